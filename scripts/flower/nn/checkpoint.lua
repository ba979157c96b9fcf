-- flower.nn checkpoints (loaded by flower.nn): the one checkpoint format of flowerlua. train.fit's
-- last.h5 / best.h5, the pipeline, the tests and the GPU tests all read and write it: a model's
-- weights, an optimizer's state and a table of training state in one HDF5 file, written atomically
-- (a temporary file renamed into place).
--
--   nn.save_checkpoint(path, model, {optimizer = opt, meta = {epoch = 3, best = 0.91, ...}})
--   local meta = nn.load_checkpoint(path, model, {optimizer = opt})   -- the meta table ({} if none)
--
-- Layout (format_version 2):
--   /                           attrs format = 'flowerlua-checkpoint', format_version = 2,
--                                     model = model name, dtype = 'float32' | 'float64',
--                                     meta = the meta table as JSON (numbers to the last bit)
--   /model                      attrs layers = weighted layers' paths in the model's order
--   /model/<layer path>         attrs class = 'Conv2D', ..., weights = {'kernel', 'bias'} (Keras order)
--   /model/<layer path>/<w>     one dataset per weight (BatchNorm's moving statistics included),
--                               the model's dtype and Keras shape (HWIO ...)
--   /optimizer                  attrs kind = 'SGD' | 'Adam', iterations, lr (when a number),
--                                     weights = paths of the weights that have state
--   /optimizer/<weight path>/<slot>   the slot tensors (m, v)
-- A layer path is the layer's name, prefixed by 'inner_model/' for layers of nested models.
-- The files of train.save_checkpoint before format 2 load too (no format attribute;
-- /weights/<weight path>, /optimizer/slots/<weight path>/<slot>, the meta as JSON in the root
-- attribute flower_train): tests/data/checkpoint_legacy.h5 is one. (Format 1 was written by tests only.)
-- Loading checks everything first — the same weighted layers, the same weight names, equal
-- shapes — and copies only then, so a file that does not fit leaves the model untouched; the error
-- names the layer, the weight and both shapes. Saving writes host data (the h5 binding copies device
-- tensors to the host); loading copies into the model's own tensors, on whatever device they live.
-- Crash tests: FLOWER_KILLPOINT='checkpoint.before_rename[:n]' kills the process when the
-- temporary file is complete but not yet renamed, 'checkpoint.after_rename[:n]' just after.
local h5 = require 'flower.h5'
local files = require 'flower.files'

return function(nn)

local FORMAT = 'flowerlua-checkpoint'
local VERSION = 2

-- weighted layers of a model (or a single layer) with their paths
local function weighted(model)
  local ls, prefixes
  if model._is_model then ls, prefixes = model._leaves(model)
  else ls, prefixes = {model}, {''} end
  local r = {}
  for i, l in ipairs(ls) do
    if #l._wnames > 0 then r[#r + 1] = {path = prefixes[i] .. l.name, layer = l} end
  end
  return r
end

local function write_optimizer(f, opt)
  local st = opt:state()
  f:create_group('/optimizer')
  f:set_attr('/optimizer', 'kind', st.kind)
  f:set_attr('/optimizer', 'iterations', st.iterations)
  if st.lr then f:set_attr('/optimizer', 'lr', st.lr) end
  local wpaths = {}
  for wp, slots in pairs(st.slots) do
    wpaths[#wpaths + 1] = wp
    for k, t in pairs(slots) do f:write('/optimizer/' .. wp .. '/' .. k, t) end
  end
  table.sort(wpaths)
  if #wpaths > 0 then f:set_attr('/optimizer', 'weights', wpaths) end
end

function nn.save_checkpoint(path, model, opts)
  opts = opts or {}
  if type(path) ~= 'string' then error('save_checkpoint: path must be a string', 2) end
  if type(model) ~= 'table' or not model._wnames then error('save_checkpoint: expected a model or a layer', 2) end
  if opts.meta ~= nil and type(opts.meta) ~= 'table' then error('save_checkpoint: meta must be a table', 2) end
  -- encoded first: a table JSON cannot hold fails before any file is touched
  local meta = opts.meta and files.json_encode(opts.meta)
  local layers = weighted(model)
  files.mkdir(files.dirname(path))
  h5.write_atomic(path, function(f)
    f:set_attr('/', 'format', FORMAT)
    f:set_attr('/', 'format_version', VERSION)
    f:set_attr('/', 'model', model.name)
    f:set_attr('/', 'dtype', model.dtype)
    if meta then f:set_attr('/', 'meta', meta) end
    local paths = {}
    for i, e in ipairs(layers) do paths[i] = e.path end
    f:create_group('/model')
    f:set_attr('/model', 'layers', paths)
    for _, e in ipairs(layers) do
      local g = '/model/' .. e.path
      for _, n in ipairs(e.layer._wnames) do f:write(g .. '/' .. n, e.layer[n]) end
      f:set_attr(g, 'class', e.layer.class_name)
      f:set_attr(g, 'weights', e.layer._wnames)
    end
    if opts.optimizer and opts.optimizer.state then write_optimizer(f, opts.optimizer) end
    files.killpoint('checkpoint.before_rename')
  end)
  files.killpoint('checkpoint.after_rename')
  return path
end

local function shape_of(t) return table.concat(t:size(), 'x') end

-- Where a file keeps what: {weight = function(layer path, weight name) -> dataset path,
-- optimizer = group or nil, slot_paths = function() -> list of weight paths with state,
-- slot = function(weight path, slot name) -> dataset path, meta = table}
local function layout_v2(f, path)
  local text = f:attr('/', 'meta')
  return {
    layers = f:attr('/model', 'layers') or {},
    names = function(lpath) return f:attr('/model/' .. lpath, 'weights') or {} end,
    weight = function(lpath, n) return '/model/' .. lpath .. '/' .. n end,
    optimizer = f:exists('/optimizer'),
    slot_paths = function() return f:attr('/optimizer', 'weights') or {} end,
    slots = function(wp) return f:list('/optimizer/' .. wp) end,
    slot = function(wp, k) return '/optimizer/' .. wp .. '/' .. k end,
    meta = text ~= nil and files.json_decode(text, path .. ': meta') or {},
  }
end

-- train.save_checkpoint's files (before format 2): the weights' paths are the dataset paths under
-- /weights; the file has the layers it has, so the model's list stands for it.
local function layout_legacy(f, path, layers)
  local ls = {}
  for _, e in ipairs(layers) do
    if f:exists('/weights/' .. e.path) then ls[#ls + 1] = e.path end
  end
  local slot_paths = {}
  local function walk(group, rel)
    for _, name in ipairs(f:list(group)) do
      local child = group .. '/' .. name
      local r = rel and (rel .. '/' .. name) or name
      if f:kind(child) == 'group' then walk(child, r)
      elseif not slot_paths[rel] then slot_paths[rel] = true; slot_paths[#slot_paths + 1] = rel end
    end
  end
  if f:exists('/optimizer/slots') then walk('/optimizer/slots', nil) end
  return {
    layers = ls,
    names = function(lpath) return f:list('/weights/' .. lpath) end,
    weight = function(lpath, n) return '/weights/' .. lpath .. '/' .. n end,
    optimizer = f:exists('/optimizer'),
    slot_paths = function() return slot_paths end,
    slots = function(wp) return f:list('/optimizer/slots/' .. wp) end,
    slot = function(wp, k) return '/optimizer/slots/' .. wp .. '/' .. k end,
    meta = files.json_decode(f:attr('/', 'flower_train'), path),
  }
end

function nn.load_checkpoint(path, model, opts)
  opts = opts or {}
  if type(path) ~= 'string' then error('load_checkpoint: path must be a string', 2) end
  if type(model) ~= 'table' or not model._wnames then error('load_checkpoint: expected a model or a layer', 2) end
  local function fail(fmt, ...) error(string.format('load_checkpoint: %s: ' .. fmt, path, ...), 3) end
  local ok, f = pcall(h5.open, path, 'r')
  if not ok then   -- h5.open's message names the path too: say it once
    local msg = tostring(f)
    local at = msg:find(path .. ': ', 1, true)
    fail('%s', at and msg:sub(at + #path + 2) or msg)
  end
  local _ <close> = f
  local layers = weighted(model)
  local L
  if f:attr('/', 'format') == FORMAT then
    local version = f:attr('/', 'format_version')
    if version ~= VERSION then
      fail('format_version %s is not supported (this flowerlua reads %d and the files before it)', tostring(version), VERSION)
    end
    L = layout_v2(f, path)
  elseif type(f:attr('/', 'flower_train')) == 'string' then
    L = layout_legacy(f, path, layers)
  else
    fail('not a flowerlua checkpoint (no format attribute)')
  end
  local in_file = {}
  for _, p in ipairs(L.layers) do in_file[p] = true end
  local in_model = {}
  for _, e in ipairs(layers) do in_model[e.path] = true end
  for _, e in ipairs(layers) do
    if not in_file[e.path] then fail("the model's layer '%s' (%s) is not in the file", e.path, e.layer.class_name) end
  end
  for _, p in ipairs(L.layers) do
    if not in_model[p] then fail("the file's layer '%s' is not in the model", p) end
  end
  -- read everything into temporaries and check it before touching the model
  local staged = {}
  for _, e in ipairs(layers) do
    local names, want = L.names(e.path), e.layer._wnames
    local have = {}
    for _, n in ipairs(names) do have[n] = true end
    local same = #names == #want
    for _, n in ipairs(want) do same = same and have[n] end
    if not same then
      fail("layer '%s' has weights {%s} in the model, {%s} in the file", e.path, table.concat(want, ', '),
        table.concat(names, ', '))
    end
    for _, n in ipairs(want) do
      local t = f:read(L.weight(e.path, n))
      local cur = e.layer[n]
      if shape_of(t) ~= shape_of(cur) then
        fail("layer '%s' weight '%s' has shape %s in the model, %s in the file", e.path, n, shape_of(cur), shape_of(t))
      end
      staged[#staged + 1] = {cur, t}
    end
  end
  local opt = opts.optimizer
  if opt and not opt.load_state then opt = nil end   -- a plain function steps without state
  local ostate
  if opt then
    if not L.optimizer then fail('no optimizer state in the file') end
    local kind = f:attr('/optimizer', 'kind')
    if kind ~= opt.kind then fail('the file holds %s optimizer state, the optimizer is %s', tostring(kind), opt.kind) end
    ostate = {kind = kind, iterations = f:attr('/optimizer', 'iterations'), lr = f:attr('/optimizer', 'lr'), slots = {}}
    local shapes = {}
    for _, e in ipairs(layers) do
      for _, n in ipairs(e.layer._wnames) do shapes[e.path .. '/' .. n] = e.layer[n] end
    end
    for _, wp in ipairs(L.slot_paths()) do
      if not shapes[wp] then fail("optimizer state for '%s', which the model does not have", wp) end
      local slots = {}
      for _, k in ipairs(L.slots(wp)) do
        local t = f:read(L.slot(wp, k))
        if shape_of(t) ~= shape_of(shapes[wp]) then
          fail("optimizer slot %s of '%s' has shape %s, the weight %s", k, wp, shape_of(t), shape_of(shapes[wp]))
        end
        slots[k] = nn.to_device(t, nn.device_of(shapes[wp]))   -- host data to the weight's device
      end
      ostate.slots[wp] = slots
    end
  end
  -- everything fits: copy
  for _, p in ipairs(staged) do p[1]:copy(p[2]) end
  if opt then opt:load_state(ostate) end
  return L.meta
end

end
