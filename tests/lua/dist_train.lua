-- Data-parallel training under `mpirun -np 2` (tests/sh/test_dist_train.sh runs it); also runs as a
-- single process for the cross-rank-count resumes. Prints `ok - [rank r] name` lines.
-- usage: dist_train.lua MODE DIR
--   equal        2 ranks at batch B = one process at 2B (weights within rounding), identical weights
--                on both ranks, global loss and metrics, validation split across ranks
--   syncbn       synchronised BatchNorm: 2 ranks at B = one process at 2B (statistics and weights)
--   bn           BatchNorm per rank: after one step each rank's moving statistics = one process
--                trained on that rank's half of the global batch
--   ckpt N E     train to epoch E (resuming from DIR/ckpt) with global batch 2B, whatever the ranks;
--                prints the weights' checksum
--   slow         many slow epochs with checkpoints (the kill -9 test); writes DIR/pid.<rank>
--   evaluate     train.evaluate{collect = true} over 2 ranks = over 1 (rows, order, numbers)
--   export       export.features over 2 ranks (rank 0 writes DIR/two.h5) = over 1 (DIR/one.h5)
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local data = require 'flower.data'
local train = require 'flower.train'
local files = require 'flower.files'
local T = require 'flower.test'
local dist = flower.dist

local mode, dir = arg[1], arg[2]
local r, size = dist.rank(), dist.size()
local function test(name, fn) T.test(string.format('[rank %d] %s', r, name), fn) end

flower.manual_seed(0)
local W = flower.randn({ 10, 4 })
local X = flower.randn({ 96, 10 })
local Y = X:matmul(W):argmax(2):view(-1)
local B = 8

local function loader(bs) return data.FeatureLoader { x = X, y = Y, batch_size = bs, shuffle = true, seed = 3 } end

local function make_model(bn, seed)
  nn.reset_names()
  flower.manual_seed(seed or 1 + r)   -- by default different on each rank: fit must broadcast rank 0's weights
  local inp = nn.Input { 10 }
  local h = nn.Dense { units = 16, name = 'fc1' }(inp)
  if bn then h = nn.BatchNormalization { name = 'bn' }(h) end
  h = nn.Activation('relu')(h)
  return nn.Model(inp, nn.Dense { units = 4, name = 'out' }(h))
end

local function copy_weights(from, to)
  local tw = to:weights()
  for i, w in ipairs(from:weights()) do tw[i].tensor:copy(w.tensor) end
end

local function maxdiff(a, b)
  local d = 0
  local bw = b:weights()
  for i, w in ipairs(a:weights()) do d = math.max(d, (w.tensor - bw[i].tensor):abs():max():item()) end
  return d
end

