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
-- Data sets. A data set is a table {paths, labels, ids, categories, category_names, num_classes,
-- root, name} with methods split, subset and #ds. `labels[i]` is a class index 1..num_classes (Lua's
-- and the tensor library's 1-based convention: argmax returns 1-based indices, so predictions
-- compare directly); `categories[label]` is the original category: the Kaggle category_id, or the
-- folder name; `category_names[label]` its name (COCO's categories[].name, else the id or folder).
--   data.kaggle(root)       the Kaggle FGVCx Flowers training set, COCO-style root/train.json:
--                           `annotations` = [{image_id, category_id}, ...]; the image of an annotation
--                           is its `images` entry's file_name ({id, file_name}, joined by image id; an
--                           annotation whose image is not listed is an error naming the id), below
--                           root/train/ (or root/ when file_name starts with 'train/'); without
--                           `images`, the seed's root/train/category_<category_id + 1>/<image_id>.jpg.
--                           The classes are the distinct category_ids present, in increasing order;
--                           `categories` = [{id, name, genus, family}] give category_names and
--                           category_info[label] = {id, name, genus, family}.
--   data.kaggle_test(root)  root/test.json `images` = [{file_name, id}, ...] -> root/test/<file_name>;
--                           no labels; ids[i] is the image id (for the submission's `id` column).
--   Paths from JSON are checked first: a file_name or image_id with a NUL byte, an absolute path or
--   a '..' segment (or an image_id with a '/') is an error naming the file and the record.
--   data.folder(root)       root/<class>/<image>.jpg: one directory per class, sorted by name.
--
-- Splits. ds:split{test_size = 0.2, seed = 42} cuts the data set as scikit-learn's
-- train_test_split(X, test_size=0.2, random_state=42) does, index for index: p = numpy's
-- RandomState(seed).permutation(n) (MT19937 seeded with init_genrand(seed); a Fisher-Yates shuffle
-- from the last element down, each swap partner drawn by masked rejection from 32-bit outputs),
-- n_test = ceil(test_size * n) (test_size < 1; an integer >= 1 is a count), valid = p[1..n_test],
-- train = p[n_test+1..n], both in that order. Integer arithmetic only, so every machine gets the
-- same split. With stratify = true: scikit-learn's train_test_split(..., stratify=labels), index
-- for index (its StratifiedShuffleSplit: per-class counts by _approximate_mode, ties and orders drawn
-- from one RandomState(seed) stream); like scikit-learn it refuses a class with a single member.
-- Both are tested against scikit-learn itself (tests/lua/test_data.lua), with rare classes and 100k ids.
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
-- Bad files (missing, empty, not a JPEG, truncated, corrupt, not a regular file): by default the
-- sample is dropped from its batch -- never a zero row -- with one warning line per file, naming the
-- file and the reason, counted in loader:stats() and listed by loader:skipped() (path and reason,
-- for logs and reports); strict = true raises a Lua error instead.
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
  local t = { paths = paths, labels = labels, ids = ids }
  for k, v in pairs(self) do if t[k] == nil and k ~= 'labels' then t[k] = v end end  -- categories, names, root
  t.name = name or self.name
  return new_dataset(t)
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

-- scikit-learn's _approximate_mode(counts, n_draws, rng): how many of n_draws draws each class
-- gets -- the floor of its proportional share, plus one for the largest remainders until the
-- total is n_draws, ties among equal remainders broken by rs as numpy's RandomState.choice(inds,
-- k, replace=False) breaks them (the first k of a permutation of inds). Same float operations,
-- same order, so the same counts.
local function approximate_mode(counts, n_draws, rs)
  local total = 0
  for _, c in ipairs(counts) do total = total + c end
  local out, rem, need = {}, {}, n_draws
  for i, c in ipairs(counts) do
    local share = c / total * n_draws
    out[i] = math.floor(share)
    rem[i] = share - out[i]
    need = need - out[i]
  end
  if need <= 0 then return out end
  local values, seen = {}, {}
  for _, r in ipairs(rem) do
    if not seen[r] then seen[r] = true; values[#values + 1] = r end
  end
  table.sort(values, function(x, y) return x > y end)
  for _, v in ipairs(values) do
    local inds = {}
    for i, r in ipairs(rem) do if r == v then inds[#inds + 1] = i end end
    local k = math.min(#inds, need)
    local p = rs:permutation(#inds)
    for j = 1, k do out[inds[p[j]]] = out[inds[p[j]]] + 1 end
    need = need - k
    if need == 0 then break end
  end
  return out
end

-- scikit-learn's StratifiedShuffleSplit (as train_test_split(stratify=y) calls it): classes in
-- increasing order, each class's members in index order; from one RandomState(seed): the train
-- counts, then the valid counts from what is left, then per class a permutation of its members
-- (the first n_train[c] to train, the next n_valid[c] to valid), then a permutation of each part.
local function stratified_split(labels, n, n_train, n_test, seed)
  local members, classes = {}, {}
  for i = 1, n do
    local c = labels[i]
    local m = members[c]
    if not m then m = {}; members[c] = m; classes[#classes + 1] = c end
    m[#m + 1] = i
  end
  table.sort(classes)
  local counts, rare = {}, {}
  for k, c in ipairs(classes) do
    counts[k] = #members[c]
    if counts[k] < 2 then rare[#rare + 1] = tostring(c) end
  end
  local fname = 'Dataset:split{stratify = true}'
  if #rare > 0 then
    error(string.format('%s: class%s %s ha%s only 1 member; a stratified split needs at least 2 in every class '
      .. '(scikit-learn refuses it too); merge or drop %s, or split without stratify', fname,
      #rare > 1 and 'es' or '', table.concat(rare, ', ', 1, math.min(#rare, 20)) .. (#rare > 20 and ', ...' or ''),
      #rare > 1 and 've' or 's', #rare > 1 and 'them' or 'it'), 3)
  end
  if n_train < #classes or n_test < #classes then
    error(string.format('%s: %d train and %d valid samples for %d classes; each part needs at least one per class',
      fname, n_train, n_test, #classes), 3)
  end
  local rs = C.random_state(seed)
  local n_i = approximate_mode(counts, n_train, rs)
  local left = {}
  for k, c in ipairs(counts) do left[k] = c - n_i[k] end
  local t_i = approximate_mode(left, n_test, rs)
  local train, test = {}, {}
  for k, c in ipairs(classes) do
    local m, p = members[c], rs:permutation(counts[k])
    for j = 1, n_i[k] do train[#train + 1] = m[p[j]] end
    for j = n_i[k] + 1, n_i[k] + t_i[k] do test[#test + 1] = m[p[j]] end
  end
  local function shuffled(t)
    local p, out = rs:permutation(#t), {}
    for j = 1, #t do out[j] = t[p[j]] end
    return out
  end
  train = shuffled(train)
  return train, shuffled(test)
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
  local tr, va = {}, {}
  if not opts.stratify then
    local p = C.permutation(n, seed)
    for i = 1, n_test do va[i] = p[i] end
    for i = n_test + 1, n do tr[#tr + 1] = p[i] end
  else
    if not self.labels then error('Dataset:split: stratify needs labels', 2) end
    tr, va = stratified_split(self.labels, n, n - n_test, n_test, seed)
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

-- A path from a JSON record, checked before it is used: a relative path below the data root (no
-- NUL byte, which would cut the name short in C; not absolute; no '..' segment). `name_only`: a
-- single file name (an image_id that becomes one). Errors name the file and the record.
local function safe_path(v, fname, path, where, key, name_only)
  local function bad(why)
    error(string.format("%s: %s: %s has %s '%s' %q: %s", fname, path, where, type(v), key, v, why), 4)
  end
  if v:find('\0', 1, true) then bad('it holds a NUL byte') end
  if v == '' then bad('it is empty') end
  if name_only and v:find('/', 1, true) then bad("it holds a '/', expected a file name") end
  if v:sub(1, 1) == '/' then bad('an absolute path; expected a path below the data root') end
  if v:find('..', 1, true) then   -- (the segment walk only where one could be)
    for seg in v:gmatch('[^/]+') do
      if seg == '..' then bad("a '..' segment would reach outside the data root") end
    end
  end
  return v
end

-- A file_name of `images` under the data root: below root/<dir>, as the seed's test/<file_name>,
-- or below root when it already starts with '<dir>/'. (Plain concatenation: 700k records.)
local function image_path(root, dir, file_name)
  if file_name:sub(1, #dir + 1) == dir .. '/' then return root .. '/' .. file_name end
  return root .. '/' .. dir .. '/' .. file_name
end

-- An image id (integer or string) of a record's `key`.
local function json_id(rec, key, where, fname, path)
  local v = rec[key]
  if type(v) == 'number' then return json_int(rec, key, where, fname, path) end
  if type(v) ~= 'string' then
    error(string.format("%s: %s: %s has no '%s' (expected a number or string)", fname, path, where, key), 3)
  end
  return safe_path(v, fname, path, where, key, true)
end

-- `images` = [{id, file_name}, ...] as a map id -> file_name (nil when the file has no `images`).
local function image_files(v, fname, path)
  if v.images == nil then return nil end
  local imgs = json_list(v, 'images', fname, path, '{id, file_name}')
  local by_id = {}
  for i, r in ipairs(imgs) do
    local where = string.format('images[%d]', i)
    if type(r) ~= 'table' then error(string.format('%s: %s: %s is a %s, expected an object', fname, path, where, type(r)), 3) end
    local id = json_id(r, 'id', where, fname, path)
    if type(r.file_name) ~= 'string' then
      error(string.format("%s: %s: %s has no 'file_name' string", fname, path, where), 3)
    end
    if by_id[id] then error(string.format('%s: %s: %s repeats image id %s', fname, path, where, id_string(id)), 3) end
    by_id[id] = safe_path(r.file_name, fname, path, where, 'file_name')
  end
  return by_id
end

-- `categories` = [{id, name, genus, family}, ...] as a map id -> {id, name, genus, family}.
local function category_table(v, fname, path)
  local out = {}
  if v.categories == nil then return out end
  for i, r in ipairs(json_list(v, 'categories', fname, path, '{id, name}')) do
    local where = string.format('categories[%d]', i)
    if type(r) ~= 'table' then error(string.format('%s: %s: %s is a %s, expected an object', fname, path, where, type(r)), 3) end
    local id = json_int(r, 'id', where, fname, path)
    local info = { id = id }
    for _, k in ipairs({ 'name', 'genus', 'family' }) do
      if r[k] ~= nil and type(r[k]) ~= 'string' then
        error(string.format("%s: %s: %s has a %s '%s', expected a string", fname, path, where, type(r[k]), k), 3)
      end
      info[k] = r[k]
    end
    out[id] = info
  end
  return out
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
  local file_of = image_files(v, fname, path)
  local cats, seen = {}, {}
  local recs = {}
  for i, a in ipairs(ann) do
    if type(a) ~= 'table' then error(string.format('%s: %s: annotations[%d] is a %s, expected an object', fname, path, i, type(a)), 2) end
    local where = string.format('annotations[%d]', i)
    local img = json_id(a, 'image_id', where, fname, path)
    local cat = json_int(a, 'category_id', where, fname, path)
    if cat < 0 then error(string.format('%s: %s: %s has category_id %d, expected >= 0', fname, path, where, cat), 2) end
    if file_of and not file_of[img] then
      error(string.format("%s: %s: %s has image_id %s, which 'images' does not list", fname, path, where, id_string(img)), 2)
    end
    recs[i] = { img, cat }
    if not seen[cat] then seen[cat] = true; cats[#cats + 1] = cat end
  end
  if #recs == 0 then error(string.format("%s: %s: 'annotations' is empty", fname, path), 2) end
  table.sort(cats)
  local info = category_table(v, fname, path)
  local label_of, names, meta = {}, {}, {}
  for l, c in ipairs(cats) do
    label_of[c] = l
    meta[l] = info[c] or { id = c }
    names[l] = meta[l].name or tostring(c)
  end
  local paths, labels, ids = {}, {}, {}
  local top = files.join(root)
  local base = files.join(root, 'train')  -- (string.format per record: 700k records load in a second)
  for i, r in ipairs(recs) do
    -- COCO's images[].file_name when the file lists images; else the seed's convention
    paths[i] = file_of and image_path(top, 'train', file_of[r[1]])
      or string.format('%s/category_%d/%s.jpg', base, r[2] + 1, id_string(r[1]))
    labels[i] = label_of[r[2]]
    ids[i] = r[1]
  end
  return new_dataset{ paths = paths, labels = labels, ids = ids, categories = cats, num_classes = #cats,
                      category_names = names, category_info = meta, root = root, name = opts.name or 'kaggle' }
end

-- data.kaggle_test(root [, opts]) -> the unlabelled test set (ids for the submission).
function data.kaggle_test(root, opts)
  opts = opts or {}
  local fname = 'data.kaggle_test'
  if type(root) ~= 'string' then error(fname .. ': expected the data set directory, got ' .. type(root), 2) end
  local path = opts.json or files.join(root, 'test.json')
  local v = read_json(path, fname)
  local imgs = json_list(v, 'images', fname, path, '{file_name, id}')
  local paths, ids, top = {}, {}, files.join(root)
  for i, r in ipairs(imgs) do
    local where = string.format('images[%d]', i)
    if type(r) ~= 'table' then error(string.format('%s: %s: %s is a %s, expected an object', fname, path, where, type(r)), 2) end
    if type(r.file_name) ~= 'string' or r.file_name == '' then
      error(string.format("%s: %s: %s has no 'file_name' string", fname, path, where), 2)
    end
    local id = r.id
    if type(id) == 'number' then id = json_int(r, 'id', where, fname, path)
    elseif type(id) ~= 'string' then error(string.format("%s: %s: %s has no 'id'", fname, path, where), 2) end
    paths[i] = image_path(top, 'test', safe_path(r.file_name, fname, path, where, 'file_name'))
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
    _skipped = {}, _skipped_at = {}, _stats = { batches = 0, samples = 0, skipped = 0, reasons = {} },
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
  if not self._skipped_at[f.index] then
    local rec = { index = f.index, path = path, reason = string.format('%s (%s)', f.message, f.status), status = f.status }
    self._skipped_at[f.index] = true
    self._skipped[#self._skipped + 1] = rec
    if self.warn then
      self.warn:write(string.format('warning: data.Loader: skipping %s: %s\n', path, rec.reason))
    end
  end
end

-- The images this loader could not read, once each, in the order met: {{index (in its data set),
-- path, reason = "<message> (<status>)", status}, ...}. They are in no batch.
function Loader:skipped()
  local out = {}
  for i, r in ipairs(self._skipped) do out[i] = { index = r.index, path = r.path, reason = r.reason, status = r.status } end
  return out
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

-- data.idx(path): an idx(.gz) file (MNIST, Fashion-MNIST) as a tensor; see flower.npy.
function data.idx(path) return require('flower.npy').load_idx(path) end

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
