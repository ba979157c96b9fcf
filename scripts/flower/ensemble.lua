-- flower.ensemble: the seed's last stage. Several models' exported features (flower.export files)
-- are checked to describe the same images in the same order, concatenated along the feature axis,
-- and a Dropout + Dense(softmax) classifier is trained on them in memory; the models' own
-- probabilities can also be averaged.
--
--   local ensemble = require 'flower.ensemble'
--   local feats = ensemble.load{'features/resnet_tiny.h5', 'features/inception_tiny.h5'}
--   local clf = ensemble.fit(feats, {dropout = 0.5, epochs = 40, lr = 1e-3, batch_size = 64, seed = 1})
--   clf.val_acc, clf.history               -- validation accuracy of the concatenated-feature classifier
--   local probs = clf:predict(feats.x.test) -- (M, K) probabilities
--   local avg = ensemble.average(feats, 'valid')   -- mean of the models' own probabilities
--   ensemble.accuracy(avg, feats.label.valid)
local flower = require 'flower'
local files = require 'flower.files'

local ensemble = {}

local function fail(fmt, ...) error('ensemble: ' .. string.format(fmt, ...), 3) end

local function first_difference(a, b)
  for i = 1, math.max(#a, #b) do if a[i] ~= b[i] then return i end end
end

-- Loads feature files; checks that every file has the same splits, images (in the same order) and
-- labels. Returns {paths, names, dims, x = {split = (N, sum D)}, label = {split = (N) 1-based},
-- probs = {split = {per model (N, K)}}, ids, images, categories, classes}.
function ensemble.load(paths)
  local export = require 'flower.export'
  if type(paths) ~= 'table' or #paths == 0 then fail('load: expected a list of feature files') end
  local parts = {}
  for i, p in ipairs(paths) do parts[i] = export.read(p) end
  local ref = parts[1]
  local r = { paths = paths, names = {}, dims = {}, x = {}, label = ref.label, probs = {}, ids = ref.ids,
              images = ref.images, categories = ref.attrs.categories, classes = ref.attrs.classes }
  for i, e in ipairs(parts) do
    r.names[i] = e.attrs.model or files.basename(paths[i])
    local any = next(e.x)
    r.dims[i] = any and e.x[any]:size(2) or 0
    for split, imgs in pairs(ref.images) do
      local other = e.images[split]
      if not other then fail("load: %s has no '%s' split but %s has", paths[i], split, paths[1]) end
      local d = first_difference(imgs, other)
      if d then
        fail("load: %s and %s disagree on the '%s' images at row %d (%s vs %s): export both from the same split",
          paths[1], paths[i], split, d, tostring(imgs[d]), tostring(other[d]))
      end
      if ref.label[split] and not ref.label[split]:equal(e.label[split]) then
        fail("load: %s and %s have different '%s' labels", paths[1], paths[i], split)
      end
    end
    for split in pairs(e.images) do
      if not ref.images[split] then fail("load: %s has a '%s' split that %s lacks", paths[i], split, paths[1]) end
    end
    if e.attrs.classes ~= ref.attrs.classes then
      fail('load: %s has %s classes, %s has %s', paths[i], tostring(e.attrs.classes), paths[1], tostring(ref.attrs.classes))
    end
  end
  for split in pairs(ref.images) do
    local xs = {}
    for i, e in ipairs(parts) do xs[i] = e.x[split] end
    r.x[split] = #xs == 1 and xs[1] or flower.cat(xs, 2)
    r.probs[split] = {}
    for i, e in ipairs(parts) do r.probs[split][i] = e.probs[split] end
  end
  return r
end

-- Fraction of rows whose argmax is the label (labels 1-based int64).
function ensemble.accuracy(probs, labels)
  local pred = probs:argmax(2):view(-1)
  return pred:eq(labels:type(pred:dtype())):sum():item() / probs:size(1)
end

-- Mean of the models' own probabilities for a split (models without probabilities are skipped).
function ensemble.average(feats, split, which)
  local sum, n = nil, 0
  for i, p in pairs(feats.probs[split] or {}) do
    if which == nil or which[i] then
      sum = sum and (sum + p) or p:clone()
      n = n + 1
    end
  end
  if n == 0 then fail("average: no model has probabilities for '%s'", split) end
  return sum / n
end

-- Per-column mean and std over the training rows (the classifier sees standardised features:
-- each backbone's features have their own scale).
local function standardizer(x)
  local mean = x:mean(1, true)
  local std = x:std(1, true) + 1e-6
  return function(t) return (t - mean) / std end
end

local Classifier = {}
Classifier.__index = Classifier

-- probabilities (N, K) for feature rows x (host tensors in and out; computed on the classifier's device)
function Classifier:predict(x)
  if self.columns then x = x:narrow(2, self.columns[1], self.columns[2]) end
  self.model:evaluate()
  x = self.transform(x)
  if self.device ~= nil then x = x:cuda(self.device) end
  local p = self.model:predict(x, 1024):softmax(2)
  if self.device ~= nil then p = p:cpu() end
  return p
end

-- Trains Dropout(dropout) + Dense(classes) on feats.x.train, validating on feats.x.valid.
-- o: dropout (0.5), epochs (40), lr (1e-3), batch_size (64), seed (1), patience (early stopping on
-- val_loss, 8; 0: none), restore_best (true: end with the weights of the epoch of lowest val_loss), columns ({first, count}: a slice of the
-- features, e.g. one model's), log, progress, standardize (true), device (train.fit's: 'cpu' by
-- default, 'cuda', 'auto'; features stay on the host, batches go up one at a time).
function ensemble.fit(feats, o)
  o = o or {}
  local nn, optim, data, train = require 'flower.nn', require 'flower.optim', require 'flower.data', require 'flower.train'
  local dev = train.resolve_device(o.device, 'ensemble.fit')
  local xt, xv = feats.x.train, feats.x.valid
  if not xt or not feats.label.train then fail('fit: the features have no labelled train split') end
  if o.columns then
    xt = xt:narrow(2, o.columns[1], o.columns[2])
    xv = xv and xv:narrow(2, o.columns[1], o.columns[2])
  end
  local K = feats.classes
  if math.type(K) ~= 'integer' or K < 2 then K = feats.label.train:max():item() end
  local transform = o.standardize == false and function(t) return t end or standardizer(xt)
  local xtn, xvn = transform(xt), xv and transform(xv)
  local seed = o.seed or 1
  flower.manual_seed(seed)
  nn.reset_names()
  local inp = nn.Input { xt:size(2) }
  local h = nn.Dropout { rate = o.dropout or 0.5, seed = seed, name = 'dropout' }(inp)
  local model = nn.Model(inp, nn.Dense { units = K, name = 'predictions' }(h), { name = 'ensemble' })
  local tl = data.FeatureLoader { x = xtn, y = feats.label.train, batch_size = o.batch_size or 64, shuffle = true, seed = seed }
  local vl = xvn and feats.label.valid and data.FeatureLoader { x = xvn, y = feats.label.valid, batch_size = 1024 } or nil
  -- keep the best epoch's weights in memory (restored at the end)
  local best, best_w = nil, nil
  local keep = { on_epoch_end = function(_, _, _, logs)
    local v = logs.val_loss or logs.loss
    if best == nil or v < best then
      best = v
      best_w = {}
      for i, w in ipairs(model:weights()) do best_w[i] = w.tensor:clone() end   -- on the model's device
    end
  end }
  local cbs = { keep }
  if vl and o.patience ~= 0 then cbs[#cbs + 1] = train.EarlyStopping { monitor = 'val_loss', patience = o.patience or 8 } end
  local hist = train.fit(model, { train = tl, valid = vl, optimizer = optim.Adam { lr = o.lr or 1e-3 },
    epochs = o.epochs or 40, callbacks = cbs, progress = o.progress, log = o.log or function() end,
    label = o.label or 'ensemble', save_best = false, device = o.device ~= nil and (dev or 'cpu') or nil })
  if best_w and o.restore_best ~= false then
    for i, w in ipairs(model:weights()) do w.tensor:copy(best_w[i]) end
  end
  local self = setmetatable({ model = model, transform = transform, history = hist, columns = o.columns,
                              device = dev }, Classifier)
  if xv and feats.label.valid then
    self.valid_probs = self:predict(feats.x.valid)
    self.val_acc = ensemble.accuracy(self.valid_probs, feats.label.valid)
  end
  return self
end

-- The column ranges {first, count} of each model's features in the concatenation.
function ensemble.columns(feats)
  local r, first = {}, 1
  for i, d in ipairs(feats.dims) do r[i] = { first, d }; first = first + d end
  return r
end

return ensemble
