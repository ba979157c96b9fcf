-- keras.save_model / model:save: whole-model .h5 files that real Keras (tf_keras 2.x and Keras 3)
-- loads and runs to our outputs, and that keras.load_model reads back to the same model. Every
-- layer flowerlua has appears in one of the models below.
local T = require 'flower.test'
local flower = require 'flower'
local files = require 'flower.files'
local nn, keras = flower.nn, flower.keras

local TMP = T.tmpdir()
local function tmp(...) return files.join(TMP, ...) end

-- max |a - b| / max(1, max |b|)
local function rel_err(a, b)
  return (a - b):abs():max():item() / math.max(1, b:abs():max():item())
end

local function randomize(m)
  flower.manual_seed(7)
  for _, w in ipairs(m:weights()) do
    if w.name ~= 'moving_variance' then w.tensor:normal_(0, 0.2) end
  end
  T.randomize_batchnorm(m)
  return m:evaluate()
end

local models = {}

-- convolutions of every kind, BN, pooling, padding, merges, the scaled residual, Preprocess 'caffe'
function models.convs()
  nn.reset_names()
  local x = nn.Input { 17, 15, 3 }
  local p = nn.Preprocess { mode = 'caffe', name = 'pre' }(x)
  local a = nn.Conv2D { filters = 8, kernel_size = 3, strides = 2, padding = 'same', activation = 'relu', name = 'c1' }(p)
  a = nn.BatchNormalization { name = 'bn1' }(a)
  local b = nn.ZeroPadding2D { padding = { { 2, 0 }, { 0, 2 } }, name = 'zp' }(a)
  b = nn.DepthwiseConv2D { kernel_size = 3, depth_multiplier = 2, use_bias = false, name = 'dw' }(b)
  b = nn.SeparableConv2D { filters = 8, kernel_size = 1, name = 'sep' }(b)
  local s = nn.ScaledAdd { scale = 0.17, name = 'scaled' } { a, b }
  local d = nn.Conv2D { filters = 8, kernel_size = { 1, 3 }, dilation_rate = 2, padding = 'same', name = 'dil' }(s)
  local m = nn.Add { name = 'add' } { s, d }
  m = nn.ReLU { name = 'relu' }(m)
  local mp = nn.MaxPooling2D { pool_size = 3, strides = 2, padding = 'same', name = 'mp' }(m)
  local ap = nn.AveragePooling2D { pool_size = 2, name = 'ap' }(m)
  local g1 = nn.GlobalAveragePooling2D { name = 'gap' }(mp)
  local g2 = nn.GlobalMaxPooling2D { name = 'gmp' }(ap)
  local c = nn.Concatenate { name = 'cat' } { g1, g2 }
  local y = nn.Dense { units = 5, name = 'fc' }(nn.Dropout { rate = 0.5, seed = 3, name = 'drop' }(c))
  return nn.Model(x, nn.Activation { activation = 'softmax', name = 'probs' }(y), { name = 'convs' }), { 2, 17, 15, 3 }, 255
end

-- a nested model (a frozen base) with Preprocess 'tf', Flatten, Reshape, Scale, Softmax
function models.nested()
  nn.reset_names()
  local bx = nn.Input { 8, 8, 3 }
  local by = nn.Conv2D { filters = 4, kernel_size = 3, activation = 'tanh', name = 'bconv' }(nn.Preprocess { mode = 'tf', name = 'bpre' }(bx))
  local base = nn.Model(bx, nn.GlobalAveragePooling2D { keepdims = true, name = 'bpool' }(by), { name = 'base' })
  base.trainable = false
  local x = nn.Input { 8, 8, 3 }
  local f = nn.Flatten { name = 'flat' }(base(x))
  local r = nn.Reshape { target_shape = { 2, 2 }, name = 'resh' }(f)
  r = nn.Scale { scale = 0.5, name = 'half' }(nn.Flatten { name = 'flat2' }(r))
  local y = nn.Softmax { name = 'sm' }(nn.Dense { units = 3, activation = 'sigmoid', name = 'fc' }(r))
  return nn.Model(x, y, { name = 'outer' }), { 2, 8, 8, 3 }, 255
end

-- a Sequential with Preprocess 'torch'
function models.sequential()
  nn.reset_names()
  return nn.Sequential({ nn.Input { 6, 6, 3 }, nn.Preprocess { mode = 'torch' }, nn.Conv2D { filters = 3, kernel_size = 2 },
    nn.Flatten {}, nn.Dense { units = 4, use_bias = false } }, { name = 'seq' }), { 3, 6, 6, 3 }, 255
end

for _, name in ipairs({ 'convs', 'nested', 'sequential' }) do
  local model, shape, scale = models[name]()
  randomize(model)
  flower.manual_seed(11)
  local x = flower.rand(shape):mul(scale)
  local want = model:forward(x)
  local path = tmp(name .. '.h5')

  T.test(name .. ': keras.load_model reads our file back to the same outputs and config', function()
    keras.save_model(model, path)
    local back = keras.load_model(path)
    for _, l in ipairs(model:layers()) do if not l._is_model then T.check(back:layer(l.name) or l.class_name == 'InputLayer', l.name) end end
    T.eq(rel_err(back:forward(x), want), 0)
  end)

  T.test(name .. ': model:save is keras.save_model', function()
    model:save(tmp(name .. '-method.h5'))
    T.eq(rel_err(keras.load_model(tmp(name .. '-method.h5')):forward(x), want), 0)
  end)

  for _, flavor in ipairs({ 'tf_keras', 'keras3' }) do
    T.test(name .. ': ' .. flavor .. ' loads and runs it to our outputs', function()
      flower.save_npy(tmp('in.npy'), x)
      local out = tmp(name .. '-' .. flavor .. '.npy')
      assert(T.sh(string.format('%s tests/reference/keras_run_model.py %s %s %s %s', T.python, flavor, path, tmp('in.npy'), out)),
        flavor .. ' could not load ' .. path)
      local got = flower.load_npy(out)
      local e = rel_err(got, want)
      T.check(e < 1e-5, string.format('max relative error %.3g', e))
    end)
  end
end

T.test('a frozen nested model: its inlined layers load frozen, the rest trainable', function()
  local model = models.nested()
  keras.save_model(model, tmp('frozen.h5'))
  local back = keras.load_model(tmp('frozen.h5'))
  T.eq(back:layer('bconv').trainable, false)
  T.eq(back:layer('fc').trainable, true)
end)

T.test('a layer without a Keras equivalent, or a model not built, is refused naming it', function()
  nn.reset_names()
  local x = nn.Input { 4 }
  local m = nn.Model(x, nn.Dense { units = 2 }(x))
  local ok, err = pcall(keras.save_model, m, 42)
  T.check(not ok and err:find('path must be a string', 1, true), err)
  ok, err = pcall(keras.save_model, {}, tmp('x.h5'))
  T.check(not ok and err:find('keras.save_model: expected a flower.nn model', 1, true), err)
  T.check(not files.exists(tmp('x.h5')))
end)

T.done()
