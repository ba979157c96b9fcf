-- flower.data: data sets, splits, threaded image loaders, feature loaders and pixel statistics.
--
--   local data = require 'flower.data'
--   local all = data.kaggle('data/flowers')               -- train.json + train/category_<id+1>/
--   local train, valid = all:split{test_size = 0.2, seed = 42}
--   local loader = data.Loader{train, batch_size = 32, shuffle = true, seed = 1, workers = 2,
--                              transform = 'train', size = 224}
--   for e = 1, epochs do
--     for batch in loader:epoch(e) do   -- batch.x (N,224,224,3) float32 0..255 RGB, batch.y (N) int64
--       ...
--     end
--   end
--   print(loader:stats().skipped)
--
-- Data sets. A data set is a table {paths, labels, ids, categories, num_classes, root, name} with
-- methods split, subset and #ds. `labels[i]` is a class index 1..num_classes (Lua's and the tensor
-- library's 1-based convention: argmax returns 1-based indices, so predictions compare directly);
-- `categories[label]` is the original category: the Kaggle category_id, or the folder name.
--   data.kaggle(root)       the Kaggle FGVCx Flowers training set: root/train.json holds
--                           `annotations` = [{image_id, category_id}, ...]; the image of an annotation
--                           is root/train/category_<category_id + 1>/<image_id>.jpg. The classes are
--                           the distinct category_ids present, in increasing order.
--   data.kaggle_test(root)  root/test.json `images` = [{file_name, id}, ...] -> root/test/<file_name>;
--                           no labels; ids[i] is the image id (for the submission's `id` column).
--   data.folder(root)       root/<class>/<image>.jpg: one directory per class, sorted by name.
--
-- Splits. ds:split{test_size = 0.2, seed = 42} cuts the data set as scikit-learn's
-- train_test_split(X, test_size=0.2, random_state=42) does, index for index: p = numpy's
-- RandomState(seed).permutation(n) (MT19937 seeded with init_genrand(seed); a Fisher-Yates shuffle
-- from the last element down, each swap partner drawn by masked rejection from 32-bit outputs),
-- n_test = ceil(test_size * n) (test_size < 1; an integer >= 1 is a count), valid = p[1..n_test],
-- train = p[n_test+1..n], both in that order. Integer arithmetic only, so every machine gets the
-- same split. With stratify = true: walk the same permutation p and send each class's first
-- round(test_size * n_c) members (at least 1 and at most n_c - 1 when the class has 2 or more) to
-- valid, the rest to train, both in p's order -- every class is then represented in proportion.
--
-- Loaders. data.Loader{ds, batch_size = 32, shuffle = false, seed = 0, workers = 2, prefetch,
-- drop_last = false, transform = 'eval', size = 224, dtype = 'float32', preprocess = 'none',
-- strict = false, warn = io.stderr, pin_memory = false}. Worker threads in C decode JPEGs into a bounded ring of
-- `prefetch` batches (default 2 x workers): memory stays bounded whatever the data set's size.
-- A finished batch becomes a tensor without a copy; the loader tells Lua's collector about its
-- size (so finished batches are freed as fast as new ones come) and reuses up to 4 freed batch
-- buffers (fresh memory costs a page fault per 4 KB on first write).
-- Epoch e's order and every sample's augmentation are functions of (seed, e) only, so the batches
-- are identical for any number of workers. `#loader` is the number of batches per epoch.
-- pin_memory = true: batches are decoded into page-locked host memory from the CUDA backend, which
-- the GPU reads by DMA (flower.cuda.to_device_async, as flower.train does with device = 'cuda')
-- while the workers decode the next batches; a buffer is refilled only once its upload is done.
-- Without a CUDA build or device it quietly uses plain memory: loader:pinned() says which.
--   transform = 'eval'   decode, scale the shorter side to size / 0.875, center crop size x size
--               'train'  Inception-style random-resized crop (area 8%..100%, aspect 3/4..4/3),
--                        resized to size x size, random horizontal flip
--               'resize' the whole image to size x size, aspect ratio not kept (Keras load_img)
--               or a table {mode = 'center'|'random_resized'|'resize', size, crop_frac, scale,
--               ratio, flip, brightness, contrast, saturation, filter = 'bilinear'|'box'|'bicubic'|
--               'lanczos', dct_scaling = true, fast = false}
-- Preprocessing happens in one place: by default the loader hands out raw RGB 0..255 (float32, or
-- uint8 with dtype = 'uint8') and the model's own preprocessing layer normalises. preprocess =
-- 'caffe' | 'tf' | 'torch' applies Keras's preprocess_input modes in the loader instead (float32
-- only) -- then build the model without its preprocessing layer.
-- Bad files (missing, empty, not a JPEG, truncated, corrupt): by default the sample is dropped
-- from its batch with one warning line per file, naming the file and the reason, and counted in
-- loader:stats(); strict = true raises a Lua error instead.
--
-- data.FeatureLoader{x = (N, D) tensor, y = (N) tensor or nil, batch_size, shuffle, seed,
-- drop_last} batches pre-extracted features the same way (the ensemble stage).
--
-- data.stats(ds, {workers = 2, eighths = 8, progress = true}) -> mean {r, g, b}, std {r, g, b}
-- (0..255 scale) over every pixel of every image, in one pass with exact integer sums.
local flower = require 'flower'
local core = require 'flower.core'
local files = require 'flower.files'

