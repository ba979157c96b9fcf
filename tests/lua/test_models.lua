-- flower.models: the four architectures' sizes equal Keras's exactly (keras.io/api/applications
-- totals; the BatchNorm moving statistics as non-trainable), their weighted-layer counts equal the
-- standard files', options behave as Keras's, and the helpers (features, heads, preprocessing).
-- Feature values against real Keras are in test_models_keras.lua.
local T = require 'flower.test'
local flower = require 'flower'
local models = require 'flower.models'
local nn = require 'flower.nn'
local keras = require 'flower.keras'

-- keras.io totals; weighted layers of the notop files (../shared/specs/keras_applications.md §1)
local KERAS = {
  resnet50 = {top = 25636712, notop = 23587712, nontrain = 53120, weighted = 106, feat = 2048, size = 224},
  inception_v3 = {top = 23851784, notop = 21802784, nontrain = 34432, weighted = 188, feat = 2048, size = 299},
  xception = {top = 22910480, notop = 20861480, nontrain = 54528, weighted = 80, feat = 2048, size = 299},
  inception_resnet_v2 = {top = 55873736, notop = 54336736, nontrain = 60544, weighted = 448, feat = 1536, size = 299},
}

-- Models are slow to build (tens of millions of weights to initialise): build each variant once.
local cache = {}
local function get(name, key, opts)
  local k = name .. ':' .. key
  if not cache[k] then cache[k] = models[name](opts) end
  return cache[k]
end

local function weighted_layers(m)
  local n = 0
  for _, l in ipairs(m:keras_layers()) do if #l:weights() > 0 then n = n + 1 end end
  return n
end

