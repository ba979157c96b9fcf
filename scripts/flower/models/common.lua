-- Shared pieces of the model zoo builders (flower.models.*): Keras's naming, input-shape rules,
-- the classifier/pooling top, and weight loading.
local nn = require 'flower.nn'

local M = {}

-- Keras names unnamed layers from per-class counters (conv2d, conv2d_1, ...; zero-based since
-- TF2). Each builder uses its own counters so that a model gets the names a fresh Keras session
-- gives it, however many models were built before (Keras itself would shift them).
function M.namer()
  local counts = {}
  return function(prefix)
    local n = counts[prefix]
    counts[prefix] = (n or -1) + 1
    if n == nil then return prefix end
    return prefix .. '_' .. (n + 1)
  end
end

local function fail(fname, fmt, ...) error(fname .. ': ' .. string.format(fmt, ...), 3) end

-- Options every builder takes, checked before anything is built.
local known = {include_top = true, weights = true, input_shape = true, pooling = true, classes = true,
               classifier_activation = true, preprocess = true, name = true, variant = true}

-- Each model's default input size and the smallest it takes (Keras's obtain_input_shape).
M.sizes = {
  resnet50 = {default = 224, min = 32},
  inception_v3 = {default = 299, min = 75},
  xception = {default = 299, min = 71},
  inception_resnet_v2 = {default = 299, min = 75},
}

