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
  local sub = files.csv_read(files.join(dir, 'predict.csv'))
  T.eq(table.concat(sub[1], ','), 'id,predicted')
  T.eq(#sub, 1 + 5)
end)

T.test('a missing weights file is an error naming it', function()
  T.raises(function()
    fg:call { '--data', root, '--weights', files.join(TMP, 'none'), '--models', 'xception', '--runs', files.join(TMP, 'runs') }
  end, 'xception: no weights file ' .. files.join(TMP, 'none', 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'))
end)

F.rmdir(TMP)
T.done()
