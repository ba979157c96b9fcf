-- flower.tensorboard: event files that TensorBoard's own reader (the `tensorboard` package) parses
-- back with the same values, from a writer and from train.fit's callback.
local T = require 'flower.test'
local flower = require 'flower'
local files = require 'flower.files'
local tb = require 'flower.tensorboard'
local nn, data, train, optim = flower.nn, flower.data, flower.train, flower.optim

local TMP = T.tmpdir()

-- {run = {tag = {{step, value}, ...}}} as TensorBoard reads the directory
local function tb_read(dir)
  local out = files.join(TMP, 'read.json')
  assert(T.sh(string.format('TF_CPP_MIN_LOG_LEVEL=3 %s tests/reference/tb_read.py %s > %s', T.python, files.shell_quote(dir), out)),
    'tensorboard reader failed (run make deps)')
  return files.json_read(out)
end

local function f32(x) return (string.unpack('<f', string.pack('<f', x))) end

T.test('crc32c matches the standard check value', function()
  T.eq(tb.crc32c('123456789'), 0xE3069283)
  T.eq(tb.crc32c(''), 0)
end)

T.test('writer: scalars read back by TensorBoard with their steps and float32 values', function()
  local dir = files.join(TMP, 'w')
  local w = tb.writer(files.join(dir, 'run1'))
  local want = {}
  for step = 0, 40 do
    local v = math.sin(step) * 10 ^ (step % 7 - 3)
    w:scalar('curve', v, step)
    want[#want + 1] = { step, f32(v) }
  end
  w:scalar('big_step', 1.5, 1 << 40)
  w:close()
  local got = tb_read(dir).run1
  T.eq(#got.curve, #want)
  for i, p in ipairs(want) do
    T.eq(got.curve[i][1], p[1]); T.eq(got.curve[i][2], p[2], 'curve at step ' .. p[1])
  end
  T.eq(got.big_step[1][1], 1 << 40)
end)

T.test('writer: wrong calls name what was wrong', function()
  local w = tb.writer(files.join(TMP, 'bad'))
  local ok, err = pcall(w.scalar, w, 'x', 'high', 1)
  T.check(not ok and err:find("scalar 'x' must be a number, got string", 1, true), err)
  ok, err = pcall(w.scalar, w, 'x', 1, -1)
  T.check(not ok and err:find('non-negative integer', 1, true), err)
  w:close()
  ok, err = pcall(w.scalar, w, 'x', 1, 1)
  T.check(not ok and err:find('is closed', 1, true), err)
end)

-- a small classifier trained by fit with the callback; also interrupted and resumed
local XT, YT, XV, YV = T.leaning_classes(128, 48)
local function run(dir, opts)
  nn.reset_names()
  flower.manual_seed(3)
  local x = nn.Input { 10 }
  local m = nn.Model(x, nn.Dense { units = 4 }(nn.Dense { units = 16, activation = 'relu' }(x)))
  local o = {
    train = data.FeatureLoader { x = XT, y = YT, batch_size = 32, shuffle = true, seed = 1 },
    valid = data.FeatureLoader { x = XV, y = YV, batch_size = 48 },
    optimizer = optim.Adam { lr = 1e-2 }, epochs = 3, metrics = { 'top2' }, progress = false,
    log = function() end, checkpoint_dir = files.join(dir, 'ckpt'), resume = true,
    callbacks = { tb.callback { log_dir = files.join(dir, 'tb') } },
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  return train.fit(m, o)
end

T.test('fit callback: epoch and batch scalars equal the history, train and validation runs', function()
  local dir = files.join(TMP, 'fit')
  local hist = run(dir)
  local got = tb_read(files.join(dir, 'tb'))
  local tr, va = got.train, got.validation
  T.eq(#tr.epoch_loss, 3); T.eq(#tr.batch_loss, 3 * 4)
  for e, row in ipairs(hist.rows) do
    T.eq(tr.epoch_loss[e][1], e)
    T.eq(tr.epoch_loss[e][2], f32(row.loss)); T.eq(tr.epoch_acc[e][2], f32(row.acc))
    T.eq(tr.epoch_top2[e][2], f32(row.top2)); T.eq(tr.epoch_lr[e][2], f32(row.lr))
    T.eq(va.epoch_loss[e][2], f32(row.val_loss)); T.eq(va.epoch_acc[e][2], f32(row.val_acc))
    T.eq(va.epoch_top2[e][2], f32(row.val_top2))
  end
  for i, p in ipairs(tr.batch_loss) do T.eq(p[1], i) end
end)

T.test('fit callback: a run interrupted mid-epoch and resumed writes each step once', function()
  local dir = files.join(TMP, 'resumed')
  local n = 0
  local stopper = { on_batch_end = function(_, _, epoch, step) n = n + 1; if n == 6 then train.request_interrupt('test') end end }
  local h1 = run(dir, { callbacks = { tb.callback { log_dir = files.join(dir, 'tb') }, stopper } })
  T.eq(h1.stopped, 'interrupted')
  run(dir)
  local tr = tb_read(files.join(dir, 'tb')).train
  T.eq(#tr.batch_loss, 12, 'batch steps, each once')
  for i, p in ipairs(tr.batch_loss) do T.eq(p[1], i) end
  T.eq(#tr.epoch_loss, 3)
end)

T.done()
