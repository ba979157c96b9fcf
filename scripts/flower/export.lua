-- flower.export: feature vectors of a fine-tuned model, in the seed's HDF5 format, in a fixed order.
--
--   local export = require 'flower.export'
--   export.features(model, {
--     path = 'runs/x/features/resnet_tiny.h5',
--     splits = {{'train', train_ds}, {'valid', valid_ds}, {'test', test_ds}},   -- data sets (flower.data)
--     loader = function(ds) return data.Loader{ds, batch_size = 64, transform = 'eval', size = 64} end,
--     layer = 'avg_pool',          -- default model.feature_layer
--     attrs = {model = 'resnet_tiny', weights = 'path/to/weights.h5', image_size = 64, preprocessing = 'tf'},
--     resume = true,               -- continue an interrupted export of the same image lists
--     device = 'cuda',             -- as train.fit's (default: where the model is); rows come back to the host
--   })
--
-- File layout (the seed's names, plus what makes the file self-describing):
--   train_x (N, D) float32, train_label (N) int64, valid_x, valid_label, test (M, D)  -- the seed's
--   <split>_probs (N, K) float32   the model's own class probabilities (valid and test), for
--                                  probability-averaging ensembles
--   <split>_images                 image paths relative to the data root, in row order
--   <split>_ids                    image ids (the submission's `id` column), in row order
--   <split>_missing                0-based rows whose image could not be read (their features are 0)
-- Labels are 0-based class indices (numpy's and Keras's convention; root attribute label_base = 0);
-- root attribute `categories` maps index -> the data set's category id.
-- Root attributes: model, feature_layer, feature_dim, classes, image_size, preprocessing, weights
-- (file name) and weights_sha256, created, flowerlua version, label_base, categories, and per split
-- `<split>_rows` (the row count expected) and `<split>_complete` (1 once every row is written).
--
-- Order: row i of <split>_x is image i of the data set given for that split, always: the loader runs
-- without shuffling, each batch's rows are placed by the data set indices the loader reports, and
-- an unreadable image gets a zero row (listed in <split>_missing) instead of shifting the others.
-- Resume: rows are appended batch by batch and flushed; an interrupted export (Ctrl-C, SIGTERM, a
-- crash between batches) continues from the rows already in the file, after checking that the file
-- lists the same images.
local flower = require 'flower'
local files = require 'flower.files'
local progress = require 'flower.progress'

local export = {}

local function fail(fmt, ...) error('export.features: ' .. string.format(fmt, ...), 3) end
local check_resumable

-- sha256 of a file (coreutils' sha256sum; weights files are large and Lua would be slow).
function export.sha256(path)
  if not files.exists(path) then return nil end
  local p = io.popen('sha256sum ' .. files.shell_quote(path) .. ' 2>/dev/null')
  local out = p and p:read('a') or ''
  if p then p:close() end
  return out:match('^(%x+)')
end

local function rel_path(root, p)
  if root and p:sub(1, #root + 1) == root .. '/' then return p:sub(#root + 2) end
  return p
end

-- A model giving (features, outputs) in one pass, sharing the layers of `model`; or just features.
local function two_headed(model, layer)
  local nn = require 'flower.nn'
  local l = model:layer(layer)
  local ok, m = pcall(function()
    return nn.Model(model.inputs[1], { l._nodes[1], model.outputs[1] }, { name = model.name .. '_export' })
  end)
  if ok then
    -- it shares the layers: it computes as the model does (output_of does the same)
    if model.mixed_precision and model:mixed_precision() then m:mixed_precision(model:mixed_precision()) end
    return m, true
  end
  return model:output_of(layer), false
end

local function same_list(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

-- A split's image paths (relative to the data root) and ids, in row order.
local function split_lists(ds, name)
  local images, ids = {}, {}
  for i, p in ipairs(ds.paths) do images[i] = rel_path(ds.root, p) end
  for i = 1, #ds.paths do ids[i] = tostring(ds.ids and ds.ids[i] or i) end
  return images, ids
end

-- What a split holds before its first row: image list, ids, labels, the row count expected, and the
-- progress attributes (<split>_committed: rows known complete; <split>_complete).
local function write_split_header(f, name, ds)
  local images, ids = split_lists(ds, name)
  local n = #images
  f:write('/' .. name .. '_images', images)
  f:write('/' .. name .. '_ids', ids)
  if ds.labels then
    local lab = flower.empty({ n }, 'int64')
    for i = 1, n do lab[i] = ds.labels[i] - 1 end
    f:write('/' .. name .. '_label', lab)
  end
  f:set_attr('/', name .. '_rows', n)
  f:set_attr('/', name .. '_complete', 0)
  f:set_attr('/', name .. '_committed', 0)
end

-- Exports one split into the open file f. Returns rows written now, or nil + reason if interrupted.
-- Crash consistency: rows are appended a batch at a time, flushed, and only then counted in
-- <split>_committed (flushed again); a resume drops rows past the count (a batch a kill cut short).
local function export_split(f, name, ds, o, fmodel, with_probs)
  local xname = name == 'test' and 'test' or (name .. '_x')
  local images = split_lists(ds, name)
  local n = #images
  if f:exists('/' .. name .. '_images') then
    if not same_list(f:read('/' .. name .. '_images'), images) then
      fail("%s: the file lists other images for '%s' than this data set (%d rows); remove it or write elsewhere",
        o.path, name, n)
    end
  else
    write_split_header(f, name, ds)
    f:flush()
  end
  if f:attr('/', name .. '_complete') == 1 then return 0 end
  local done = f:exists('/' .. xname) and f:shape('/' .. xname)[1] or 0
  local committed = f:attr('/', name .. '_committed')
  if committed and done > committed then          -- a kill cut a batch short: drop its rows
    f:truncate_rows('/' .. xname, committed)
    if f:exists('/' .. name .. '_missing') then
      local kept = 0
      for _, r in ipairs(f:read('/' .. name .. '_missing'):totable()) do if r < committed then kept = kept + 1 end end
      f:truncate_rows('/' .. name .. '_missing', kept)
    end
    done = committed
  end
  if with_probs and f:exists('/' .. name .. '_probs') and f:shape('/' .. name .. '_probs')[1] > done then
    f:truncate_rows('/' .. name .. '_probs', done)
  end
  if with_probs and done > 0 and f:exists('/' .. name .. '_probs') and f:shape('/' .. name .. '_probs')[1] ~= done then
    fail("%s: '%s' has %d rows but '%s_probs' %d: the file is damaged; remove it", o.path, xname, done, name,
      f:shape('/' .. name .. '_probs')[1])
  end
  if done >= n then f:set_attr('/', name .. '_complete', 1); return 0 end
  local rest = {}
  for i = done + 1, n do rest[#rest + 1] = i end
  local sub = ds:subset(rest, (ds.name or name) .. ':export')
  local loader = o.loader(sub)
  local bar = progress.new { total = #loader, label = string.format('export %s %s', o.attrs.model or '', name),
                             silent = o.progress == false }
  local next_row = 1                     -- next row of `sub` to write (1-based)
  local D, K
  local function zeros_rows(count, cols) return flower.zeros({ count, cols }, 'float32') end
  local function append(x, p)
    f:append_rows('/' .. xname, x)
    if with_probs and p then f:append_rows('/' .. name .. '_probs', p) end
  end
  local function fill_missing(upto)      -- zero rows for sub rows next_row..upto
    if upto < next_row then return end
    local count = upto - next_row + 1
    append(zeros_rows(count, D), K and zeros_rows(count, K) or nil)
    local miss = flower.empty({ count }, 'int64')
    for i = 1, count do miss[i] = done + next_row + i - 2 end
    f:append_rows('/' .. name .. '_missing', miss)
    next_row = upto + 1
  end
  local step = 0
  local train = require 'flower.train'
  for hbatch in loader:epoch(1) do
    local batch = train.batch_to_device(hbatch, o._device)
    local out = fmodel:forward(batch.x)
    local feats, probs = out, nil
    if type(out) == 'table' and not flower.is_tensor(out) then feats, probs = out[1], out[2]:softmax(2) end
    if o._device ~= nil then
      feats = feats:cpu()
      probs = probs and probs:cpu()
    end
    D = feats:size(2)
    K = probs and probs:size(2) or nil
    local idx = batch.index
    -- rows of this batch in order, written a run of consecutive rows at a time; a gap (an unreadable
    -- image the loader dropped) becomes zero rows
    local j = 1
    while j <= #idx do
      local k = idx[j]
      if k < next_row then fail('the loader returned row %d after row %d (rows must come in order)', k, next_row - 1) end
      fill_missing(k - 1)
      local last = j
      while idx[last + 1] == idx[last] + 1 do last = last + 1 end
      append(feats:narrow(1, j, last - j + 1):contiguous(), probs and probs:narrow(1, j, last - j + 1):contiguous())
      next_row = idx[last] + 1
      j = last + 1
    end
    step = step + 1
    f:flush()
    files.killpoint('export.batch_flushed')
    f:set_attr('/', name .. '_committed', done + next_row - 1)
    f:flush()
    files.killpoint('export.batch_committed')
    bar:update(step)
    local why = require('flower.train').interrupted()
    if why and next_row <= #rest then
      bar:finish()
      return nil, why
    end
  end
  if D then fill_missing(#rest) elseif next_row <= #rest then
    fail("no image of split '%s' could be read (%d rows)", name, #rest)
  end
  bar:finish()
  f:set_attr('/', name .. '_committed', done + #rest)
  f:flush()
  files.killpoint('export.split_committed')
  f:set_attr('/', name .. '_complete', 1)
  f:flush()
  return #rest
end

-- The root attributes and every split's header, for a new file.
local function write_header(f, o, model, layer)
  local a = o.attrs
  local ds1 = o.splits[1][2]
  f:set_attr('/', 'model', a.model or model.name or '')
  f:set_attr('/', 'feature_layer', layer)
  f:set_attr('/', 'image_size', a.image_size or 0)
  f:set_attr('/', 'preprocessing', a.preprocessing or '')
  f:set_attr('/', 'weights', a.weights and files.basename(a.weights) or '')
  f:set_attr('/', 'weights_sha256', a.weights and export.sha256(a.weights) or '')
  f:set_attr('/', 'created', os.date('!%Y-%m-%dT%H:%M:%SZ'))
  f:set_attr('/', 'flowerlua', flower.version or '')
  f:set_attr('/', 'label_base', 0)
  f:set_attr('/', 'classes', ds1.num_classes or 0)
  local cats = {}
  for i, c in ipairs(ds1.categories or {}) do cats[i] = tostring(c) end
  if #cats > 0 then f:set_attr('/', 'categories', cats) end
  local s = {}
  for i, sp in ipairs(o.splits) do s[i] = sp[1] end
  f:set_attr('/', 'splits', s)
  for _, sp in ipairs(o.splits) do
    if sp[1] == 'train' or sp[1] == 'valid' or sp[1] == 'test' then write_split_header(f, sp[1], sp[2]) end
  end
end

-- Raises unless the file at `path` is an export a resume can continue: a kill during an HDF5 flush
-- can leave a file libhdf5 cannot open, or opens with damaged structures. It is read in the
-- untrusted reader process (flower.h5.open_untrusted), so a damaged file cannot crash this one.
function check_resumable(path, splits)
  local h5 = require 'flower.h5'
  local f <close> = h5.open_untrusted(path)
  if f:attr('/', 'feature_layer') == nil then error('no feature_layer attribute', 0) end
  for _, sp in ipairs(splits) do
    local name = sp[1]
    local xname = name == 'test' and 'test' or (name .. '_x')
    if f:kind('/' .. name .. '_images') then
      for _, d in ipairs({ '_images', '_ids' }) do
        if f:kind('/' .. name .. d) ~= 'dataset' then error('no dataset ' .. name .. d, 0) end
        f:shape('/' .. name .. d)
      end
      if f:attr('/', name .. '_rows') == nil or f:attr('/', name .. '_complete') == nil then
        error('split ' .. name .. ' lacks its row count', 0)
      end
      local committed = f:attr('/', name .. '_committed')
      local x = f:kind('/' .. xname) and f:shape('/' .. xname)[1] or 0
      committed = committed or x
      if x < committed then error(string.format('%s has %d rows, %d were committed', xname, x, committed), 0) end
      local p = '/' .. name .. '_probs'
      if f:kind(p) and f:shape(p)[1] < committed then error(string.format('%s has fewer rows than committed', p), 0) end
      if committed > 0 then                       -- the committed rows are readable
        f:read_slice('/' .. xname, committed, 1)
        if f:kind(p) then f:read_slice(p, committed, 1) end
      end
      if f:kind('/' .. name .. '_missing') then f:read('/' .. name .. '_missing') end
    end
  end
end

-- Returns {path, rows = {split = n}, seconds, images_per_s, interrupted = reason or nil}.
function export.features(model, o)
  if type(o) ~= 'table' or type(o.path) ~= 'string' then fail('expected options with path') end
  if type(o.splits) ~= 'table' or #o.splits == 0 then fail('expected splits = {{name, dataset}, ...}') end
  if type(o.loader) ~= 'function' then fail('expected loader = function(dataset) -> loader') end
  local layer = o.layer or model.feature_layer
  if not layer then fail('no feature layer: pass layer = <name> or set model.feature_layer') end
  o.attrs = o.attrs or {}
  -- the device first: a missing GPU fails before the file is touched
  o._device = require('flower.train').run_device(model, o.device, 'export.features')
  local h5 = require 'flower.h5'
  h5.remove_stale_tmp(o.path)            -- temporaries of killed writes
  local exists = files.exists(o.path)
  if exists and not o.resume then os.remove(o.path); exists = false end
  if exists then
    local ok, why = pcall(check_resumable, o.path, o.splits)
    if not ok then
      io.stderr:write(string.format('export.features: %s cannot be resumed (%s); exporting it again\n', o.path, why))
      os.remove(o.path)
      exists = false
    end
  end
  files.mkdir(files.dirname(o.path))
  local fmodel, with_probs = two_headed(model, layer)
  if o._device ~= nil and fmodel.cuda then fmodel:cuda(o._device) end   -- the shared layers are there already
  local was = model.train
  model:evaluate()
  fmodel:evaluate()
  local u = files.util()
  local prev = u and u.catch_signals(true)
  require('flower.train').clear_interrupt()
  local t0 = files.now()
  local result = { path = o.path, rows = {} }
  local ok, err = pcall(function()
    -- the file appears whole (attributes, every split's image lists) or not at all
    if not exists then h5.write_atomic(o.path, function(f) write_header(f, o, model, layer) end) end
    local f <close> = h5.open(o.path, 'a')
    if f:attr('/', 'feature_layer') ~= layer or (o.attrs.model and f:attr('/', 'model') ~= o.attrs.model) then
      fail("%s was written by model '%s' at layer '%s'; this is '%s' at '%s'", o.path, tostring(f:attr('/', 'model')),
        tostring(f:attr('/', 'feature_layer')), tostring(o.attrs.model), layer)
    end
    local total = 0
    for _, sp in ipairs(o.splits) do
      local name, ds = sp[1], sp[2]
      if name ~= 'train' and name ~= 'valid' and name ~= 'test' then fail("split names are train, valid and test, got '%s'", tostring(name)) end
      local rows, why = export_split(f, name, ds, o, fmodel, with_probs and name ~= 'train')
      if rows == nil then result.interrupted = why; return end
      result.rows[name] = rows
      total = total + rows
    end
    result.images = total
    local xn = o.splits[1][1] == 'test' and 'test' or (o.splits[1][1] .. '_x')
    if f:exists('/' .. xn) then f:set_attr('/', 'feature_dim', f:shape('/' .. xn)[2]) end
  end)
  if u then u.catch_signals(prev) end
  if was then model:training() end
  if not ok then error(err, 0) end
  result.seconds = files.now() - t0
  result.images_per_s = result.images and result.seconds > 0 and result.images / result.seconds or nil
  return result
end

-- Reads an exported file: {x = {train =, valid =, test =}, label = {...} (1-based int64), probs = {...},
-- images = {...}, ids = {...}, attrs = {...}}. Refuses an incomplete export.
function export.read(path)
  local h5 = require 'flower.h5'
  local f <close> = h5.open(path, 'r')
  local r = { path = path, x = {}, label = {}, probs = {}, images = {}, ids = {}, missing = {}, attrs = {} }
  for _, a in ipairs(f:attrs('/')) do r.attrs[a] = f:attr('/', a) end
  local splits = f:attr('/', 'splits') or { 'train', 'valid', 'test' }
  if type(splits) == 'string' then splits = { splits } end
  for _, name in ipairs(splits) do
    if f:attr('/', name .. '_complete') ~= 1 then
      error(string.format("export.read: %s: split '%s' is incomplete (%d of %d rows); resume the export first", path, name,
        f:exists('/' .. (name == 'test' and 'test' or name .. '_x')) and f:shape('/' .. (name == 'test' and 'test' or name .. '_x'))[1] or 0,
        f:attr('/', name .. '_rows') or 0), 2)
    end
    r.x[name] = f:read('/' .. (name == 'test' and 'test' or (name .. '_x')))
    if f:exists('/' .. name .. '_label') then r.label[name] = f:read('/' .. name .. '_label'):type('int64') + 1 end
    if f:exists('/' .. name .. '_probs') then r.probs[name] = f:read('/' .. name .. '_probs') end
    r.images[name] = f:read('/' .. name .. '_images')
    r.ids[name] = f:read('/' .. name .. '_ids')
    if f:exists('/' .. name .. '_missing') then r.missing[name] = f:read('/' .. name .. '_missing'):totable() end
  end
  return r
end

return export
