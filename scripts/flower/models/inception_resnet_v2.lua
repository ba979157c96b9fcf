-- InceptionResNetV2 exactly as Keras builds it (keras-applications / tf.keras
-- inception_resnet_v2.py, the TF-slim network): conv2d_bn = Conv2D (no bias) ->
-- BatchNormalization(scale=False, epsilon 1e-3) -> ReLU, automatic names; residual blocks
-- block35 x10 (scale 0.17), block17 x20 (0.1), block8 x9 (0.2) and block8_10 (scale 1.0, no ReLU):
-- branches -> Concatenate (<block>_mixed) -> 1x1 conv with bias and no BN (<block>_conv) ->
-- x + scale * up (Keras's CustomScaleLayer, here nn.ScaledAdd with the same inputs {x, up}) ->
-- ReLU (<block>_ac). Ends with conv_7b (1536 channels). Input 299 (at least 75). Preprocessing: tf.
--   flower.models.inception_resnet_v2{include_top=true, weights=nil|'imagenet'|path,
--       input_shape={299,299,3}, pooling=nil|'avg'|'max', classes=1000, preprocess=true}
local nn = require 'flower.nn'
local common = require 'flower.models.common'

local function inception_resnet_v2(opts)
  local o = common.options('inception_resnet_v2', opts)
  local L = o.L
  local name = common.namer()
  -- conv2d_bn(x, filters, kernel [, strides, padding, activation, use_bias, name])
  local function cbn(x, filters, k, a)
    a = a or {}
    local n = a.name
    x = L('Conv2D', {filters = filters, kernel_size = k, strides = a.strides or 1, padding = a.padding or 'same',
                  use_bias = a.use_bias == true, name = n or name('conv2d')})(x)
    if not a.use_bias then
      x = L('BatchNormalization', {scale = false, name = n and (n .. '_bn') or name('batch_normalization')})(x)
    end
    if a.activation ~= false then
      x = nn.Activation{'relu', name = n and (n .. '_ac') or name('activation')}(x)
    end
    return x
  end
  local valid2 = {strides = 2, padding = 'valid'}
  local function maxpool(x, padding)
    return nn.MaxPooling2D{pool_size = 3, strides = 2, padding = padding or 'valid', name = name('max_pooling2d')}(x)
  end

  local function block(x, scale, kind, idx, channels, activation)
    local branches
    if kind == 'block35' then
      local b0 = cbn(x, 32, 1)
      local b1 = cbn(x, 32, 1)
      b1 = cbn(b1, 32, 3)
      local b2 = cbn(x, 32, 1)
      b2 = cbn(b2, 48, 3)
      b2 = cbn(b2, 64, 3)
      branches = {b0, b1, b2}
    elseif kind == 'block17' then
      local b0 = cbn(x, 192, 1)
      local b1 = cbn(x, 128, 1)
      b1 = cbn(b1, 160, {1, 7})
      b1 = cbn(b1, 192, {7, 1})
      branches = {b0, b1}
    else
      local b0 = cbn(x, 192, 1)
      local b1 = cbn(x, 192, 1)
      b1 = cbn(b1, 224, {1, 3})
      b1 = cbn(b1, 256, {3, 1})
      branches = {b0, b1}
    end
    local bname = kind .. '_' .. idx
    local mixed = nn.Concatenate{axis = -1, name = bname .. '_mixed'}(branches)
    local up = cbn(mixed, channels, 1, {activation = false, use_bias = true, name = bname .. '_conv'})
    x = nn.ScaledAdd{scale = scale, name = name('custom_scale_layer'), type_name = 'CustomScaleLayer'}{x, up}
    if activation ~= false then x = nn.Activation{'relu', name = bname .. '_ac'}(x) end
    return x
  end

  local img, x = common.input(o, 'tf')
  -- stem: 35 x 35 x 192 at 299
  x = cbn(x, 32, 3, valid2)
  x = cbn(x, 32, 3, {padding = 'valid'})
  x = cbn(x, 64, 3)
  x = maxpool(x)
  x = cbn(x, 80, 1, {padding = 'valid'})
  x = cbn(x, 192, 3, {padding = 'valid'})
  x = maxpool(x)

  -- mixed_5b (Inception-A): 35 x 35 x 320
  do
    local b0 = cbn(x, 96, 1)
    local b1 = cbn(x, 48, 1)
    b1 = cbn(b1, 64, 5)
    local b2 = cbn(x, 64, 1)
    b2 = cbn(b2, 96, 3)
    b2 = cbn(b2, 96, 3)
    local bp = nn.AveragePooling2D{pool_size = 3, strides = 1, padding = 'same', name = name('average_pooling2d')}(x)
    bp = cbn(bp, 64, 1)
    x = nn.Concatenate{axis = -1, name = 'mixed_5b'}{b0, b1, b2, bp}
  end
  for i = 1, 10 do x = block(x, 0.17, 'block35', i, 320) end

  -- mixed_6a (Reduction-A): 17 x 17 x 1088
  do
    local b0 = cbn(x, 384, 3, valid2)
    local b1 = cbn(x, 256, 1)
    b1 = cbn(b1, 256, 3)
    b1 = cbn(b1, 384, 3, valid2)
    local bp = maxpool(x)
    x = nn.Concatenate{axis = -1, name = 'mixed_6a'}{b0, b1, bp}
  end
  for i = 1, 20 do x = block(x, 0.1, 'block17', i, 1088) end

  -- mixed_7a (Reduction-B): 8 x 8 x 2080
  do
    local b0 = cbn(x, 256, 1)
    b0 = cbn(b0, 384, 3, valid2)
    local b1 = cbn(x, 256, 1)
    b1 = cbn(b1, 288, 3, valid2)
    local b2 = cbn(x, 256, 1)
    b2 = cbn(b2, 288, 3)
    b2 = cbn(b2, 320, 3, valid2)
    local bp = maxpool(x)
    x = nn.Concatenate{axis = -1, name = 'mixed_7a'}{b0, b1, b2, bp}
  end
  for i = 1, 9 do x = block(x, 0.2, 'block8', i, 2080) end
  x = block(x, 1.0, 'block8', 10, 2080, false)

  x = cbn(x, 1536, 1, {name = 'conv_7b'})
  x = common.top(o, x, name)
  local model = nn.Model(img, x, {name = o.name or 'inception_resnet_v2'})
  return common.finish(model, o, {
    family = 'inception_resnet_v2', preprocess = 'tf', default_size = 299, features = 1536,
    file = 'inception_resnet_v2_weights_tf_dim_ordering_tf_kernels', fetch = 'inception_resnet_v2',
  })
end

return inception_resnet_v2
