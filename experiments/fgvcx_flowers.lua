-- The seed's full recipe for the FGVCx Flowers challenge (Kaggle, 2018): four Keras Applications
-- models from their ImageNet weights, each fine-tuned head-first then whole, their features
-- exported and concatenated, a Dropout + Dense(softmax) ensemble, and the submission.
--
--   ./flowerlua experiments/fgvcx_flowers.lua --data /data/fgvcx --weights ~/.keras/models
--   ./flowerlua experiments/fgvcx_flowers.lua --data DIR --weights DIR --models resnet50,xception --epochs 3
--   ./flowerlua experiments/fgvcx_flowers.lua --resume runs/fgvcx_flowers-20250101-120000   # after Ctrl-C
--   build-cuda/flowerlua experiments/fgvcx_flowers.lua --data DIR --weights DIR --device cuda   # on a GPU
--
-- --data DIR holds the Kaggle layout: train.json, test.json, train/category_<id+1>/<image_id>.jpg,
-- test/<file_name> and (optionally) sample_submission.csv. --weights DIR holds Keras's standard
-- `notop` files (scripts/fetch_weights.sh downloads them):
--   resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5             (224x224, 2048 features)
--   inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5         (299x299, 2048)
--   xception_weights_tf_dim_ordering_tf_kernels_notop.h5             (299x299, 2048)
--   inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5  (299x299, 1536; the seed adds
--       Dropout(0.5) + Dense(2048, relu) + Dropout(0.5) so that it gives 2048 features too)
-- Without --weights the models start from random weights (a warning says so).
-- The schedule is the seed's: stage 1 trains only the new softmax head (Adam, lr 1e-3, 1 epoch),
-- stage 2 every layer (--epochs, --lr). Each model's own preprocessing runs inside the model.
-- Expect hours per epoch per model on a CPU at 700k images; every step checkpoints, so Ctrl-C and
-- --resume are safe at any point.
local recipe = require 'flower.recipe'
local files = require 'flower.files'

local WEIGHT_FILES = {
  resnet50 = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
  inception_v3 = 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5',
  xception = 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5',
  inception_resnet_v2 = 'inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5',
}
local SIZES = { resnet50 = 224, inception_v3 = 299, xception = 299, inception_resnet_v2 = 299 }

local R = recipe.new {
  name = 'fgvcx_flowers',
  description = 'The seed\'s recipe: ResNet50, InceptionV3, Xception and InceptionResNetV2 from Keras ImageNet '
    .. 'weights, head then all layers, feature export, ensemble, submission.',
  options = {
    { name = 'data', type = 'string', required = true, help = 'the Kaggle FGVCx Flowers directory' },
    { name = 'weights', type = 'string', help = 'directory with the Keras notop weight files' },
    { name = 'models', type = 'list', default = { 'resnet50', 'inception_v3', 'xception', 'inception_resnet_v2' },
      choices = { 'resnet50', 'inception_v3', 'xception', 'inception_resnet_v2' }, help = 'models to fine-tune' },
    { name = 'size', type = 'int', min = 32, help = 'input size for every model (default: each model\'s own, 224 or 299)' },
    { name = 'head_epochs', type = 'int', default = 1, min = 0, help = 'epochs of the head-only stage' },
    { name = 'head_lr', type = 'number', default = 1e-3, min = 0, help = 'learning rate of the head-only stage (Adam)' },
    { name = 'epochs', type = 'int', default = 3, min = 0, help = 'epochs of the all-layers stage' },
    { name = 'lr', type = 'number', default = 1e-4, min = 0, help = 'learning rate of the all-layers stage (Adam)' },
    { name = 'batch_size', type = 'int', default = 32, min = 1, help = 'batch size' },
    { name = 'augment', type = 'bool', default = true, help = 'random flips (and crops, see --crop-scale) while training' },
    { name = 'crop_scale', type = 'number', default = 0.35, min = 0, max = 1, help = 'random crops covering this fraction of the image or more (0: no crops)' },
    { name = 'ensemble_epochs', type = 'int', default = 50, min = 1, help = 'epochs of the ensemble classifier' },
    { name = 'ensemble_lr', type = 'number', default = 1e-3, min = 0, help = 'learning rate of the ensemble classifier' },
    { name = 'ensemble_dropout', type = 'number', default = 0.5, min = 0, max = 0.95, help = 'dropout of the ensemble' },
    { name = 'topk', type = 'int', default = 0, min = 0, help = 'add a top-k column to predict.csv (0: none)' },
    { name = 'workers', type = 'int', default = 2, min = 1, help = 'image decoding threads' },
    { name = 'seed', type = 'int', default = 1, min = 0, help = 'seed of the heads, shuffling, augmentation and dropout' },
  },
  settings = {
    stages = {
      { epochs = 'head_epochs', train = 'head', lr = 'head_lr' },
      { epochs = 'epochs', train = 'all', lr = 'lr' },
    },
  },
  run = function(cfg, run)
    local pipeline = require 'flower.pipeline'
    local models = require 'flower.models'
    if not cfg.weights then
      run:log('warning: no --weights: the models start from random weights, not ImageNet (see scripts/fetch_weights.sh)')
    end
    local function size_of(name) return cfg.size or SIZES[name] end
    local summary = pipeline.run(cfg, run, {
      build = function(name, classes)
        local wpath = cfg.weights and files.join(cfg.weights, WEIGHT_FILES[name]) or nil
        if wpath and not files.exists(wpath) then
          error(string.format('fgvcx_flowers: %s: no weights file %s', name, wpath), 0)
        end
        local s = size_of(name)
        local base = models.build(name, { include_top = false, pooling = 'avg', weights = wpath, preprocess = true,
                                          input_shape = { s, s, 3 } })
        local m
        if name == 'inception_resnet_v2' then
          m = models.inception_resnet_v2_head(base, { classes = classes, seed = cfg.seed })
          m.feature_layer = 'head_dense'
          m.head = { 'head_dropout_1', 'head_dense', 'head_dropout_2', 'predictions' }
        else
          m = models.classifier(base, { classes = classes, seed = cfg.seed })
          local layers = base:keras_layers()
          m.feature_layer = layers[#layers].name
          m.head = { 'predictions' }
        end
        if wpath then run:log('%s: ImageNet weights from %s', name, wpath) end
        return m
      end,
      size = function(name) return size_of(name) end,
      loss = function() return 'categorical_crossentropy' end,   -- the models end in softmax, as the seed's
      describe = function(name)
        local mode = (name == 'resnet50') and 'caffe' or 'tf'
        return { preprocessing = mode .. ' (Keras preprocess_input, inside the model)',
                 weights = cfg.weights and files.join(cfg.weights, WEIGHT_FILES[name]) or nil }
      end,
    })
    return recipe.finish(run, summary)
  end,
}

return R:main(arg)