-- every trainable weight, flattened into one vector (the "hash" compared across ranks, exactly)
local function flat(model, trainable_only)
  local parts = {}
  for _, w in ipairs(model:weights()) do
    if w.trainable or not trainable_only then parts[#parts + 1] = w.tensor:contiguous():view(-1) end
  end
  return flower.cat(parts, 1)
end

local quiet = function() end

-- The BatchNorm modes: m2 (this job's ranks), m1 (one process, from rank 0's initial weights, ref)
-- and the loader of the first 2B samples in batches of B (rank r trains on batch r + 1).
local function bn_models()
  local m2 = make_model(true)
  local m1 = make_model(true)
  local ref = make_model(true, 1)
  copy_weights(ref, m1)
  return m2, m1, ref, data.FeatureLoader { x = X:narrow(1, 1, 2 * B), y = Y:narrow(1, 1, 2 * B), batch_size = B }
end

-- one epoch of SGD (lr 0.1), quietly; extra options from opts
local function fit_epoch(m, loader, opts)
  local o = { train = loader, optimizer = optim.SGD { lr = 0.1 }, epochs = 1, progress = false, log = quiet }
  for k, v in pairs(opts or {}) do o[k] = v end
  return train.fit(m, o)
end

if mode == 'equal' then
  local m2 = make_model(false)
  local m1 = make_model(false)
  local ref = make_model(false, 1)         -- rank 0's initial weights, for the single-process run
  local h = train.fit(m2, { train = loader(B), valid = loader(16), optimizer = optim.SGD { lr = 0.1, momentum = 0.9 },
    epochs = 3, progress = false, log = quiet })
  copy_weights(ref, m1)
  local h1 = train.fit(m1, { train = loader(2 * B), valid = loader(16), optimizer = optim.SGD { lr = 0.1, momentum = 0.9 },
    epochs = 3, progress = false, log = quiet, distributed = false })
  test('2 ranks at batch 8 = 1 process at batch 16 (18 steps, SGD with momentum)', function()
    local d = maxdiff(m2, m1)
    T.check(d < 1e-5, 'max |w2 - w1| = ' .. d)
  end)
  test('the weights are identical on both ranks (bit for bit)', function()
    local v = flat(m2, true)
    local g = dist.all_gather(v:view(1, -1))
    T.eq((g[1] - g[2]):abs():max():item(), 0)
  end)
  test('loss, accuracy and validation are global (= the single process)', function()
    for e = 1, 3 do
      T.near(h.rows[e].loss, h1.rows[e].loss, 1e-5)
      T.near(h.rows[e].acc, h1.rows[e].acc, 1e-9)
      T.near(h.rows[e].val_loss, h1.rows[e].val_loss, 1e-5)
      T.near(h.rows[e].val_acc, h1.rows[e].val_acc, 1e-9)
    end
  end)
  test('an odd number of batches: the last step leaves rank 1 without one, still equal', function()
    local xs = X:narrow(1, 1, 40)           -- 5 batches of 8 over 2 ranks; 3 batches of 16 (8 in the last)
    local ys = Y:narrow(1, 1, 40)
    local a, b = make_model(false), make_model(false)
    copy_weights(ref, b)
    train.fit(a, { train = data.FeatureLoader { x = xs, y = ys, batch_size = 8 }, optimizer = optim.SGD { lr = 0.1 },
      epochs = 2, progress = false, log = quiet })
    train.fit(b, { train = data.FeatureLoader { x = xs, y = ys, batch_size = 16 }, optimizer = optim.SGD { lr = 0.1 },
      epochs = 2, progress = false, log = quiet, distributed = false })
    T.check(maxdiff(a, b) < 1e-5, 'max diff ' .. maxdiff(a, b))
  end)
elseif mode == 'bn' then
  local m2, m1, _, two = bn_models()
  fit_epoch(m2, two)
  -- one process on this rank's half only: batch r + 1 of `two`
  local half = data.FeatureLoader { x = X:narrow(1, r * B + 1, B), y = Y:narrow(1, r * B + 1, B), batch_size = B }
  fit_epoch(m1, half, { distributed = false })
  test('BatchNorm per rank: moving statistics = one process on the rank\'s half-batch', function()
    local a, b = m2:layer('bn'), m1:layer('bn')
    T.check((a.moving_mean - b.moving_mean):abs():max():item() < 1e-6, 'moving_mean')
    T.check((a.moving_variance - b.moving_variance):abs():max():item() < 1e-6, 'moving_variance')
  end)
  test('BatchNorm per rank: the ranks\' statistics differ, their trainable weights do not', function()
    local g = dist.all_gather(m2:layer('bn').moving_mean:view(1, -1))
    T.check((g[1] - g[2]):abs():max():item() > 1e-4, 'the two halves gave the same statistics')
    local v = dist.all_gather(flat(m2, true):view(1, -1))
    T.eq((v[1] - v[2]):abs():max():item(), 0)
  end)
elseif mode == 'syncbn' then
  -- synchronised BatchNorm over 2 ranks at batch 8 = plain BatchNorm in one process at 16
  local m2, m1, ref, two = bn_models()
  local one = data.FeatureLoader { x = X:narrow(1, 1, 2 * B), y = Y:narrow(1, 1, 2 * B), batch_size = 2 * B }
  fit_epoch(m2, two, { sync_batchnorm = true })
  fit_epoch(m1, one, { distributed = false })
  test('synchronised BatchNorm: statistics and weights = one process on the full batch', function()
    local a, b = m2:layer('bn'), m1:layer('bn')
    T.check((a.moving_mean - b.moving_mean):abs():max():item() < 1e-6, 'moving_mean')
    T.check((a.moving_variance - b.moving_variance):abs():max():item() < 1e-5, 'moving_variance')
    T.check(maxdiff(m2, m1) < 1e-5, 'weights differ by ' .. maxdiff(m2, m1))
  end)
  test('synchronised BatchNorm over 3 epochs of shuffled batches, SGD with momentum', function()
    local a, b = make_model(true), make_model(true)
    copy_weights(ref, b)
    train.fit(a, { train = loader(B), optimizer = optim.SGD { lr = 0.05, momentum = 0.9 }, epochs = 3, progress = false,
      log = quiet, sync_batchnorm = true })
    train.fit(b, { train = loader(2 * B), optimizer = optim.SGD { lr = 0.05, momentum = 0.9 }, epochs = 3,
      progress = false, log = quiet, distributed = false })
    T.check(maxdiff(a, b) < 1e-4, 'weights and statistics differ by ' .. maxdiff(a, b))
  end)
elseif mode == 'ckpt' then
  local epochs = tonumber(arg[3])
  local m = make_model(false)
  -- global batch 16: one rank takes 16, two ranks 8 each
  local h = train.fit(m, { train = loader(16 // size), optimizer = optim.Adam { lr = 0.01 }, epochs = epochs,
    progress = false, log = quiet, checkpoint_dir = dir .. '/ckpt', resume = true,
    history_csv = dir .. '/history.csv' })
  if r == 0 then
    for _, w in ipairs(m:weights()) do io.write(string.format('W %s %.9g\n', w.path, w.tensor:sum():item())) end
    io.write(string.format('ROWS %d\n', #h.rows))
  end
elseif mode == 'slow' then
  local f = assert(io.open('/proc/self/stat'))          -- its first field is our pid
  files.write_atomic(string.format('%s/pid.%d', dir, r), tostring(f:read('n')))
  f:close()
  local m = make_model(false)
  local l = loader(B)
  local slow = setmetatable({}, { __len = function() return #l end, __index = { epoch = function(_, e)
    local it = l:epoch(e)
    return function()
      local t = files.now() + 0.05
      while files.now() < t do end
      return it()
    end
  end } })
  train.fit(m, { train = slow, optimizer = optim.Adam { lr = 0.01 }, epochs = 1000, progress = false, log = quiet,
    checkpoint_dir = dir .. '/ckpt' })
elseif mode == 'evaluate' then
  local m = make_model(true)
  copy_weights(make_model(true, 1), m)
  local ev = loader(B)
  ev.shuffle = false
  local a = train.evaluate(m, ev, { collect = true, softmax = true, progress = false, topk = { 2 } })
  local b = train.evaluate(m, ev, { collect = true, softmax = true, progress = false, topk = { 2 }, dist = false })
  test('evaluate over 2 ranks = over 1: rows, order, numbers', function()
    T.eq(a.n, b.n)
    T.near(a.loss, b.loss, 1e-6)
    T.near(a.acc, b.acc, 1e-12)
    T.near(a.top[2], b.top[2], 1e-12)
    T.eq(table.concat(a.index, ','), table.concat(b.index, ','))
    T.eq(table.concat(a.pred, ','), table.concat(b.pred, ','))
    T.eq(table.concat(a.labels, ','), table.concat(b.labels, ','))
    T.check((a.probs - b.probs):abs():max():item() < 1e-6)
  end)
elseif mode == 'export' then
  local F = dofile('tests/lua/exp_fixture.lua')
  local export = require 'flower.export'
  local nets = require 'flower.smallnets'
  local h5 = require 'flower.h5'
  if r == 0 then F.flowers('export-dist', 3, 7, 5) end       -- rank 0 makes the images, then the others look
  dist.barrier()
  local root = F.flowers('export-dist', 3, 7, 5)
  local all = data.kaggle(root)
  local tr, va = all:split { test_size = 0.25, seed = 42, stratify = true }
  local te = data.kaggle_test(root)
  local model = nets.build('vgg_tiny', { classes = all.num_classes, input_size = 32, width = 4, seed = 1 })
  local function ld(ds) return data.Loader { ds, batch_size = 4, transform = 'eval', size = 32, workers = 1, warn = false } end
  local splits = { { 'train', tr }, { 'valid', va }, { 'test', te } }
  local attrs = { model = 'vgg_tiny', image_size = 32, preprocessing = 'tf' }
  local a = export.features(model, { path = dir .. '/two.h5', splits = splits, loader = ld, attrs = attrs, progress = false })
  if r == 0 then
    export.features(model, { path = dir .. '/one.h5', splits = splits, loader = ld, attrs = attrs, progress = false,
      distributed = false })
  end
  dist.barrier()
  test('export over 2 ranks: the file of one process (rows, order, numbers), written by rank 0 only', function()
    T.eq(a.rows.train, #tr); T.eq(a.rows.test, #te)
    if r ~= 0 then return end
    local f1 <close> = h5.open(dir .. '/one.h5', 'r')
    local f2 <close> = h5.open(dir .. '/two.h5', 'r')
    for _, name in ipairs({ 'train_x', 'valid_x', 'test', 'valid_probs', 'test_probs' }) do
      local x, y = f1:read('/' .. name), f2:read('/' .. name)
      T.eq(table.concat(x:size(), 'x'), table.concat(y:size(), 'x'), name)
      T.check((x - y):abs():max():item() < 1e-6, name)
    end
    for _, name in ipairs({ 'train_label', 'valid_label' }) do
      T.eq(table.concat(f1:read('/' .. name):totable(), ','), table.concat(f2:read('/' .. name):totable(), ','), name)
    end
    for _, name in ipairs({ 'train_images', 'test_ids' }) do
      T.eq(table.concat(f1:read('/' .. name), ','), table.concat(f2:read('/' .. name), ','), name)
    end
    for _, at in ipairs({ 'train_complete', 'test_complete', 'feature_dim', 'model' }) do
      T.eq(f1:attr('/', at), f2:attr('/', at), at)
    end
  end)
end
T.done()
