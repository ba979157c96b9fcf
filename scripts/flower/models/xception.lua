-- Xception exactly as Keras builds it (keras-applications / tf.keras xception.py): no conv has a
-- bias; BatchNormalization epsilon 1e-3 with scale; SeparableConv2D = 3x3 depthwise 'same' then
-- 1x1 pointwise. Entry blocks 2-4 and block 13 add a strided 1x1 conv + BN shortcut (unnamed in
-- Keras: conv2d, batch_normalization ...) to a max pool 3x3/2 'same' (asymmetric TF padding).
-- Input 299 (at least 71). Preprocessing: tf.
--   flower.models.xception{include_top=true, weights=nil|'imagenet'|path, input_shape={299,299,3},
--                          pooling=nil|'avg'|'max', classes=1000, preprocess=true}
local nn = require 'flower.nn'
local common = require 'flower.models.common'

local function xception(opts)
  local o = common.options('xception', opts)
  local L = o.L
  local name = common.namer()
  local function sep(x, filters, n)
    return L('SeparableConv2D', {filters = filters, kernel_size = 3, padding = 'same', use_bias = false, name = n})(x)
  end
  local function bn(x, n) return L('BatchNormalization', {axis = -1, name = n or name('batch_normalization')})(x) end
  local function relu(x, n) return nn.Activation{'relu', name = n}(x) end
  local function residual(x, filters)
    local r = L('Conv2D', {filters = filters, kernel_size = 1, strides = 2, padding = 'same', use_bias = false,
                        name = name('conv2d')})(x)
    return bn(r)
  end
  local function pool(x, n) return nn.MaxPooling2D{pool_size = 3, strides = 2, padding = 'same', name = n}(x) end
  local function add(a, b) return nn.Add{name = name('add')}{a, b} end

  local img, x = common.input(o, 'tf')
  x = L('Conv2D', {filters = 32, kernel_size = 3, strides = 2, use_bias = false, name = 'block1_conv1'})(x)
  x = bn(x, 'block1_conv1_bn')
  x = relu(x, 'block1_conv1_act')
  x = L('Conv2D', {filters = 64, kernel_size = 3, use_bias = false, name = 'block1_conv2'})(x)
  x = bn(x, 'block1_conv2_bn')
  x = relu(x, 'block1_conv2_act')

  -- entry flow blocks 2, 3, 4 (block 2 has no leading ReLU: its input already had one)
  for b, filters in ipairs({128, 256, 728}) do
    local p = 'block' .. (b + 1)
    local r = residual(x, filters)
    if b > 1 then x = relu(x, p .. '_sepconv1_act') end
    x = sep(x, filters, p .. '_sepconv1')
    x = bn(x, p .. '_sepconv1_bn')
    x = relu(x, p .. '_sepconv2_act')
    x = sep(x, filters, p .. '_sepconv2')
    x = bn(x, p .. '_sepconv2_bn')
    x = pool(x, p .. '_pool')
    x = add(x, r)
  end

  -- middle flow, blocks 5..12: 19 x 19 x 728 at 299
  for i = 5, 12 do
    local p = 'block' .. i
    local r = x
    for k = 1, 3 do
      x = relu(x, p .. '_sepconv' .. k .. '_act')
      x = sep(x, 728, p .. '_sepconv' .. k)
      x = bn(x, p .. '_sepconv' .. k .. '_bn')
    end
    x = add(x, r)
  end

  -- exit flow
  local r = residual(x, 1024)
  x = relu(x, 'block13_sepconv1_act')
  x = sep(x, 728, 'block13_sepconv1')
  x = bn(x, 'block13_sepconv1_bn')
  x = relu(x, 'block13_sepconv2_act')
  x = sep(x, 1024, 'block13_sepconv2')
  x = bn(x, 'block13_sepconv2_bn')
  x = pool(x, 'block13_pool')
  x = add(x, r)
  x = sep(x, 1536, 'block14_sepconv1')
  x = bn(x, 'block14_sepconv1_bn')
  x = relu(x, 'block14_sepconv1_act')
  x = sep(x, 2048, 'block14_sepconv2')
  x = bn(x, 'block14_sepconv2_bn')
  x = relu(x, 'block14_sepconv2_act')

  x = common.top(o, x, name)
  local model = nn.Model(img, x, {name = o.name or 'xception'})
  return common.finish(model, o, {
    family = 'xception', preprocess = 'tf', default_size = 299, features = 2048,
    file = 'xception_weights_tf_dim_ordering_tf_kernels', fetch = 'xception',
  })
end

return xception