local C = core._data
local data = {}

---------------------------------------------------------------------------------------------------
-- Data sets

local Dataset = {}
Dataset.__index = Dataset
Dataset.__len = function(self) return #self.paths end

local function new_dataset(t)
  t.ids = t.ids or {}
  return setmetatable(t, Dataset)
end
data.new_dataset = new_dataset

-- A data set of the samples at `indices` (1-based), in that order.
function Dataset:subset(indices, name)
  local paths, labels, ids = {}, self.labels and {} or nil, {}
  for i, k in ipairs(indices) do
    if math.type(k) ~= 'integer' or k < 1 or k > #self.paths then
      error(string.format('Dataset:subset: index %d is %s, expected an integer in 1..%d', i, tostring(k), #self.paths), 2)
    end
    paths[i] = self.paths[k]
    if labels then labels[i] = self.labels[k] end
    ids[i] = self.ids[k]
  end
  return new_dataset{ paths = paths, labels = labels, ids = ids, categories = self.categories,
                      num_classes = self.num_classes, root = self.root, name = name or self.name }
end

-- n_test as scikit-learn's _validate_shuffle_split computes it
local function test_count(test_size, n, fname)
  if math.type(test_size) == 'integer' and test_size >= 1 then
    if test_size >= n then error(string.format('%s: test_size %d must be smaller than the %d samples', fname, test_size, n), 3) end
    return test_size
  end
  if type(test_size) ~= 'number' or not (test_size > 0 and test_size < 1) then
    error(fname .. ': test_size must be a fraction in (0, 1) or a count >= 1, got ' .. tostring(test_size), 3)
  end
  local k = math.ceil(test_size * n)
  if k >= n then error(string.format('%s: test_size %g leaves no training samples out of %d', fname, test_size, n), 3) end
  return math.tointeger(k)
end

-- ds:split{test_size = 0.2, seed = 42, stratify = false} -> train, valid (see the top of the file)
function Dataset:split(opts)
  opts = opts or {}
  local n = #self.paths
  local seed = opts.seed or 42
  if math.type(seed) ~= 'integer' or seed < 0 or seed > 0xFFFFFFFF then
    error('Dataset:split: seed must be an integer in 0..2^32-1, got ' .. tostring(seed), 2)
  end
  local test_size = opts.test_size or 0.2
  local n_test = test_count(test_size, n, 'Dataset:split')
  local p = C.permutation(n, seed)
  local tr, va = {}, {}
  if not opts.stratify then
    for i = 1, n_test do va[i] = p[i] end
    for i = n_test + 1, n do tr[#tr + 1] = p[i] end
  else
    if not self.labels then error('Dataset:split: stratify needs labels', 2) end
    local frac = math.type(test_size) == 'integer' and test_size / n or test_size
    local count, quota, taken = {}, {}, {}
    for i = 1, n do local c = self.labels[i]; count[c] = (count[c] or 0) + 1 end
    for c, nc in pairs(count) do
      local q = math.floor(frac * nc + 0.5)
      if nc >= 2 then q = math.max(1, math.min(nc - 1, q)) end
      quota[c], taken[c] = q, 0
    end
    for i = 1, n do
      local k = p[i]
      local c = self.labels[k]
      if taken[c] < quota[c] then taken[c] = taken[c] + 1; va[#va + 1] = k else tr[#tr + 1] = k end
    end
  end
  local base = self.name or 'data'
  return self:subset(tr, base .. ':train'), self:subset(va, base .. ':valid')
end

-- Counts per class: {[label] = n}
function Dataset:class_counts()
  local c = {}
  for _, l in ipairs(self.labels or {}) do c[l] = (c[l] or 0) + 1 end
  return c
end

local function read_json(path, fname)
  local f, err = io.open(path, 'rb')
  if not f then error(string.format('%s: cannot read %s: %s', fname, path, tostring(err)), 3) end
  local text = f:read('a')
  f:close()
  if #text == 0 then error(string.format('%s: %s is empty, expected JSON', fname, path), 3) end
  local cjson = require 'cjson.safe'
  local v, jerr = cjson.decode(text)
  if v == nil then error(string.format('%s: %s is not valid JSON: %s', fname, path, tostring(jerr)), 3) end
  if type(v) ~= 'table' then error(string.format('%s: %s: expected a JSON object, got %s', fname, path, type(v)), 3) end
  return v
end

-- An integer field of a JSON record (cjson decodes numbers as floats): integral numbers only.
local function json_int(rec, key, where, fname, path)
  local v = rec[key]
  local i = type(v) == 'number' and math.tointeger(v) or nil
  if i == nil then
    error(string.format("%s: %s: %s has %s '%s', expected an integer", fname, path, where,
      v == nil and 'no' or ('a ' .. type(v) .. ' ' .. tostring(v) .. ' as'), key), 3)
  end
  return i
end

local function json_list(v, key, fname, path, what)
  local l = v[key]
  if type(l) ~= 'table' then
    error(string.format("%s: %s: expected a list '%s' of %s, got %s", fname, path, key, what,
      l == nil and 'no such key' or type(l)), 3)
  end
  return l
end

local function id_string(v)
  if math.type(v) == 'integer' then return string.format('%d', v) end
  return tostring(v)
end

-- data.kaggle(root [, opts]) -> the training set of the Kaggle FGVCx Flowers layout.
-- opts.json (default root/train.json), opts.name.
function data.kaggle(root, opts)
  opts = opts or {}
  local fname = 'data.kaggle'
  if type(root) ~= 'string' then error(fname .. ': expected the data set directory, got ' .. type(root), 2) end
  local path = opts.json or files.join(root, 'train.json')
  local v = read_json(path, fname)
  local ann = json_list(v, 'annotations', fname, path, '{image_id, category_id}')
  local cats, seen = {}, {}
  local recs = {}
  for i, a in ipairs(ann) do
    if type(a) ~= 'table' then error(string.format('%s: %s: annotations[%d] is a %s, expected an object', fname, path, i, type(a)), 2) end
    local where = string.format('annotations[%d]', i)
    local img = a.image_id
    if type(img) ~= 'number' and type(img) ~= 'string' then
      error(string.format("%s: %s: %s has no 'image_id' (expected a number or string)", fname, path, where), 2)
    end
    if type(img) == 'number' then img = json_int(a, 'image_id', where, fname, path) end
    local cat = json_int(a, 'category_id', where, fname, path)
    if cat < 0 then error(string.format('%s: %s: %s has category_id %d, expected >= 0', fname, path, where, cat), 2) end
    recs[i] = { img, cat }
    if not seen[cat] then seen[cat] = true; cats[#cats + 1] = cat end
  end
  if #recs == 0 then error(string.format("%s: %s: 'annotations' is empty", fname, path), 2) end
  table.sort(cats)
  local label_of = {}
  for l, c in ipairs(cats) do label_of[c] = l end
  local paths, labels, ids = {}, {}, {}
  local base = files.join(root, 'train')  -- (string.format per record: 700k records load in a second)
  for i, r in ipairs(recs) do
    paths[i] = string.format('%s/category_%d/%s.jpg', base, r[2] + 1, id_string(r[1]))
    labels[i] = label_of[r[2]]
    ids[i] = r[1]
  end
  return new_dataset{ paths = paths, labels = labels, ids = ids, categories = cats, num_classes = #cats,
                      root = root, name = opts.name or 'kaggle' }
end

-- data.kaggle_test(root [, opts]) -> the unlabelled test set (ids for the submission).
function data.kaggle_test(root, opts)
  opts = opts or {}
  local fname = 'data.kaggle_test'
  if type(root) ~= 'string' then error(fname .. ': expected the data set directory, got ' .. type(root), 2) end
  local path = opts.json or files.join(root, 'test.json')
  local v = read_json(path, fname)
  local imgs = json_list(v, 'images', fname, path, '{file_name, id}')
  local paths, ids = {}, {}
  for i, r in ipairs(imgs) do
    local where = string.format('images[%d]', i)
    if type(r) ~= 'table' then error(string.format('%s: %s: %s is a %s, expected an object', fname, path, where, type(r)), 2) end
    if type(r.file_name) ~= 'string' or r.file_name == '' then
      error(string.format("%s: %s: %s has no 'file_name' string", fname, path, where), 2)
    end
    local id = r.id
    if type(id) == 'number' then id = json_int(r, 'id', where, fname, path)
    elseif type(id) ~= 'string' then error(string.format("%s: %s: %s has no 'id'", fname, path, where), 2) end
    paths[i] = files.join(root, 'test', r.file_name)
    ids[i] = id
  end
  if #paths == 0 then error(string.format("%s: %s: 'images' is empty", fname, path), 2) end
  return new_dataset{ paths = paths, ids = ids, root = root, name = opts.name or 'kaggle_test' }
end

local image_ext = { jpg = true, jpeg = true, JPG = true, JPEG = true, Jpg = true }

-- data.folder(root [, opts]) -> root/<class>/*.jpg, classes sorted by name (bytewise); labels
-- 1..K in that order; categories[label] = the folder name. opts.extensions = {jpg = true, ...}.
function data.folder(root, opts)
  opts = opts or {}
  local fname = 'data.folder'
  if type(root) ~= 'string' then error(fname .. ': expected a directory, got ' .. type(root), 2) end
  local ok, names, kinds = pcall(C.listdir, root)
  if not ok then error(fname .. ': ' .. tostring(names):gsub('^listdir: ', ''), 2) end
  local ext = opts.extensions or image_ext
  local paths, labels, ids, cats = {}, {}, {}, {}
  for i, name in ipairs(names) do
    if kinds[i] == 'dir' and name:sub(1, 1) ~= '.' then
      local dir = files.join(root, name)
      local fnames, fkinds = C.listdir(dir)
      local label
      for j, f in ipairs(fnames) do
        local e = f:match('%.([^.]+)$')
        if fkinds[j] == 'file' and e and ext[e] then
          if not label then cats[#cats + 1] = name; label = #cats end
          paths[#paths + 1] = files.join(dir, f)
          labels[#labels + 1] = label
          ids[#ids + 1] = f:gsub('%.[^.]+$', '')
        end
      end
    end
  end
  if #paths == 0 then error(string.format('%s: no images (%s) in class folders under %s', fname, 'jpg/jpeg', root), 2) end
  return new_dataset{ paths = paths, labels = labels, ids = ids, categories = cats, num_classes = #cats,
                      root = root, name = opts.name or 'folder' }
end

---------------------------------------------------------------------------------------------------
-- Transforms

local presets = {
  eval = function(size) return { mode = 'center', size = size } end,
  train = function(size) return { mode = 'random_resized', size = size, flip = true } end,
  resize = function(size) return { mode = 'resize', size = size } end,
}

local function resolve_transform(tf, size, fname)
  size = size or 224
  if tf == nil then tf = 'eval' end
  if type(tf) == 'string' then
    local p = presets[tf]
    if not p then error(string.format("%s: transform must be 'eval', 'train', 'resize' or a table, got '%s'", fname, tf), 3) end
    return p(size)
  end
  if type(tf) ~= 'table' then error(fname .. ': transform must be a string or a table, got ' .. type(tf), 3) end
  local t = {}
  for k, v in pairs(tf) do t[k] = v end
  if t.size == nil then t.size = size end
  return t
end
data.resolve_transform = resolve_transform

-- data.load_image(path [, opts]) -> uint8 (H, W, 3) tensor (whole image by default; opts as the
-- loader's transform table, plus seed, dtype, preprocess).
function data.load_image(path, opts) return C.image_load(path, opts) end
function data.decode_image(bytes, opts) return C.image_decode(bytes, opts) end
function data.image_info(bytes) return C.image_info(bytes) end
function data.resize_image(t, h, w, filter, box) return C.image_resize(t, h, w, filter, box) end
function data.encode_image(t, quality, opts) return C.image_encode(t, quality, opts) end

-- Writes an image tensor as a JPEG file atomically.
function data.save_image(t, path, quality, opts)
  return files.write_atomic(path, C.image_encode(t, quality or 90, opts))
end

---------------------------------------------------------------------------------------------------
-- The image loader

local Loader = {}
Loader.__index = Loader
Loader.__len = function(self) return self._c:nbatches() end
Loader.__close = function(self) self:close() end

function data.Loader(opts)
  local fname = 'data.Loader'
  if type(opts) ~= 'table' then error(fname .. ': expected a table of options', 2) end
  local ds = opts[1] or opts.dataset
  if type(ds) ~= 'table' or type(ds.paths) ~= 'table' then
    error(fname .. ': the first entry (or `dataset`) must be a data set with `paths`', 2)
  end
  local tf = resolve_transform(opts.transform, opts.size, fname)
  local self = setmetatable({
    dataset = ds, batch_size = opts.batch_size or 32, strict = opts.strict or false,
    warn = opts.warn == nil and io.stderr or opts.warn, transform = tf,
    _warned = {}, _stats = { batches = 0, samples = 0, skipped = 0, reasons = {} },
  }, Loader)
  local ok, c = pcall(C.loader, {
    paths = ds.paths, labels = ds.labels, batch_size = opts.batch_size or 32,
    shuffle = opts.shuffle or false, seed = opts.seed or 0, workers = opts.workers or 2,
    prefetch = opts.prefetch, drop_last = opts.drop_last or false, dtype = opts.dtype or 'float32',
    preprocess = opts.preprocess or 'none', transform = tf, pin_memory = opts.pin_memory or false,
  })
  if not ok then error(fname .. ': ' .. tostring(c):gsub('^Loader: ', ''):gsub('^loader: ', ''), 2) end
  self._c = c
  return self
end

function Loader:_failure(f)
  local path = self.dataset.paths[f.index]
  if self.strict then
    error(string.format('data.Loader: %s: %s (%s)', path, f.message, f.status), 0)
  end
  local s = self._stats
  s.skipped = s.skipped + 1
  s.reasons[f.status] = (s.reasons[f.status] or 0) + 1
  if not self._warned[f.index] then
    self._warned[f.index] = true
    if self.warn then
      self.warn:write(string.format('warning: data.Loader: skipping %s: %s (%s)\n', path, f.message, f.status))
    end
  end
end

-- for batch in loader:epoch(e) do ... end: batch = {x = (N,H,W,3), y = (N) int64 or nil,
-- index = {data set indices}, n = N}. A batch whose every sample failed is left out.
function Loader:epoch(e)
  return self:epoch_shard(e, 0, 1)
end

-- Batches rank+1, rank+1+size, ... of epoch e only (flower.dist: each rank of a data-parallel job
-- decodes its own share), each exactly as loader:epoch(e) gives it.
function Loader:epoch_shard(e, rank, size)
  e = e or 1
  if math.type(e) ~= 'integer' then error('Loader:epoch: expected an integer epoch, got ' .. tostring(e), 2) end
  self._c:start(e, rank, size)
  return function()
    while true do
      local x, y, index, failures = self._c:next()
      if x == nil then return nil end
      if failures then for _, f in ipairs(failures) do self:_failure(f) end end
      local n = #index
      if n > 0 then
        self._stats.batches = self._stats.batches + 1
        self._stats.samples = self._stats.samples + n
        return { x = x, y = y, index = index, n = n }
      end
    end
  end
end

-- {batches, samples (good ones handed out), skipped, reasons = {truncated = k, ...}} since creation
function Loader:stats()
  local s = self._stats
  local r = {}
  for k, v in pairs(s.reasons) do r[k] = v end
  return { batches = s.batches, samples = s.samples, skipped = s.skipped, reasons = r }
end

function Loader:size() return self._c:size() end
-- true when batches come in page-locked memory (pin_memory = true and a CUDA device present)
function Loader:pinned() return self._c:pinned() end
function Loader:close() if self._c then self._c:close() end end

---------------------------------------------------------------------------------------------------
-- Feature loader

local FeatureLoader = {}
FeatureLoader.__index = FeatureLoader
FeatureLoader.__len = function(self)
  if self.drop_last then return self.n // self.batch_size end
  return (self.n + self.batch_size - 1) // self.batch_size
end

function data.FeatureLoader(opts)
  local fname = 'data.FeatureLoader'
  if type(opts) ~= 'table' or not flower.is_tensor(opts.x) then error(fname .. ': expected {x = tensor, y = tensor or nil, ...}', 2) end
  local x, y = opts.x, opts.y
  local n = x:size()[1]
  if y ~= nil and (not flower.is_tensor(y) or y:size()[1] ~= n) then
    error(string.format('%s: y must be a tensor with %d rows like x', fname, n), 2)
  end
  local bs = opts.batch_size or 32
  if math.type(bs) ~= 'integer' or bs < 1 then error(fname .. ': batch_size must be a positive integer', 2) end
  -- rows are copied with memcpy: make views contiguous once here
  if not x:is_contiguous() then x = x:contiguous() end
  if y ~= nil and not y:is_contiguous() then y = y:contiguous() end
  return setmetatable({ x = x, y = y, n = n, batch_size = bs, shuffle = opts.shuffle or false,
                        seed = opts.seed or 0, drop_last = opts.drop_last or false }, FeatureLoader)
end

-- for batch in fl:epoch(e): {x = rows, y = rows or nil, index = {row indices}, n}; the order is
-- numpy's permutation seeded with epoch_seed(seed, e), as the image loader's.
function FeatureLoader:epoch(e) return self:epoch_shard(e, 0, 1) end

-- Batches rank+1, rank+1+size, ... of epoch e only (as Loader:epoch_shard).
function FeatureLoader:epoch_shard(e, rank, size)
  e = e or 1
  local order
  if self.shuffle then order = C.permutation(self.n, C.epoch_seed(self.seed, e))
  else order = {} for i = 1, self.n do order[i] = i end end
  local nb, b = #self, rank
  return function()
    if b >= nb then return nil end
    local first = b * self.batch_size + 1
    local last = math.min(first + self.batch_size - 1, self.n)
    b = b + size
    local idx = table.move(order, first, last, 1, {})
    return { x = C.gather_rows(self.x, idx), y = self.y and C.gather_rows(self.y, idx) or nil, index = idx, n = #idx }
  end
end

---------------------------------------------------------------------------------------------------
-- Statistics

-- data.stats(ds [, opts]) -> mean {r, g, b}, std {r, g, b}, info {pixels, images, skipped}.
-- opts: workers (2), eighths (8: full size; 1..7 decodes at that many eighths, much faster and
-- nearly the same numbers), progress (true), chunk (256 files between progress updates), warn.
function data.stats(ds, opts)
  opts = opts or {}
  local n = #ds.paths
  if n == 0 then error('data.stats: the data set is empty', 2) end
  local chunk = opts.chunk or 256
  local bar
  if opts.progress ~= false then
    bar = require('flower.progress').new{ total = n, label = 'pixel statistics' }
  end
  local warn = opts.warn == nil and io.stderr or opts.warn
  local pixels, images, skipped = 0, 0, 0
  local sum, sumsq = { 0, 0, 0 }, { 0, 0, 0 }
  for first = 1, n, chunk do
    local last = math.min(n, first + chunk - 1)
    local r = C.pixel_stats(ds.paths, first, last, opts.workers or 2, opts.eighths or 8)
    pixels = pixels + r.pixels
    -- exact integers per chunk; sums of squares over a whole data set can pass 2^63, so the
    -- running totals are floats (53-bit mantissa: relative error below 1e-15)
    for c = 1, 3 do sum[c] = sum[c] + r.sum[c] + 0.0; sumsq[c] = sumsq[c] + r.sumsq[c] + 0.0 end
    for _, f in ipairs(r.failed) do
      skipped = skipped + 1
      if opts.strict then error(string.format('data.stats: %s: %s (%s)', ds.paths[f.index], f.message, f.status), 2) end
      if warn then warn:write(string.format('warning: data.stats: skipping %s: %s (%s)\n', ds.paths[f.index], f.message, f.status)) end
    end
    images = images + (last - first + 1) - #r.failed
    if bar then bar:update(last) end
  end
  if bar then bar:finish() end
  if pixels == 0 then error('data.stats: no image could be decoded', 2) end
  local mean, std = {}, {}
  for c = 1, 3 do
    mean[c] = sum[c] / pixels
    std[c] = math.sqrt(math.max(0, sumsq[c] / pixels - mean[c] * mean[c]))
  end
  return mean, std, { pixels = pixels, images = images, skipped = skipped }
end

return data
