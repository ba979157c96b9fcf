-- flower.train: fit, history, checkpoints, resume equal to an uninterrupted run, interrupts,
-- NaN stops, callbacks and freeze/unfreeze stages. Small in-memory data (feature loaders), seconds.
local T = require 'flower.test'
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local data = require 'flower.data'
local train = require 'flower.train'
local files = require 'flower.files'

local TMP = T.tmpdir()
local function tmp(...) return files.join(TMP, ...) end

local XT, YT, XV, YV = T.leaning_classes(256, 96)

local function loaders(bs) return T.leaning_loaders(XT, YT, XV, YV, bs) end

-- Dense -> BatchNorm -> ReLU -> Dropout (seeded and unseeded) -> Dense(logits)
local function make_model()
  nn.reset_names()
  flower.manual_seed(123)
  local x = nn.Input { 10 }
  local h = nn.Dense { units = 16, name = 'fc1' }(x)
  h = nn.BatchNormalization { name = 'bn1' }(h)
  h = nn.Activation { activation = 'relu', name = 'relu1' }(h)
  h = nn.Dropout { rate = 0.3, seed = 5, name = 'drop_seeded' }(h)
  h = nn.Dense { units = 16, activation = 'relu', name = 'fc2' }(h)
  h = nn.Dropout { rate = 0.2, name = 'drop_global' }(h)
  local y = nn.Dense { units = 4, name = 'head' }(h)
  return nn.Model(x, y, { name = 'mlp' })
end

local function weights_equal(a, b)
  local wa, wb = a:weights(), b:weights()
  T.eq(#wa, #wb)
  for i = 1, #wa do
    T.eq(wa[i].path, wb[i].path)
    local d = (wa[i].tensor:double() - wb[i].tensor:double()):abs():max():item()
    T.eq(d, 0, 'weight ' .. wa[i].path .. ' differs by ' .. d)
  end
end

local quiet = function() end

T.test('fit learns, keeps a history and writes history.csv', function()
  local tl, vl = loaders()
  local m = make_model()
  local hist = train.fit(m, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 8,
    progress = false, log = quiet, history_csv = tmp('h1', 'history.csv'), stage = 1 })
  T.eq(#hist.rows, 8)
  local first, last = hist.rows[1], hist.rows[8]
  T.check(last.loss < first.loss, 'training loss falls')
  T.check(last.val_acc > 0.8, 'validation accuracy ' .. last.val_acc)
  T.eq(last.epoch, 8); T.eq(last.stage, 1); T.near(last.lr, 0.01)
  local csv = files.csv_read(tmp('h1', 'history.csv'))
  T.eq(#csv, 9)
  T.eq(table.concat(csv[1], ','), 'stage,epoch,loss,acc,val_loss,val_acc,lr,seconds,images_per_s')
  T.near(tonumber(csv[9][6]), last.val_acc, 1e-6)
  -- evaluate agrees with the history's last validation numbers
  local ev = train.evaluate(m, vl, { progress = false, collect = true })
  T.near(ev.acc, last.val_acc, 1e-9); T.near(ev.loss, last.val_loss, 1e-5)
  T.eq(#ev.pred, 96); T.eq(#ev.labels, 96); T.eq(ev.probs:size(1), 96)
end)

T.test('resume from a checkpoint equals an uninterrupted run (bit for bit)', function()
  local tl, vl = loaders()
  -- uninterrupted: 4 epochs
  local a = make_model()
  flower.manual_seed(99)
  local ha = train.fit(a, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 4,
    progress = false, log = quiet, checkpoint_dir = tmp('ra'), callbacks = { train.ReduceLROnPlateau { patience = 1 } } })
  -- interrupted after epoch 2, step 3, then resumed in a fresh model and optimizer
  local b = make_model()
  flower.manual_seed(99)
  local steps = 0
  local stopper = { on_epoch_begin = function(_, _, e) if e == 2 then steps = 0 end end }
  local tl2 = setmetatable({}, { __len = function() return #tl end, __index = {
    epoch = function(_, e)
      local it = tl:epoch(e)
      return function()
        local bt = it()
        steps = steps + 1
        if e == 2 and steps == 3 then train.request_interrupt('test') end
        return bt
      end
    end } })
  local hb = train.fit(b, { train = tl2, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 4,
    progress = false, log = quiet, checkpoint_dir = tmp('rb'), callbacks = { stopper, train.ReduceLROnPlateau { patience = 1 } } })
  T.eq(hb.stopped, 'interrupted'); T.eq(hb.interrupted, 'test'); T.eq(#hb.rows, 1)
  flower.manual_seed(12345) -- the global generator is restored from the checkpoint, whatever it is now
  local c = make_model()
  local hc = train.fit(c, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 4,
    progress = false, log = quiet, checkpoint_dir = tmp('rb'), resume = true,
    callbacks = { {}, train.ReduceLROnPlateau { patience = 1 } } })
  T.eq(hc.stopped, nil)
  T.eq(#hc.rows, 4)
  weights_equal(a, c)
  for e = 1, 4 do
    T.eq(hc.rows[e].loss, ha.rows[e].loss, 'loss of epoch ' .. e)
    T.eq(hc.rows[e].val_acc, ha.rows[e].val_acc, 'val_acc of epoch ' .. e)
    T.eq(hc.rows[e].lr, ha.rows[e].lr, 'lr of epoch ' .. e)
  end
end)

T.test('resume after a finished epoch, and a finished run resumes to nothing', function()
  local tl, vl = loaders()
  local a = make_model()
  local ha = train.fit(a, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 3,
    progress = false, log = quiet, checkpoint_dir = tmp('rc') })
  local b = make_model()
  train.fit(b, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 2,
    progress = false, log = quiet, checkpoint_dir = tmp('rd') })
  local c = make_model()
  local hc = train.fit(c, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 3,
    progress = false, log = quiet, checkpoint_dir = tmp('rd'), resume = true })
  weights_equal(a, c)
  T.eq(hc.rows[3].val_loss, ha.rows[3].val_loss)
  local d = make_model()
  local hd = train.fit(d, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 3,
    progress = false, log = quiet, checkpoint_dir = tmp('rd'), resume = true })
  T.eq(#hd.rows, 3)
  weights_equal(a, d)
end)

