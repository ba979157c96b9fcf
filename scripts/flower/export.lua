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
--     tta = 'flip',                -- test-time augmentation for valid and test (flower.tta's modes;
--                                  -- default 'none'): their features and probabilities are each the
--                                  -- mean over the views; the loader is called as loader(ds, split)
--                                  -- and must decode valid/test at tta.load_size(image_size, spec)
--     device = 'cuda',             -- as train.fit's (default: where the model is); rows come back to the host
--     distributed = true,          -- split the batches across the job's ranks (flower.dist; nil: on
--                                  -- with several ranks); rank 0 alone writes, the same file as one process
--   })
--
-- File layout (the seed's names, plus what makes the file self-describing):
--   train_x (N, D) float32, train_label (N) int64, valid_x, valid_label, test (M, D)  -- the seed's
--   <split>_probs (N, K) float32   the model's own class probabilities (valid and test), for
--                                  probability-averaging ensembles: its output as it is when it
--                                  ends in a softmax, softmax(output) when it ends in logits
--   <split>_images                 image paths relative to the data root, in row order
--   <split>_ids                    image ids (the submission's `id` column), in row order: readers
--                                  join by id
--   <split>_requested              every image asked for (relative paths): what a resume must match
--   <split>_index                  each row's 0-based position in <split>_requested
--   <split>_skipped, _skipped_images  positions and paths of the images that could not be read:
--                                  they have no row (never a zero row)
-- Labels are 0-based class indices (numpy's and Keras's convention; root attribute label_base = 0);
-- root attribute `categories` maps index -> the data set's category id.
-- Root attributes: model, feature_layer, feature_dim, classes, image_size, preprocessing, weights
-- (file name) and weights_sha256, created, flowerlua version, label_base, categories, tta (the
-- test-time augmentation of valid and test: none, flip, crops or crops+flip), and per split
-- `<split>_rows` (the row count expected) and `<split>_complete` (1 once every row is written).
--
-- Order: rows are the data set's images in order, those that could be decoded: the loader runs
-- without shuffling and drops what it cannot read, and <split>_index / <split>_ids say which image
-- each row is. <split>_images, _ids and _label are written when the split completes.
-- Resume: rows are appended batch by batch with their positions and flushed; an interrupted export
-- (Ctrl-C, SIGTERM, a crash between batches) continues after the last image written or skipped,
-- after checking that the file lists the same images.
-- Crash consistency (kill -9 anywhere): a new file appears whole (root attributes and every split's
-- image list, through h5.write_atomic); after each batch's appends and a flush, the rows and skipped
-- positions are counted in <split>_committed / <split>_committed_skipped (flushed again), and a
-- resume drops whatever lies past those counts. A file a kill left unreadable or inconsistent
-- (checked in the untrusted reader, so a damaged file cannot crash this process) is exported again,
-- and so is one written with another test-time augmentation.
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

-- Whether a model's output is already probabilities: its last layer is a softmax (Softmax, an
-- Activation('softmax'), or a layer with activation = 'softmax'; a nested model is looked into).
local function ends_in_softmax(model)
  local l = model.outputs[1].layer
  while l._is_model do l = l.outputs[1].layer end
  return l.class_name == 'Softmax' or l.act == 'softmax' or l.activation == 'softmax'
end
export.ends_in_softmax = ends_in_softmax

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

-- Rows of a dataset (0 when absent) and its last value (-1 when empty).
local function rows_of(f, d) return f:exists(d) and f:shape(d)[1] or 0 end
local function last_of(f, d)
  local k = rows_of(f, d)
  return k > 0 and f:read_slice(d, k, 1):totable()[1] or -1
end

-- What a split holds before its first row: the images asked for, the row count expected, and the
-- progress attributes.
local function write_split_header(f, name, images)
  f:write('/' .. name .. '_requested', images)
  f:set_attr('/', name .. '_rows', #images)
  f:set_attr('/', name .. '_complete', 0)
  f:set_attr('/', name .. '_committed', 0)
  f:set_attr('/', name .. '_committed_skipped', 0)
end

-- Counts what the file holds now as complete (after flushing it), so that a resume keeps it.
local function commit(f, name, xname)
  f:flush()
  files.killpoint('export.batch_flushed')
  f:set_attr('/', name .. '_committed', rows_of(f, xname))
  f:set_attr('/', name .. '_committed_skipped', rows_of(f, '/' .. name .. '_skipped'))
  f:flush()
  files.killpoint('export.batch_committed')
end

-- Drops rows appended after the last commit (a batch a kill cut short).
local function roll_back(f, name, xname)
  local pre = '/' .. name
  local c, cs = f:attr('/', name .. '_committed'), f:attr('/', name .. '_committed_skipped')
  if c == nil then return end                    -- written before commits were counted
  for _, d in ipairs({ xname, pre .. '_probs', pre .. '_index' }) do
    if rows_of(f, d) > c then f:truncate_rows(d, c) end
  end
  if rows_of(f, pre .. '_skipped') > (cs or 0) then f:truncate_rows(pre .. '_skipped', cs or 0) end
end

-- Exports one split into the open file f. Returns rows written now and the images skipped now
-- ({{path, reason}}), or nil + reason if interrupted.
-- The features and probabilities (nil without a probability head) of one batch; with test-time
-- augmentation (o.tta, valid and test only) each is the mean over the views (flower.tta.mean), the
-- probabilities averaged after the softmax as flower.tta averages them.
local function forward(fmodel, x, o, split)
  local function heads(v)
    local out = fmodel:forward(v)
    if type(out) == 'table' and not flower.is_tensor(out) then
      return out[1], o._softmax and out[2]:softmax(2) or out[2]
    end
    return out
  end
  if not o.tta or split == 'train' then return heads(x) end
  return require('flower.tta').mean(x, o.size, o.tta, heads)
end

local function export_split(f, name, ds, o, fmodel, with_probs)
  local xname = '/' .. (name == 'test' and 'test' or (name .. '_x'))
  local pre = '/' .. name
  local n = #ds.paths
  local images = {}
  for i, p in ipairs(ds.paths) do images[i] = rel_path(ds.root, p) end
  if f:exists(pre .. '_requested') then
    if not same_list(f:read(pre .. '_requested'), images) then
      fail("%s: the file lists other images for '%s' than this data set (%d rows); remove it or write elsewhere",
        o.path, name, n)
    end
  else
    write_split_header(f, name, images)
    f:flush()
  end
  local D = o._dist                      -- dist: nil, or the job's context (rank 0 writes)
  local complete = f:attr('/', name .. '_complete') == 1
  if D then complete = D:from_main(complete) end
  if complete then return 0, {} end
  roll_back(f, name, xname)
  local done = rows_of(f, xname)
  if rows_of(f, pre .. '_index') ~= done or (with_probs and done > 0 and rows_of(f, pre .. '_probs') ~= done) then
    fail("%s: '%s' has %d rows but '%s_index' %d and '%s_probs' %d: the file is damaged; remove it", o.path, xname,
      done, name, rows_of(f, pre .. '_index'), name, rows_of(f, pre .. '_probs'))
  end
  -- continue after the last image written or skipped (0-based positions in the image list)
  local start = math.max(last_of(f, pre .. '_index'), last_of(f, pre .. '_skipped')) + 1
  if D then start = D:from_main(start) end   -- dist: rank 0's file says where to continue
  local rest = {}
  for i = start + 1, n do rest[#rest + 1] = i end
  local written, skipped_now = 0, {}
  if #rest > 0 then
    local loader = o.loader(ds:subset(rest, (ds.name or name) .. ':export'), name)
    local bar = progress.new { total = D and D:steps(loader) or #loader,
                               label = string.format('export %s %s', o.attrs.model or '', name),
                               silent = o.progress == false or (D and not D.main) }
    local nskipped = 0
    -- images the loader could not read since the last call: recorded with the rows, never as rows
    local function record_skipped()
      local sk = loader.skipped and loader:skipped() or {}
      if #sk == nskipped then return end
      local pos = flower.empty({ #sk - nskipped }, 'int64')
      for j = nskipped + 1, #sk do
        pos[j - nskipped] = rest[sk[j].index] - 1
        skipped_now[#skipped_now + 1] = { path = ds.paths[rest[sk[j].index]], reason = sk[j].reason }
      end
      f:append_rows(pre .. '_skipped', pos)
      nskipped = #sk
    end
    -- dist: every rank's skipped positions of this step go to rank 0's file, in order
    local function record_skipped_dist()
      local sk = loader.skipped and loader:skipped() or {}
      local pos = flower.zeros(#sk - nskipped):long()
      for j = nskipped + 1, #sk do
        pos[j - nskipped] = rest[sk[j].index] - 1
        skipped_now[#skipped_now + 1] = { path = ds.paths[rest[sk[j].index]], reason = sk[j].reason }
      end
      nskipped = #sk
      local all = require('flower.core')._dist.all_gather(pos):totable()
      table.sort(all)
      if #all > 0 then f:append_rows(pre .. '_skipped', flower.tensor(all, 'int64')) end
    end
    local step = 0
    local train = require 'flower.train'
    local nsteps = D and D:steps(loader) or #loader
    for hbatch in (D and D:epoch(loader, 1) or loader:epoch(1)) do
     local feats, probs, idx
     if hbatch.n ~= 0 then     -- dist: a rank may have no batch at the last step
      local batch = train.batch_to_device(hbatch, o._device)
      feats, probs = forward(fmodel, batch.x, o, name)
      if o._device ~= nil then
        feats = feats:cpu()
        probs = probs and probs:cpu()
      end
      idx = {}
      for j, k in ipairs(batch.index) do idx[j] = rest[k] end
     end
     -- dist: every rank's rows of this step, in the loader's order (batch b was rank (b-1) % size's)
     if D then feats, probs, idx = D:gather_batches(feats, probs, idx) end
     if feats then
      -- the batch's rows are the images the loader decoded, in order; each row's position in the
      -- image list goes to <split>_index with it
      local pos = flower.empty({ #idx }, 'int64')
      for j, k in ipairs(idx) do pos[j] = k - 1 end
      f:append_rows(xname, feats:contiguous())
      if with_probs and probs then f:append_rows(pre .. '_probs', probs:contiguous()) end
      f:append_rows(pre .. '_index', pos)
      written = written + #idx
     end
      if D then record_skipped_dist() else record_skipped() end
      commit(f, name, xname)
      step = step + 1
      bar:update(step)
      local why = train.interrupted()
      if D then why = D:any(why) end   -- dist: every rank stops at the same step
      if why and step < nsteps then
        bar:finish()
        return nil, why
      end
    end
    if not D then record_skipped() end
    commit(f, name, xname)
    bar:finish()
  end
  if D and not D.main then return written, skipped_now end   -- dist: rank 0 completes the file
  -- complete: the per-row lists, for the rows there are
  local index = rows_of(f, pre .. '_index') > 0 and f:read(pre .. '_index'):totable() or {}
  if #index == 0 then fail("no image of split '%s' could be read (%d images)", name, n) end
  local imgs, ids = {}, {}
  for j, p in ipairs(index) do
    imgs[j] = images[p + 1]
    ids[j] = tostring(ds.ids and ds.ids[p + 1] or p + 1)
  end
  f:write(pre .. '_images', imgs)
  f:write(pre .. '_ids', ids)
  if ds.labels then
    local lab = flower.empty({ #index }, 'int64')
    for j, p in ipairs(index) do lab[j] = ds.labels[p + 1] - 1 end
    f:write(pre .. '_label', lab)
  end
  local sk = rows_of(f, pre .. '_skipped') > 0 and f:read(pre .. '_skipped'):totable() or {}
  if #sk > 0 then
    local list = {}
    for j, p in ipairs(sk) do list[j] = images[p + 1] end
    f:write(pre .. '_skipped_images', list)
  end
  f:flush()
  files.killpoint('export.split_listed')
  f:set_attr('/', name .. '_complete', 1)
  f:flush()
  return written, skipped_now
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
  f:set_attr('/', 'tta', o.tta and o.tta.name or 'none')
  f:set_attr('/', 'classes', ds1.num_classes or 0)
  local cats = {}
  for i, c in ipairs(ds1.categories or {}) do cats[i] = tostring(c) end
  if #cats > 0 then f:set_attr('/', 'categories', cats) end
  local s = {}
  for i, sp in ipairs(o.splits) do s[i] = sp[1] end
  f:set_attr('/', 'splits', s)
  for _, sp in ipairs(o.splits) do
    local name, ds = sp[1], sp[2]
    if name == 'train' or name == 'valid' or name == 'test' then
      local images = {}
      for i, p in ipairs(ds.paths) do images[i] = rel_path(ds.root, p) end
      write_split_header(f, name, images)
    end
  end
end

-- Raises unless the file at `path` is an export a resume can continue: a kill during an HDF5 flush
-- can leave a file libhdf5 cannot open, or opens with damaged structures. It is read in the
-- untrusted reader process (flower.h5.open_untrusted), so a damaged file cannot crash this one.
local function check_resumable(path, splits, tta)
  local h5 = require 'flower.h5'
  local f <close> = h5.open_untrusted(path)
  if f:attr('/', 'feature_layer') == nil then error('no feature_layer attribute', 0) end
  local was = f:attr('/', 'tta') or 'none'
  if was ~= tta then error(string.format("it was written with test-time augmentation '%s', this export asks for '%s'", was, tta), 0) end
  for _, sp in ipairs(splits) do
    local pre = '/' .. sp[1]
    local xname = sp[1] == 'test' and '/test' or (pre .. '_x')
    if f:kind(pre .. '_requested') then
      f:shape(pre .. '_requested')
      if f:attr('/', sp[1] .. '_rows') == nil or f:attr('/', sp[1] .. '_complete') == nil then
        error('split ' .. sp[1] .. ' lacks its row count', 0)
      end
      local c = f:attr('/', sp[1] .. '_committed') or rows_of(f, xname)
      local cs = f:attr('/', sp[1] .. '_committed_skipped') or rows_of(f, pre .. '_skipped')
      for _, d in ipairs({ xname, pre .. '_index', pre .. '_probs' }) do
        local k = f:kind(d) and f:shape(d)[1]
        if k and k < c then error(string.format('%s has %d rows, %d were committed', d, k, c), 0) end
        if k and c > 0 then f:read_slice(d, c, 1) end      -- the committed rows are readable
      end
      if rows_of(f, xname) < c or rows_of(f, pre .. '_index') < c then error('committed rows are missing', 0) end
      if rows_of(f, pre .. '_skipped') < cs then error('committed skipped positions are missing', 0) end
      if cs > 0 then f:read(pre .. '_skipped') end
    end
  end
end

-- Returns {path, rows = {split = rows written now}, skipped = {split = {{path, reason}, ...} skipped
-- now}, seconds, images_per_s, interrupted = reason or nil}.
function export.features(model, o)
  if type(o) ~= 'table' or type(o.path) ~= 'string' then fail('expected options with path') end
  if type(o.splits) ~= 'table' or #o.splits == 0 then fail('expected splits = {{name, dataset}, ...}') end
  if type(o.loader) ~= 'function' then fail('expected loader = function(dataset) -> loader') end
  local layer = o.layer or model.feature_layer
  if not layer then fail('no feature layer: pass layer = <name> or set model.feature_layer') end
  o.attrs = o.attrs or {}
  if o.tta ~= nil then
    local ok, spec = true, o.tta
    if type(spec) ~= 'table' then ok, spec = pcall(require('flower.tta').parse, spec) end
    if not ok then fail('%s', spec) end
    o.tta = spec.views > 1 and spec or nil
    o.size = o.size or o.attrs.image_size
    if o.tta and math.type(o.size) ~= 'integer' then fail('tta needs the model input size: size = <pixels> (or attrs.image_size)') end
  end
  -- the device first: a missing GPU fails before the file is touched
  o._device = require('flower.train').run_device(model, o.device, 'export.features')
  local h5 = require 'flower.h5'
  -- dist: the batches are split across ranks and rank 0 alone writes; the others write to nothing
  o._dist = require('flower.dist').fit_context(model, o, o._device)
  local writes = not o._dist or o._dist.main
  if writes then h5.remove_stale_tmp(o.path) end      -- temporaries of killed writes
  local exists = writes and files.exists(o.path)
  if exists and not o.resume then os.remove(o.path); exists = false end
  if exists then
    local okr, why = pcall(check_resumable, o.path, o.splits, o.tta and o.tta.name or 'none')
    if not okr then
      io.stderr:write(string.format('export.features: %s cannot be resumed (%s); exporting it again\n', o.path, why))
      os.remove(o.path)
      exists = false
    end
  end
  if writes then files.mkdir(files.dirname(o.path)) end
  local fmodel, with_probs = two_headed(model, layer)
  o._softmax = not ends_in_softmax(model)   -- logits get a softmax; probabilities are kept as they are
  if o._device ~= nil then require('flower.device').move(fmodel, o._device) end   -- the shared layers are there already
  local was = model.train
  model:evaluate()
  fmodel:evaluate()
  local u = files.util()
  local prev = u and u.catch_signals(true)
  require('flower.train').clear_interrupt()
  local t0 = files.now()
  local result = { path = o.path, rows = {}, skipped = {} }
  local ok, err = pcall(function()
    -- the file appears whole (attributes, every split's image list) or not at all
    if writes and not exists then h5.write_atomic(o.path, function(f) write_header(f, o, model, layer) end) end
    local f <close> = writes and h5.open(o.path, 'a') or require('flower.dist').null_file()
    if writes and (f:attr('/', 'feature_layer') ~= layer or (o.attrs.model and f:attr('/', 'model') ~= o.attrs.model)) then
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
      result.skipped[name] = why
      total = total + rows
    end
    result.images = total
    local xn = o.splits[1][1] == 'test' and 'test' or (o.splits[1][1] .. '_x')
    if f:exists('/' .. xn) then f:set_attr('/', 'feature_dim', f:shape('/' .. xn)[2]) end
  end)
  if u then u.catch_signals(prev) end
  if was then model:training() end
  if not ok then error(err, 0) end
  if o._dist then o._dist:barrier() end   -- dist: the file is closed and complete before any rank reads it
  result.seconds = files.now() - t0
  result.images_per_s = result.images and result.seconds > 0 and result.images / result.seconds or nil
  return result
end

-- A finished export, opened for reading in pieces (the ensemble streams its features from it):
--   local r <close> = export.open(path)
--   r.splits = {'train', 'valid', 'test'}, r.rows = {split = n}, r.dim (feature columns), r.attrs
--   r:x(split) / r:x_rows(split, first, count)     -- (n, dim) float32, whole or rows first..first+count-1
--   r:prefetch(split, first, count), r:prefetch_probs(...)   -- start reading those rows in the background
--   r:probs(split) / r:probs_rows(split, first, count)   -- (n, K) or nil (the model's own probabilities)
--   r:labels(split) (1-based int64 or nil), r:ids(split), r:images(split), r:skipped(split) (paths),
--   r:index(split) (each row's 1-based position in the data set exported, or nil in older files)
-- Opening checks that every split is complete and that its features, labels, probabilities,
-- positions, image and id lists all have the split's row count (the images asked for less those
-- skipped): a short or damaged file is an error naming the dataset, never fewer rows.
local Reader = {}
Reader.__index = Reader
Reader.__close = function(self) self:close() end

local function xname(split) return split == 'test' and 'test' or (split .. '_x') end

local function open_fail(path, fmt, ...) error(string.format('export.open: %s: ' .. fmt, path, ...), 3) end

function export.open(path)
  local h5 = require 'flower.h5'
  if type(path) ~= 'string' then error('export.open: expected a file path, got ' .. type(path), 2) end
  if not files.exists(path) then error(string.format('export.open: %s: no such file', path), 2) end
  local f = h5.open(path, 'r')
  local r = setmetatable({ path = path, file = f, attrs = {}, splits = {}, rows = {} }, Reader)
  local ok, err = pcall(function()
    for _, a in ipairs(f:attrs('/')) do r.attrs[a] = f:attr('/', a) end
    local splits = r.attrs.splits or { 'train', 'valid', 'test' }
    if type(splits) == 'string' then splits = { splits } end
    for _, name in ipairs(splits) do
      local xn = xname(name)
      local have = f:exists('/' .. xn) and f:shape('/' .. xn)[1] or 0
      local n = r.attrs[name .. '_rows']
      if r.attrs[name .. '_complete'] ~= 1 then
        open_fail(path, "split '%s' is incomplete (%d of %s rows); resume the export first", name, have, tostring(n or 0))
      end
      if math.type(n) ~= 'integer' then n = have
      elseif f:exists('/' .. name .. '_skipped') then n = n - f:shape('/' .. name .. '_skipped')[1] end
      local function check(ds)
        if not f:exists('/' .. ds) then return end
        local got = f:shape('/' .. ds)[1] or 0
        if got ~= n then
          open_fail(path, "'%s' has %d rows, expected %d (the %s split's row count): the file is short or damaged; export it again",
            ds, got, n, name)
        end
      end
      if not f:exists('/' .. xn) then open_fail(path, "split '%s' has no features ('%s')", name, xn) end
      check(xn)
      local shape = f:shape('/' .. xn)
      if #shape ~= 2 then open_fail(path, "'%s' has %d dims, expected 2 (rows, features)", xn, #shape) end
      if r.dim and shape[2] ~= r.dim then
        open_fail(path, "'%s' has %d columns, the other splits %d", xn, shape[2], r.dim)
      end
      r.dim = shape[2]
      for _, ds in ipairs({ name .. '_label', name .. '_probs', name .. '_index', name .. '_images', name .. '_ids' }) do
        check(ds)
      end
      for _, ds in ipairs({ name .. '_images', name .. '_ids' }) do
        if not f:exists('/' .. ds) then open_fail(path, "split '%s' has no '%s'", name, ds) end
      end
      r.splits[#r.splits + 1] = name
      r.rows[name] = n
    end
  end)
  if not ok then f:close(); error(err, 0) end
  return r
end

local function dataset(self, split, suffix)
  if not self.rows[split] then error(string.format("export: %s has no '%s' split", self.path, tostring(split)), 3) end
  return '/' .. (suffix and (split .. suffix) or xname(split))
end

function Reader:x(split) return self.file:read(dataset(self, split)) end
function Reader:x_rows(split, first, count) return self.file:read_slice(dataset(self, split), first, count) end
-- start reading rows first..first+count-1 of the features (or the probabilities) in the background
local function prefetch(self, name, split, first, count)
  count = math.min(count, (self.rows[split] or 0) - first + 1)
  if count > 0 then self.file:prefetch(name, first, count) end
end
function Reader:prefetch(split, first, count) prefetch(self, dataset(self, split), split, first, count) end
function Reader:prefetch_probs(split, first, count)
  if self:has_probs(split) then prefetch(self, dataset(self, split, '_probs'), split, first, count) end
end
function Reader:has_probs(split) return self.file:exists(dataset(self, split, '_probs')) end
function Reader:probs(split)
  return self:has_probs(split) and self.file:read(dataset(self, split, '_probs')) or nil
end
function Reader:probs_rows(split, first, count)
  return self:has_probs(split) and self.file:read_slice(dataset(self, split, '_probs'), first, count) or nil
end
-- a 0-based int dataset of the split as 1-based int64 (labels, image indices); nil when absent
local function one_based(self, split, suffix)
  local ds = dataset(self, split, suffix)
  if not self.file:exists(ds) then return nil end
  local raw = self.file:read(ds)
  local t = raw:type('int64') + 1
  raw:free()
  return t
end
function Reader:labels(split) return one_based(self, split, '_label') end
function Reader:ids(split) return self.file:read(dataset(self, split, '_ids')) end
function Reader:images(split) return self.file:read(dataset(self, split, '_images')) end
function Reader:skipped(split)
  local ds = dataset(self, split, '_skipped_images')
  return self.file:exists(ds) and self.file:read(ds) or {}
end
function Reader:index(split) return one_based(self, split, '_index') end
function Reader:close() if self.file then self.file:close(); self.file = nil end end

-- Reads an exported file whole: {x = {train =, valid =, test =}, label = {...} (1-based int64),
-- probs = {...}, images = {...}, ids = {...}, skipped = {split = {image paths}}, attrs = {...}}; with
-- export.open's checks.
function export.read(path)
  local f <close> = export.open(path)
  local r = { path = path, x = {}, label = {}, probs = {}, images = {}, ids = {}, skipped = {}, attrs = f.attrs }
  for _, name in ipairs(f.splits) do
    r.x[name] = f:x(name)
    r.label[name] = f:labels(name)
    r.probs[name] = f:probs(name)
    r.images[name] = f:images(name)
    r.ids[name] = f:ids(name)
    r.skipped[name] = f:skipped(name)
  end
  return r
end

return export
