-- InceptionV3 exactly as Keras builds it (keras-applications / tf.keras inception_v3.py): every
-- conv is conv2d_bn = Conv2D (no bias) -> BatchNormalization(scale=False, epsilon 1e-3) -> ReLU,
-- with Keras's automatic names (conv2d, batch_normalization, activation, numbered from zero as in
-- TF2) in Keras's creation order; the concatenations are mixed0..mixed10 and mixed9_0/mixed9_1.
-- Input 299 (at least 75). Preprocessing: tf (x/127.5 - 1).
--   flower.models.inception_v3{include_top=true, weights=nil|'imagenet'|path, input_shape={299,299,3},
--                              pooling=nil|'avg'|'max', classes=1000, preprocess=true}
local nn = require 'flower.nn'
local common = require 'flower.models.common'

local function inception_v3(opts)
  local o = common.options('inception_v3', opts)
  local L = o.L
  local name = common.namer()
  -- conv2d_bn(x, filters, rows, cols [, padding [, strides]])
  local function cbn(x, filters, kh, kw, padding, strides)
    x = L('Conv2D', {filters = filters, kernel_size = {kh, kw}, strides = strides or 1, padding = padding or 'same',
                  use_bias = false, name = name('conv2d')})(x)
    x = L('BatchNormalization', {scale = false, name = name('batch_normalization')})(x)
    return nn.Activation{'relu', name = name('activation')}(x)
  end
  local function maxpool(x) return nn.MaxPooling2D{pool_size = 3, strides = 2, name = name('max_pooling2d')}(x) end
  local function avgpool(x)
    return nn.AveragePooling2D{pool_size = 3, strides = 1, padding = 'same', name = name('average_pooling2d')}(x)
  end
  local function concat(list, n) return nn.Concatenate{axis = -1, name = n or name('concatenate')}(list) end

  local img, x = common.input(o, 'tf')
  x = cbn(x, 32, 3, 3, 'valid', 2)
  x = cbn(x, 32, 3, 3, 'valid')
  x = cbn(x, 64, 3, 3)
  x = maxpool(x)
  x = cbn(x, 80, 1, 1, 'valid')
  x = cbn(x, 192, 3, 3, 'valid')
  x = maxpool(x)

  -- mixed 0, 1, 2: 35 x 35 x 256 / 288 / 288
  for i, pool_filters in ipairs({32, 64, 64}) do
    local b1 = cbn(x, 64, 1, 1)
    local b5 = cbn(x, 48, 1, 1)
    b5 = cbn(b5, 64, 5, 5)
    local b3 = cbn(x, 64, 1, 1)
    b3 = cbn(b3, 96, 3, 3)
    b3 = cbn(b3, 96, 3, 3)
    local bp = avgpool(x)
    bp = cbn(bp, pool_filters, 1, 1)
    x = concat({b1, b5, b3, bp}, 'mixed' .. (i - 1))
  end

  -- mixed 3: 17 x 17 x 768
  do
    local b3 = cbn(x, 384, 3, 3, 'valid', 2)
    local bd = cbn(x, 64, 1, 1)
    bd = cbn(bd, 96, 3, 3)
    bd = cbn(bd, 96, 3, 3, 'valid', 2)
    local bp = maxpool(x)
    x = concat({b3, bd, bp}, 'mixed3')
  end

  -- mixed 4..7: 17 x 17 x 768
  for i, c in ipairs({128, 160, 160, 192}) do
    local b1 = cbn(x, 192, 1, 1)
    local b7 = cbn(x, c, 1, 1)
    b7 = cbn(b7, c, 1, 7)
    b7 = cbn(b7, 192, 7, 1)
    local bd = cbn(x, c, 1, 1)
    bd = cbn(bd, c, 7, 1)
    bd = cbn(bd, c, 1, 7)
    bd = cbn(bd, c, 7, 1)
    bd = cbn(bd, 192, 1, 7)
    local bp = avgpool(x)
    bp = cbn(bp, 192, 1, 1)
    x = concat({b1, b7, bd, bp}, 'mixed' .. (3 + i))
  end

  -- mixed 8: 8 x 8 x 1280
  do
    local b3 = cbn(x, 192, 1, 1)
    b3 = cbn(b3, 320, 3, 3, 'valid', 2)
    local b7 = cbn(x, 192, 1, 1)
    b7 = cbn(b7, 192, 1, 7)
    b7 = cbn(b7, 192, 7, 1)
    b7 = cbn(b7, 192, 3, 3, 'valid', 2)
    local bp = maxpool(x)
    x = concat({b3, b7, bp}, 'mixed8')
  end

  -- mixed 9, 10: 8 x 8 x 2048
  for i = 0, 1 do
    local b1 = cbn(x, 320, 1, 1)
    local b3 = cbn(x, 384, 1, 1)
    local b3a = cbn(b3, 384, 1, 3)
    local b3b = cbn(b3, 384, 3, 1)
    b3 = concat({b3a, b3b}, 'mixed9_' .. i)
    local bd = cbn(x, 448, 1, 1)
    bd = cbn(bd, 384, 3, 3)
    local bda = cbn(bd, 384, 1, 3)
    local bdb = cbn(bd, 384, 3, 1)
    bd = concat({bda, bdb})
    local bp = avgpool(x)
    bp = cbn(bp, 192, 1, 1)
    x = concat({b1, b3, bd, bp}, 'mixed' .. (9 + i))
  end

  x = common.top(o, x, name)
  local model = nn.Model(img, x, {name = o.name or 'inception_v3'})
  return common.finish(model, o, {
    family = 'inception_v3', preprocess = 'tf', default_size = 299, features = 2048,
    file = 'inception_v3_weights_tf_dim_ordering_tf_kernels', fetch = 'inception_v3',
  })
end

return inception_v3