T.test('best-only checkpoint keeps the best epoch', function()
  local tl, vl = loaders()
  local m = make_model()
  local h = train.fit(m, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 4,
    progress = false, log = quiet, checkpoint_dir = tmp('best'), save_best = 'val_acc' })
  local besti = 1
  for i, r in ipairs(h.rows) do if r.val_acc > h.rows[besti].val_acc then besti = i end end
  T.eq(h.best.epoch, besti)
  local m2 = make_model()
  local meta = nn.load_checkpoint(tmp('best', 'best.h5'), m2)
  T.eq(meta.epoch, besti)
  local ev = train.evaluate(m2, vl, { progress = false })
  T.near(ev.acc, h.rows[besti].val_acc, 1e-9)
end)

T.test('a checkpoint of another model is refused and leaves the model untouched', function()
  local tl = loaders()
  local m = make_model()
  train.fit(m, { train = tl, optimizer = optim.Adam {}, epochs = 1, progress = false, log = quiet, checkpoint_dir = tmp('cm') })
  nn.reset_names()
  local x = nn.Input { 10 }
  local other = nn.Model(x, nn.Dense { units = 3, name = 'fc1' }(x))
  local before = other:weights()[1].tensor:clone()
  T.raises(function() nn.load_checkpoint(tmp('cm', 'last.h5'), other) end, "the file's layer 'bn1' is not in the model")
  local x2 = nn.Input { 10 }
  local h2 = nn.Dense { units = 3, name = 'fc1' }(x2)
  h2 = nn.BatchNormalization { name = 'bn1' }(h2)
  h2 = nn.Dense { units = 16, activation = 'relu', name = 'fc2' }(h2)
  local narrow = nn.Model(x2, nn.Dense { units = 4, name = 'head' }(h2))
  T.raises(function() nn.load_checkpoint(tmp('cm', 'last.h5'), narrow) end,
    "layer 'fc1' weight 'kernel' has shape 10x3 in the model, 10x16 in the file")
  T.eq((other:weights()[1].tensor - before):abs():max():item(), 0)
  local f = io.open(tmp('notckpt.h5'), 'w'); f:write('junk'); f:close()
  T.raises(function() nn.load_checkpoint(tmp('notckpt.h5'), other) end, 'notckpt.h5')
  -- resuming into another model names the file and changes nothing
  T.raises(function() train.fit(other, { train = tl, optimizer = optim.Adam {}, epochs = 2, progress = false, log = quiet,
    checkpoint_dir = tmp('cm'), resume = true }) end, 'last.h5')
  T.eq((other:weights()[1].tensor - before):abs():max():item(), 0)
end)