for _, name in ipairs(models.names) do
  local k = KERAS[name]
  T.test(name .. ': parameter counts equal Keras exactly, with and without the top', function()
    local top = get(name, 'top', {})
    local total, trainable = top:count_params()
    T.eq(total, k.top, 'total with top')
    T.eq(total - trainable, k.nontrain, 'non-trainable')
    T.eq(weighted_layers(top), k.weighted + 1)
    local out = top.outputs[1].shape
    T.eq(#out, 1); T.eq(out[1], 1000)
    T.eq(top:keras_layers()[#top:keras_layers()].name, name == 'resnet50' and 'predictions' or 'predictions')
    local notop = get(name, 'avg', {include_top = false, pooling = 'avg'})
    total, trainable = notop:count_params()
    T.eq(total, k.notop, 'total without top')
    T.eq(total - trainable, k.nontrain)
    T.eq(weighted_layers(notop), k.weighted, 'weighted layers (the notop file has as many groups)')
    T.eq(notop.outputs[1].shape[1], k.feat)
    T.eq(notop.feature_dim, k.feat)
    T.eq(notop.default_size, k.size)
    local text = notop:summary{print_fn = false}
    T.check(text:find('Total params: ' .. k.notop, 1, true), 'summary total')
    T.check(text:find('Non-trainable params: ' .. k.nontrain, 1, true), 'summary non-trainable')
  end)
end

T.test('resnet50 keras1 variant: old names, epsilon 1e-3, same sizes', function()
  local m = models.resnet50{include_top = true, variant = 'keras1'}
  T.eq(select(1, m:count_params()), KERAS.resnet50.top)
  T.eq(m:layer('bn_conv1').epsilon, 1e-3)
  T.eq(m:layer('res2a_branch1').kernel:size(4), 256)
  T.eq(m:layer('bn5c_branch2c').moving_mean:size(1), 2048)
  T.eq(m:keras_layers()[#m:keras_layers()].name, 'fc1000')
  local n = models.resnet50{include_top = false, input_shape = {224, 224, 3}}
  T.eq(n:layer('conv1_bn').epsilon, 1.001e-5)
  T.eq(n.variant, 'keras2')
  T.check(n:layer('conv2_block1_0_conv').bias, 'every ResNet50 conv has a bias')
  -- no pooling: the 7x7x2048 map at 224
  local s = n.outputs[1].shape
  T.eq(table.concat(s, 'x'), '7x7x2048')
end)

T.test('architecture details: Keras names, biases, BatchNorm settings, output sizes', function()
  local iv3 = get('inception_v3', 'avg')
  T.eq(iv3:layer('conv2d').use_bias, false)
  T.eq(iv3:layer('batch_normalization_93').scale, false)
  T.eq(iv3:layer('conv2d_93').kernel:size(4), 192)
  T.eq(table.concat(iv3:layer('mixed10')._nodes[1].shape, 'x'), '8x8x2048')
  T.eq(table.concat(iv3:layer('mixed7')._nodes[1].shape, 'x'), '17x17x768')
  local x = get('xception', 'avg')
  T.eq(x:layer('block14_sepconv2_bn').epsilon, 1e-3)
  T.eq(x:layer('block2_sepconv1').use_bias, false)
  T.eq(table.concat(x:layer('block2_pool')._nodes[1].shape, 'x'), '74x74x128')
  T.eq(table.concat(x:layer('block4_pool')._nodes[1].shape, 'x'), '19x19x728')
  T.eq(x:layer('conv2d_3').kernel:size(4), 1024)     -- the unnamed residual convs: conv2d .. conv2d_3
  local r = get('inception_resnet_v2', 'avg')
  T.eq(r:layer('block35_1_conv').use_bias, true)
  T.eq(r:layer('custom_scale_layer').scale, 0.17)
  T.eq(r:layer('custom_scale_layer_10').scale, 0.1)
  T.eq(r:layer('custom_scale_layer_30').scale, 0.2)
  T.eq(r:layer('custom_scale_layer_39').scale, 1.0)
  T.raises(function() r:layer('block8_10_ac') end, "no layer named 'block8_10_ac'")   -- the last block has no ReLU
  T.eq(r:layer('conv_7b_bn').scale, false)
  T.eq(table.concat(r:layer('mixed_6a')._nodes[1].shape, 'x'), '17x17x1088')
  T.eq(table.concat(r:layer('mixed_7a')._nodes[1].shape, 'x'), '8x8x2080')
  T.eq(table.concat(r:layer('conv_7b_ac')._nodes[1].shape, 'x'), '8x8x1536')
end)

T.test('options: input_shape, pooling, classes, classifier_activation, name', function()
  local m = models.xception{include_top = false, input_shape = {71, 71, 3}, pooling = 'max'}
  T.eq(m:keras_layers()[#m:keras_layers()].class_name, 'GlobalMaxPooling2D')
  T.eq(m.outputs[1].shape[1], 2048)
  local v = models.inception_v3{include_top = false, input_shape = {-1, -1, 3}, pooling = 'avg'}
  T.eq(v.inputs[1].shape[1], -1)
  local c = models.resnet50{classes = 10, classifier_activation = false, name = 'r10', input_shape = {224, 224, 3}}
  T.eq(c.name, 'r10')
  T.eq(c.outputs[1].shape[1], 10)
  T.eq(c:layer('predictions').activation, nil)
  T.eq(select(1, c:count_params()), KERAS.resnet50.notop + 2048 * 10 + 10)
  T.eq(c:keras_layers()[#c:keras_layers()].name, 'predictions')
end)

T.test('option errors are clear and raised before building', function()
  T.raises(function() models.resnet50{input_shape = {31, 224, 3}, include_top = false} end,
    'resnet50: input size must be at least 32x32')
  T.raises(function() models.inception_v3{input_shape = {74, 74, 3}, include_top = false} end, 'at least 75x75')
  T.raises(function() models.xception{input_shape = {70, 299, 3}, include_top = false} end, 'at least 71x71')
  T.raises(function() models.inception_resnet_v2{input_shape = {299, 299, 1}} end, 'must have 3 channels')
  T.raises(function() models.resnet50{pooling = 'mean'} end, "pooling must be nil, 'avg' or 'max'")
  T.raises(function() models.resnet50{include_tops = false} end, "unknown option 'include_tops'")
  T.raises(function() models.resnet50{weights = 'imagenet', classes = 10} end, 'classes must be 1000')
  T.raises(function() models.resnet50{input_shape = {-1, -1, 3}} end, 'with include_top, input_shape must be fully known')
  T.raises(function() models.resnet50{variant = 'v3'} end, "variant must be 'keras1' or 'keras2'")
  T.raises(function() models.build('vgg16') end, "unknown model 'vgg16'")
  local home, fw = os.getenv('HOME'), os.getenv('FLOWER_WEIGHTS')
  if not fw then
    -- no weights directory with the file: the message says how to get it
    local ok, err = pcall(models.xception, {weights = 'imagenet', include_top = false})
    if not ok then
      T.check(tostring(err):find('fetch_weights.sh xception', 1, true), tostring(err))
      T.check(tostring(err):find('xception_weights_tf_dim_ordering_tf_kernels_notop.h5', 1, true), tostring(err))
    end
  end
  T.check(home or true)
  T.raises(function() models.resnet50{include_top = false, weights = '/nonexistent/w.h5'} end, 'no such file')
end)

T.test('features(): the seed\'s Model(input, layers[-2].output)', function()
  local m = get('xception', 'top')
  local f = models.features(m)
  T.eq(f.outputs[1].shape[1], 2048)
  T.eq(f:keras_layers()[#f:keras_layers()].name, 'avg_pool')
  local p = get('xception', 'avg')
  T.eq(models.features(p), p)
  local n = models.resnet50{include_top = false, input_shape = {32, 32, 3}}
  T.raises(function() models.features(n) end, "build it with pooling='avg'")
  local r = models.resnet50{include_top = false, pooling = 'max', input_shape = {32, 32, 3}}
  T.eq(r:keras_layers()[#r:keras_layers()].name, 'max_pool')
  T.eq(models.features(r), r)
end)

T.test('inception_resnet_v2_head: the seed\'s 1536 -> 2048 head, trainable on a frozen base', function()
  local base = models.inception_resnet_v2{include_top = false, pooling = 'avg', input_shape = {75, 75, 3}}
  local m = models.inception_resnet_v2_head(base, {classes = 5, seed = 1})
  local total = m:count_params()
  T.eq(total, KERAS.inception_resnet_v2.notop + 1536 * 2048 + 2048 + 2048 * 5 + 5)
  local names = {}
  for _, l in ipairs(m:keras_layers()) do names[#names + 1] = l.class_name end
  T.eq(table.concat(names, ',', #names - 3), 'Dropout,Dense,Dropout,Dense')
  T.eq(m:layer('predictions').activation, 'softmax')
  local f = models.features(m)
  T.eq(f.outputs[1].shape[1], 2048)
  T.eq(f.feature_dim, nil)
  T.eq(m.feature_dim, 2048)
  for _, l in ipairs(base:layers()) do l.trainable = false end
  local _, trainable = m:count_params()
  T.eq(trainable, 1536 * 2048 + 2048 + 2048 * 5 + 5)
  m:evaluate()
  flower.manual_seed(2)
  local y = m:forward(flower.rand(2, 75, 75, 3):mul(2):add(-1))
  T.eq(table.concat(y:size(), 'x'), '2x5')
  T.allclose(y:sum(2), flower.ones(2), 1e-5)
  local nopool = nn.Model(base.inputs[1], base:layer('conv_7b_ac')._nodes[1])
  T.raises(function() models.inception_resnet_v2_head(nopool, {classes = 3}) end, 'must end in pooled features')
end)

T.test('classifier(): base + Dense softmax head', function()
  local base = get('resnet50', 'avg')
  local m = models.classifier(base, {classes = 3, dropout = 0.5})
  T.eq(select(1, m:count_params()), KERAS.resnet50.notop + 2048 * 3 + 3)
  T.eq(m.preprocess_mode, 'caffe')
end)

T.test('preprocess_input: caffe and tf modes as Keras computes them', function()
  local x = flower.tensor({{{{0, 128, 255}, {10, 20, 30}}}})      -- 1x1x2x3 RGB
  local caffe = models.preprocess_input(x, 'caffe')
  T.allclose(caffe, flower.tensor({{{{255 - 103.939, 128 - 116.779, 0 - 123.68}, {30 - 103.939, 20 - 116.779, 10 - 123.68}}}}), 1e-6)
  local tf = models.preprocess_input(x, 'tf')
  T.allclose(tf, flower.tensor({{{{-1, 128 / 127.5 - 1, 1}, {10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1}}}}), 1e-6)
  local u8 = models.preprocess_input(flower.tensor({{{{0, 128, 255}}}}, 'uint8'), 'tf')
  T.eq(u8:dtype(), 'float32')
  T.allclose(u8, flower.tensor({{{{-1, 128 / 127.5 - 1, 1}}}}), 1e-6)
  local m = models.resnet50{include_top = false, pooling = 'avg', input_shape = {32, 32, 3}, preprocess = true}
  cache = nil
  T.eq(m:keras_layers()[2].name, 'preprocess')
  T.eq(m.preprocess_mode, 'caffe')
  T.eq(select(1, m:count_params()), KERAS.resnet50.notop)
  T.check(nn)
end)

T.test('the zoo takes what the loaders hand out (RGB 0..255) by default; preprocess=false is Keras\'s bare graph', function()
  local images = flower.rand(2, 32, 32, 3) * 255
  for _, name in ipairs({'resnet50', 'xception'}) do
    local size = models.min_size(name) < 32 and 32 or models.min_size(name)
    local shape = {size, size, 3}
    local x = name == 'resnet50' and images or flower.rand(2, size, size, 3) * 255
    local m = models[name]{include_top = false, pooling = 'avg', input_shape = shape}
    T.eq(m:keras_layers()[2].name, 'preprocess', name .. ': preprocessing is the first layer by default')
    local bare = models[name]{include_top = false, pooling = 'avg', input_shape = shape, preprocess = false}
    T.check(not pcall(bare.layer, bare, 'preprocess'), name .. ': preprocess=false has no preprocessing layer')
    local w = os.tmpname()
    keras.save_weights(m, w)
    keras.load_weights(bare, w)
    os.remove(w)
    m:evaluate(); bare:evaluate()
    T.allclose(m:forward(x), bare:forward(models.preprocess_input(x, m.preprocess_mode)), 1e-4, 1e-5,
      name .. ': raw images in = preprocessed images into the bare graph')
  end
  T.eq(models.min_size('inception_v3'), 75); T.eq(models.default_size('xception'), 299)
end)

T.done()
