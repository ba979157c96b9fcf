-- Real data: Fashion-MNIST (70,000 28x28 grey images of 10 kinds of clothing) from Debian's
-- `dataset-fashion-mnist` package, a small CNN trained from scratch with train.fit on tensors in
-- memory. The network is the one tests/bench/fashion_mnist.lua runs in PyTorch beside it.
--
--   ./flowerlua experiments/fashion_mnist.lua [--epochs 3] [--tensorboard runs/fm-tb] [--tiny]
--
-- Conv(32, 3x3, ReLU) - MaxPool 2 - Conv(64, 3x3, ReLU) - MaxPool 2 - Flatten - Dense(128, ReLU) -
-- Dropout(0.3) - Dense(10), Adam(1e-3), batch 64; pixels scaled to [0, 1]; labels 1..10 (the files
-- hold 0..9). The last 10,000 training images are held out for validation; the 10,000 test images
-- give the final accuracy.
local flower = require 'flower'
local cli = require 'flower.cli'
local files = require 'flower.files'
local nn, data, train, optim = flower.nn, flower.data, flower.train, flower.optim

local spec = {
  name = 'fashion_mnist',
  description = 'A small CNN on Fashion-MNIST (Debian dataset-fashion-mnist), trained from tensors in memory.',
  options = {
    { name = 'data', type = 'string', default = '/usr/share/datasets/fashion-mnist',
      help = 'folder with the four *-idx?-ubyte.gz files' },
    { name = 'epochs', type = 'int', default = 3, min = 1, help = 'training epochs' },
    { name = 'batch_size', type = 'int', default = 64, min = 1, help = 'batch size' },
    { name = 'lr', type = 'number', default = 1e-3, help = 'Adam learning rate' },
    { name = 'seed', type = 'int', default = 1, help = 'weights, shuffling and dropout' },
    { name = 'threads', type = 'int', default = 0, help = 'CPU threads (0: all cores)' },
    { name = 'out', type = 'string', default = '', help = 'run directory (default runs/fashion_mnist-<time>)' },
    { name = 'tensorboard', type = 'string', default = '', help = 'write TensorBoard event files to this folder' },
    { name = 'tiny', type = 'bool', default = false, help = '2,000 training images and 1 epoch (seconds, for tests)' },
  },
}

local recipe = {}

function recipe.build(seed)
  nn.reset_names()
  flower.manual_seed(seed)
  local x = nn.Input { 28, 28, 1 }
  local y = nn.Conv2D { filters = 32, kernel_size = 3, activation = 'relu', name = 'conv1' }(x)
  y = nn.MaxPooling2D { pool_size = 2, name = 'pool1' }(y)
  y = nn.Conv2D { filters = 64, kernel_size = 3, activation = 'relu', name = 'conv2' }(y)
  y = nn.MaxPooling2D { pool_size = 2, name = 'pool2' }(y)
  y = nn.Flatten { name = 'flatten' }(y)
  y = nn.Dense { units = 128, activation = 'relu', name = 'fc1' }(y)
  y = nn.Dropout { rate = 0.3, seed = seed, name = 'dropout' }(y)
  y = nn.Dense { units = 10, name = 'logits' }(y)
  return nn.Model(x, y, { name = 'fashion_cnn' })
end

-- images (N, 28, 28, 1) float32 in [0, 1] and labels (N) int64 in 1..10
function recipe.load(dir, part, limit)
  local prefix = part == 'train' and 'train' or 't10k'
  local x = data.idx(files.join(dir, prefix .. '-images-idx3-ubyte.gz'))
  local y = data.idx(files.join(dir, prefix .. '-labels-idx1-ubyte.gz'))
  if x:size(1) ~= y:size(1) then
    error(string.format('fashion_mnist: %s has %d images but %d labels', dir, x:size(1), y:size(1)), 0)
  end
  if limit and limit < x:size(1) then x, y = x:narrow(1, 1, limit), y:narrow(1, 1, limit) end
  return x:float():div(255):view(-1, 28, 28, 1), y:long():add(1)
end

function recipe.run(o)
  if o.threads > 0 then flower.setnumthreads(o.threads) end
  local X, Y = recipe.load(o.data, 'train', o.tiny and 2500 or nil)
  local XT, YT = recipe.load(o.data, 'test', o.tiny and 500 or nil)
  local nval = o.tiny and 500 or 10000
  local ntrain = X:size(1) - nval
  local test = data.FeatureLoader { x = XT, y = YT, batch_size = 500 }
  local out = o.out ~= '' and o.out or files.join('runs', 'fashion_mnist-' .. os.date('%Y%m%d-%H%M%S'))
  files.mkdir(out)
  local model = recipe.build(o.seed)
  local callbacks = {}
  if o.tensorboard ~= '' then callbacks[1] = flower.tensorboard.callback { log_dir = o.tensorboard } end
  local hist = train.fit(model, {
    x = X:narrow(1, 1, ntrain), y = Y:narrow(1, 1, ntrain), batch_size = o.batch_size, shuffle = true, seed = o.seed,
    validation_data = { X:narrow(1, ntrain + 1, nval), Y:narrow(1, ntrain + 1, nval) },
    optimizer = optim.Adam { lr = o.lr }, epochs = o.tiny and 1 or o.epochs, metrics = { 'top2' },
    callbacks = callbacks, checkpoint_dir = files.join(out, 'ckpt'), resume = true,
    history_csv = files.join(out, 'history.csv'),
  })
  local test = train.evaluate(model, test, { progress = false, topk = { 2 } })
  local secs = 0
  for _, r in ipairs(hist.rows) do secs = secs + r.seconds end
  local result = { test_acc = test.acc, test_loss = test.loss, test_top2 = test.top[2], epochs = #hist.rows,
                   seconds_per_epoch = #hist.rows > 0 and secs / #hist.rows or 0, train_images = ntrain }
  files.json_write(files.join(out, 'results.json'), result)
  print(string.format('fashion_mnist: test accuracy %.4f (top-2 %.4f), %.1f s per epoch, run %s',
    test.acc, test.top[2], result.seconds_per_epoch, out))
  return result
end

-- run when executed, a module when loaded with dofile/require (tests and the benchmark)
if arg and arg[0] and arg[0]:match('fashion_mnist%.lua$') and not FASHION_MNIST_NO_MAIN then
  recipe.run(cli.main(spec, arg))
end
return recipe
