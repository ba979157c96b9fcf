-- flower.ensemble: the seed's last stage. Several models' exported features (flower.export files)
-- are checked to describe the same images in the same order, and a Dropout + Dense(softmax)
-- classifier is trained on their concatenation; the models' own probabilities can also be averaged.
--
--   local ensemble = require 'flower.ensemble'
--   local feats = ensemble.load({'features/resnet_tiny.h5', 'features/inception_tiny.h5'},
--                               {memory_budget = '8G'})
--   local clf = ensemble.fit(feats, {dropout = 0.5, epochs = 40, lr = 1e-3, batch_size = 64, seed = 1})
--   clf.val_acc, clf.history, clf.valid_pred  -- validation accuracy, history, predicted labels (1-based)
--   local probs = clf:predict(feats, 'test')   -- (M, K) probabilities, in the files' row order
--   ensemble.average(feats, 'test')            -- mean of the models' own probabilities (M, K)
--   ensemble.average_accuracy(feats, 'valid')  -- its accuracy, streamed
--
-- Memory: the features are never held concatenated. When all the files' features fit in the
-- memory budget (default half of RAM) each file's datasets are read whole once ("resident");
-- otherwise every pass streams them from the files in blocks of rows (`block_rows`, 4096: 128 MiB
-- for four 2048-column models), and a batch is the rows of the current block with every file's
-- columns side by side. Either way the batches are the same: the blocks come in an order drawn
-- from (seed, epoch), the rows of each block in an order drawn from (seed, epoch, block), so a
-- resumed fit sees the batches an uninterrupted one saw. The classifier standardises its input
-- with per-column statistics from one streaming pass over the training rows (float64, blocks
-- combined as Chan et al.), applied in place to each batch. A batch is valid until the next one
-- is asked for: its tensors are then freed (not left to Lua's collector).
local flower = require 'flower'
local files = require 'flower.files'
local device = require 'flower.device'

local ensemble = {}

ensemble.BLOCK_ROWS = 4096

local function fail(fmt, ...) error('ensemble: ' .. string.format(fmt, ...), 3) end

local function C() return require('flower.core')._data end

local function first_difference(a, b)
  for i = 1, math.max(#a, #b) do if a[i] ~= b[i] then return i end end
end

-- Checks that two lists name the same rows in the same order; the error names the first row that
-- differs (a shorter list differs at its end). what_a, what_b: descriptions for the message.
function ensemble.check_join(what, what_a, a, what_b, b)
  local d = first_difference(a, b)
  if d then
    error(string.format("%s: %s and %s disagree at row %d of %d/%d (%s vs %s)", what, what_a, what_b, d, #a, #b,
      a[d] == nil and 'nothing' or ("'" .. tostring(a[d]) .. "'"),
      b[d] == nil and 'nothing' or ("'" .. tostring(b[d]) .. "'")), 2)
  end
end

---------------------------------------------------------------------------------------------------
-- Feature sets: several files' columns for the same rows

local Features = {}
Features.__index = Features

-- feats:rows(split, first, count [, columns]) -> (count, D) float32: rows first..first+count-1 with
-- every part's columns (or the columns {first, count} of the concatenation), read from the files
-- or narrowed from the resident tensors.
function Features:rows(split, first, count, columns)
  local c0, c1 = 1, self.D
  if columns then c0, c1 = columns[1], columns[1] + columns[2] - 1 end
  local pieces, base = {}, 0
  for _, p in ipairs(self.parts) do
    local lo, hi = math.max(c0, base + 1), math.min(c1, base + p.dim)
    if lo <= hi then
      local t = p.x and p.x[split]:narrow(1, first, count) or p.reader:x_rows(split, first, count)
      if lo > base + 1 or hi < base + p.dim then
        local cols = t:narrow(2, lo - base, hi - lo + 1)
        t:free()   -- the view holds the rows now; garbage would hold them until Lua collects it
        t = cols
      end
      pieces[#pieces + 1] = t
    end
    base = base + p.dim
  end
  if #pieces == 1 then
    local t = pieces[1]
    if t:is_contiguous() then return t end
    local c = t:contiguous()
    t:free()
    return c
  end
  local x = flower.cat(pieces, 2)
  for _, t in ipairs(pieces) do t:free() end   -- views of resident tensors just let go of them
  return x
end

-- Starts reading rows first..first+count-1 of the streamed parts in the background (the kernel
-- reads them while the current block is computed on; resident parts need nothing). probs: the
-- models' probabilities instead of their features.
function Features:prefetch(split, first, count, probs)
  if not first or self.resident or not self.prefetching then return end
  for _, p in ipairs(self.parts) do
    if p.reader then
      if probs then p.reader:prefetch_probs(split, first, count) else p.reader:prefetch(split, first, count) end
    end
  end
end

-- the models' own probabilities for rows first..first+count-1: a list (per part, nil without)
function Features:probs_rows(split, first, count)
  local out = {}
  for i, p in ipairs(self.parts) do
    if p.probs then out[i] = p.probs[split] and p.probs[split]:narrow(1, first, count)
    else out[i] = p.reader:probs_rows(split, first, count) end
  end
  return out
end

function Features:close()
  for _, p in ipairs(self.parts) do if p.reader then p.reader:close() end end
end
Features.__close = Features.close

-- The whole concatenation of a split (small data sets and tests only: it is the copy streaming avoids).
function Features:x(split) return self:rows(split, 1, self.n[split]) end

-- bytes of what a resident feature set holds: every split's features and probabilities (float32)
local function feature_bytes(readers)
  local b = 0
  for _, r in ipairs(readers) do
    for _, s in ipairs(r.splits) do
      b = b + r.rows[s] * r.dim * 4
      if r:has_probs(s) then b = b + r.rows[s] * r.file:shape('/' .. s .. '_probs')[2] * 4 end
    end
  end
  return b
end

-- Opens feature files and checks that every file has the same splits, row counts, ids, images (in
-- the same order), labels and classes; each mismatch is an error naming the files and the first
-- row that differs. o: memory_budget (bytes or '8G'; default half of RAM), resident (true / false:
-- force whole-file reads or streaming; default: resident when the features fit the budget),
-- block_rows, prefetch (default true: a streamed pass asks the kernel for the next block while it
-- uses this one; false for measuring, or for file systems where read-ahead advice costs). Returns
-- a feature set {paths, names, dims, D, n = {split = rows}, splits, label =
-- {split = (N) int64 1-based}, ids = {split = list}, index = {split = (N) int64: each row's 1-based
-- position in the data set exported, where the files record it}, requested = {split = images asked
-- for}, classes, categories, resident, budget, bytes}.
function ensemble.load(paths, o)
  o = o or {}
  local export = require 'flower.export'
  local memory = require 'flower.memory'
  if type(paths) ~= 'table' or #paths == 0 then fail('load: expected a list of feature files') end
  local readers = {}
  local ok, err = pcall(function()
    for i, p in ipairs(paths) do readers[i] = export.open(p) end
  end)
  if not ok then
    for _, r in ipairs(readers) do r:close() end
    error(err, 0)
  end
  local ref = readers[1]
  local self = setmetatable({ paths = paths, names = {}, dims = {}, parts = {}, n = {}, splits = ref.splits,
    label = {}, ids = {}, index = {}, requested = {}, classes = ref.attrs.classes, categories = ref.attrs.categories },
    Features)
  ok, err = pcall(function()
    for _, s in ipairs(ref.splits) do
      self.n[s] = ref.rows[s]
      self.ids[s] = ref:ids(s)
      self.label[s] = ref:labels(s)
      self.index[s] = ref:index(s)
      self.requested[s] = ref.attrs[s .. '_rows']
    end
    local ref_images = {}
    for _, s in ipairs(ref.splits) do ref_images[s] = ref:images(s) end
    for i, r in ipairs(readers) do
      self.names[i] = r.attrs.model or files.basename(paths[i])
      self.dims[i] = r.dim
      if i > 1 then
        for _, s in ipairs(ref.splits) do
          if not r.rows[s] then fail("load: %s has no '%s' split but %s has", paths[i], s, paths[1]) end
          if r.rows[s] ~= ref.rows[s] then
            fail("load: %s has %d '%s' rows, %s has %d: export both from the same split", paths[i], r.rows[s], s,
              paths[1], ref.rows[s])
          end
          local images = r:images(s)
          local d = first_difference(ref_images[s], images)
          if d then
            fail("load: %s and %s disagree on the '%s' images at row %d (%s vs %s): export both from the same split",
              paths[1], paths[i], s, d, tostring(ref_images[s][d]), tostring(images[d]))
          end
          ensemble.check_join(string.format("ensemble: load: the '%s' ids", s), paths[1], self.ids[s], paths[i], r:ids(s))
          local lab = r:labels(s)
          if (lab == nil) ~= (self.label[s] == nil) or (lab and not lab:equal(self.label[s])) then
            local la, lb = self.label[s] and self.label[s]:totable() or {}, lab and lab:totable() or {}
            local k = first_difference(la, lb)
            fail("load: %s and %s have different '%s' labels (first at row %d: %s vs %s)", paths[1], paths[i], s, k,
              tostring(la[k] and la[k] - 1), tostring(lb[k] and lb[k] - 1))
          end
        end
        for _, s in ipairs(r.splits) do
          if not ref.rows[s] then fail("load: %s has a '%s' split that %s lacks", paths[i], s, paths[1]) end
        end
        if r.attrs.classes ~= ref.attrs.classes then
          fail('load: %s has %s classes, %s has %s', paths[i], tostring(r.attrs.classes), paths[1], tostring(ref.attrs.classes))
        end
      end
    end
  end)
  if not ok then
    for _, r in ipairs(readers) do r:close() end
    error(err, 0)
  end
  self.D = 0
  for _, d in ipairs(self.dims) do self.D = self.D + d end
  self.bytes = feature_bytes(readers)
  self.budget = memory.budget(o.memory_budget, 'ensemble: memory_budget')
  if o.resident ~= nil then self.resident = o.resident else self.resident = self.bytes <= self.budget end
  self.block_rows = o.block_rows or ensemble.BLOCK_ROWS
  self.prefetching = o.prefetch ~= false
  for i, r in ipairs(readers) do
    local part = { dim = r.dim, path = paths[i], reader = r }
    if self.resident then
      part.x, part.probs = {}, {}
      for _, s in ipairs(r.splits) do part.x[s] = r:x(s); part.probs[s] = r:probs(s) end
      r:close()
      part.reader = nil
    end
    self.parts[i] = part
  end
  return self
end

-- A feature set over tensors already in memory: {x = {split = (N, D)}, label = {split = (N) 1-based},
-- classes, ids = {split = list} (optional)}.
function ensemble.from_tensors(t)
  if type(t) ~= 'table' or type(t.x) ~= 'table' then fail('expected {x = {split = tensor}, label = {...}}') end
  local self = setmetatable({ names = { 'features' }, n = {}, splits = {}, label = {}, ids = t.ids or {},
    classes = t.classes, categories = t.categories, resident = true, block_rows = t.block_rows or ensemble.BLOCK_ROWS,
    parts = { { x = {}, probs = t.probs or {} } } }, Features)
  for _, s in ipairs({ 'train', 'valid', 'test' }) do
    local x = t.x[s]
    if x then
      if x:dim() ~= 2 then fail("the '%s' features must be (rows, columns), got %d dims", s, x:dim()) end
      if x:dtype() ~= 'float32' then x = x:float() end
      self.parts[1].x[s] = x:contiguous()
      self.n[s] = x:size(1)
      self.splits[#self.splits + 1] = s
      self.parts[1].dim = x:size(2)
      local lab = t.label and t.label[s]
      if lab and lab:size(1) ~= self.n[s] then
        fail("the '%s' labels have %d rows, the features %d", s, lab:size(1), self.n[s])
      end
      if lab then self.label[s] = lab:type('int64'):contiguous() end
    end
  end
  self.dims = { self.parts[1].dim }
  self.D = self.parts[1].dim
  return self
end

local function as_features(feats)
  if type(feats) == 'table' and type(feats.rows) == 'function' then return feats end   -- a feature set (or a view of one)
  return ensemble.from_tensors(feats)
end

---------------------------------------------------------------------------------------------------
-- Streaming: blocks of rows, batches from them

-- Per-column mean and standard deviation (unbiased, + 1e-6) of a split, (1, D) float32 each, from
-- one pass in blocks: float64 block means and squared deviations, combined as Chan et al. do.
function ensemble.statistics(feats, split, columns)
  feats = as_features(feats)
  local n = feats.n[split]
  if not n or n < 2 then fail("statistics: the '%s' split has %s rows, need 2 or more", split, tostring(n)) end
  local mean, m2, seen
  local step = math.min(feats.block_rows, 1024)
  for first = 1, n, feats.block_rows do
    local count = math.min(feats.block_rows, n - first + 1)
    local block = feats:rows(split, first, count, columns)
    feats:prefetch(split, first + count, feats.block_rows)
    for f = 1, count, step do
      local c = math.min(step, count - f + 1)
      local rows = block:narrow(1, f, c)
      local x = rows:double()
      rows:free()
      local bm = x:mean(1, true)
      x:sub_(bm)
      local bm2 = x:mul_(x):sum(1, true)
      x:free()
      if not mean then mean, m2, seen = bm, bm2, c
      else
        local total = seen + c
        local delta = bm:sub_(mean)
        mean:add_(delta * (c / total))
        m2:add_(bm2):add_(delta:mul_(delta):mul_(seen * c / total))
        seen = total
        delta:free(); bm2:free()
      end
    end
    block:free()
  end
  local std = m2:div_(n - 1):sqrt_():add_(1e-6)
  return mean:float(), std:float()
end

local Loader = {}
Loader.__index = Loader
Loader.__len = function(self) return (self.n + self.batch_size - 1) // self.batch_size end

-- A loader over a split for train.fit / train.evaluate: batches {x = (b, D) standardised with
-- (mean, std) when given, y = (b) labels, index = rows (1-based), n = b}. o: batch_size, shuffle,
-- seed, columns, mean, std.
function ensemble.loader(feats, split, o)
  feats = as_features(feats)
  local n = feats.n[split]
  if not n then fail("loader: no '%s' split", tostring(split)) end
  return setmetatable({ feats = feats, split = split, n = n, batch_size = o.batch_size or 64, shuffle = o.shuffle or false,
    seed = o.seed or 0, columns = o.columns, mean = o.mean, std = o.std, labels = feats.label[split] }, Loader)
end

local function free_batch(b)
  if b then
    b.x:free()
    if b.y then b.y:free() end
  end
end

-- The order of an epoch: blocks (first row, count) and, per block, the order of its rows.
local function block_order(self, e)
  local B = self.feats.block_rows
  local nb = (self.n + B - 1) // B
  local order
  if self.shuffle then order = C().permutation(nb, C().epoch_seed(self.seed, e))
  else order = {} for i = 1, nb do order[i] = i end end
  return order, B
end

local function rows_order(self, e, b, count)
  if not self.shuffle then
    local r = {}
    for i = 1, count do r[i] = i end
    return r
  end
  return C().permutation(count, C().sample_seed(self.seed, e, b) & 0xffffffff)
end

function Loader:epoch(e)
  e = e or 1
  local order, B = block_order(self, e)
  local feats, split, bs = self.feats, self.split, self.batch_size
  local bi, block, perm, pos, first = 0, nil, nil, 1, 0
  local prev
  local function next_block()
    if block then block:free() end
    bi = bi + 1
    if bi > #order then block = nil; return false end
    first = (order[bi] - 1) * B + 1
    local count = math.min(B, self.n - first + 1)
    block = feats:rows(split, first, count, self.columns)
    feats:prefetch(split, order[bi + 1] and (order[bi + 1] - 1) * B + 1, B)   -- read while this block is used
    perm = rows_order(self, e, order[bi], count)
    pos = 1
    return true
  end
  return function()
    free_batch(prev)
    prev = nil
    local pieces, index = {}, {}
    while #index < bs do
      if not block or pos > #perm then
        if not next_block() then break end
      end
      local take = math.min(bs - #index, #perm - pos + 1)
      local local_idx = table.move(perm, pos, pos + take - 1, 1, {})
      for i = 1, take do index[#index + 1] = first + local_idx[i] - 1 end
      pieces[#pieces + 1] = C().gather_rows(block, local_idx)
      pos = pos + take
    end
    if #index == 0 then
      if block then block:free(); block = nil end
      return nil
    end
    local x = pieces[1]
    if #pieces > 1 then
      x = flower.cat(pieces, 1)
      for _, p in ipairs(pieces) do p:free() end
    end
    if self.mean then x:sub_(self.mean):div_(self.std) end
    -- the step's own temporaries (activations, gradients) are left to Lua's collector, which does
    -- not see their bytes: advance it as if the batch's bytes were allocated, as the image loader does
    collectgarbage('step', x:numel() * 4 // 1024)
    prev = { x = x, y = self.labels and C().gather_rows(self.labels, index) or nil, index = index, n = #index }
    return prev
  end
end

---------------------------------------------------------------------------------------------------
-- Probabilities and accuracy

-- Fraction of rows whose argmax is the label (labels 1-based int64).
function ensemble.accuracy(probs, labels)
  local pred = probs:argmax(2):view(-1)
  return pred:eq(labels:type(pred:dtype())):sum():item() / probs:size(1)
end

-- calls fn(first, count, list of the parts' probabilities) per block of a split, in row order
local function each_prob_block(feats, split, which, fn)
  local n = feats.n[split]
  if not n then fail("average: no '%s' split", tostring(split)) end
  for first = 1, n, feats.block_rows do
    local count = math.min(feats.block_rows, n - first + 1)
    local ps = feats:probs_rows(split, first, count)
    feats:prefetch(split, first + count, feats.block_rows, true)
    local sum, k = nil, 0
    for i, p in pairs(ps) do
      if which == nil or which[i] then
        if sum then sum:add_(p) else sum = p:clone() end
        k = k + 1
      end
      p:free()
    end
    if k == 0 then fail("average: no model has probabilities for '%s'", split) end
    fn(first, count, sum:div_(k))
    sum:free()
  end
end

-- Mean of the models' own probabilities for a split, (N, K) (models without probabilities are skipped).
function ensemble.average(feats, split, which)
  feats = as_features(feats)
  local out
  each_prob_block(feats, split, which, function(first, count, p)
    out = out or flower.empty({ feats.n[split], p:size(2) }, 'float32')
    out:narrow(1, first, count):copy(p)
  end)
  return out
end

-- Accuracy of the averaged probabilities and the predicted labels (1-based), streamed.
-- accuracy, predicted labels and top-5 accuracy (nil with 5 classes or fewer) of the averaged
-- probabilities, block by block
function ensemble.average_accuracy(feats, split, which)
  feats = as_features(feats)
  local labels = feats.label[split]
  if not labels then fail("average_accuracy: the '%s' split has no labels", split) end
  local right, right5, pred = 0, 0, {}
  each_prob_block(feats, split, which, function(first, count, p)
    local top = p:argmax(2):view(-1)
    local y = labels:narrow(1, first, count)
    right = right + top:eq(y:type(top:dtype())):sum():item()
    if p:size(2) > 5 then right5 = right5 + require('flower.nn').top_k_accuracy(p, y, 5) * count end
    for i, v in ipairs(top:totable()) do pred[first + i - 1] = v end
  end)
  local n = feats.n[split]
  return right / n, pred, (feats.classes or 0) > 5 and right5 / n or nil
end

---------------------------------------------------------------------------------------------------
-- The classifier

local Classifier = {}
Classifier.__index = Classifier

-- probabilities of one batch of standardised rows (host in, host out)
local function batch_probs(self, x)
  return device.move(self.model:forward(device.move(x, self.device)):softmax(2), nil)
end

-- clf:predict(x) for feature rows (N, D) tensor, or clf:predict(feats, split) streamed from a
-- feature set; returns (N, K) probabilities on the host, in row order.
function Classifier:predict(src, split)
  self.model:evaluate()
  if flower.is_tensor(src) then
    local x = src
    if self.columns then x = x:narrow(2, self.columns[1], self.columns[2]) end
    x = x:clone():sub_(self.mean):div_(self.std)
    local out = {}
    for first = 1, x:size(1), 1024 do
      out[#out + 1] = batch_probs(self, x:narrow(1, first, math.min(1024, x:size(1) - first + 1)))
    end
    x:free()
    return #out == 1 and out[1] or flower.cat(out, 1)
  end
  local feats = as_features(src)
  local probs
  for b in ensemble.loader(feats, split, { batch_size = 1024, columns = self.columns, mean = self.mean, std = self.std }):epoch(1) do
    local p = batch_probs(self, b.x)
    probs = probs or flower.empty({ feats.n[split], p:size(2) }, 'float32')
    probs:narrow(1, b.index[1], b.n):copy(p)
    p:free()
  end
  return probs
end

-- predicted labels (1-based list) and accuracy (when the split has labels), streamed
function Classifier:evaluate(feats, split)
  self.model:evaluate()
  feats = as_features(feats)
  local pred, right, right5, labels = {}, 0, 0, feats.label[split]
  local top5 = (feats.classes or 0) > 5
  for b in ensemble.loader(feats, split, { batch_size = 1024, columns = self.columns, mean = self.mean, std = self.std }):epoch(1) do
    local p = batch_probs(self, b.x)
    local top = p:argmax(2):view(-1)
    if labels then
      right = right + top:eq(b.y:type(top:dtype())):sum():item()
      if top5 then right5 = right5 + require('flower.nn').top_k_accuracy(p, b.y, 5) * b.n end
    end
    for i, v in ipairs(top:totable()) do pred[b.index[i]] = v end
    p:free()
  end
  local n = feats.n[split]
  return pred, labels and right / n or nil, (labels and top5) and right5 / n or nil
end

-- Trains Dropout(dropout) + Dense(classes) on the train split, validating on valid.
-- feats: ensemble.load's feature set, or {x = {split = tensor}, label = {...}, classes} (in memory).
-- o: dropout (0.5), epochs (40), lr (1e-3), batch_size (64), seed (1), patience (early stopping on
-- val_loss, 8; 0: none), restore_best (true: end with the weights of the epoch of lowest
-- val_loss), columns ({first, count}: a slice of the features, e.g. one model's), log, progress, standardize (true), device (train.fit's: 'cpu' by
-- default, 'cuda', 'auto'; features stay on the host, batches go up one at a time),
-- checkpoint_dir and resume (train.fit's: an interrupted fit continues bit-identically; the best
-- epoch's weights are then kept in checkpoint_dir/best.h5 instead of memory).
-- Returns the classifier {model, mean, std, history, val_acc, valid_pred}, or one with
-- interrupted = reason when train.fit was interrupted.
function ensemble.fit(feats, o)
  o = o or {}
  feats = as_features(feats)
  local nn, optim, train = require 'flower.nn', require 'flower.optim', require 'flower.train'
  local dev = device.resolve(o.device, 'ensemble.fit')
  if not feats.n.train or not feats.label.train then fail('fit: the features have no labelled train split') end
  local D = o.columns and o.columns[2] or feats.D
  local K = feats.classes
  if math.type(K) ~= 'integer' or K < 2 then K = feats.label.train:max():item() end
  local mean, std
  if o.standardize == false then mean, std = flower.zeros({ 1, D }), flower.ones({ 1, D })
  else mean, std = ensemble.statistics(feats, 'train', o.columns) end
  local seed = o.seed or 1
  flower.manual_seed(seed)
  nn.reset_names()
  local inp = nn.Input { D }
  local h = nn.Dropout { rate = o.dropout or 0.5, seed = seed, name = 'dropout' }(inp)
  local model = nn.Model(inp, nn.Dense { units = K, name = 'predictions' }(h), { name = 'ensemble' })
  local common = { columns = o.columns, mean = mean, std = std }
  local function loader_opts(t)
    for k, v in pairs(common) do t[k] = v end
    return t
  end
  local tl = ensemble.loader(feats, 'train', loader_opts { batch_size = o.batch_size or 64, shuffle = true, seed = seed })
  local vl = feats.n.valid and feats.label.valid and ensemble.loader(feats, 'valid', loader_opts { batch_size = 1024 }) or nil
  local cbs = {}
  local best_w
  if not o.checkpoint_dir then
    -- keep the best epoch's weights in memory (restored at the end)
    local best
    cbs[1] = { on_epoch_end = function(_, _, _, logs)
      local v = logs.val_loss or logs.loss
      if best == nil or v < best then
        best = v
        best_w = {}
        for i, w in ipairs(model:weights()) do best_w[i] = w.tensor:clone() end   -- on the model's device
      end
    end }
  end
  if vl and o.patience ~= 0 then cbs[#cbs + 1] = train.EarlyStopping { monitor = 'val_loss', patience = o.patience or 8 } end
  local hist = train.fit(model, { train = tl, valid = vl, optimizer = optim.Adam { lr = o.lr or 1e-3 },
    epochs = o.epochs or 40, callbacks = cbs, progress = o.progress, log = o.log or function() end,
    label = o.label or 'ensemble', device = o.device ~= nil and (dev or 'cpu') or nil,
    checkpoint_dir = o.checkpoint_dir, resume = o.resume,
    save_best = o.checkpoint_dir and (vl and 'val_loss' or 'loss') or false, distributed = o.distributed })
  local self = setmetatable({ model = model, mean = mean, std = std, history = hist, columns = o.columns,
                              device = dev }, Classifier)
  if hist.stopped == 'interrupted' then self.interrupted = hist.interrupted; return self end
  if o.restore_best ~= false then
    if best_w then
      for i, w in ipairs(model:weights()) do w.tensor:copy(best_w[i]) end
    elseif o.checkpoint_dir and files.exists(files.join(o.checkpoint_dir, 'best.h5')) then
      nn.load_checkpoint(files.join(o.checkpoint_dir, 'best.h5'), model)
    end
  end
  if vl then self.valid_pred, self.val_acc, self.val_top5 = self:evaluate(feats, 'valid') end
  return self
end

-- The column ranges {first, count} of each model's features in the concatenation.
function ensemble.columns(feats)
  local r, first = {}, 1
  for i, d in ipairs(feats.dims) do r[i] = { first, d }; first = first + d end
  return r
end

return ensemble
