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
-- Without --weights the models start from random weights (the log and report.html say so).
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
local MODELS = { 'resnet50', 'inception_v3', 'xception', 'inception_resnet_v2' }

local R = recipe.new {
  name = 'fgvcx_flowers',
  description = 'The seed\'s recipe: ResNet50, InceptionV3, Xception and InceptionResNetV2 from Keras ImageNet '
    .. 'weights, head then all layers, feature export, ensemble, submission.',
  options = recipe.pipeline_options {
    data = { required = true, help = 'the Kaggle FGVCx Flowers directory (train.json, train/, test.json, test/)' },
    models = { default = MODELS, choices = MODELS, help = 'models to fine-tune' },
    size = { min = 1, help = 'input size for every model (default: each model\'s own, 224 or 299; at least '
      .. '32 for resnet50, 75 for inception_v3 and inception_resnet_v2, 71 for xception)' },
    weights = { help = 'directory with the Keras notop weight files (scripts/fetch_weights.sh --dir DIR)' },
    head_lr = { default = 1e-3 },
    epochs = { default = 3 },
    lr = { default = 1e-4 },
    batch_size = { default = 32 },
    crop_scale = { default = 0.35 },
    ensemble_epochs = { default = 50 },
  },
  -- before the run directory is made: the data set, every weights file and every model's input size
  check = function(cfg)
    local models = require 'flower.models'
    if not files.isdir(cfg.data) then recipe.fail('fgvcx_flowers: --data %s: no such directory', cfg.data) end
    if not files.exists(files.join(cfg.data, 'train.json')) then
      recipe.fail('fgvcx_flowers: --data %s: no train.json there (expected the Kaggle FGVCx layout: train.json, '
        .. 'train/category_<id>/..., test.json, test/...)', cfg.data)
    end
    for _, name in ipairs(cfg.models) do
      local s, min = cfg.size or models.default_size(name), models.min_size(name)
      if s < min then
        recipe.fail('fgvcx_flowers: --size %d: %s takes images of at least %dx%d (give --size %d or more, or leave '
          .. 'it out for each model\'s own size)', s, name, min, min, min)
      end
      if cfg.weights then
        local path = files.join(cfg.weights, WEIGHT_FILES[name])
        if not files.exists(path) then
          recipe.fail('fgvcx_flowers: --weights %s: %s: no weights file %s (scripts/fetch_weights.sh --dir %s '
            .. 'downloads it)', cfg.weights, name, path, cfg.weights)
        end
      end
    end
  end,
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
    local function size_of(name) return cfg.size or models.default_size(name) end
    local summary = pipeline.run(cfg, run, {
      build = function(name, classes)
        local wpath = cfg.weights and files.join(cfg.weights, WEIGHT_FILES[name]) or nil
        local s = size_of(name)
        -- a weights file that does not fit the model is the user's error, not the program's
        local base = recipe.as_user_error(models.build, name, { include_top = false, pooling = 'avg', weights = wpath,
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
