-- Fashion-MNIST beside PyTorch in the same run: experiments/fashion_mnist.lua's CNN and the same
-- network in PyTorch (tests/bench/fashion_mnist_torch.py), same data, split, batch, optimizer and
-- epochs, same thread count; prints test accuracy and seconds per training epoch, and the ratio.
--   ./flowerlua tests/bench/fashion_mnist.lua [epochs=3] [threads=2]
local flower = require 'flower'
local files = require 'flower.files'
local T = require 'flower.test'

local epochs = math.tointeger(tonumber(arg[1] or '3'))
local threads = math.tointeger(tonumber(arg[2] or '2'))
if not epochs or not threads then
  io.stderr:write('usage: ./flowerlua tests/bench/fashion_mnist.lua [epochs] [threads]\n')
  os.exit(2)
end
local DATA = '/usr/share/datasets/fashion-mnist'

FASHION_MNIST_NO_MAIN = true
local recipe = dofile('experiments/fashion_mnist.lua')
local out = T.tmpdir()
local ours = recipe.run { data = DATA, epochs = epochs, batch_size = 64, lr = 1e-3, seed = 1, threads = threads,
                          out = out, tensorboard = '', tiny = false }

local json = files.join(out, 'torch.json')
assert(T.sh(string.format('%s tests/bench/fashion_mnist_torch.py %s %d %d > %s', T.python, DATA, epochs, threads, json)),
  'the PyTorch peer failed')
local peer = files.json_read(json)

print(string.format('\n%-12s %10s %14s', 'framework', 'test acc', 's per epoch'))
print(string.format('%-12s %10.4f %14.1f', 'flowerlua', ours.test_acc, ours.seconds_per_epoch))
print(string.format('%-12s %10.4f %14.1f', 'pytorch', peer.test_acc, peer.seconds_per_epoch))
print(string.format('speed ratio (PyTorch time / ours): %.2fx', peer.seconds_per_epoch / ours.seconds_per_epoch))
