-- flower.keras: Keras's HDF5 files (weights and whole models) for flower.nn models.
--
--   local keras = require 'flower.keras'
--   keras.load_weights(model, 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5')
--   keras.load_weights(model, 'w.h5', {by_name=true, skip_mismatch=true}) --> report
--   keras.save_weights(model, 'w.h5')            -- Keras 2 layout; Keras can load it
--   local m = keras.load_model('model.h5')       -- Sequential / Functional from model_config
--
-- FILE LAYOUT (../shared/specs/keras_applications.md §1, §6). The root (or /model_weights in a
-- whole-model file) has `layer_names` (or chunks layer_names0, layer_names1, ... when the list
-- passes 64 KiB), naming one group per layer of Keras's model.layers, weightless layers included.
-- Each group has `weight_names`, the datasets in Keras order, as paths relative to the group:
-- `conv1/kernel:0` (Keras 2), `conv1_W:0` (Keras 1), `sequential/conv1/kernel` (Keras 3). They are
-- opened exactly as listed, never rebuilt from names.
--
-- MATCHING. By order (the default, as Keras's load_weights): the model's layers with weights, in
-- Keras's model.layers order (model:keras_layers(), Keras's _map_graph_network), pair with the
-- file's groups with weights, in file order, whatever their names; so the Keras 1 ResNet50 file,
-- the Xception file with auto names and the TF-slim-named InceptionResNetV2 file all load. By name
-- (by_name=true): a layer takes the group of its name; groups and layers without a partner are
-- reported (Keras ignores them silently); with skip_mismatch=true a layer whose tensor count or
-- shapes differ is skipped and reported instead of failing (a new classifier head), every one of
-- them named on stderr.
-- AUTOMATIC NAMES. Unnamed layers are numbered per class prefix: tf.keras, Keras 3 and flowerlua
-- name them conv2d, conv2d_1, conv2d_2 ...; standalone Keras 1.x/2.x, which wrote the standard
-- ImageNet files, conv2d_1, conv2d_2 ... By name, the file's scheme is read off the names present,
-- per prefix: where one side has the bare prefix and the other starts at `_1`, the k-th layer of
-- that prefix pairs with the file's k-th (conv2d <-> conv2d_1, conv2d_5 <-> conv2d_6), never with
-- its neighbour; the report lists these pairs (renamed) and the file's keras_version.
-- Either way it is all-or-nothing: every tensor is read and checked into temporaries first, and the
-- model's tensors are only overwritten (in place) once all of them fit. Errors name the model's
-- layer, the file's group and both shapes.
-- A nested model (a model used as a layer) counts as one layer whose weights are its layers'
-- trainable weights followed by their non-trainable ones, as Keras stores it.
local flower = require 'flower'
local h5 = require 'flower.h5'
local nn = require 'flower.nn'

local keras = {}

-- Keras splits an attribute larger than HDF5's object-header limit into numbered chunks.
local HEADER_LIMIT = 64512

local function shape_str(t) return table.concat(t, 'x') end

-- Re-raises err from the public function `op` with the message starting `op: ` (without a location
-- inside this library, e.g. from h5.open), at the caller's level.
local function rethrow(op, err)
  local msg = tostring(err):gsub('^[^%s]-%.lua:%d+: ', '', 1)
  if msg:sub(1, #op + 1) ~= op .. ':' then msg = op .. ': ' .. msg end
  error(msg, 3)
end

-- a name list attribute, plain or chunked; nil when absent
local function read_names(f, path, name)
  local v = f:attr(path, name)
  if v ~= nil then
    if type(v) == 'string' then return {v} end
    return v
  end
  local out, k = {}, 0
  while true do
    local c = f:attr(path, name .. k)
    if c == nil then break end
    if type(c) == 'string' then c = {c} end
    for _, s in ipairs(c) do out[#out + 1] = s end
    k = k + 1
  end
  if k == 0 then return nil end
  return out
end

-- writes a name list as Keras does: fixed-length strings, chunked past 64512 bytes
-- (numpy.array_split: the first n % k chunks get one more element)
local function write_names(f, path, name, list)
  local width = 1
  for _, s in ipairs(list) do if #s > width then width = #s end end
  local n, k = #list, 1
  while n > 0 and math.ceil(n / k) * width > HEADER_LIMIT do k = k + 1 end
  if k == 1 then f:set_attr(path, name, list); return end
  local base, extra, pos = n // k, n % k, 1
  for c = 0, k - 1 do
    local len = base + (c < extra and 1 or 0)
    f:set_attr(path, name .. c, table.move(list, pos, pos + len - 1, 1, {}))
    pos = pos + len
  end
end

-------------------------------------------------------------------------------- the file side

-- Opens a Keras weight file: returns the weights group and its layer groups
-- {name, path, weight_names} in file order.
local function file_layers(f, path, op)
  local root, names = '', read_names(f, '/', 'layer_names')
  if not names and f:kind('/model_weights') == 'group' then
    root, names = '/model_weights', read_names(f, '/model_weights', 'layer_names')
  end
  if not names then
    error(string.format("%s: %s is not a Keras weight file: there is no 'layer_names' attribute at the root " ..
      "or in /model_weights", op, path), 0)
  end
  local groups = {}
  for i, n in ipairs(names) do
    local gp = root .. '/' .. n
    local kind = f:kind(gp)
    if kind ~= 'group' then
      error(string.format("%s: %s: layer_names[%d] is '%s', but the file has no group '%s' (%s)", op, path, i, n, gp,
        kind and ('found a ' .. kind) or 'missing'), 0)
    end
    local wn = read_names(f, gp, 'weight_names')
    if wn == nil then
      error(string.format("%s: %s: group '%s' has no 'weight_names' attribute", op, path, gp), 0)
    end
    for j, w in ipairs(wn) do
      if type(w) ~= 'string' then
        error(string.format("%s: %s: group '%s': weight_names[%d] is not a string", op, path, gp, j), 0)
      end
    end
    groups[i] = {name = n, path = gp, weight_names = wn}
  end
  return groups, root
end

local function weighted(groups)
  local r = {}
  for _, g in ipairs(groups) do if #g.weight_names > 0 then r[#r + 1] = g end end
  return r
end

-- keras.weighted_groups(path) -> names of the file's layer groups that hold weights, in order
function keras.weighted_groups(path)
  local f <close> = h5.open_untrusted(path)
  local r = {}
  for i, g in ipairs(weighted(file_layers(f, path, 'keras.weighted_groups'))) do r[i] = g.name end
  return r
end

-- keras.inspect(path) -> {layers = {{name, weights = {{name, shape}}}}, keras_version, backend,
-- model_config (decoded JSON or nil)} for a quick look at a file
function keras.inspect(path)
  local f <close> = h5.open_untrusted(path)
  local groups, root = file_layers(f, path, 'keras.inspect')
  local info = {layers = {}, root = root == '' and '/' or root}
  for _, g in ipairs(groups) do
    local ws = {}
    for i, w in ipairs(g.weight_names) do ws[i] = {name = w, shape = f:shape(g.path .. '/' .. w)} end
    info.layers[#info.layers + 1] = {name = g.name, weights = ws}
  end
  for _, k in ipairs({'keras_version', 'backend'}) do
    info[k] = f:attr(root == '' and '/' or root, k) or f:attr('/', k)
  end
  local cfg = f:attr('/', 'model_config')
  if cfg then info.model_config = require('cjson').decode(cfg) end
  return info
end

-------------------------------------------------------------------------------- the model side

-- the weight records of one Keras-level layer: a plain layer's own, or for a nested model every
-- trainable weight of its layers (Keras order) followed by the non-trainable ones
local function layer_weights(layer)
  if not layer._is_model then return layer:weights() end
  local tr, nt = {}, {}
  for _, l in ipairs(layer:keras_layers()) do
    for _, w in ipairs(layer_weights(l)) do
      local train = w.trainable and layer.trainable ~= false
      if train then tr[#tr + 1] = w else nt[#nt + 1] = w end
    end
  end
  for _, w in ipairs(nt) do tr[#tr + 1] = w end
  return tr
end
keras.layer_weights = layer_weights

local function model_layers(model)
  if type(model) ~= 'table' or not model._is_model then
    error('expected a flower.nn model (nn.Model or nn.Sequential), got ' .. tostring(model), 0)
  end
  if not model.built then
    error(string.format("model '%s' is not built yet (give it an input shape or run one forward first)", model.name), 0)
  end
  return model:keras_layers()
end

local function describe(layer) return string.format("layer '%s' (%s)", layer.name, layer.class_name) end

-------------------------------------------------------------------------------- loading

-- Reads group g's tensors for `layer` into temporaries; checks count and shapes.
-- Returns the list of tensors, or nil and a message.
local function read_group(f, path, layer, g, where)
  local ws = layer_weights(layer)
  if #ws ~= #g.weight_names then
    local mine = {}
    for i, w in ipairs(ws) do mine[i] = w.name end
    return nil, string.format("%s has %d weights (%s) but the file's group '%s' has %d (%s)%s", describe(layer), #ws,
      table.concat(mine, ', '), g.name, #g.weight_names, table.concat(g.weight_names, ', '), where)
  end
  local tmp = {}
  for i, w in ipairs(ws) do
    local dpath = g.path .. '/' .. g.weight_names[i]
    local kind = f:kind(dpath)
    if kind ~= 'dataset' then
      return nil, string.format("the file's group '%s' lists weight '%s' but %s holds %s", g.name, g.weight_names[i],
        dpath, kind and ('a ' .. kind) or 'nothing')
    end
    local fshape = f:shape(dpath)
    local mshape = w.tensor:size()
    if shape_str(fshape) ~= shape_str(mshape) then
      return nil, string.format("%s weight '%s' has shape %s, but the file's group '%s' has '%s' of shape %s%s",
        describe(layer), w.name, shape_str(mshape), g.name, g.weight_names[i], shape_str(fshape), where)
    end
    local t = f:read(dpath)
    if not flower.is_tensor(t) then
      return nil, string.format("the file's dataset %s holds strings, not numbers", dpath)
    end
    tmp[i] = t
  end
  return tmp
end

-- Copies the temporaries into the model, in place (nothing here can fail: shapes were checked).
local function commit(pairs_)
  for _, p in ipairs(pairs_) do
    local ws = layer_weights(p.layer)
    for i, w in ipairs(ws) do w.tensor:copy(p.tensors[i]) end
  end
end

-- the shapes of a layer's weights and of a group's datasets, as '3x3x3x32,32'
local function layer_shapes(l)
  local r = {}
  for i, w in ipairs(layer_weights(l)) do r[i] = shape_str(w.tensor:size()) end
  return table.concat(r, ',')
end
local function group_shapes(f, g)
  local r = {}
  for i, w in ipairs(g.weight_names) do
    local ok, sh = pcall(f.shape, f, g.path .. '/' .. w)
    r[i] = ok and shape_str(sh) or '?'
  end
  return table.concat(r, ',')
end

-- Which layers lack a partner when the model and the file have different counts: by name when the
-- names mostly agree, else the first place where walking both lists in order finds other shapes.
local function unpaired(f, ml, fl)
  local fnames, mnames = {}, {}
  for _, g in ipairs(fl) do fnames[g.name] = true end
  for _, l in ipairs(ml) do mnames[l.name] = true end
  local lacking, extra, common = {}, {}, 0
  for _, l in ipairs(ml) do if fnames[l.name] then common = common + 1 else lacking[#lacking + 1] = l.name end end
  for _, g in ipairs(fl) do if not mnames[g.name] then extra[#extra + 1] = g.name end end
  local function list(t) return table.concat(t, "', '", 1, math.min(#t, 8)) .. (#t > 8 and "', ..." or "'") end
  if common >= math.min(#ml, #fl) / 2 and (#lacking > 0 or #extra > 0) then
    local parts = {}
    if #lacking > 0 then parts[#parts + 1] = string.format("the file has no weights for the model's layer(s) '%s", list(lacking)) end
    if #extra > 0 then parts[#parts + 1] = string.format("the model has no layer for the file's group(s) '%s", list(extra)) end
    return ' (' .. table.concat(parts, '; ') .. ')'
  end
  for i = 1, math.min(#ml, #fl) do
    local a, b = layer_shapes(ml[i]), group_shapes(f, fl[i])
    if a ~= b then
      return string.format(" (walking both in order, the first that differ are the model's layer %d '%s' (%s) and " ..
        "the file's group %d '%s' (%s))", i, ml[i].name, a, i, fl[i].name, b)
    end
  end
  local first = math.min(#ml, #fl)
  if #ml > #fl then return string.format(" (the model's layer %d, '%s', has no counterpart)", first + 1, ml[first + 1].name) end
  return string.format(" (the file's group %d, '%s', has no counterpart)", first + 1, fl[first + 1].name)
end

-- A hint when a ResNet50 file of the other Keras generation meets the model: the Keras 1 file names
-- its layers conv1, bn_conv1, res2a_branch2a...; tf.keras conv1_conv, conv1_bn...
local function variant_hint(model, fl)
  local first = fl[1] and fl[1].name
  local has = function(n) return (pcall(model.layer, model, n)) end
  if first == 'conv1' and has('conv1_conv') then
    return "; the file is the Keras 1 ResNet50 (conv1, bn_conv1, ...): build the model with variant='keras1', or " ..
      "pass the file as weights= to flower.models.resnet50, which detects it"
  elseif first == 'conv1_conv' and has('bn_conv1') then
    return "; the file is the tf.keras ResNet50 (conv1_conv, conv1_bn, ...): build the model with variant='keras2'"
  end
  return ''
end

local function load_by_order(f, path, model, groups, op)
  local fl = weighted(groups)
  local ml = {}
  for _, l in ipairs(model_layers(model)) do if #layer_weights(l) > 0 then ml[#ml + 1] = l end end
  if #ml ~= #fl then
    error(string.format('%s: %s: the model %s has %d layers with weights, the file %d%s; layers are matched by ' ..
      'order (pass by_name=true to match names)%s; nothing was loaded', op, path, model.name, #ml, #fl,
      unpaired(f, ml, fl), variant_hint(model, fl)), 0)
  end
  local plan = {}
  for i, l in ipairs(ml) do
    local where = string.format(' (matched by order: layer %d of %d)', i, #ml)
    local tensors, err = read_group(f, path, l, fl[i], where)
    if not tensors then error(string.format('%s: %s: %s%s; nothing was loaded', op, path, err, variant_hint(model, fl)), 0) end
    plan[i] = {layer = l, tensors = tensors, group = fl[i].name}
  end
  commit(plan)
  return {matched = 'order', loaded = #plan, skipped = {}, missing_in_file = {}, unused_in_file = {}, renamed = {}}
end

-- A name's automatic-numbering parts: 'conv2d_5' -> 'conv2d', 5; 'conv2d' -> 'conv2d', 0.
local function numbered(name)
  local p, k = name:match('^(.-)_(%d+)$')
  if p and p ~= '' then return p, tonumber(k) end
  return name, 0
end

-- The file-group name for each model layer name whose automatic numbering differs from the file's
-- (see AUTOMATIC NAMES above): {[model name] = file name}. A prefix counts as zero-based on a side
-- that has it bare, one-based on a side that has `<prefix>_1` but not the bare prefix.
local function scheme_map(model_names, file_names)
  local function bases(names)
    local has, b = {}, {}
    for _, n in ipairs(names) do has[n] = true end
    for _, n in ipairs(names) do
      local p, k = numbered(n)
      if k == 0 then b[p] = 0 elseif k == 1 and not has[p] then b[p] = 1 end
    end
    return b
  end
  local mb, fb = bases(model_names), bases(file_names)
  local map = {}
  for _, n in ipairs(model_names) do
    local p, k = numbered(n)
    local shift = (mb[p] ~= nil and fb[p] ~= nil) and (fb[p] - mb[p]) or 0
    if shift ~= 0 then
      local j = k + shift
      map[n] = j == 0 and p or (p .. '_' .. j)
    end
  end
  return map
end
keras.scheme_map = scheme_map

local function load_by_name(f, path, model, groups, op, skip_mismatch)
  local by_name, order = {}, {}
  for _, l in ipairs(model_layers(model)) do
    if #layer_weights(l) > 0 then order[#order + 1] = l end
  end
  local fl = weighted(groups)
  local mnames, fnames = {}, {}
  for i, l in ipairs(order) do mnames[i] = l.name end
  for i, g in ipairs(fl) do fnames[i] = g.name end
  local map = scheme_map(mnames, fnames)
  local report = {matched = 'name', loaded = 0, skipped = {}, missing_in_file = {}, unused_in_file = {}, renamed = {},
                  keras_version = f:attr('/', 'keras_version')}
  for _, l in ipairs(order) do
    local fname = map[l.name] or l.name
    by_name[fname] = l
    if map[l.name] then report.renamed[#report.renamed + 1] = {layer = l.name, group = fname} end
  end
  local plan, seen = {}, {}
  for _, g in ipairs(fl) do
    local l = by_name[g.name]
    if not l then
      report.unused_in_file[#report.unused_in_file + 1] = g.name
    else
      seen[l] = true
      local tensors, err = read_group(f, path, l, g, map[l.name] and
        string.format(" (the file numbers unnamed layers from _1: its '%s' is the model's '%s')", g.name, l.name) or '')
      if tensors then
        plan[#plan + 1] = {layer = l, tensors = tensors, group = g.name}
      elseif skip_mismatch then
        report.skipped[#report.skipped + 1] = {layer = l.name, reason = err}
      else
        error(string.format('%s: %s: %s (by name; skip_mismatch=true skips such layers); nothing was loaded', op,
          path, err), 0)
      end
    end
  end
  for _, l in ipairs(order) do if not seen[l] then report.missing_in_file[#report.missing_in_file + 1] = l.name end end
  commit(plan)
  report.loaded = #plan
  return report
end

-- What a by-name load did, for people: the counts, then every skipped layer with its reason, every
-- layer the file has no weights for, and the renaming of automatic names if any.
function keras.print_report(res, path, out)
  out = out or io.stdout
  out:write(string.format('keras.load_weights: %s: loaded %d layers by name; %d skipped (mismatch), %d not in the file%s\n',
    path, res.loaded, #res.skipped, #res.missing_in_file,
    #res.renamed > 0 and string.format('; %d automatic names matched across numbering schemes (%s -> %s, ...)',
      #res.renamed, res.renamed[1].layer, res.renamed[1].group) or ''))
  for _, s in ipairs(res.skipped) do out:write(string.format('  skipped %s: %s\n', s.layer, s.reason)) end
  for _, n in ipairs(res.missing_in_file) do out:write(string.format('  not in the file: %s\n', n)) end
end

-- keras.load_weights(model, path [, {by_name=false, skip_mismatch=false, quiet=false}]) -> report
-- report: {matched='order'|'name', loaded=<layers>, skipped={{layer, reason}}, missing_in_file={names},
-- unused_in_file={names}, renamed={{layer, group}} (automatic names paired across numbering schemes),
-- keras_version}; by name, anything not loaded (each skipped layer with its reason, each layer
-- missing from the file) is also printed on stderr unless quiet.
function keras.load_weights(model, path, opts)
  local op = 'keras.load_weights'
  opts = opts or {}
  if type(path) ~= 'string' then error(op .. ': path must be a string, got ' .. type(path), 2) end
  if opts.skip_mismatch and not opts.by_name then
    error(op .. ': skip_mismatch=true needs by_name=true (as in Keras)', 2)
  end
  local ok, res = pcall(function()
    model_layers(model)
    local f <close> = h5.open_untrusted(path)
    local groups = file_layers(f, path, op)
    if opts.by_name then return load_by_name(f, path, model, groups, op, opts.skip_mismatch) end
    return load_by_order(f, path, model, groups, op)
  end)
  if not ok then rethrow(op, res) end
  if opts.by_name and not opts.quiet and (#res.skipped > 0 or #res.missing_in_file > 0 or #res.renamed > 0) then
    keras.print_report(res, path, io.stderr)
  end
  return res
end

-------------------------------------------------------------------------------- saving

-- Writes the weights group of `layers` (a model's model_layers) under `root` of an open file
-- (Keras 2 layout).
local function write_weights(f, root, layers)
  local names = {}
  for i, l in ipairs(layers) do names[i] = l.name end
  local r = root == '' and '/' or root
  f:create_group(r)
  write_names(f, r, 'layer_names', names)
  f:set_attr(r, 'backend', 'tensorflow')
  f:set_attr(r, 'keras_version', keras.layout_version)
  for _, l in ipairs(layers) do
    local gp = root .. '/' .. l.name
    f:create_group(gp)
    local wn = {}
    for i, w in ipairs(layer_weights(l)) do
      local owner = w.layer and w.layer.name or l.name
      wn[i] = owner .. '/' .. w.name .. ':0'
      f:write(gp .. '/' .. wn[i], w.tensor)
    end
    write_names(f, gp, 'weight_names', wn)
  end
end

-- The Keras version whose layout save_weights writes (Keras only treats '1' specially).
keras.layout_version = '2.2.4'

-- keras.save_weights(model, path): a Keras 2 weight file (tf.keras's save_weights .h5 layout),
-- written atomically. Keras loads it with model.load_weights(path); so does keras.load_weights.
function keras.save_weights(model, path)
  if type(path) ~= 'string' then error('keras.save_weights: path must be a string', 2) end
  local ok, err = pcall(function()
    model_layers(model)
    h5.write_atomic(path, function(f)
      write_weights(f, '', model_layers(model))
      f:set_attr('/', 'flowerlua_version', flower.version or '?')
    end)
  end)
  if not ok then rethrow('keras.save_weights', err) end
end

-------------------------------------------------------------------------------- whole models

local cjson_ok, cjson = pcall(require, 'cjson')
local null = cjson_ok and cjson.null or nil

local function isnull(v) return v == nil or v == null end

-- Keras config values that never change a forward pass once the weights are loaded
local ignorable = {
  name = true, trainable = true, dtype = true, kernel_initializer = true, bias_initializer = true,
  kernel_regularizer = true, bias_regularizer = true, activity_regularizer = true, kernel_constraint = true,
  bias_constraint = true, depthwise_initializer = true, pointwise_initializer = true,
  depthwise_regularizer = true, pointwise_regularizer = true, depthwise_constraint = true,
  pointwise_constraint = true, beta_initializer = true, gamma_initializer = true,
  moving_mean_initializer = true, moving_variance_initializer = true, beta_regularizer = true,
  gamma_regularizer = true, beta_constraint = true, gamma_constraint = true, batch_input_shape = true,
  batch_size = true, build_config = true, quantization_config = true, module = true, registered_name = true,
  input_dim = true, input_shape = true, seed = true, lora_rank = true, lora_alpha = true,
}

local function pairify(v) if type(v) == 'table' then return {v[1], v[2]} end return v end

-- option value checks: a config key with a value other than the default we support is an error
local function want(cfg, key, ok_values, layer, cls)
  local v = cfg[key]
  if isnull(v) then return end
  for _, ok in ipairs(ok_values) do
    if v == ok then return end
    if type(v) == 'table' and type(ok) == 'table' then
      local same = #v == #ok
      for i = 1, #ok do if v[i] ~= ok[i] then same = false end end
      if same then return end
    end
  end
  error(string.format("keras.load_model: layer '%s' (%s): option %s=%s is not supported by flowerlua", layer, cls,
    key, type(v) == 'table' and cjson.encode(v) or tostring(v)), 0)
end

local function activation_of(v, layer, cls)
  if isnull(v) then return nil end
  if type(v) == 'table' then  -- Keras 3 may serialise a function object
    v = v.config and (v.config.name or v.config) or v.class_name
  end
  if type(v) ~= 'string' then
    error(string.format("keras.load_model: layer '%s' (%s): unsupported activation %s", layer, cls, tostring(v)), 0)
  end
  if v == 'linear' then return nil end
  if not nn.activations[v] then
    error(string.format("keras.load_model: layer '%s' (%s): activation '%s' is not supported (flowerlua has " ..
      "linear, relu, sigmoid, softmax, tanh)", layer, cls, v), 0)
  end
  return v
end

-- Keras class -> {keys it reads; build(cfg, name) -> layer}
local converters = {}

local function conv_common(c, n, cls)
  want(c, 'data_format', {'channels_last'}, n, cls)
  want(c, 'groups', {1}, n, cls)
  return {kernel_size = pairify(c.kernel_size), strides = pairify(c.strides or 1), padding = c.padding,
          dilation_rate = pairify(c.dilation_rate or 1), use_bias = c.use_bias ~= false,
          activation = activation_of(c.activation, n, cls), name = n}
end

converters.Conv2D = {keys = {'filters', 'kernel_size', 'strides', 'padding', 'dilation_rate', 'use_bias',
  'activation', 'data_format', 'groups'}, build = function(c, n)
  local o = conv_common(c, n, 'Conv2D')
  o.filters = c.filters
  return nn.Conv2D(o)
end}
converters.DepthwiseConv2D = {keys = {'kernel_size', 'strides', 'padding', 'dilation_rate', 'use_bias',
  'activation', 'data_format', 'depth_multiplier', 'groups'}, build = function(c, n)
  local o = conv_common(c, n, 'DepthwiseConv2D')
  o.depth_multiplier = c.depth_multiplier or 1
  return nn.DepthwiseConv2D(o)
end}
converters.SeparableConv2D = {keys = {'filters', 'kernel_size', 'strides', 'padding', 'dilation_rate', 'use_bias',
  'activation', 'data_format', 'depth_multiplier', 'groups'}, build = function(c, n)
  local o = conv_common(c, n, 'SeparableConv2D')
  o.filters, o.depth_multiplier = c.filters, c.depth_multiplier or 1
  return nn.SeparableConv2D(o)
end}
converters.BatchNormalization = {keys = {'axis', 'momentum', 'epsilon', 'center', 'scale', 'synchronized',
  'renorm', 'renorm_clipping', 'renorm_momentum', 'fused', 'virtual_batch_size', 'adjustment'}, build = function(c, n)
  want(c, 'renorm', {false}, n, 'BatchNormalization')
  want(c, 'virtual_batch_size', {}, n, 'BatchNormalization')
  want(c, 'adjustment', {}, n, 'BatchNormalization')
  local axis = c.axis
  if type(axis) == 'table' then
    if #axis ~= 1 then
      error(string.format("keras.load_model: layer '%s' (BatchNormalization): several axes are not supported", n), 0)
    end
    axis = axis[1]
  end
  return nn.BatchNormalization{axis = math.tointeger(axis) or -1, momentum = c.momentum, epsilon = c.epsilon,
                               center = c.center ~= false, scale = c.scale ~= false, name = n}
end}
converters.Activation = {keys = {'activation'}, build = function(c, n)
  return nn.Activation{activation = activation_of(c.activation, n, 'Activation') or 'linear', name = n}
end}
converters.ReLU = {keys = {'max_value', 'negative_slope', 'threshold'}, build = function(c, n)
  want(c, 'max_value', {}, n, 'ReLU')
  want(c, 'negative_slope', {0}, n, 'ReLU')
  want(c, 'threshold', {0}, n, 'ReLU')
  return nn.ReLU{name = n}
end}
converters.Softmax = {keys = {'axis'}, build = function(c, n)
  want(c, 'axis', {-1}, n, 'Softmax')
  return nn.Softmax{name = n}
end}
for _, cls in ipairs({'MaxPooling2D', 'AveragePooling2D'}) do
  converters[cls] = {keys = {'pool_size', 'strides', 'padding', 'data_format'}, build = function(c, n)
    want(c, 'data_format', {'channels_last'}, n, cls)
    return nn[cls]{pool_size = pairify(c.pool_size), strides = not isnull(c.strides) and pairify(c.strides) or nil,
                   padding = c.padding, name = n}
  end}
end
for _, cls in ipairs({'GlobalAveragePooling2D', 'GlobalMaxPooling2D'}) do
  converters[cls] = {keys = {'data_format', 'keepdims'}, build = function(c, n)
    want(c, 'data_format', {'channels_last'}, n, cls)
    return nn[cls]{keepdims = c.keepdims == true, name = n}
  end}
end
converters.Dense = {keys = {'units', 'activation', 'use_bias'}, build = function(c, n)
  return nn.Dense{units = c.units, activation = activation_of(c.activation, n, 'Dense'), use_bias = c.use_bias ~= false,
                  name = n}
end}
converters.Dropout = {keys = {'rate', 'noise_shape'}, build = function(c, n)
  want(c, 'noise_shape', {}, n, 'Dropout')
  return nn.Dropout{rate = c.rate, name = n}
end}
converters.Flatten = {keys = {'data_format'}, build = function(c, n)
  want(c, 'data_format', {'channels_last'}, n, 'Flatten')
  return nn.Flatten{name = n}
end}
converters.Reshape = {keys = {'target_shape'}, build = function(c, n)
  return nn.Reshape{target_shape = c.target_shape, name = n}
end}
converters.Concatenate = {keys = {'axis'}, build = function(c, n) return nn.Concatenate{axis = c.axis, name = n} end}
converters.Add = {keys = {}, build = function(_, n) return nn.Add{name = n} end}
converters.ZeroPadding2D = {keys = {'padding', 'data_format'}, build = function(c, n)
  want(c, 'data_format', {'channels_last'}, n, 'ZeroPadding2D')
  return nn.ZeroPadding2D{padding = c.padding, name = n}
end}
converters.CustomScaleLayer = {keys = {'scale'}, build = function(c, n)
  return nn.ScaledAdd{scale = c.scale, name = n, type_name = 'CustomScaleLayer'}
end}

converters.FlowerPreprocess = {keys = {'mode'}, build = function(c, n) return nn.Preprocess{mode = c.mode, name = n} end}
converters.Rescaling = {keys = {'scale', 'offset'}, build = function(c, n)
  want(c, 'offset', {0}, n, 'Rescaling')
  if type(c.scale) ~= 'number' then
    error(string.format("keras.load_model: layer '%s' (Rescaling): only a single number scale is supported", n), 0)
  end
  return nn.Scale{scale = c.scale, name = n}
end}

local function layer_from_config(spec)
  local cls, cfg = spec.class_name, spec.config or {}
  local name = cfg.name
  local conv = converters[cls]
  if not conv then
    local why = cls == 'Lambda' and ' (a Lambda holds Python code)' or ''
    error(string.format("keras.load_model: layer '%s' has type %s, which flowerlua does not support%s", tostring(name),
      tostring(cls), why), 0)
  end
  local known = {}
  for _, k in ipairs(conv.keys) do known[k] = true end
  for k, v in pairs(cfg) do
    if not known[k] and not ignorable[k] and not isnull(v) then
      error(string.format("keras.load_model: layer '%s' (%s): option '%s' is not supported by flowerlua", name, cls, k), 0)
    end
  end
  local ok, layer = pcall(conv.build, cfg, name)
  if not ok then
    local msg = tostring(layer)
    if not msg:find('keras.load_model', 1, true) then msg = "keras.load_model: layer '" .. tostring(name) .. "': " .. msg end
    error(msg, 0)
  end
  if cfg.trainable == false then layer.trainable = false end
  return layer
end

-- InputLayer / batch_input_shape -> nn.Input node
local function input_from(cfg, name)
  local bs = cfg.batch_shape
  if isnull(bs) then bs = cfg.batch_input_shape end
  if isnull(bs) or type(bs) ~= 'table' then
    error(string.format("keras.load_model: input '%s' has no batch_shape / batch_input_shape", tostring(name)), 0)
  end
  local shape = {}
  for i = 2, #bs do
    local v = bs[i]
    shape[#shape + 1] = isnull(v) and -1 or math.tointeger(v)
  end
  return nn.Input{shape = shape, name = name}
end

-- The (layer, node, tensor) references of one inbound node, in argument order, for Keras 2
-- ([[name, node, tensor, kwargs], ...]) and Keras 3 ({args = [...keras tensors...], kwargs}).
local function inbound_refs(node)
  local refs = {}
  if node.args ~= nil then
    local function walk(v)
      if type(v) ~= 'table' then return end
      if v.class_name == '__keras_tensor__' then
        local h = v.config.keras_history
        refs[#refs + 1] = {h[1], h[2], h[3]}
        return
      end
      for _, x in ipairs(v) do walk(x) end
    end
    walk(node.args)
  else
    for _, r in ipairs(node) do refs[#refs + 1] = {r[1], r[2], r[3]} end
  end
  return refs
end

local function ref_list(v)
  if isnull(v) then return {} end
  if type(v[1]) == 'string' then return {v} end   -- Keras 3 writes a single input as [name, 0, 0]
  return v
end

local build_model

-- a Functional config -> nn.Model
local function build_functional(config)
  local nodes = {}         -- layer name -> output node
  local is_model = {}
  local made = {}
  for _, spec in ipairs(config.layers) do
    local cfg = spec.config or {}
    local name = spec.name or cfg.name
    if spec.class_name == 'InputLayer' then
      nodes[name] = input_from(cfg, name)
    else
      local inbound = spec.inbound_nodes or {}
      if #inbound ~= 1 then
        error(string.format("keras.load_model: layer '%s' is called %d times; shared layers are not supported",
          tostring(name), #inbound), 0)
      end
      local refs = inbound_refs(inbound[1])
      local ins = {}
      for i, r in ipairs(refs) do
        -- a model used as a layer: Keras 2 numbers its one call node 1 (node 0 is its own graph)
        local node_ok = (r[2] or 0) == 0 or (r[2] == 1 and is_model[r[1]])
        if not node_ok or (r[3] or 0) ~= 0 then
          error(string.format("keras.load_model: layer '%s' takes output %d of node %d of '%s'; only single-use, " ..
            'single-output layers are supported', name, r[3], r[2], r[1]), 0)
        end
        ins[i] = nodes[r[1]]
        if not ins[i] then
          error(string.format("keras.load_model: layer '%s' takes '%s', which is not defined before it", name, r[1]), 0)
        end
      end
      local layer
      if spec.class_name == 'Functional' or spec.class_name == 'Model' or spec.class_name == 'Sequential' then
        layer = build_model(spec)
        is_model[name] = true
      else
        layer = layer_from_config({class_name = spec.class_name, config = cfg})
      end
      made[#made + 1] = layer
      local ok, out = pcall(function() return layer(layer.multi and ins or ins[1]) end)
      if not ok then error('keras.load_model: ' .. tostring(out), 0) end
      nodes[name] = out
    end
  end
  local inputs, outputs = {}, {}
  for i, r in ipairs(ref_list(config.input_layers)) do inputs[i] = nodes[r[1]] end
  for i, r in ipairs(ref_list(config.output_layers)) do outputs[i] = nodes[r[1]] end
  if #inputs == 0 or #outputs == 0 then error('keras.load_model: the model config names no inputs or outputs', 0) end
  return nn.Model(#inputs == 1 and inputs[1] or inputs, #outputs == 1 and outputs[1] or outputs,
    {name = config.name})
end

-- a Sequential config (a list of layers, or {name, layers}) -> nn.Model (an nn.Sequential)
local function build_sequential(config)
  local list = config.layers or config
  local input
  local layers = {}
  for i, spec in ipairs(list) do
    local cfg = spec.config or {}
    if spec.class_name == 'InputLayer' then
      if i ~= 1 then error('keras.load_model: an InputLayer in the middle of a Sequential model', 0) end
      input = input_from(cfg, cfg.name)
    else
      if i == 1 and not isnull(cfg.batch_input_shape or cfg.batch_shape) then
        input = input_from(cfg, (cfg.name or 'layer') .. '_input')
      end
      if spec.class_name == 'Functional' or spec.class_name == 'Model' or spec.class_name == 'Sequential' then
        layers[#layers + 1] = build_model(spec)
      else
        layers[#layers + 1] = layer_from_config(spec)
      end
    end
  end
  if not input then
    local bis = config.build_input_shape
    if isnull(bis) then
      error('keras.load_model: the Sequential model has no input shape (no InputLayer or batch_input_shape)', 0)
    end
    input = input_from({batch_shape = bis}, 'input_1')
  end
  local seq_list = {input}
  for _, l in ipairs(layers) do seq_list[#seq_list + 1] = l end
  local ok, m = pcall(nn.Sequential, seq_list, {name = not isnull(config.name) and config.name or nil})
  if not ok then error('keras.load_model: ' .. tostring(m), 0) end
  return m
end

build_model = function(spec)
  local cls = spec.class_name
  if cls == 'Sequential' then return build_sequential(spec.config) end
  if cls == 'Functional' or cls == 'Model' then return build_functional(spec.config) end
  error(string.format("keras.load_model: model class '%s' is not supported (Sequential and Functional are)",
    tostring(cls)), 0)
end

-- keras.model_from_config(json_string_or_table) -> an nn model with fresh weights
function keras.model_from_config(cfg)
  if not cjson_ok then error('keras.model_from_config: lua-cjson is not installed', 2) end
  if type(cfg) == 'string' then cfg = cjson.decode(cfg) end
  return build_model(cfg)
end

-- keras.load_model(path) -> the model of a Keras .h5 file (model.save('x.h5') of standalone Keras
-- 2.x, tf.keras 2.x, or Keras 3's legacy .h5), with its weights, in inference mode.
function keras.load_model(path)
  if type(path) ~= 'string' then error('keras.load_model: path must be a string', 2) end
  if not cjson_ok then error('keras.load_model: lua-cjson is not installed', 2) end
  local ok, res = pcall(function()
    local f <close> = h5.open_untrusted(path)
    local cfg = f:attr('/', 'model_config')
    if cfg == nil then
      error(string.format("keras.load_model: %s has no 'model_config' attribute: it holds weights only " ..
        '(build the model, then keras.load_weights)', path), 0)
    end
    if type(cfg) ~= 'string' then error('keras.load_model: ' .. path .. ': model_config is not a string', 0) end
    local dok, spec = pcall(cjson.decode, cfg)
    if not dok then error('keras.load_model: ' .. path .. ': model_config is not valid JSON: ' .. tostring(spec), 0) end
    local model = build_model(spec)
    local groups = file_layers(f, path, 'keras.load_model')
    load_by_order(f, path, model, groups, 'keras.load_model')
    model.keras_version = f:attr('/', 'keras_version')
    local meta = f:attr('/', 'flowerlua_metadata')
    if type(meta) == 'string' then
      local mok, m = pcall(cjson.decode, meta)
      if not mok or type(m) ~= 'table' then
        error('keras.load_model: ' .. path .. ': flowerlua_metadata is not a JSON object', 0)
      end
      model.metadata = m
    end
    model:evaluate()
    return model
  end)
  if not ok then rethrow('keras.load_model', res) end
  return res
end

-------------------------------------------------------------------------------- saving whole models

-- flowerlua layer -> Keras class name and config (tf.keras 2.x's get_config keys). Layers Keras has
-- no built-in class for are registered custom layers, defined for Keras users in
-- scripts/flowerlua_keras.py: FlowerPreprocess (Keras Applications' preprocess_input as a layer)
-- and CustomScaleLayer (InceptionResNetV2's scaled residual; Keras 3's applications name it so).
-- A Keras Lambda was the other way: it holds marshalled Python bytecode that only the same Python
-- version can load and that Keras 3's safe mode refuses; a registered layer is plain JSON.
local function pair_of(a, b) return {a, b} end
local function conv_config(l)
  return {kernel_size = pair_of(l.kh, l.kw), strides = pair_of(l.sh, l.sw), padding = l.padding,
          data_format = 'channels_last', dilation_rate = pair_of(l.dh or 1, l.dw or 1),
          activation = l.activation or 'linear', use_bias = l.use_bias}
end
local writers = {}
writers.Conv2D = function(l) local c = conv_config(l); c.filters = l.filters; c.groups = 1; return 'Conv2D', c end
writers.DepthwiseConv2D = function(l)
  local c = conv_config(l); c.depth_multiplier = l.depth_multiplier; return 'DepthwiseConv2D', c
end
writers.SeparableConv2D = function(l)
  local c = conv_config(l); c.filters, c.depth_multiplier = l.filters, l.depth_multiplier; return 'SeparableConv2D', c
end
writers.BatchNormalization = function(l)
  return 'BatchNormalization', {axis = l.axis, momentum = l.momentum, epsilon = l.epsilon, center = l.center,
                                scale = l.scale}
end
writers.Activation = function(l) return 'Activation', {activation = l.act} end
writers.ReLU = function() return 'ReLU', {max_value = null, negative_slope = 0, threshold = 0} end
writers.Softmax = function() return 'Softmax', {axis = -1} end
for _, cls in ipairs({'MaxPooling2D', 'AveragePooling2D'}) do
  writers[cls] = function(l)
    return cls, {pool_size = pair_of(l.kh, l.kw), strides = pair_of(l.sh, l.sw), padding = l.padding,
                 data_format = 'channels_last'}
  end
end
for _, cls in ipairs({'GlobalAveragePooling2D', 'GlobalMaxPooling2D'}) do
  writers[cls] = function(l) return cls, {data_format = 'channels_last', keepdims = l.keepdims} end
end
writers.Dense = function(l) return 'Dense', {units = l.units, activation = l.activation or 'linear', use_bias = l.use_bias ~= false} end
writers.Dropout = function(l) return 'Dropout', {rate = l.rate, noise_shape = null, seed = l.seed or null} end
writers.Flatten = function() return 'Flatten', {data_format = 'channels_last'} end
writers.Reshape = function(l) return 'Reshape', {target_shape = l.target_shape} end
writers.Concatenate = function(l) return 'Concatenate', {axis = l.axis} end
writers.Add = function() return 'Add', {} end
writers.ScaledAdd = function(l) return 'CustomScaleLayer', {scale = l.scale} end
writers.Scale = function(l) return 'Rescaling', {scale = l.scale, offset = 0} end
writers.ZeroPadding2D = function(l)
  return 'ZeroPadding2D', {padding = {{l.pt, l.pb}, {l.pl, l.pr}}, data_format = 'channels_last'}
end
writers.Preprocess = function(l) return 'FlowerPreprocess', {mode = l.mode} end

local function layer_config(l, frozen)
  local w = writers[l.class_name]
  if not w then
    error(string.format("layer '%s' has type %s, which has no Keras equivalent to save", l.name, l.class_name), 0)
  end
  local cls, cfg = w(l)
  cfg.name, cfg.trainable, cfg.dtype = l.name, l.trainable ~= false and not frozen, 'float32'
  return {class_name = cls, config = cfg}
end

local function input_config(l)
  local shape = {null}
  for _, d in ipairs(l.shape) do shape[#shape + 1] = d >= 0 and d or null end
  return {class_name = 'InputLayer', config = {batch_input_shape = shape, dtype = l.input_dtype or 'float32',
                                                sparse = false, ragged = false, name = l.name}}
end

-- Keras's Functional config, with nested models inlined: tf.keras refers to a nested model's call
-- as its node 1 and Keras 3 as its node 0, so neither loads the other's nested files; a flat graph
-- of the same layers (same names, weights and outputs) loads in both. A frozen nested model's
-- layers are saved with trainable = false. Returns the config and the leaf layers in its order
-- (the weight groups).
local function model_config(model)
  local specs, leaves = {}, {}
  -- emits model's layers; `bound` maps a nested model's input nodes to the references feeding them
  local function emit(m, bound, frozen)
    local node_of, ref_of = {}, {}
    for _, n in ipairs(m.nodes) do node_of[n.layer] = n end
    for _, l in ipairs(m:keras_layers()) do
      local n = node_of[l]
      if getmetatable(l) == nn.InputLayer then
        if bound then
          ref_of[n] = bound[n]
        else
          local spec = input_config(l)
          spec.name, spec.inbound_nodes = l.name, {}
          specs[#specs + 1] = spec
          ref_of[n] = {l.name, 0, 0}
        end
      elseif l._is_model then
        if #l.outputs ~= 1 then error(string.format("nested model '%s' has several outputs", l.name), 0) end
        local inner = {}
        for i, inode in ipairs(l.inputs) do inner[inode] = ref_of[n.inputs[i]] end
        ref_of[n] = emit(l, inner, frozen or l.trainable == false)[1]
      else
        local spec = layer_config(l, frozen)
        local refs = {}
        for i, p in ipairs(n.inputs) do local r = ref_of[p]; refs[i] = {r[1], r[2], r[3], {}} end
        spec.name, spec.inbound_nodes = l.name, {refs}
        specs[#specs + 1] = spec
        leaves[#leaves + 1] = l
        ref_of[n] = {l.name, 0, 0}
      end
    end
    local outs = {}
    for i, o in ipairs(m.outputs) do outs[i] = ref_of[o] end
    return outs, ref_of
  end
  local outs, ref_of = emit(model, nil, false)
  local ins = {}
  for i, n in ipairs(model.inputs) do ins[i] = ref_of[n] end
  local names = {}
  for _, spec in ipairs(specs) do
    if names[spec.name] then
      error(string.format("the layer name '%s' is used twice once nested models are inlined; rename one", spec.name), 0)
    end
    names[spec.name] = true
  end
  return {class_name = 'Functional', config = {name = model.name, layers = specs, input_layers = ins,
                                                output_layers = outs}}, leaves
end

-- keras.save_model(model, path): a whole-model file as tf.keras's model.save('x.h5') writes it
-- (model_config + model_weights), atomically. keras.load_model reads it back; so do tf.keras and
-- Keras 3 (keras.models.load_model), with custom_objects from scripts/flowerlua_keras.py when the
-- model has a Preprocess or ScaledAdd layer. Sequential models are saved as Functional ones, and
-- nested models inlined (see model_config). opts.metadata (a table: the class ids and names of the
-- outputs, the image size, ...) is kept as JSON in the attribute `flowerlua_metadata`, which Keras
-- ignores; keras.load_model gives it back as model.metadata.
function keras.save_model(model, path, opts)
  if type(path) ~= 'string' then error('keras.save_model: path must be a string', 2) end
  local meta = opts and opts.metadata
  if meta ~= nil and type(meta) ~= 'table' then error('keras.save_model: metadata must be a table', 2) end
  if not cjson_ok then error('keras.save_model: lua-cjson is not installed', 2) end
  local ok, err = pcall(function()
    model_layers(model)
    local cfg, leaves = model_config(model)
    local json = cjson.encode(cfg)
    h5.write_atomic(path, function(f)
      f:set_attr('/', 'model_config', json)
      f:set_attr('/', 'keras_version', keras.layout_version)
      f:set_attr('/', 'backend', 'tensorflow')
      f:set_attr('/', 'flowerlua_version', flower.version or '?')
      if meta then f:set_attr('/', 'flowerlua_metadata', cjson.encode(meta)) end
      write_weights(f, '/model_weights', leaves)
    end)
  end)
  if not ok then
    local msg = tostring(err)
    if not msg:find('keras.save_model', 1, true) then msg = 'keras.save_model: ' .. msg end
    error(msg, 2)
  end
  return path
end

return keras