-- Keras's obtain_input_shape: channels_last (H, W, 3); sizes >= the model's minimum; with the
-- classifier and the ImageNet weights the size must be the default. preprocess defaults to true:
-- the data path (flower.data's loaders) hands out raw RGB 0..255, and the model normalises it.
function M.options(fname, opts)
  local default_size, min_size = M.sizes[fname].default, M.sizes[fname].min
  opts = opts or {}
  if type(opts) ~= 'table' then fail(fname, 'expected a table of options, got %s', type(opts)) end
  for k in pairs(opts) do
    if not known[k] then fail(fname, "unknown option '%s'", tostring(k)) end
  end
  local o = {}
  o.include_top = opts.include_top ~= false
  o.classes = opts.classes or 1000
  o.pooling = opts.pooling
  o.weights = opts.weights
  o.preprocess = opts.preprocess ~= false
  o.name = opts.name
  o.variant = opts.variant
  o.classifier_activation = opts.classifier_activation
  if o.classifier_activation == nil then o.classifier_activation = 'softmax' end
  if o.classifier_activation == false then o.classifier_activation = nil end
  if math.type(o.classes) ~= 'integer' or o.classes < 1 then
    fail(fname, 'classes must be a positive integer, got %s', tostring(opts.classes))
  end
  if o.pooling ~= nil and o.pooling ~= 'avg' and o.pooling ~= 'max' then
    fail(fname, "pooling must be nil, 'avg' or 'max', got %s", tostring(o.pooling))
  end
  if o.weights ~= nil and type(o.weights) ~= 'string' then
    fail(fname, "weights must be nil, 'imagenet' or the path of a Keras .h5 file, got %s", type(o.weights))
  end
  if o.weights == 'imagenet' and o.include_top and o.classes ~= 1000 then
    fail(fname, "with weights='imagenet' and include_top, classes must be 1000, got %d", o.classes)
  end
  local s = opts.input_shape
  if s == nil then
    s = {default_size, default_size, 3}
  else
    if type(s) ~= 'table' or #s ~= 3 then fail(fname, 'input_shape must be {height, width, 3}') end
    s = {s[1], s[2], s[3]}
    if s[3] ~= 3 then fail(fname, 'input_shape must have 3 channels (RGB), got %s', tostring(s[3])) end
    for i = 1, 2 do
      if s[i] == nil or s[i] == -1 or s[i] == false then
        if o.include_top then fail(fname, 'with include_top, input_shape must be fully known') end
        s[i] = -1
      elseif math.type(s[i]) ~= 'integer' or s[i] < min_size then
        fail(fname, 'input size must be at least %dx%d, got input_shape {%s, %s, 3}', min_size, min_size,
          tostring(s[1]), tostring(s[2]))
      end
    end
    if o.include_top and o.weights == 'imagenet' and (s[1] ~= default_size or s[2] ~= default_size) then
      fail(fname, "with include_top and weights='imagenet', input_shape must be {%d, %d, 3}, got {%d, %d, 3}",
        default_size, default_size, s[1], s[2])
    end
  end
  o.input_shape = s
  M.maker(o)
  return o
end

-- A layer maker: L('Conv2D', {...}) is nn.Conv2D{...}, except that when weights are given the
-- weights start uninitialised (flower.empty): initialising 25-55 million numbers at random costs
-- seconds, and the all-or-nothing load that follows overwrites every one of them or fails (and
-- then the builder raises, so no half-initialised model ever escapes).
local EMPTY = function(shape, dtype) return require('flower').empty(shape, dtype) end
local lazy_inits = {
  Conv2D = {'kernel_initializer', 'bias_initializer'},
  SeparableConv2D = {'depthwise_initializer', 'pointwise_initializer', 'bias_initializer'},
  BatchNormalization = {'gamma_initializer', 'beta_initializer', 'moving_mean_initializer',
                        'moving_variance_initializer'},
  Dense = {'kernel_initializer', 'bias_initializer'},
}
function M.maker(o)
  local lazy = o.weights ~= nil
  o.L = function(cls, opts)
    if lazy and lazy_inits[cls] then
      for _, k in ipairs(lazy_inits[cls]) do opts[k] = EMPTY end
    end
    return nn[cls](opts)
  end
  return o.L
end

-- The input node, and (unless preprocess = false) Keras's preprocess_input as a first layer, so
-- that the model takes RGB images in [0, 255] (uint8 or float); preprocess = false gives Keras's
-- bare graph, which takes preprocessed input.
function M.input(o, mode)
  local img = nn.Input{shape = o.input_shape, name = 'input_1'}
  local x = img
  if o.preprocess then x = nn.Preprocess{mode = mode, name = 'preprocess'}(x) end
  return img, x
end

-- Keras's top: GAP + Dense(classes) named avg_pool / predictions, or the pooling of a notop model.
-- pool_names: {avg=..., max=...} (ResNet names them; the others leave Keras's automatic names).
function M.top(o, x, name, pool_names)
  if o.include_top then
    x = nn.GlobalAveragePooling2D{name = 'avg_pool'}(x)
    return o.L('Dense', {units = o.classes, activation = o.classifier_activation, name = o.top_name or 'predictions'})(x)
  end
  if o.pooling == 'avg' then
    return nn.GlobalAveragePooling2D{name = pool_names and pool_names.avg or name('global_average_pooling2d')}(x)
  elseif o.pooling == 'max' then
    return nn.GlobalMaxPooling2D{name = pool_names and pool_names.max or name('global_max_pooling2d')}(x)
  end
  return x
end

-- Finishes a model: records its preprocessing mode and loads the weights (a path, or 'imagenet'
-- from the Keras cache directory) all-or-nothing.
function M.finish(model, o, info)
  model.preprocess_mode = info.preprocess
  model.default_size = info.default_size
  model.feature_dim = info.features
  model.family = info.family
  if o.weights then
    local keras = require 'flower.keras'
    local path = o.weights
    if path == 'imagenet' then path = M.imagenet_file(info, o.include_top) end
    keras.load_weights(model, path)
    model.weights_file = path
  end
  return model
end

-- The standard Keras weight files, found where scripts/fetch_weights.sh (and Keras) put them.
function M.imagenet_file(info, top)
  local file = info.file .. (top and '' or '_notop') .. (info.file_suffix or '') .. '.h5'
  local dirs = {}
  if os.getenv('FLOWER_WEIGHTS') then dirs[#dirs + 1] = os.getenv('FLOWER_WEIGHTS') end
  if os.getenv('HOME') then dirs[#dirs + 1] = os.getenv('HOME') .. '/.keras/models' end
  for _, d in ipairs(dirs) do
    local p = d .. '/' .. file
    local f = io.open(p, 'rb')
    if f then f:close(); return p end
  end
  error(string.format("%s: weights='imagenet' needs %s in $FLOWER_WEIGHTS or ~/.keras/models; " ..
    "run scripts/fetch_weights.sh %s (needs internet), or pass weights=<path>", info.family, file, info.fetch), 3)
end

return M
