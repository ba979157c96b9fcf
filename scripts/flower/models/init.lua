-- flower.models: the four Keras Applications models, layer for layer as Keras builds them (same
-- layer names, padding, strides, biases and BatchNorm settings), so that Keras's own HDF5 weight
-- files load into them (flower.keras.load_weights) and give Keras's features.
--
--   local models = require 'flower.models'
--   local m = models.resnet50{include_top=false, pooling='avg', weights='resnet50_notop.h5'}
--   m:evaluate(); local f = m:forward(images)      -- RGB in [0, 255], as flower.data's loaders give
--   local bare = models.resnet50{include_top=false, pooling='avg', preprocess=false}
--   bare:forward(models.preprocess_input(images, bare.preprocess_mode))   -- Keras's graph as it is
--
-- Builders: resnet50, inception_v3, xception, inception_resnet_v2, each taking Keras's options
-- include_top (default true), weights (nil, 'imagenet' = the standard file from
-- scripts/fetch_weights.sh, or a path), input_shape ({H, W, 3}; -1 for an unknown size without the
-- top), pooling (nil, 'avg', 'max'), classes (1000), classifier_activation ('softmax'), plus
-- preprocess (default true: Keras's preprocess_input is the model's first layer, so it takes RGB in
-- [0, 255] as the loaders hand it out; false: Keras's bare graph, fed preprocessed input) and
-- name. Every model records model.preprocess_mode ('caffe' or 'tf'), model.default_size and
-- model.feature_dim.
local nn = require 'flower.nn'

local models = {}

models.resnet50 = require 'flower.models.resnet50'
models.inception_v3 = require 'flower.models.inception_v3'
models.xception = require 'flower.models.xception'
models.inception_resnet_v2 = require 'flower.models.inception_resnet_v2'

models.names = {'resnet50', 'inception_v3', 'xception', 'inception_resnet_v2'}

local common = require 'flower.models.common'

-- The smallest input size (pixels, square) a model takes, and its default.
function models.min_size(name) return common.sizes[name] and common.sizes[name].min end
function models.default_size(name) return common.sizes[name] and common.sizes[name].default end

-- Keras's parameter counts (keras.io/api/applications), with and without the classifier.
models.keras_params = {
  resnet50 = {top = 25636712, notop = 23587712},
  inception_v3 = {top = 23851784, notop = 21802784},
  xception = {top = 22910480, notop = 20861480},
  inception_resnet_v2 = {top = 55873736, notop = 54336736},
}

-- build(name, opts): a model by name
function models.build(name, opts)
  local b = models[name]
  if type(b) ~= 'function' or not models.keras_params[name] then
    error(string.format("models.build: unknown model '%s' (expected %s)", tostring(name),
      table.concat(models.names, ', ')), 2)
  end
  return b(opts)
end

-- Keras Applications' preprocess_input on RGB images (N, H, W, 3), values in [0, 255]:
-- 'caffe' RGB->BGR minus the ImageNet means; 'tf' x/127.5 - 1; 'torch' ImageNet mean/std.
function models.preprocess_input(x, mode)
  local p = nn.Preprocess{mode = mode or 'caffe'}
  return p:forward(x)
end

-- The seed's feature extractor: Model(model.input, model.layers[-2].output), i.e. the model
-- without its last layer (the softmax classifier), in Keras's layer order. A model that already
-- ends in pooling is returned as it is; one that ends in a 4-d feature map is refused.
function models.features(model)
  local layers = model:keras_layers()
  local last = layers[#layers]
  if last.class_name == 'GlobalAveragePooling2D' or last.class_name == 'GlobalMaxPooling2D' then return model end
  if last.class_name ~= 'Dense' then
    error(string.format("models.features: %s ends in '%s' (%s), not in a classifier or a global pooling; " ..
      "build it with pooling='avg'", model.name, last.name, last.class_name), 2)
  end
  return model:output_of(layers[#layers - 1].name, {name = model.name .. '_features'})
end

-- The seed's InceptionResNetV2 head, bringing its 1536 features to 2048 like the other models:
-- base (include_top=false, pooling='avg') -> Dropout(0.5) -> Dense(2048, relu) -> Dropout(0.5)
-- -> Dense(classes, softmax). opts: classes (required), units (2048), dropout (0.5), seed.
-- Returns the full model; models.features(m) then gives the 2048-d features.
function models.inception_resnet_v2_head(base, opts)
  opts = opts or {}
  if math.type(opts.classes) ~= 'integer' or opts.classes < 1 then
    error('models.inception_resnet_v2_head: classes (a positive integer) is required', 2)
  end
  local rate, units = opts.dropout or 0.5, opts.units or 2048
  local x = base.inputs[1]
  local y = base.outputs[1]
  if #y.shape ~= 1 then
    error(string.format("models.inception_resnet_v2_head: the base must end in pooled features, got shape %s " ..
      "(build it with include_top=false, pooling='avg')", nn.shape_str(y.shape)), 2)
  end
  y = nn.Dropout{rate = rate, seed = opts.seed, name = 'head_dropout_1'}(y)
  y = nn.Dense{units = units, activation = 'relu', name = 'head_dense'}(y)
  y = nn.Dropout{rate = rate, seed = opts.seed and opts.seed + 1, name = 'head_dropout_2'}(y)
  y = nn.Dense{units = opts.classes, activation = 'softmax', name = 'predictions'}(y)
  local m = nn.Model(x, y, {name = opts.name or (base.name .. '_head')})
  m.preprocess_mode, m.default_size, m.feature_dim = base.preprocess_mode, base.default_size, units
  return m
end

-- A classifier on top of a pooled base (the seed's transfer-learning model): base -> [Dropout] ->
-- Dense(classes, softmax), sharing the base's layers (freeze them with layer.trainable = false).
function models.classifier(base, opts)
  opts = opts or {}
  if math.type(opts.classes) ~= 'integer' or opts.classes < 1 then
    error('models.classifier: classes (a positive integer) is required', 2)
  end
  local y = base.outputs[1]
  if #y.shape ~= 1 then
    error(string.format("models.classifier: the base must end in pooled features, got shape %s", nn.shape_str(y.shape)), 2)
  end
  if opts.dropout and opts.dropout > 0 then y = nn.Dropout{rate = opts.dropout, seed = opts.seed, name = 'head_dropout'}(y) end
  y = nn.Dense{units = opts.classes, activation = 'softmax', name = opts.head_name or 'predictions'}(y)
  local m = nn.Model(base.inputs[1], y, {name = opts.name or (base.name .. '_classifier')})
  m.preprocess_mode, m.default_size, m.feature_dim = base.preprocess_mode, base.default_size, base.feature_dim
  return m
end

return models
