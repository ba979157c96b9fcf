-- flower.smallnets: small CNNs for the quickstart and tests, built from flower.nn layers in the
-- same shape as the zoo's models (a base ending in a pooled feature vector, then a head), so the
-- seed's whole pipeline -- head, then all layers; feature export; ensemble -- runs on two CPU cores
-- in minutes. The ImageNet models are the same pipeline with bigger bases (experiments/fgvcx_flowers.lua).
--
--   local nets = require 'flower.smallnets'
--   local model = nets.build('resnet_tiny', {input_size = 64, classes = 20, width = 16, seed = 1})
--   model.feature_layer   -- 'avg_pool': the layer whose output export_features writes
--   model.head            -- {'predictions'}: the layers a 'head' stage trains
--
-- Architectures (input (S, S, 3) RGB 0..255; Preprocess 'tf' maps it to [-1, 1]):
--   resnet_tiny      stem conv 3x3 (w) and 2x2 max pool, then three stages of one residual block each
--                    (widths w, 2w, 4w; the last two with stride 2 and a 1x1 projection shortcut)
--   inception_tiny   stem conv 3x3 (w), max pool, conv 3x3/2 (2w), inception block (1x1 | 1x1-3x3 |
--                    1x1-3x3-3x3 | avgpool-1x1, concatenated), max pool, a second inception block
--   vgg_tiny         (conv 3x3 - BN - ReLU - 2x2 max pool) x 4 with widths w, 2w, 4w, 8w
-- Every base ends in GlobalAveragePooling2D named 'avg_pool' (as Keras's pooling='avg'); the head is
-- an optional Dropout and Dense(classes) named 'predictions' giving logits (the loss applies softmax).
local flower = require 'flower'
local nn = require 'flower.nn'

local nets = {}

-- BatchNorm's moving statistics follow the batches with momentum 0.9 (PyTorch's 0.1), not Keras's
-- 0.99: a quickstart run has a few hundred steps, and with 0.99 the moving averages still lag far
-- behind the weights, so evaluation-mode accuracy trails training accuracy by tens of points.
local BN_MOMENTUM = 0.9

local function conv_bn(x, filters, k, stride, name)
  x = nn.Conv2D { filters = filters, kernel_size = k, strides = stride or 1, padding = 'same', use_bias = false,
                  name = name .. '_conv' }(x)
  x = nn.BatchNormalization { momentum = BN_MOMENTUM, name = name .. '_bn' }(x)
  return nn.Activation { activation = 'relu', name = name .. '_relu' }(x)
end

local function residual(x, filters, stride, name)
  local y = conv_bn(x, filters, 3, stride, name .. '_1')
  y = nn.Conv2D { filters = filters, kernel_size = 3, padding = 'same', use_bias = false, name = name .. '_2_conv' }(y)
  y = nn.BatchNormalization { momentum = BN_MOMENTUM, name = name .. '_2_bn' }(y)
  local s = x
  if stride ~= 1 or x.shape[3] ~= filters then
    s = nn.Conv2D { filters = filters, kernel_size = 1, strides = stride, use_bias = false, name = name .. '_0_conv' }(x)
    s = nn.BatchNormalization { momentum = BN_MOMENTUM, name = name .. '_0_bn' }(s)
  end
  y = nn.Add { name = name .. '_add' } { s, y }
  return nn.Activation { activation = 'relu', name = name .. '_out' }(y)
end

local function inception(x, w, name)
  local b1 = conv_bn(x, w, 1, 1, name .. '_b1')
  local b2 = conv_bn(conv_bn(x, w * 3 // 4, 1, 1, name .. '_b2a'), w, 3, 1, name .. '_b2b')
  local b3 = conv_bn(conv_bn(conv_bn(x, w // 2, 1, 1, name .. '_b3a'), w // 2, 3, 1, name .. '_b3b'), w // 2, 3, 1, name .. '_b3c')
  local b4 = nn.AveragePooling2D { pool_size = 3, strides = 1, padding = 'same', name = name .. '_b4_pool' }(x)
  b4 = conv_bn(b4, w // 2, 1, 1, name .. '_b4')
  return nn.Concatenate { axis = -1, name = name .. '_concat' } { b1, b2, b3, b4 }
end

local builders = {}

-- The stems keep full resolution for one convolution (petal shapes are small), then pool.
function builders.resnet_tiny(x, w)
  x = conv_bn(x, w, 3, 1, 'stem')
  x = nn.MaxPooling2D { pool_size = 2, name = 'stem_pool' }(x)
  x = residual(x, w, 1, 'block1')
  x = residual(x, 2 * w, 2, 'block2')
  x = residual(x, 4 * w, 2, 'block3')
  return x
end

function builders.inception_tiny(x, w)
  x = conv_bn(x, w, 3, 1, 'stem')
  x = nn.MaxPooling2D { pool_size = 3, strides = 2, padding = 'same', name = 'stem_pool' }(x)
  x = conv_bn(x, 2 * w, 3, 2, 'stem2')
  x = inception(x, 2 * w, 'mixed1')
  x = nn.MaxPooling2D { pool_size = 3, strides = 2, padding = 'same', name = 'reduce_pool' }(x)
  x = inception(x, 4 * w, 'mixed2')
  return x
end

function builders.vgg_tiny(x, w)
  for i, f in ipairs({ w, 2 * w, 4 * w, 8 * w }) do
    x = conv_bn(x, f, 3, 1, 'block' .. i)
    x = nn.MaxPooling2D { pool_size = 2, name = 'block' .. i .. '_pool' }(x)
  end
  return x
end

nets.names = { 'resnet_tiny', 'inception_tiny', 'vgg_tiny' }

-- build(arch, {input_size = 64, classes, width = 16, dropout = 0, seed}) -> model with
-- model.feature_layer = 'avg_pool', model.head = {'predictions'} (plus 'head_dropout').
function nets.build(arch, o)
  o = o or {}
  local b = builders[arch]
  if not b then
    error(string.format("smallnets.build: unknown architecture '%s' (expected one of %s)", tostring(arch),
      table.concat(nets.names, ', ')), 2)
  end
  if math.type(o.classes) ~= 'integer' or o.classes < 2 then
    error('smallnets.build: classes must be an integer >= 2, got ' .. tostring(o.classes), 2)
  end
  local size = o.input_size or 64
  if o.seed then flower.manual_seed(o.seed) end
  nn.reset_names()
  local inp = nn.Input { shape = { size, size, 3 }, name = 'input' }
  local x = nn.Preprocess { mode = 'tf', name = 'preprocess' }(inp)
  x = b(x, o.width or 16)
  x = nn.GlobalAveragePooling2D { name = 'avg_pool' }(x)
  local head = {}
  if o.dropout and o.dropout > 0 then
    x = nn.Dropout { rate = o.dropout, seed = o.seed and (o.seed * 7919 + 17) or nil, name = 'head_dropout' }(x)
    head[#head + 1] = 'head_dropout'
  end
  local y = nn.Dense { units = o.classes, name = 'predictions' }(x)
  head[#head + 1] = 'predictions'
  local model = nn.Model(inp, y, { name = arch })
  model.feature_layer = 'avg_pool'
  model.head = head
  return model
end

return nets
