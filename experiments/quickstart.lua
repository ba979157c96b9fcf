-- The quickstart: the seed's whole pipeline on the built-in synthetic flowers set, in minutes on two
-- CPU cores. `make quickstart` runs it with no arguments:
--
--   ./flowerlua experiments/quickstart.lua            # generates data/flowers if absent, then runs
--   ./flowerlua experiments/quickstart.lua --help     # every option
--   ./flowerlua experiments/quickstart.lua --tiny     # a few seconds (tests, CI)
--   ./flowerlua experiments/quickstart.lua --resume runs/quickstart-20250101-120000   # after Ctrl-C
--   ./flowerlua experiments/quickstart.lua --device cuda   # on a GPU (a `make CUDA=1` build)
--
-- What it does (each step is the seed's, with small CNNs in place of the ImageNet models, which
-- would take hours per epoch on a CPU): fine-tune each model in `--models` with a freeze-then-unfreeze
-- schedule (the head first, then every layer), export each model's pooled features for train /
-- valid / test to HDF5 in a fixed order, train a Dropout + Dense classifier on the concatenated
-- features (and average the models' probabilities), write predict.csv in the sample submission's
-- format and report.html. The small models start from random weights (no ImageNet here), so the head
-- stage only warms up the classifier; --weights DIR loads DIR/<model>.h5 (Keras layout, e.g. the
-- models/<model>/weights.h5 of an earlier run) by layer name, which makes it real transfer learning.
-- Everything lands in runs/quickstart-<timestamp>/.
local recipe = require 'flower.recipe'
local files = require 'flower.files'

local R = recipe.new {
  name = 'quickstart',
  description = 'The seed\'s pipeline (fine-tune, export features, ensemble, predict.csv, report) on the '
    .. 'synthetic flowers set; generates the data set first if it is absent.',
  options = {
    { name = 'data', type = 'string', default = 'data/flowers-quickstart', help = 'data set directory (Kaggle layout)' },
    { name = 'classes', type = 'int', default = 6, min = 2, help = 'classes when generating the data set' },
    { name = 'train_per_class', type = 'int', default = 100, min = 2, help = 'training photos per class when generating' },
    { name = 'test', type = 'int', default = 60, min = 0, help = 'test photos when generating' },
    { name = 'models', type = 'list', default = { 'vgg_tiny', 'inception_tiny' },
      choices = { 'resnet_tiny', 'inception_tiny', 'vgg_tiny' }, help = 'models to fine-tune and ensemble' },
    { name = 'size', type = 'int', default = 48, min = 16, help = 'input size in pixels' },
    { name = 'width', type = 'int', default = 16, min = 2, help = 'channels of the first stage of each model' },
    { name = 'dropout', type = 'number', default = 0, min = 0, max = 0.95, help = 'dropout before each model\'s classifier' },
    { name = 'head_epochs', type = 'int', default = 1, min = 0, help = 'epochs of the head-only stage' },
    { name = 'head_lr', type = 'number', default = 3e-3, min = 0, help = 'learning rate of the head-only stage' },
    { name = 'epochs', type = 'int', default = 11, min = 0, help = 'epochs of the all-layers stage (cosine learning-rate decay)' },
    { name = 'lr', type = 'number', default = 2e-3, min = 0, help = 'learning rate of the all-layers stage (Adam)' },
    { name = 'batch_size', type = 'int', default = 16, min = 1, help = 'batch size' },
    { name = 'augment', type = 'bool', default = true, help = 'random flips (and crops, see --crop-scale) while training' },
    { name = 'crop_scale', type = 'number', default = 0, min = 0, max = 1, help = 'random crops covering this fraction of the image or more (0: no crops)' },
    { name = 'ensemble_epochs', type = 'int', default = 60, min = 1, help = 'epochs of the ensemble classifier' },
    { name = 'ensemble_lr', type = 'number', default = 1e-3, min = 0, help = 'learning rate of the ensemble classifier' },
    { name = 'ensemble_dropout', type = 'number', default = 0.5, min = 0, max = 0.95, help = 'dropout of the ensemble classifier' },
    { name = 'topk', type = 'int', default = 3, min = 0, help = 'add a top-k column to predict.csv (0 or 1: none)' },
    { name = 'weights', type = 'string', help = 'directory of <model>.h5 weights to start from (by layer name)' },
    { name = 'workers', type = 'int', default = 2, min = 1, help = 'image decoding threads' },
    { name = 'seed', type = 'int', default = 1, min = 0, help = 'seed of weights, shuffling, augmentation and dropout' },
    { name = 'tiny', type = 'bool', help = 'a tiny run in seconds (4 classes, 32 px, 1+1 epochs) for tests' },
  },
  settings = {
    -- the freeze/unfreeze schedule; string values name options (so --epochs and --lr apply)
    stages = {
      { epochs = 'head_epochs', train = 'head', lr = 'head_lr' },
      { epochs = 'epochs', train = 'all', lr = 'lr', schedule = 'cosine' },
    },
  },
  run = function(cfg, run)
    local pipeline = require 'flower.pipeline'
    local nets = require 'flower.smallnets'
    if cfg.tiny and not run.resuming then
      -- only what was not given on the command line changes (a resumed run has its saved config)
      local tiny = { classes = 4, train_per_class = 12, test = 8, size = 32, width = 4, head_epochs = 1, epochs = 1,
                     ensemble_epochs = 5, data = 'build/quickstart-tiny' }
      for k, v in pairs(tiny) do if not run.given[k] then cfg[k] = v end end
      run:write_config()
    end
    if not files.exists(files.join(cfg.data, 'train.json')) then
      local args = { '--out', cfg.data, '--classes', tostring(cfg.classes), '--train-per-class', tostring(cfg.train_per_class),
                     '--test', tostring(cfg.test), '--seed', tostring(cfg.seed), '--workers', tostring(cfg.workers) }
      if cfg.tiny then for _, a in ipairs({ '--min-size', '96x72', '--max-size', '128x96', '--quiet' }) do args[#args + 1] = a end end
      run:log('generating the synthetic flowers set in %s (%d classes, %d photos each, %d test)', cfg.data, cfg.classes,
        cfg.train_per_class, cfg.test)
      run:timed('generate the data set', cfg.classes * cfg.train_per_class + cfg.test, function()
        recipe.run_script('make_flowers.lua', args)
      end)
    end
    local summary = pipeline.run(cfg, run, {
      build = function(name, classes)
        local m = nets.build(name, { classes = classes, input_size = cfg.size, width = cfg.width, dropout = cfg.dropout,
                                     seed = cfg.seed })
        if cfg.weights then
          local keras = require 'flower.keras'
          local path = files.join(cfg.weights, name .. '.h5')
          keras.load_weights(m, path, { by_name = true, skip_mismatch = true })
          run:log('%s: weights from %s (by name; the classifier is new)', name, path)
        end
        return m
      end,
      size = function() return cfg.size end,
      loss = function() return 'logits' end,
      describe = function(name)
        return { preprocessing = 'tf (x/127.5 - 1, inside the model)',
                 weights = cfg.weights and files.join(cfg.weights, name .. '.h5') or nil }
      end,
    })
    return recipe.finish(run, summary)
  end,
}

return R:main(arg)
