-- flower.help / the REPL's help(x): documentation from the sources' own comments.
local T = require 'flower.test'
local flower = require 'flower'

local function doc(x) return flower.help(x, { print = false }) end
local function has(s, want) T.check(s:find(want, 1, true), 'missing ' .. want .. ' in:\n' .. s) end

T.test('a module: the comment block its file opens with', function()
  local s = doc(flower.train)
  has(s, '-- flower.train: the training loop')
  T.check(not s:find('local flower = require', 1, true), 'code after the header')
end)

T.test('a Lua function: the comments above it and its definition line', function()
  local s = doc(flower.load_npy)
  has(s, '-- Reads a .npy file into a tensor'); has(s, 'function npy.load_npy(path)'); has(s, 'npy.lua:')
end)

T.test('a Lua function documented in its module header: those lines', function()
  local s = doc(flower.train.fit)
  has(s, 'train.fit(model, {'); has(s, 'function train.fit(model, o)')
end)

T.test('a C function: the comment above it in bindings/', function()
  has(doc(flower.zeros), 'zeros/ones/empty(size... [, dtype])')
  has(doc(flower.randn(2).narrow), 'narrow(dim, start, len)')
end)

T.test('a layer class and a layer instance: nn.lua lines about it', function()
  has(doc(flower.nn.Conv2D), 'Conv2D{filters, kernel_size, strides')
  has(doc(flower.nn.Dense { units = 3 }), 'Dense{units, activation, use_bias}')
end)

T.test('a tensor: its dtype, size and methods; by name; unknown names', function()
  local s = doc(flower.zeros(2, 3))
  has(s, 'a float32 tensor of size 2x3'); has(s, 'matmul')
  has(doc('flower.data.idx'), 'function data.idx(path)')
  T.eq(doc('flower.nope'), 'help: nothing is called flower.nope')
end)

T.test('the REPL has help as a global', function()
  local p = io.popen("printf 'help(flower.optim)\\n' | " .. (os.getenv('FLOWERLUA') or './flowerlua') .. ' -i 2>&1')
  local out = p:read('a'); p:close()
  has(out, '-- flower.optim')
  T.check(not out:find('\nnil\n', 1, true), 'help(x) shows a nil after its text:\n' .. out)
end)

T.done()
