-- experiments/fashion_mnist.lua on the real Fashion-MNIST files (Debian dataset-fashion-mnist):
-- the idx files read to the documented sizes and ranges, and the --tiny recipe learns.
local T = require 'flower.test'
local files = require 'flower.files'

local DATA = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_NO_MAIN = true
local recipe = dofile('experiments/fashion_mnist.lua')

T.test('the Debian files: 60,000 + 10,000 images of 28x28, labels 1..10, 6,000 of each in train', function()
  local X, Y = recipe.load(DATA, 'train')
  T.eq(table.concat(X:size(), 'x'), '60000x28x28x1')
  T.eq(Y:min():item(), 1); T.eq(Y:max():item(), 10)
  T.eq(X:min():item(), 0); T.eq(X:max():item(), 1)
  local counts = {}
  for _, v in ipairs(Y:totable()) do counts[v] = (counts[v] or 0) + 1 end
  for c = 1, 10 do T.eq(counts[c], 6000, 'class ' .. c) end
  local XT = recipe.load(DATA, 'test')
  T.eq(XT:size(1), 10000)
end)

T.test('--tiny trains, writes results.json and a TensorBoard run, and beats chance by far', function()
  local out = T.tmpdir()
  local r = recipe.run { data = DATA, epochs = 1, batch_size = 64, lr = 1e-3, seed = 1, threads = 0,
                         out = out, tensorboard = files.join(out, 'tb'), tiny = true }
  T.check(r.test_acc > 0.5, 'test accuracy ' .. r.test_acc)
  T.eq(files.json_read(files.join(out, 'results.json')).test_acc, r.test_acc)
  local ok = false
  for _ in io.popen('ls ' .. files.join(out, 'tb', 'train')):lines() do ok = true end
  T.check(ok, 'no event file')
end)

T.done()
