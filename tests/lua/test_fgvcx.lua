-- experiments/fgvcx_flowers.lua (the seed's full recipe) end to end on a tiny set with ResNet50 at
-- 32x32: --weights wiring (a Keras-layout notop file, as scripts/fetch_weights.sh provides, loads
-- into the base), the softmax head and categorical cross-entropy, export, ensemble, submission.
local T = require 'flower.test'
local recipe = require 'flower.recipe'
local files = require 'flower.files'
local models = require 'flower.models'
local keras = require 'flower.keras'
local export = require 'flower.export'
local F = dofile('tests/lua/exp_fixture.lua')

local root = F.flowers('export', 3, 8, 5)
local TMP = F.tmpdir()
local fg = recipe.load('experiments/fgvcx_flowers.lua')

T.test('fgvcx_flowers with ResNet50 notop weights from --weights', function()
  -- a notop weights file in Keras's layout under the standard name
  local wdir = files.join(TMP, 'weights')
  files.mkdir(wdir)
  local base = models.resnet50 { include_top = false, pooling = 'avg', input_shape = { 32, 32, 3 } }
  local wfile = files.join(wdir, 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5')
  local flower = require 'flower'
  local k = base:layer('conv1_conv').kernel
  k:copy(flower.rand(k:size()) * 0.01)   -- unlike any fresh initialisation
  keras.save_weights(base, wfile)
  -- --epochs 0: only the head trains, so the base must hold the file's weights afterwards
  local s = fg:call { '--data', root, '--weights', wdir, '--models', 'resnet50', '--size', '32', '--epochs', '0',
    '--batch-size', '8', '--ensemble-epochs', '2', '--runs', files.join(TMP, 'runs'), '--run-name', 'r' }
  local dir = files.join(TMP, 'runs', 'r')
  T.check(files.read(files.join(dir, 'log.txt')):find('ImageNet weights from ' .. wfile, 1, true), 'weights loaded')
  T.eq(#s.results, 3)
  local got = s.finetuned[1].model:layer('conv1_conv').kernel
  T.eq((got - k):abs():max():item(), 0, 'conv1 kernel from the file')
  local e = export.read(files.join(dir, 'features', 'resnet50.h5'))
  T.eq(e.x.train:size(2), 2048, 'pooled ResNet50 features')
  T.eq(e.attrs.weights, 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5')
  T.eq(e.attrs.weights_sha256, export.sha256(wfile))
  -- the model ends in a softmax: the file holds its probabilities, not softmax(softmax(x))
  local pipeline, train = require 'flower.pipeline', require 'flower.train'
  local cfg = files.json_read(files.join(dir, 'config.json'))
  local ds = pipeline.datasets(cfg)
  local ev = train.evaluate(s.finetuned[1].model, pipeline.eval_loader(cfg, ds.valid, 32),
    { loss = 'categorical_crossentropy', collect = true, progress = false })
  T.allclose(e.probs.valid, ev.probs, 1e-5, 1e-7, 'valid_probs = the model\'s probabilities')
  local sub = files.csv_read(files.join(dir, 'predict.csv'))
  T.eq(table.concat(sub[1], ','), 'id,predicted')
  T.eq(#sub, 1 + 5)
end)

local FL = os.getenv('FLOWERLUA') or './flowerlua'
local sh = T.capture
local function entries(dir)
  local p = io.popen('ls -A ' .. files.shell_quote(dir) .. ' 2>/dev/null')
  local out = p:read('a')
  p:close()
  return out
end

-- user errors: the message alone (no Lua traceback), exit status 1, and no run directory left behind
local function user_error(args, want)
  local runs = files.join(TMP, 'bad-runs')
  local out, rc = sh(FL .. ' experiments/fgvcx_flowers.lua ' .. args .. ' --runs ' .. runs)
  T.eq(rc, 1, out)
  T.check(out:find(want, 1, true), 'expected ' .. want .. ' in: ' .. out)
  T.check(not out:find('traceback', 1, true), 'a traceback: ' .. out)
  T.eq(entries(runs), '', 'run directories left behind')
end

T.test('input sizes are checked for every model before anything runs', function()
  user_error('--data ' .. root .. ' --models resnet50,inception_v3 --size 32',
    'fgvcx_flowers: --size 32: inception_v3 takes images of at least 75x75')
  user_error('--data ' .. root .. ' --models xception --size 70', 'xception takes images of at least 71x71')
end)

T.test('a bad --data, a missing or unfit weights file: a message, no traceback, no run directory', function()
  user_error('--data ' .. files.join(TMP, 'nowhere'), '--data ' .. files.join(TMP, 'nowhere') .. ': no such directory')
  user_error('--data ' .. TMP, 'no train.json there')
  user_error('--data ' .. root .. ' --weights ' .. files.join(TMP, 'none') .. ' --models xception',
    'xception: no weights file ' .. files.join(TMP, 'none', 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'))
  -- a weights file of another model: found when the model is built, still the user's error
  local wdir = files.join(TMP, 'wrong')
  files.mkdir(wdir)
  os.execute(string.format('cp %s %s', files.shell_quote(files.join(TMP, 'weights', 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5')),
    files.shell_quote(files.join(wdir, 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'))))
  user_error('--data ' .. root .. ' --weights ' .. wdir .. ' --models xception --size 71',
    'keras.load_weights: ' .. files.join(wdir, 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'))
  -- from Lua too: an error whose message is the text
  local e = T.raises(function()
    fg:call { '--data', root, '--weights', files.join(TMP, 'none'), '--models', 'xception', '--runs', files.join(TMP, 'runs') }
  end, 'xception: no weights file ' .. files.join(TMP, 'none', 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'))
  T.check(recipe.is_user_error(e), 'a recipe user error')
end)

T.test('`--resume RUNDIR` alone continues a run (the options come from its config.json)', function()
  local runs = files.join(TMP, 'runs')
  local out, rc = sh(FL .. ' experiments/fgvcx_flowers.lua --data ' .. root .. ' --models resnet50 --size 32 --epochs 0 ' ..
    '--batch-size 8 --ensemble-epochs 2 --workers 1 --runs ' .. runs .. ' --run-name again')
  T.eq(rc, 0, out)
  local dir = files.join(runs, 'again')
  local before = files.read(files.join(dir, 'predict.csv'))
  out, rc = sh(FL .. ' experiments/fgvcx_flowers.lua --resume ' .. dir)
  T.eq(rc, 0, out)
  T.check(not out:find('is required', 1, true), out)
  T.eq(files.read(files.join(dir, 'predict.csv')), before, 'the same submission')
  local html = files.read(files.join(dir, 'report.html'))
  T.check(html:find('resnet50 started from random weights', 1, true), 'the report says the weights were random')
  T.check(html:find('predict-averaged.csv', 1, true), 'the Files table lists predict-averaged.csv')
  out, rc = sh(FL .. ' experiments/fgvcx_flowers.lua --resume ' .. files.join(TMP, 'weights'))
  T.eq(rc, 1, out); T.check(out:find('no config.json there', 1, true) and not out:find('traceback', 1, true), out)
end)

F.rmdir(TMP)
T.done()
