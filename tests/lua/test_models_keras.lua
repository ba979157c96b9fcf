-- The model zoo against real Keras. tests/reference/gen_keras_models.py (tf-keras) builds each
-- application with seeded random weights and calibrated BatchNorm statistics, saves it with
-- Keras's own save_weights, records Keras's pooled features for two images, and derives the older
-- layouts of the standard ImageNet files from the same weights (Keras 1 ResNet50, Keras 2.0
-- InceptionV3 numbering, Keras 1 Xception auto names, TF-slim InceptionResNetV2 names). Here every
-- file must load (by Keras's layer order) and give Keras's features within 1e-4 relative, our
-- layer order must be Keras's model.layers order name for name, and Keras must load the file
-- flowerlua writes.
local T = require 'flower.test'
local flower = require 'flower'
local models = require 'flower.models'
local keras = require 'flower.keras'
local h5 = require 'flower.h5'

local PY = T.python
local REF = (os.getenv('BUILD') or 'build') .. '/ref/keras'
local GEN = 'tests/reference/gen_keras_models.py'
local RTOL = 1e-4

local sh = T.sh

-- Generates (only) the models whose references are missing or older than the generator.
do
  local stale = {}
  for _, n in ipairs(models.names) do
    if not sh(string.format('[ %s/%s_ref.h5 -nt %s ]', REF, n, GEN)) then stale[#stale + 1] = n end
  end
  if #stale > 0 then
    io.stderr:write('test_models_keras: generating Keras references for ' .. table.concat(stale, ' ') .. '\n')
    assert(sh(string.format('%s %s %s %s >&2', PY, GEN, REF, table.concat(stale, ' '))),
      'test_models_keras: the Keras reference generator failed (' .. PY .. ' ' .. GEN .. '); run make deps')
  end
end

local function ref(name)
  local f <close> = h5.open(REF .. '/' .. name .. '_ref.h5', 'r')
  local r = {size = f:attr('/', 'size'), preprocess = f:attr('/', 'preprocess'), params = f:attr('/', 'params'),
             trainable = f:attr('/', 'trainable_params'), order = f:attr('/', 'layer_order'),
             order_keras1 = f:attr('/', 'layer_order_keras1'), weighted = f:attr('/', 'weighted_layers'),
             images = f:read('/images'), inputs = f:read('/inputs'), features = f:read('/features')}
  if f:exists('/features_keras1') then r.features_keras1 = f:read('/features_keras1') end
  return r
end

local function build(name, r, weights, extra)
  -- Keras's bare graph (preprocess = false): the references feed preprocessed inputs
  local opts = {include_top = false, pooling = 'avg', input_shape = {r.size, r.size, 3}, weights = weights,
                preprocess = false}
  for k, v in pairs(extra or {}) do opts[k] = v end
  local m = models[name](opts)
  m:evaluate()
  return m
end

local function names(layers)
  local r = {}
  for i, l in ipairs(layers) do r[i] = l.name end
  return r
end

local function same_list(got, want, what)
  T.eq(#got, #want, what .. ': count')
  for i = 1, #want do
    if got[i] ~= want[i] then error(string.format('%s: position %d is %s, Keras has %s', what, i, got[i], want[i]), 2) end
  end
end

local same_weights = T.same_weights

local derived = {
  resnet50 = {file = 'resnet50_keras1_notop.h5', what = 'the Keras 1 file layout (conv1, bn_conv1, _W:0, running_std)'},
  inception_v3 = {file = 'inception_v3_keras20_notop.h5', what = 'Keras 2.0 one-based names (conv2d_1 ...)'},
  xception = {file = 'xception_keras1_notop.h5', what = 'Keras 1 auto names (convolution2d_N, _W:0)'},
  inception_resnet_v2 = {file = 'inception_resnet_v2_tfslim_notop.h5', what = 'TF-slim names (Conv2d_1a_3x3 ...)'},
}

for _, name in ipairs(models.names) do
  local r = ref(name)
  local keras_file = REF .. '/' .. name .. '_notop.h5'
  local m

  T.test(name .. ': tf-keras save_weights file loads and gives Keras\'s features (1e-4)', function()
    m = build(name, r, keras_file)
    local total, trainable = m:count_params()
    T.eq(total, r.params, 'Keras count_params')
    T.eq(trainable, r.trainable, 'Keras trainable params')
    local y = m:forward(r.inputs)
    T.allclose(y, r.features, RTOL, 0, name .. ' features')
  end)

  T.test(name .. ': layer order equals Keras\'s model.layers, name for name', function()
    same_list(names(m:keras_layers()), r.order, 'model.layers')
    local w = {}
    for _, l in ipairs(m:keras_layers()) do if #l:weights() > 0 then w[#w + 1] = l.name end end
    same_list(w, r.weighted, 'weighted layers')
  end)

  T.test(name .. ': ' .. derived[name].what .. ' loads to the same features', function()
    local path = REF .. '/' .. derived[name].file
    if name == 'resnet50' then
      local old = build(name, r, path)       -- variant detected from the file: keras1
      T.eq(old.variant, 'keras1')
      T.eq(old:layer('bn_conv1').epsilon, 1e-3)
      same_list(names(old:keras_layers()), r.order_keras1, 'keras1 model.layers')
      T.allclose(old:forward(r.inputs), r.features_keras1, RTOL, 0, 'keras1 features')
      -- same weights, other architecture: the features differ (epsilon 1e-3 vs 1.001e-5)
      local d = (old:forward(r.inputs) - r.features):abs():max():item()
      T.check(d > 1e-3, 'the two ResNet50 variants should differ, max diff ' .. d)
    else
      local other = build(name, r, path)
      same_weights(other, m)                 -- the same tensors, bit for bit
    end
  end)

  T.test(name .. ': by_name loads the tf-keras file; preprocess=true takes raw images', function()
    local p = build(name, r, nil, {preprocess = true})
    local rep = keras.load_weights(p, keras_file, {by_name = true})
    T.eq(rep.loaded, #r.weighted)
    T.eq(#rep.missing_in_file, 0)
    T.eq(#rep.unused_in_file, 0)
    same_weights(p, m)
    T.eq(p.preprocess_mode, r.preprocess)
    T.allclose(p:forward(r.images), r.features, RTOL, 0, name .. ' from uint8 images')
    T.allclose(models.preprocess_input(r.images, r.preprocess), r.inputs, 1e-6, 0, 'preprocess_input')
    local path = REF .. '/' .. derived[name].file
    if name == 'inception_v3' then
      -- Keras 2.0 numbered from 1: that file's conv2d_1 is our conv2d, and by name each layer gets its own
      -- weights (before, the shapes clashed; with skip_mismatch 53 layers took a neighbour's weights)
      local q = build(name, r, nil, {preprocess = true})
      local rep1 = keras.load_weights(q, path, {by_name = true})
      T.eq(rep1.loaded, #r.weighted); T.eq(#rep1.missing_in_file, 0); T.eq(rep1.renamed[1].group, 'conv2d_1')
      same_weights(q, m)
      local s = build(name, r, nil, {preprocess = true})
      local rep2 = keras.load_weights(s, path, {by_name = true, skip_mismatch = true, quiet = true})
      T.eq(rep2.loaded, #r.weighted); T.eq(#rep2.skipped, 0)
      same_weights(s, m)
    elseif name ~= 'resnet50' then
      -- auto / TF-slim names: by name almost nothing matches (why Keras loads these by order)
      local rep2 = keras.load_weights(p, path, {by_name = true, quiet = true})
      T.check(rep2.loaded < #r.weighted / 2, 'old-layout names should mostly not match, loaded ' .. rep2.loaded)
      T.check(#rep2.missing_in_file > 0, 'missing layers are reported')
    end
  end)
  m = nil
  collectgarbage()
end

T.test('xception with its classifier: a with-top Keras file loads and predicts as Keras', function()
  local r = ref('xception')
  local f <close> = h5.open(REF .. '/xception_ref.h5', 'r')
  local want = f:read('/predictions_top5')
  local m = models.xception{classes = 5, input_shape = {r.size, r.size, 3}, weights = REF .. '/xception_top5.h5',
                            preprocess = false}
  m:evaluate()
  T.allclose(m:forward(r.inputs), want, RTOL, 0, 'predictions')
  -- the notop file does not fit a model with a top, and says why
  T.raises(function() keras.load_weights(m, REF .. '/xception_notop.h5') end,
    "the model xception has 81 layers with weights, the file 80 (the file has no weights for the model's layer(s) 'predictions')")
  -- the seed's way: the notop base by order, then a new head
  local base = models.xception{include_top = false, pooling = 'avg', input_shape = {r.size, r.size, 3},
                               weights = REF .. '/xception_notop.h5', preprocess = false}
  local clf = models.classifier(base, {classes = 5})
  local rep = keras.load_weights(clf, REF .. '/xception_top5.h5', {by_name = true, skip_mismatch = true, quiet = true})
  T.eq(rep.loaded, 81)
  clf:evaluate()
  T.allclose(clf:forward(r.inputs), want, RTOL, 0, 'by name into base + new head')
end)

T.test('xception: a standalone Keras 2.2 file (residual convs conv2d_1 ... conv2d_4) loads by name, each layer its own', function()
  local r = ref('xception')
  local ours = build('xception', r, REF .. '/xception_notop.h5')
  local k22 = os.tmpname()
  assert(sh(string.format('%s tests/reference/keras22_names.py %s %s', PY, REF .. '/xception_notop.h5', k22)),
    'keras22_names.py failed')
  local m = build('xception', r, nil)
  local rep = keras.load_weights(m, k22, {by_name = true, skip_mismatch = true, quiet = true})
  T.eq(rep.loaded, #r.weighted); T.eq(#rep.skipped, 0); T.eq(#rep.missing_in_file, 0)
  T.eq(#rep.renamed, 8, 'four residual convs and their BatchNorms')
  same_weights(m, ours)
  T.allclose(m:forward(r.inputs), r.features, RTOL, 0, 'Keras\'s features')
  os.remove(k22)
end)

T.test('resnet50: the Keras 1 file into a tf.keras-named model suggests variant=\'keras1\'', function()
  local r = ref('resnet50')
  local m = build('resnet50', r, nil)
  T.raises(function() keras.load_weights(m, REF .. '/resnet50_keras1_notop.h5') end,
    "the file is the Keras 1 ResNet50 (conv1, bn_conv1, ...): build the model with variant='keras1'")
end)

T.test('resnet50: a wrong model\'s file is refused, nothing loaded', function()
  local r = ref('xception')
  local m = build('xception', r, nil)
  local before = m:layer('block1_conv1').kernel:clone()
  T.raises(function() keras.load_weights(m, REF .. '/resnet50_notop.h5') end,
    'the model xception has 80 layers with weights, the file 106')
  T.raises(function() keras.load_weights(m, REF .. '/inception_v3_notop.h5') end, 'nothing was loaded')
  T.check(m:layer('block1_conv1').kernel:equal(before), 'weights changed by a failed load')
  T.raises(function() models.resnet50{include_top = false, weights = REF .. '/xception_notop.h5'} end,
    "is not a ResNet50 weight file: its first layer with weights is 'block1_conv1'")
end)

T.test('Keras loads the file keras.save_weights writes (resnet50), and predicts what we predict', function()
  local r = ref('resnet50')
  local m = build('resnet50', r, REF .. '/resnet50_notop.h5')
  -- change the weights so that the check is not satisfied by Keras's own file
  for _, l in ipairs(m:keras_layers()) do
    if l.class_name == 'BatchNormalization' then l.gamma:mul_(1.25); l.beta:add_(0.05) end
  end
  local mine = m:forward(r.inputs)
  local d = (mine - r.features):abs():max():item()
  T.check(d > 1e-2, 'the perturbation should change the features')
  local dir = os.tmpname()
  os.remove(dir)
  os.execute('mkdir -p ' .. dir)
  local w, x, y = dir .. '/ours.h5', dir .. '/x.h5', dir .. '/y.h5'
  keras.save_weights(m, w)
  h5.write_atomic(x, function(f) f:write('/x', r.inputs) end)
  assert(sh(string.format('%s tests/reference/keras_load_check.py resnet50 %s %s %s >&2', PY, w, x, y)),
    'tf-keras could not load our file')
  local theirs = h5.read(y, '/y')
  T.allclose(theirs, mine, RTOL, 0, 'Keras on our file vs flowerlua')
  -- and we read our own file back bit-identically
  local back = build('resnet50', r, w)
  same_weights(back, m)
  os.execute('rm -rf ' .. dir)
end)

T.done()