T.test('a NaN loss stops naming the step; the last good checkpoint stays', function()
  local tl, vl = loaders()
  local m = make_model()
  train.fit(m, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 1,
    progress = false, log = quiet, checkpoint_dir = tmp('nan') })
  local good = files.read(tmp('nan', 'last.h5'))
  local calls = 0
  local badloss = function(out, y)
    calls = calls + 1
    local l, g = nn.softmax_cross_entropy(out, y)
    if calls == 5 then return 0 / 0, g end
    return l, g
  end
  local err = T.raises(function()
    train.fit(m, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 3, loss = badloss,
      progress = false, log = quiet, checkpoint_dir = tmp('nan'), resume = true })
  end, 'the loss became')
  T.check(err:find('at epoch 2, step 5 of 8', 1, true), err)
  T.eq(files.read(tmp('nan', 'last.h5')), good, 'checkpoint untouched')
end)

T.test('early stopping and learning-rate callbacks', function()
  local tl, vl = loaders()
  local m = make_model()
  local es = train.EarlyStopping { monitor = 'val_loss', patience = 1, min_delta = 10 } -- never "improves"
  local lrs = {}
  local sched = train.LearningRateScheduler(function(epoch) lrs[#lrs + 1] = 0.1 / epoch; return 0.1 / epoch end)
  local h = train.fit(m, { train = tl, valid = vl, optimizer = optim.SGD { lr = 0.1 }, epochs = 10,
    progress = false, log = quiet, callbacks = { sched, es } })
  T.eq(h.stopped, 'early_stopping'); T.eq(#h.rows, 2)
  T.near(h.rows[2].lr, 0.05)
  -- a flower.optim schedule by epoch, counted from the fit's first epoch (a stage's start)
  local opt = optim.SGD { lr = 1 }
  local cos = train.LearningRateScheduler(optim.cosine { lr = 1, decay_steps = 4 })
  local seen = {}
  local ctx = { optimizer = opt, initial_epoch = 2 }
  for e = 3, 7 do cos:on_epoch_begin(ctx, e); seen[#seen + 1] = opt.lr end
  T.eq(seen[1], 1); T.eq(seen[3], 0.5); T.eq(seen[5], 0)
  local step = train.LearningRateScheduler(optim.step_decay { lr = 1, decay_rate = 0.5, decay_steps = 2 })
  local st = {}
  ctx.initial_epoch = 0
  for e = 1, 5 do step:on_epoch_begin(ctx, e); st[#st + 1] = opt.lr end
  T.eq(table.concat(st, ','), '1.0,1.0,0.5,0.5,0.25')
  T.raises(function() train.LearningRateScheduler(0.1) end, 'expected a flower.optim schedule or a function')
  local rop = train.ReduceLROnPlateau { monitor = 'val_loss', patience = 2, factor = 0.5 }
  opt.lr = 1
  local c2 = { optimizer = opt, log = quiet }
  for _, v in ipairs({ 1.0, 0.9, 0.95, 0.96, 0.97, 0.98 }) do rop:on_epoch_end(c2, 1, { val_loss = v }) end
  T.near(opt.lr, 0.25)
  -- a schedule owns the rate: a callback setting it is an error, not a silent replacement
  local sched_opt = optim.Adam { lr = optim.cosine { lr = 1, decay_steps = 4 } }
  T.raises(function() rop:on_epoch_end({ optimizer = sched_opt, log = quiet }, 1, { val_loss = 2 }) end,
    'the optimizer\'s learning rate is a schedule')
  T.raises(function() cos:on_epoch_begin({ optimizer = sched_opt, initial_epoch = 0 }, 1) end, 'the learning rate is a schedule')
end)

T.test("callbacks take Keras's defaults, and bad options are errors naming them", function()
  local rop = train.ReduceLROnPlateau()
  T.eq(rop.monitor, 'val_loss'); T.eq(rop.factor, 0.1); T.eq(rop.patience, 10); T.eq(rop.min_delta, 1e-4)
  T.eq(rop.cooldown, 0); T.eq(rop.min_lr, 0); T.eq(rop.mode, 'min')
  T.eq(train.ReduceLROnPlateau { monitor = 'val_top5' }.mode, 'max')
  local es = train.EarlyStopping()
  T.eq(es.monitor, 'val_loss'); T.eq(es.patience, 0); T.eq(es.min_delta, 0); T.eq(es.mode, 'min')
  T.eq(train.EarlyStopping { monitor = 'val_acc' }.mode, 'max')
  T.raises(function() train.ReduceLROnPlateau { factor = 1 } end, 'train.ReduceLROnPlateau: factor must be a number >= 0 and < 1, got 1')
  T.raises(function() train.ReduceLROnPlateau { patience = 1.5 } end, 'patience must be an integer >= 0')
  T.raises(function() train.EarlyStopping { mode = 'up' } end, "mode must be 'auto', 'min' or 'max', got up")
  local cos = optim.cosine { lr = 0.1, decay_steps = 10 }
  T.eq(cos.config.alpha, nil); T.eq(cos(10), 0); T.eq(cos(20), 0)   -- alpha = 0: down to 0, as Keras
end)

T.test('stages: head only, then from a layer, then all; frozen layers untouched', function()
  local tl, vl = loaders()
  local m = make_model()
  T.eq(train.set_trainable(m, 'head'), 1)
  T.eq(m:layer('fc1').trainable, false); T.eq(m:layer('head').trainable, true)
  T.eq(train.set_trainable(m, 'from:fc2'), 2)
  T.eq(m:layer('bn1').trainable, false); T.eq(m:layer('fc2').trainable, true)
  T.eq(train.set_trainable(m, 'all'), 4)
  T.raises(function() train.set_trainable(m, 'from:nope') end, "no layer named 'nope'")
  T.raises(function() train.set_trainable(m, 'some') end, "train must be 'all', 'head', 'none' or 'from:<layer name>'")
  local fc1 = m:layer('fc1').kernel:clone()
  local fc2 = m:layer('fc2').kernel:clone()
  local lrs = {}
  local hist = train.fit_stages(m, { { epochs = 1, train = 'head', lr = 0.01 }, { epochs = 1, train = 'from:fc2', lr = 0.005 },
    { epochs = 2, train = 'all', lr = 0.001 } }, {
    train = tl, valid = vl, progress = false, log = quiet, checkpoint_dir = tmp('stages'),
    make_optimizer = function(st) lrs[#lrs + 1] = st.lr; return optim.Adam { lr = st.lr } end,
    callbacks = function(st)
      return { { on_epoch_end = function(_, ctx, e)
        if st.train == 'head' then
          T.eq((m:layer('fc1').kernel - fc1):abs():max():item(), 0, 'fc1 frozen in stage 1')
          T.eq((m:layer('fc2').kernel - fc2):abs():max():item(), 0, 'fc2 frozen in stage 1')
        elseif st.train == 'from:fc2' then
          T.eq((m:layer('fc1').kernel - fc1):abs():max():item(), 0, 'fc1 frozen in stage 2')
        end
      end } }
    end,
  })
  T.eq(#hist.rows, 4)
  T.eq(hist.rows[1].stage, 1); T.eq(hist.rows[2].stage, 2); T.eq(hist.rows[4].epoch, 4)
  T.eq(table.concat(lrs, ','), '0.01,0.005,0.001')
  T.check((m:layer('fc1').kernel - fc1):abs():max():item() > 0, 'fc1 trained in stage 3')
  T.check(files.exists(tmp('stages', 'stage3', 'last.h5')), 'per-stage checkpoints')
end)

T.test('top-k metrics in the history and history.csv', function()
  local tl, vl = loaders()
  local m = make_model()
  local h = train.fit(m, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 2, metrics = { 'acc', 'top2' },
    progress = false, log = quiet, history_csv = tmp('topk', 'history.csv') })
  local r = h.rows[2]
  T.check(r.top2 >= r.acc and r.top2 <= 1, 'train top2 >= acc')
  T.check(r.val_top2 >= r.val_acc, 'val top2 >= val acc')
  local ev = train.evaluate(m, vl, { progress = false, topk = { 2 } })
  T.near(ev.top[2], r.val_top2, 1e-12)
  T.near(ev.top[2], nn.top_k_accuracy(m:predict(XV), YV, 2), 1e-12)
  local csv = files.csv_read(tmp('topk', 'history.csv'))
  T.eq(csv[1][10], 'top2'); T.eq(csv[1][11], 'val_top2')
  T.raises(function() train.fit(m, { train = tl, optimizer = optim.Adam {}, metrics = { 'f1' } }) end, "unknown metric 'f1'")
end)

T.test('top-k in the progress line, beside loss and accuracy, and its validation twin at the end', function()
  local tl, vl = loaders()
  local m = make_model()
  local path = tmp('bar.txt')
  files.mkdir(TMP)
  local f = assert(io.open(path, 'w'))
  train.fit(m, { train = tl, valid = vl, optimizer = optim.Adam { lr = 0.01 }, epochs = 1, metrics = { 'top2' }, log = quiet,
    progress = { out = f, tty = false, interval = 0 } })
  f:close()
  local text = files.read(path)
  local last = text:match('([^\n]*)\n$')
  T.check(text:find('train epoch 1/1 +1/8 %(12%%%) .* %- loss [%d.]+ %- acc [%d.]+ %- top2 [%d.]+\n'), text)
  T.check(last:find(' %- loss [%d.]+ %- acc [%d.]+ %- top2 [%d.]+ %- val_loss [%d.]+ %- val_acc [%d.]+ %- val_top2 [%d.]+$'), last)
end)

T.test("fit(x, y) on tensors in memory, as Keras's: the same run as with the equivalent loaders", function()
  local a = make_model()
  local ha = train.fit(a, { x = XT, y = YT, batch_size = 32, seed = 7, validation_data = { XV, YV }, optimizer = optim.Adam { lr = 0.01 },
    epochs = 3, metrics = { 'top2' }, progress = false, log = quiet })
  local b = make_model()
  local hb = train.fit(b, { train = data.FeatureLoader { x = XT, y = YT, batch_size = 32, shuffle = true, seed = 7 },
    valid = data.FeatureLoader { x = XV, y = YV, batch_size = 32 }, optimizer = optim.Adam { lr = 0.01 }, epochs = 3,
    metrics = { 'top2' }, progress = false, log = quiet })
  weights_equal(a, b)
  for e = 1, 3 do
    for _, k in ipairs({ 'loss', 'acc', 'top2', 'val_loss', 'val_acc', 'val_top2' }) do T.eq(ha.rows[e][k], hb.rows[e][k], k) end
  end
  -- shuffle = false keeps the order; Keras's default batch size is 32
  local c = make_model()
  local hc = train.fit(c, { x = XT, y = YT, shuffle = false, optimizer = optim.SGD { lr = 0.01 }, epochs = 1, progress = false, log = quiet })
  local d = make_model()
  train.fit(d, { train = data.FeatureLoader { x = XT, y = YT, batch_size = 32 }, optimizer = optim.SGD { lr = 0.01 }, epochs = 1,
    progress = false, log = quiet })
  weights_equal(c, d)
  T.eq(hc.rows[1].val_loss, nil)
  local m = make_model()
  local function fit(o)
    o.optimizer, o.progress, o.log = optim.Adam {}, false, quiet
    return train.fit(m, o)
  end
  T.raises(function() fit { x = XT, y = YT, train = data.FeatureLoader { x = XT, y = YT } } end,
    'train.fit: give either train (a loader) or x and y (tensors), not both')
  T.raises(function() fit { x = XT } end, 'y must be a tensor of labels (one per sample of x), got nil')
  T.raises(function() fit { x = { 1, 2 }, y = YT } end, 'x must be a tensor of samples, got table')
  T.raises(function() fit { x = XT, y = YV } end, 'x has 256 samples, y 96 labels')
  T.raises(function() fit { x = XT, y = YT, batch_size = 0 } end, 'batch_size must be a positive integer, got 0')
  T.raises(function() fit { x = XT, y = YT, validation_data = XV } end, 'validation_data must be {x_valid, y_valid} (two tensors)')
  T.raises(function() fit { x = XT, y = YT, validation_data = { XV, YT } } end, 'validation_data has 96 samples and 256 labels')
  T.raises(function() fit { train = data.FeatureLoader { x = XT, y = YT }, validation_data = { XV, YV } } end,
    'validation_data goes with x and y')
end)

T.test('bad arguments are errors naming what is wrong', function()
  local tl = loaders()
  local m = make_model()
  T.raises(function() train.fit(m, { train = tl, epochs = 1 }) end, 'train.fit: optimizer is required')
  T.raises(function() train.fit(m, { train = {}, optimizer = optim.Adam {} }) end, 'train must be a loader')
  T.raises(function() train.fit(m, { train = tl, optimizer = optim.Adam {}, epochs = 1.5 }) end, 'epochs must be a non-negative integer')
  T.raises(function() train.fit(m, { train = tl, optimizer = optim.Adam {}, loss = 'mse' }) end, 'loss must be')
end)

os.execute('rm -rf ' .. files.shell_quote(TMP))
T.done()
