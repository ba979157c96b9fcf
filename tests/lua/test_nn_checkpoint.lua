-- Checkpoints (nn.save_checkpoint, the one format train.fit, the pipeline and the tests use): weights
-- + optimizer state + meta round trips, resumed training equals uninterrupted training, atomic
-- writes, clear errors (model untouched) for files that do not fit, and files of the format before
-- (tests/data/checkpoint_legacy.h5, written by train.save_checkpoint at commit c00750e) still load.
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local train = require 'flower.train'
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

local function train_steps(m, opt, steps, seed)
  local loss = train.make_loss(nn.CategoricalCrossentropy{from_logits = true})
  m:training()
  for s = 1, steps do
    flower.manual_seed(seed + s)
    train.step(m, {x = flower.randn(4, 6, 6, 2), y = flower.tensor({1, 2, 3, 1}, 'int64')}, loss, opt)
  end
end

local same_weights = T.same_weights

T.test('save and load: weights, BN statistics, optimizer state and meta round-trip', function()
  flower.manual_seed(1)
  local a = make()
  local opt = optim.Adam{lr = 0.01}
  train_steps(a, opt, 2, 100)
  local p = tmp('roundtrip')
  local third, big = 1 / 3, 2 ^ 53 + 1
  nn.save_checkpoint(p, a, {optimizer = opt, meta = {epoch = 2, note = 'x', hist = {0.5, 0.25},
    nested = {lr = 0.1 + 0.2, third = third, big = big, list = {{a = 1}, {a = 2}}}}})
  flower.manual_seed(2)
  local b = make()
  local opt2 = optim.Adam{lr = 0.01}
  local meta = nn.load_checkpoint(p, b, {optimizer = opt2})
  same_weights(a, b)
  T.eq(meta.epoch, 2); T.eq(meta.note, 'x'); T.eq(meta.hist[2], 0.25)
  -- numbers come back to the last bit (a resumed run's learning rate and running sums)
  T.eq(meta.nested.lr, 0.1 + 0.2); T.eq(meta.nested.third, third); T.eq(meta.nested.big, big)
  T.eq(math.type(meta.nested.big), 'integer'); T.eq(meta.nested.list[2].a, 2)
  T.eq(nn.load_checkpoint(p, make()).epoch, 2, 'the meta without an optimizer')
  T.eq(opt2.iterations, 2)
  -- resumed training equals uninterrupted training, bit for bit
  train_steps(a, opt, 3, 200)
  train_steps(b, opt2, 3, 200)
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
  nn.save_checkpoint(p, a, {meta = {epoch = 1}})
  -- fails half-way through the file (the optimizer's state comes after the weights)
  local broken = {state = function() error('the optimizer broke') end}
  T.raises(function() nn.save_checkpoint(p, a, {optimizer = broken, meta = {epoch = 2}}) end, 'the optimizer broke')
  -- a meta JSON cannot hold fails before anything is written
  local cyclic = {}; cyclic.self = cyclic
  T.raises(function() nn.save_checkpoint(p, a, {meta = cyclic}) end, 'cyclic')
  T.raises(function() nn.save_checkpoint(p, a, {meta = 'epoch 3'}) end, 'meta must be a table')
  local meta = nn.load_checkpoint(p, make())
  T.eq(meta.epoch, 1)
  local ls = io.popen('ls ' .. base .. '_atomic.h5.tmp* 2>/dev/null'):read('a')
  T.eq(ls, '', 'temporary file left behind')
  os.remove(p)
end)

-- the model of tests/data/checkpoint_legacy.h5 (written by train.fit with train.save_checkpoint at
-- commit c00750e: 2 epochs of Adam, EarlyStopping and ReduceLROnPlateau callbacks)
local LEGACY = 'tests/data/checkpoint_legacy.h5'
local function legacy_model()
  nn.reset_names()
  local inp = nn.Input{4}
  local h = nn.Dense{units = 3, name = 'fc1'}(inp)
  h = nn.BatchNormalization{name = 'bn'}(h)
  h = nn.Dropout{rate = 0.5, seed = 5, name = 'drop'}(h)
  return nn.Model(inp, nn.Dense{units = 2, name = 'head'}(h), {name = 'legacy'})
end

T.test('a checkpoint of the format before (train.save_checkpoint) loads: weights, optimizer, meta', function()
  local h5 = require 'flower.h5'
  local m = legacy_model()
  local opt = optim.Adam{lr = 0.5}
  local meta = nn.load_checkpoint(LEGACY, m, {optimizer = opt})
  local f <close> = h5.open(LEGACY, 'r')
  local n = 0
  for _, w in ipairs(m:weights()) do
    T.check(w.tensor:equal(f:read('/weights/' .. w.path)), 'weight ' .. w.path); n = n + 1
  end
  T.eq(n, 8, 'kernels, biases, gamma, beta and the moving statistics')
  T.eq(opt.iterations, 6); T.eq(opt.lr, 0.01)
  T.check(opt.slots['fc1/kernel'].v:equal(f:read('/optimizer/slots/fc1/kernel/v')), 'Adam v of fc1/kernel')
  T.check(opt.slots['bn/gamma'].m:equal(f:read('/optimizer/slots/bn/gamma/m')), 'Adam m of bn/gamma')
  T.eq(opt.slots['bn/moving_mean'], nil)
  T.eq(meta.epoch, 2); T.eq(meta.step, 0); T.eq(#meta.history, 2); T.eq(meta.rng.layers.drop, 144)
  T.eq(meta.callbacks[2].cool, 0); T.eq(meta.best.monitor, 'val_acc')
  -- a model it does not fit is refused before anything changes
  nn.reset_names()
  local x = nn.Input{4}
  local other = nn.Model(x, nn.Dense{units = 2, name = 'head'}(nn.Dense{units = 5, name = 'fc1'}(x)))
  local k0 = other:layer('fc1').kernel:clone()
  T.raises(function() nn.load_checkpoint(LEGACY, other) end, "layer 'fc1' weight 'kernel' has shape 4x5 in the model, 4x3 in the file")
  T.check(other:layer('fc1').kernel:equal(k0), 'model changed by a failed load')
end)

T.test('train.fit resumes from a checkpoint of the format before', function()
  local data = require 'flower.data'
  local dir = base .. '_legacy_resume'
  os.execute('mkdir -p ' .. dir .. ' && cp ' .. LEGACY .. ' ' .. dir .. '/last.h5')
  flower.manual_seed(0)
  local x = flower.randn({24, 4})
  local y = x:matmul(flower.randn({4, 2})):argmax(2):view(-1)
  local tl = data.FeatureLoader{x = x, y = y, batch_size = 8, shuffle = true, seed = 3}
  local m = legacy_model()
  local logs = {}
  local es, rop = train.EarlyStopping{patience = 5}, train.ReduceLROnPlateau{patience = 1}
  local h = train.fit(m, {train = tl, valid = tl, optimizer = optim.Adam{lr = 0.01}, epochs = 3, progress = false,
    log = function(s) logs[#logs + 1] = s end, checkpoint_dir = dir, resume = true, callbacks = {es, rop}})
  T.check(logs[1]:find('resumed from .* %(epoch 2, step 0%)'), logs[1])
  T.eq(#h.rows, 3); T.eq(h.rows[3].epoch, 3)
  T.eq(h.rows[1].val_loss, 0.62456721067428589, 'the history from the file')
  T.eq(es.best_epoch ~= nil, true)
  local back = legacy_model()
  local meta = nn.load_checkpoint(dir .. '/last.h5', back)
  same_weights(m, back)
  T.eq(meta.epoch, 3)
  os.execute('rm -rf ' .. dir)
end)

T.done()
