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
-- models/<model>/model.h5 of an earlier run) by layer name, which makes it real transfer learning.
-- Everything lands in runs/quickstart-<timestamp>/.
local recipe = require 'flower.recipe'
local files = require 'flower.files'

local R = recipe.new {
  name = 'quickstart',
  description = 'The seed\'s pipeline (fine-tune, export features, ensemble, predict.csv, report) on the '
    .. 'synthetic flowers set; generates the data set first if it is absent.',
  options = recipe.pipeline_options {
    data = { default = 'data/flowers-quickstart', help = 'data set directory (Kaggle layout; generated if absent)' },
    models = { default = { 'vgg_tiny', 'inception_tiny' }, choices = { 'resnet_tiny', 'inception_tiny', 'vgg_tiny' } },
    size = { default = 48, min = 16 },
    weights = { help = 'directory of <model>.h5 weights to start from (by layer name)' },
    head_lr = { default = 3e-3 },
    epochs = { default = 11, help = 'epochs of the all-layers stage (cosine learning-rate decay)' },
    lr = { default = 2e-3 },
    batch_size = { default = 16 },
    crop_scale = { default = 0 },
    ensemble_epochs = { default = 60 },
    topk = { default = 3 },
    extra = {
      { name = 'classes', type = 'int', default = 6, min = 2, help = 'classes when generating the data set' },
      { name = 'train_per_class', type = 'int', default = 100, min = 2, help = 'training photos per class when generating' },
      { name = 'test', type = 'int', default = 60, min = 0, help = 'test photos when generating' },
      { name = 'width', type = 'int', default = 16, min = 2, help = 'channels of the first stage of each model' },
      { name = 'dropout', type = 'number', default = 0, min = 0, max = 0.95, help = 'dropout before each model\'s classifier' },
      { name = 'tiny', type = 'bool', help = 'a tiny run in seconds (4 classes, 32 px, 1+1 epochs) for tests' },
    },
  },
  -- before the run directory is made: every weights file --weights names must be there
  check = function(cfg)
    if not cfg.weights then return end
    for _, name in ipairs(cfg.models) do
      local path = files.join(cfg.weights, name .. '.h5')
      if not files.exists(path) then recipe.fail('quickstart: --weights %s: %s: no weights file %s', cfg.weights, name, path) end
    end
  end,
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
          recipe.as_user_error(keras.load_weights, m, path, { by_name = true, skip_mismatch = true })
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
