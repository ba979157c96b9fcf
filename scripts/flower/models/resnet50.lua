-- ResNet50 exactly as Keras builds it, in the two versions whose ImageNet files exist:
--   variant 'keras2' (default): tf.keras / Keras 3 resnet.py: layers conv1_conv, conv1_bn,
--     conv2_block1_0_conv ...; BatchNorm epsilon 1.001e-5; Add([shortcut, x]).
--   variant 'keras1': keras-applications resnet50.py (the Keras 1 file of 2016): layers conv1,
--     bn_conv1, res2a_branch2a, bn2a_branch2a, ..., res2a_branch1; epsilon 1e-3; add([x, shortcut]);
--     classifier fc1000.
-- Both: ZeroPad(3) -> 7x7/2 conv (with bias, as every conv here) -> BN -> ReLU -> ZeroPad(1) ->
-- 3x3/2 max pool; bottleneck blocks with the stride on the first 1x1 (v1, Caffe style).
-- With weights=<file> and no variant, the variant is read off the file's group names (conv1 versus
-- conv1_conv). Preprocessing: caffe (RGB->BGR, minus the ImageNet means).
--   flower.models.resnet50{include_top=true, weights=nil|'imagenet'|path, input_shape={224,224,3},
--                          pooling=nil|'avg'|'max', classes=1000, preprocess=true, variant=nil}
local nn = require 'flower.nn'
local common = require 'flower.models.common'

local L   -- the layer maker of the model being built (common.maker)

local STAGES = {{64, 3, 1}, {128, 4, 2}, {256, 6, 2}, {512, 3, 2}}   -- filters, blocks, first stride

-- tf.keras resnet.py block1 (shortcut conv created first, as in Keras)
local function block2(x, filters, stride, conv_shortcut, name)
  local shortcut = x
  if conv_shortcut then
    shortcut = L('Conv2D', {filters = 4 * filters, kernel_size = 1, strides = stride, name = name .. '_0_conv'})(x)
    shortcut = L('BatchNormalization', {epsilon = 1.001e-5, name = name .. '_0_bn'})(shortcut)
  end
  x = L('Conv2D', {filters = filters, kernel_size = 1, strides = stride, name = name .. '_1_conv'})(x)
  x = L('BatchNormalization', {epsilon = 1.001e-5, name = name .. '_1_bn'})(x)
  x = nn.Activation{'relu', name = name .. '_1_relu'}(x)
  x = L('Conv2D', {filters = filters, kernel_size = 3, padding = 'same', name = name .. '_2_conv'})(x)
  x = L('BatchNormalization', {epsilon = 1.001e-5, name = name .. '_2_bn'})(x)
  x = nn.Activation{'relu', name = name .. '_2_relu'}(x)
  x = L('Conv2D', {filters = 4 * filters, kernel_size = 1, name = name .. '_3_conv'})(x)
  x = L('BatchNormalization', {epsilon = 1.001e-5, name = name .. '_3_bn'})(x)
  x = nn.Add{name = name .. '_add'}{shortcut, x}
  return nn.Activation{'relu', name = name .. '_out'}(x)
end

-- keras-applications resnet50.py conv_block / identity_block (shortcut conv created last)
local function block1(x, filters, stride, conv_shortcut, stage, blk, name)
  local cb, bb = 'res' .. stage .. blk .. '_branch', 'bn' .. stage .. blk .. '_branch'
  local y = L('Conv2D', {filters = filters, kernel_size = 1, strides = stride, name = cb .. '2a'})(x)
  y = L('BatchNormalization', {name = bb .. '2a'})(y)
  y = nn.Activation{'relu', name = name('activation')}(y)
  y = L('Conv2D', {filters = filters, kernel_size = 3, padding = 'same', name = cb .. '2b'})(y)
  y = L('BatchNormalization', {name = bb .. '2b'})(y)
  y = nn.Activation{'relu', name = name('activation')}(y)
  y = L('Conv2D', {filters = 4 * filters, kernel_size = 1, name = cb .. '2c'})(y)
  y = L('BatchNormalization', {name = bb .. '2c'})(y)
  local shortcut = x
  if conv_shortcut then
    shortcut = L('Conv2D', {filters = 4 * filters, kernel_size = 1, strides = stride, name = cb .. '1'})(x)
    shortcut = L('BatchNormalization', {name = bb .. '1'})(shortcut)
  end
  y = nn.Add{name = name('add')}{y, shortcut}
  return nn.Activation{'relu', name = name('activation')}(y)
end

-- The variant a Keras weight file was made for, from its first weighted group's name.
local function detect_variant(path)
  local keras = require 'flower.keras'
  local groups = keras.weighted_groups(path)
  local first = groups[1]
  if first == 'conv1' then return 'keras1' end
  if first == 'conv1_conv' then return 'keras2' end
  error(string.format("resnet50: %s is not a ResNet50 weight file: its first layer with weights is '%s' " ..
    "(expected conv1 for the Keras 1 file or conv1_conv for the tf.keras one)", path, tostring(first)), 3)
end

local function resnet50(opts)
  local o = common.options('resnet50', opts)
  L = o.L
  local variant = o.variant
  if variant == nil then
    variant = (o.weights and o.weights ~= 'imagenet') and detect_variant(o.weights) or 'keras2'
  end
  if variant ~= 'keras1' and variant ~= 'keras2' then
    error("resnet50: variant must be 'keras1' or 'keras2', got " .. tostring(variant), 2)
  end
  local name = common.namer()
  local img, x = common.input(o, 'caffe')
  local k1 = variant == 'keras1'
  x = nn.ZeroPadding2D{padding = 3, name = 'conv1_pad'}(x)
  x = L('Conv2D', {filters = 64, kernel_size = 7, strides = 2, name = k1 and 'conv1' or 'conv1_conv'})(x)
  if k1 then
    x = L('BatchNormalization', {name = 'bn_conv1'})(x)
    x = nn.Activation{'relu', name = name('activation')}(x)
  else
    x = L('BatchNormalization', {epsilon = 1.001e-5, name = 'conv1_bn'})(x)
    x = nn.Activation{'relu', name = 'conv1_relu'}(x)
  end
  x = nn.ZeroPadding2D{padding = 1, name = 'pool1_pad'}(x)
  x = nn.MaxPooling2D{pool_size = 3, strides = 2, name = k1 and name('max_pooling2d') or 'pool1_pool'}(x)
  for s, st in ipairs(STAGES) do
    local filters, blocks, stride = st[1], st[2], st[3]
    for b = 1, blocks do
      if k1 then
        x = block1(x, filters, b == 1 and stride or 1, b == 1, s + 1, ('abcdef'):sub(b, b), name)
      else
        x = block2(x, filters, b == 1 and stride or 1, b == 1, 'conv' .. (s + 1) .. '_block' .. b)
      end
    end
  end
  if k1 then o.top_name = 'fc1000' end
  x = common.top(o, x, name, not k1 and {avg = 'avg_pool', max = 'max_pool'} or nil)
  local model = nn.Model(img, x, {name = o.name or 'resnet50'})
  model.variant = variant
  return common.finish(model, o, {
    family = 'resnet50', preprocess = 'caffe', default_size = 224, features = 2048,
    file = 'resnet50_weights_tf_dim_ordering_tf_kernels', file_suffix = k1 and '_keras1' or nil,
    fetch = k1 and 'resnet50_keras1' or 'resnet50',
  })
end

return resnet50
