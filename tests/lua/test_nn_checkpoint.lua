-- Checkpoints: weights + optimizer state round trips, resumed training equals uninterrupted
-- training, atomic writes, and clear errors (model untouched) for files that do not fit.
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local T = require 'flower.test'

local dir = os.getenv('TMPDIR') or '/tmp'
local base = string.format('%s/flowerlua_ckpt_%d', dir, math.random(1, 1e9))
local function tmp(name) return base .. '_' .. name .. '.h5' end

local function make(width)
  nn.reset_names()
  local x = nn.Input{6, 6, 2}
  local y = nn.Conv2D{filters = width or 4, kernel_size = 3, padding = 'same', use_bias = false, name = 'conv'}(x)
  y = nn.BatchNormalization{name = 'bn'}(y)
  y = nn.ReLU{}(y)
  y = nn.GlobalAveragePooling2D{}(y)
  y = nn.Dense{units = 3, name = 'fc'}(y)
  return nn.Model(x, y, {name = 'net'})
end

local function train(m, opt, steps, seed)
  local loss = nn.CategoricalCrossentropy{from_logits = true}
  m:training()
  for s = 1, steps do
    flower.manual_seed(seed + s)
    local x = flower.randn(4, 6, 6, 2)
    local lab = flower.tensor({1, 2, 3, 1}, 'int64')
    m:zero_grad()
    local out = m:forward(x)
    loss:forward(out, lab)
    m:backward(x, loss:backward(out, lab))
    opt:step(m)
  end
end

local same_weights = T.same_weights

T.test('save and load: weights, BN statistics, optimizer state and extras round-trip', function()
  flower.manual_seed(1)
  local a = make()
  local opt = optim.Adam{lr = 0.01}
  train(a, opt, 2, 100)
  local p = tmp('roundtrip')
  nn.save_checkpoint(p, a, {optimizer = opt, extra = {epoch = 2, note = 'x', hist = {0.5, 0.25}}})
  flower.manual_seed(2)
  local b = make()
  local opt2 = optim.Adam{lr = 0.01}
  local extra = nn.load_checkpoint(p, b, {optimizer = opt2})
  same_weights(a, b)
  T.eq(extra.epoch, 2); T.eq(extra.note, 'x'); T.eq(extra.hist[2], 0.25)
  T.eq(opt2.iterations, 2)
  -- resumed training equals uninterrupted training, bit for bit
  train(a, opt, 3, 200)
  train(b, opt2, 3, 200)
  same_weights(a, b)
  os.remove(p)
end)

T.test('loading refuses a file whose layers or shapes differ, leaving the model untouched', function()
  local a = make(4)
  local p = tmp('mismatch')
  nn.save_checkpoint(p, a)
  local b = make(5)
  local k0 = b:layer('conv').kernel:clone()
  T.raises(function() nn.load_checkpoint(p, b) end,
    "layer 'conv' weight 'kernel' has shape 3x3x2x5 in the model, 3x3x2x4 in the file")
  T.check(b:layer('conv').kernel:equal(k0), 'model changed by a failed load')
  nn.reset_names()
  local x = nn.Input{6, 6, 2}
  local other = nn.Model(x, nn.Dense{units = 3, name = 'fc'}(nn.GlobalAveragePooling2D{}(x)))
  T.raises(function() nn.load_checkpoint(p, other) end, "the file's layer 'conv' is not in the model")
  T.raises(function() nn.load_checkpoint(p, make(4), {optimizer = optim.SGD{}}) end, 'no optimizer state')
  os.remove(p)
  local q = tmp('notckpt')
  local h5 = require 'flower.h5'
  h5.write_atomic(q, function(f) f:write('/x', flower.zeros(2)) end)
  T.raises(function() nn.load_checkpoint(q, make(4)) end, 'not a flowerlua checkpoint')
  os.remove(q)
end)

T.test('saving is atomic: a failed save leaves the previous file intact and no temporary', function()
  local a = make()
  local p = tmp('atomic')
  nn.save_checkpoint(p, a, {extra = {epoch = 1}})
  T.raises(function() nn.save_checkpoint(p, a, {extra = {bad = {1, 'mixed'}}}) end, 'set_attr')
  local extra = nn.load_checkpoint(p, make())
  T.eq(extra.epoch, 1)
  local ls = io.popen('ls ' .. base .. '_atomic.h5.tmp* 2>/dev/null'):read('a')
  T.eq(ls, '', 'temporary file left behind')
  os.remove(p)
end)

T.done()
