-- flower.nn checkpoints (loaded by flower.nn): a model's weights and an optimizer's state in one
-- HDF5 file, written atomically (a temporary file renamed into place).
--
--   nn.save_checkpoint(path, model, {optimizer = opt, extra = {epoch = 3, best = 0.91}})
--   local extra = nn.load_checkpoint(path, model, {optimizer = opt})   -- returns the extra table
--
-- Layout (format_version 1):
--   /                           attrs format = 'flowerlua-checkpoint', format_version = 1,
--                                     model = model name, dtype = 'float32' | 'float64'
--   /model                      attrs layers = weighted layers' paths in the model's order
--   /model/<layer path>         attrs class = 'Conv2D', ..., weights = {'kernel', 'bias'} (Keras order)
--   /model/<layer path>/<w>     one dataset per weight, the model's dtype and Keras shape (HWIO ...)
--   /optimizer                  attrs kind = 'SGD' | 'Adam', iterations, lr (when a number),
--                                     weights = paths of the weights that have state
--   /optimizer/<weight path>/<slot>   the slot tensors (m, v)
--   /extra                      attrs: the caller's numbers / strings / lists
-- A layer path is the layer's name, prefixed by 'inner_model/' for layers of nested models.
-- Loading checks everything first — the same weighted layers, the same weight names, equal
-- shapes — and copies only then, so a file that does not fit leaves the model untouched; the error
-- names the layer, the weight and both shapes. Saving writes host data (the h5 binding copies device
-- tensors to the host); loading copies into the model's own tensors, on whatever device they live.
local h5 = require 'flower.h5'

return function(nn)

local FORMAT = 'flowerlua-checkpoint'

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

function nn.save_checkpoint(path, model, opts)
  opts = opts or {}
  if type(path) ~= 'string' then error('save_checkpoint: path must be a string', 2) end
  if type(model) ~= 'table' or not model._wnames then error('save_checkpoint: expected a model or a layer', 2) end
  local layers = weighted(model)
  h5.write_atomic(path, function(f)
    f:set_attr('/', 'format', FORMAT)
    f:set_attr('/', 'format_version', 1)
    f:set_attr('/', 'model', model.name)
    f:set_attr('/', 'dtype', model.dtype)
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
    local opt = opts.optimizer
    if opt then
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
    if opts.extra then
      f:create_group('/extra')
      for k, v in pairs(opts.extra) do f:set_attr('/extra', k, v) end
    end
  end)
end

local function shape_of(t) return table.concat(t:size(), 'x') end

function nn.load_checkpoint(path, model, opts)
  opts = opts or {}
  if type(model) ~= 'table' or not model._wnames then error('load_checkpoint: expected a model or a layer', 2) end
  local f <close> = h5.open(path, 'r')
  local function fail(fmt, ...) error(string.format('load_checkpoint: %s: ' .. fmt, path, ...), 3) end
  if f:attr('/', 'format') ~= FORMAT then fail('not a flowerlua checkpoint (no format attribute)') end
  local version = f:attr('/', 'format_version')
  if version ~= 1 then fail('format_version %s is not supported (this flowerlua reads 1)', tostring(version)) end
  local layers = weighted(model)
  local file_layers = f:attr('/model', 'layers') or {}
  local in_file = {}
  for _, p in ipairs(file_layers) do in_file[p] = true end
  local in_model = {}
  for _, e in ipairs(layers) do in_model[e.path] = true end
  for _, e in ipairs(layers) do
    if not in_file[e.path] then fail("the model's layer '%s' (%s) is not in the file", e.path, e.layer.class_name) end
  end
  for _, p in ipairs(file_layers) do
    if not in_model[p] then fail("the file's layer '%s' is not in the model", p) end
  end
  -- read everything into temporaries and check it before touching the model
  local staged = {}
  for _, e in ipairs(layers) do
    local g = '/model/' .. e.path
    local names = f:attr(g, 'weights') or {}
    local want = e.layer._wnames
    if table.concat(names, ',') ~= table.concat(want, ',') then
      fail("layer '%s' has weights {%s} in the model, {%s} in the file", e.path, table.concat(want, ', '),
        table.concat(names, ', '))
    end
    for _, n in ipairs(want) do
      local t = f:read(g .. '/' .. n)
      local cur = e.layer[n]
      if shape_of(t) ~= shape_of(cur) then
        fail("layer '%s' weight '%s' has shape %s in the model, %s in the file", e.path, n, shape_of(cur), shape_of(t))
      end
      staged[#staged + 1] = {cur, t}
    end
  end
  local opt = opts.optimizer
  local ostate
  if opt then
    if not f:exists('/optimizer') then fail('no optimizer state in the file') end
    local kind = f:attr('/optimizer', 'kind')
    if kind ~= opt.kind then fail('the file holds %s optimizer state, the optimizer is %s', tostring(kind), opt.kind) end
    ostate = {kind = kind, iterations = f:attr('/optimizer', 'iterations'), lr = f:attr('/optimizer', 'lr'), slots = {}}
    local shapes = {}
    for _, e in ipairs(layers) do
      for _, n in ipairs(e.layer._wnames) do shapes[e.path .. '/' .. n] = e.layer[n] end
    end
    for _, wp in ipairs(f:attr('/optimizer', 'weights') or {}) do
      if not shapes[wp] then fail("optimizer state for '%s', which the model does not have", wp) end
      local slots = {}
      for _, k in ipairs(f:list('/optimizer/' .. wp)) do
        local t = f:read('/optimizer/' .. wp .. '/' .. k)
        if shape_of(t) ~= shape_of(shapes[wp]) then
          fail("optimizer slot %s of '%s' has shape %s, the weight %s", k, wp, shape_of(t), shape_of(shapes[wp]))
        end
        slots[k] = nn.to_device(t, nn.device_of(shapes[wp]))   -- host data to the weight's device
      end
      ostate.slots[wp] = slots
    end
  end
  local extra = {}
  if f:exists('/extra') then
    for _, k in ipairs(f:attrs('/extra')) do extra[k] = f:attr('/extra', k) end
  end
  -- everything fits: copy
  for _, p in ipairs(staged) do p[1]:copy(p[2]) end
  if opt then opt:load_state(ostate) end
  return extra
end

end
