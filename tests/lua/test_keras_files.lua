-- flower.keras.load_model on whole-model .h5 files written by real Keras: tf-keras (Keras 2 line)
-- and Keras 3 (legacy .h5), Sequential and Functional, nested models; each must predict what Keras
-- predicted (tests/reference/gen_keras_files.py), and what flowerlua cannot run is refused by name.
local T = require 'flower.test'
local flower = require 'flower'
local keras = require 'flower.keras'
local h5 = require 'flower.h5'
local cjson = require 'cjson'

local PY = T.python
local REF = (os.getenv('BUILD') or 'build') .. '/ref/keras_files'
local GEN = 'tests/reference/gen_keras_files.py'

local sh = T.sh

if not sh(string.format('[ %s/files.stamp -nt %s ]', REF, GEN)) then
  assert(sh(string.format('%s %s %s >&2', PY, GEN, REF)),
    'test_keras_files: the Keras file generator failed (' .. PY .. ' ' .. GEN .. '); run make deps')
end

local function io_of(name)
  local f <close> = h5.open(REF .. '/' .. name .. '_io.h5', 'r')
  return f:read('/x'), f:read('/y'), f:attr('/', 'params'), f:attr('/', 'keras')
end

local expect_class = {seq = 'Sequential', seqdense = 'Sequential', func = 'Model', nested = 'Model'}

for _, prefix in ipairs({'tf2', 'k3'}) do
  for _, kind in ipairs({'seq', 'seqdense', 'func', 'nested'}) do
    local name = prefix .. '_' .. kind
    T.test(name .. ': load_model predicts what Keras predicted', function()
      local m = keras.load_model(REF .. '/' .. name .. '.h5')
      local x, y, params, version = io_of(name)
      T.eq(m.class_name, expect_class[kind])
      T.eq(select(1, m:count_params()), params, 'parameter count')
      T.eq(m.keras_version, version)
      T.allclose(m:forward(x), y, 1e-5, 0, name)
      T.allclose(m:predict(x, 2), y, 1e-5, 0, name .. ' predict in batches of 2')
    end)
  end
end

T.test('load_model keeps Keras\'s layer names and settings', function()
  local m = keras.load_model(REF .. '/tf2_func.h5')
  T.eq(m.name, 'func')
  T.eq(m:layer('stem').use_bias, false)
  T.eq(m:layer('stem_bn').scale, false)
  T.eq(m:layer('stem_bn').epsilon, 1.001e-5)
  T.eq(m:layer('pad').pt, 1); T.eq(m:layer('pad').pb, 2); T.eq(m:layer('pad').pl, 0); T.eq(m:layer('pad').pr, 1)
  T.eq(m:layer('head').activation, 'sigmoid')
  local names = {}
  for _, l in ipairs(m:keras_layers()) do names[#names + 1] = l.name end
  local f <close> = h5.open(REF .. '/tf2_func.h5', 'r')
  T.eq(table.concat(names, ','), table.concat(f:attr('/model_weights', 'layer_names'), ','), 'Keras layer order')
  local s = keras.load_model(REF .. '/k3_seq.h5')
  T.eq(s:layer('sep').depth_multiplier, 1)
  T.eq(s:layer('dw').depth_multiplier, 2)
  T.eq(s:layer('ap').padding, 'same')
end)

T.test('weights-only files: load_model refuses, load_weights loads them', function()
  T.raises(function() keras.load_model(REF .. '/tf2_seq_weights.h5') end,
    "tf2_seq_weights.h5 has no 'model_config' attribute: it holds weights only")
  local m = keras.load_model(REF .. '/tf2_seq.h5')
  for _, w in ipairs(m:weights()) do w.tensor:zero() end
  keras.load_weights(m, REF .. '/tf2_seq_weights.h5')
  local x, y = io_of('tf2_seq')
  T.allclose(m:forward(x), y, 1e-5)
end)

T.test('unsupported layers and options are refused by name', function()
  for _, p in ipairs({'tf2', 'k3'}) do
    T.raises(function() keras.load_model(REF .. '/' .. p .. '_unsupported.h5') end,
      "layer 'deconv' has type Conv2DTranspose, which flowerlua does not support")
  end
  local f <close> = h5.open(REF .. '/tf2_seq.h5', 'r')
  local base = f:attr('/', 'model_config')
  local function with(edit)
    local cfg = cjson.decode(base)
    edit(cfg.config.layers)
    return cfg
  end
  T.raises(function() keras.model_from_config(with(function(L) L[2].config.data_format = 'channels_first' end)) end,
    "layer 'c1' (Conv2D): option data_format=channels_first is not supported")
  T.raises(function() keras.model_from_config(with(function(L) L[2].config.activation = 'elu' end)) end,
    "layer 'c1' (Conv2D): activation 'elu' is not supported")
  T.raises(function() keras.model_from_config(with(function(L) L[2].config.fancy = 3 end)) end,
    "layer 'c1' (Conv2D): option 'fancy' is not supported")
  T.raises(function() keras.model_from_config(with(function(L) L[3].config.renorm = true end)) end,
    "layer 'bn1' (BatchNormalization): option renorm=true is not supported")
  T.raises(function() keras.model_from_config(with(function(L) L[9].config.noise_shape = {1, 2} end)) end,
    "layer 'drop' (Dropout): option noise_shape=[1,2] is not supported")
  T.raises(function()
    keras.model_from_config(with(function(L) L[2] = {class_name = 'Lambda', config = {name = 'lam'}} end))
  end, "layer 'lam' has type Lambda, which flowerlua does not support (a Lambda holds Python code)")
  T.raises(function() keras.model_from_config({class_name = 'Subclassed', config = {}}) end,
    "model class 'Subclassed' is not supported")
  -- a fresh model from the config alone has Keras's structure and parameter count
  local m = keras.model_from_config(base)
  T.eq(select(1, m:count_params()), 1494)
end)

T.test('broken files give clear errors', function()
  local dir = os.tmpname()
  os.remove(dir)
  os.execute('mkdir -p ' .. dir)
  local src = io.open(REF .. '/tf2_func.h5', 'rb'):read('a')
  local cut = dir .. '/cut.h5'
  local g = io.open(cut, 'wb'); g:write(src:sub(1, #src // 2)); g:close()
  T.raises(function() keras.load_model(cut) end, 'cut.h5')
  local bad = dir .. '/badjson.h5'
  h5.write_atomic(bad, function(f) f:set_attr('/', 'model_config', '{"class_name": "Sequential", ') end)
  T.raises(function() keras.load_model(bad) end, 'model_config is not valid JSON')
  T.raises(function() keras.load_model(dir .. '/none.h5') end, 'none.h5: no such file')
  os.execute('rm -rf ' .. dir)
  T.check(flower)
end)

T.done()
