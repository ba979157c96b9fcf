-- Exact resume (issue 14): a train.fit run stopped anywhere and resumed equals the uninterrupted
-- run bit for bit — weights (BatchNorm statistics included), optimizer state, history (losses,
-- accuracies, top-k, learning rates), the best checkpoint and why it stopped — for every callback
-- and schedule. Stopped two ways:
--   SIGINT (the real signal, sent to this process from inside the loader) after every step of every
--     epoch: a mid-epoch checkpoint, or the epoch's own at its last step;
--   SIGKILL (FLOWER_KILLPOINT, in a child process) before and after the rename of every checkpoint
--     the run writes, and after every optimizer step (the configurations with state).
-- The resumed run uses a fresh model, optimizer and callbacks, and a scrambled global generator, as a
-- new process would. Also: a Ctrl-C in the last epoch of a stage stops fit_stages (issue 14 point 3).
local T = require 'flower.test'
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local data = require 'flower.data'
local train = require 'flower.train'
local files = require 'flower.files'

local EPOCHS = 4
local XT, YT, XV, YV = T.leaning_classes(64, 32)   -- batches of 16: 4 steps an epoch
local quiet = function() end

-- Dense -> BatchNorm -> a nested model (Dense, Dropout 'drop' seeded) -> Dropout 'drop' (seeded: the
-- same name as the nested one, so stream offsets must be told apart by path) -> Dropout (global
-- generator) -> Dense
local function make_model()
  nn.reset_names()
  flower.manual_seed(123)
  local ii = nn.Input { 12 }
  local ih = nn.Dense { units = 12, activation = 'relu', name = 'inner_fc' }(ii)
  local inner = nn.Model(ii, nn.Dropout { rate = 0.3, seed = 9, name = 'drop' }(ih), { name = 'inner' })
  local x = nn.Input { 10 }
  local h = nn.Dense { units = 12, name = 'fc1' }(x)
  h = nn.BatchNormalization { name = 'bn1' }(h)
  h = nn.Activation { activation = 'relu', name = 'relu1' }(h)
  h = inner(h)
  h = nn.Dropout { rate = 0.2, seed = 5, name = 'drop' }(h)
  h = nn.Dropout { rate = 0.2, name = 'drop_global' }(h)
  return nn.Model(x, nn.Dense { units = 4, name = 'head' }(h), { name = 'resume_net' })
end

-- Each configuration makes its optimizer and callbacks afresh (a resumed run gets new ones).
local CONFIGS = {
  { name = 'plain', make = function() return optim.Adam { lr = 0.01 }, {} end },
  { name = 'cosine_by_epoch', make = function()
      return optim.Adam { lr = 0.02 }, { train.LearningRateScheduler(optim.cosine { lr = 0.02, decay_steps = EPOCHS - 1 }) }
    end },
  { name = 'step_decay_by_epoch', make = function()
      return optim.Adam { lr = 0.02 }, { train.LearningRateScheduler(optim.step_decay { lr = 0.02, decay_steps = 2, decay_rate = 0.5 }) }
    end },
  { name = 'lr_function', make = function()   -- the rate from the rate: applied once per epoch
      return optim.SGD { lr = 0.05, momentum = 0.9 }, { train.LearningRateScheduler(function(_, lr) return lr * 0.7 end) }
    end },
  { name = 'reduce_lr_on_plateau', make = function()
      return optim.Adam { lr = 0.02 }, { train.ReduceLROnPlateau { patience = 1, factor = 0.5, min_delta = 10, cooldown = 2 } }
    end },
  { name = 'early_stopping', stops = 'early_stopping', make = function()   -- val_loss never improves by 10: stops after epoch 2
      return optim.Adam { lr = 0.01 }, { train.EarlyStopping { patience = 1, min_delta = 10 } }
    end },
  { name = 'schedule_by_step', make = function()
      return optim.Adam { lr = optim.cosine { lr = 0.02, decay_steps = 3 * EPOCHS, alpha = 0.1 } }, {}
    end },
  { name = 'all_together', stops = 'early_stopping', save_best = 'val_loss', make = function()
      return optim.SGD { lr = 0.05, momentum = 0.9, nesterov = true }, {
        train.LearningRateScheduler(function(e, lr) return e == 1 and 0.05 or lr * 0.9 end),
        train.ReduceLROnPlateau { monitor = 'val_acc', patience = 1, factor = 0.5, min_delta = 0.5 },
        train.EarlyStopping { monitor = 'val_acc', patience = 3, min_delta = 0.5 },
      }
    end },
}
local BY_NAME = {}
for _, c in ipairs(CONFIGS) do BY_NAME[c.name] = c end

-- The loader, optionally calling at_step(epoch, step) as each batch is handed out.
local function loader(at_step)
  local tl = data.FeatureLoader { x = XT, y = YT, batch_size = 16, shuffle = true, seed = 7 }
  if not at_step then return tl end
  return setmetatable({}, { __len = function() return #tl end, __index = { epoch = function(_, e)
    local it, step = tl:epoch(e), 0
    return function()
      local b = it()
      if b then step = step + 1; at_step(e, step) end
      return b
    end
  end } })
end

local function run(cfg, dir, resume, at_step)
  local model = make_model()
  -- the checkpoint restores the generator, whatever it is (without one, a new process seeds as the
  -- first did: the run starts afresh)
  if resume and files.exists(files.join(dir, 'last.h5')) then flower.manual_seed(4242) end
  local opt, cbs = cfg.make()
  local hist = train.fit(model, { train = loader(at_step), valid = data.FeatureLoader { x = XV, y = YV, batch_size = 16 },
    optimizer = opt, callbacks = cbs, epochs = EPOCHS, metrics = { 'acc', 'top2' }, save_best = cfg.save_best,
    checkpoint_dir = dir, resume = resume, progress = false, log = quiet })
  return model, opt, hist
end

-- Everything a run leaves, as text with every number in hexadecimal floating point (%a: exact).
-- (Integers print as the same floats: JSON, and so a checkpoint's meta, writes 0.0 as 0, which
-- reads back as the integer 0 — equal in value and in every computation.)
local function hex(v)
  if type(v) == 'number' then return string.format('%a', v + 0.0) end
  return tostring(v)
end
local function tensor_text(t)
  local vals = t:double():view(-1):totable()
  for i, v in ipairs(vals) do vals[i] = string.format('%a', v) end
  return table.concat(vals, ',')
end
local function weights_text(model, out)
  for _, w in ipairs(model:weights()) do out[#out + 1] = 'weight ' .. w.path .. ' ' .. tensor_text(w.tensor) end
end
local function fingerprint(model, opt, hist, dir)
  local out = {}
  weights_text(model, out)
  local st = opt:state()
  out[#out + 1] = 'optimizer iterations ' .. st.iterations .. ' lr ' .. hex(opt:get_lr())
  local paths = {}
  for p in pairs(st.slots) do paths[#paths + 1] = p end
  table.sort(paths)
  for _, p in ipairs(paths) do
    for _, k in ipairs({ 'm', 'v' }) do
      if st.slots[p][k] then out[#out + 1] = 'slot ' .. p .. '/' .. k .. ' ' .. tensor_text(st.slots[p][k]) end
    end
  end
  for _, r in ipairs(hist.rows) do
    local keys = {}
    for k in pairs(r) do if k ~= 'seconds' and k ~= 'images_per_s' then keys[#keys + 1] = k end end
    table.sort(keys)
    for i, k in ipairs(keys) do keys[i] = k .. '=' .. hex(r[k]) end
    out[#out + 1] = 'history ' .. table.concat(keys, ' ')
  end
  out[#out + 1] = 'stopped ' .. tostring(hist.stopped ~= 'interrupted' and hist.stopped or nil)
  local best = files.join(dir, 'best.h5')
  if files.exists(best) then
    local m = make_model()
    local meta = nn.load_checkpoint(best, m)
    out[#out + 1] = 'best epoch ' .. meta.epoch .. ' ' .. meta.best.monitor .. ' ' .. hex(meta.best.value)
    weights_text(m, out)
  end
  return table.concat(out, '\n')
end

local function same(got, want, what)
  if got == want then return end
  local g, w = {}, {}
  for l in (got .. '\n'):gmatch('(.-)\n') do g[#g + 1] = l end
  for l in (want .. '\n'):gmatch('(.-)\n') do w[#w + 1] = l end
  for i = 1, math.max(#g, #w) do
    if g[i] ~= w[i] then
      error(string.format('%s: line %d differs:\n  resumed:       %s\n  uninterrupted: %s', what, i,
        (g[i] or '(none)'):sub(1, 200), (w[i] or '(none)'):sub(1, 200)), 2)
    end
  end
end

---------------------------------------------------------------------------------------------------
-- The child process of the SIGKILL tests: test_train_resume.lua --child run|resume CONFIG DIR OUT
-- runs (or resumes) CONFIG's fit in DIR and writes its fingerprint to OUT.
if arg and arg[1] == '--child' then
  local cfg, dir, out = BY_NAME[arg[3]], arg[4], arg[5]
  local model, opt, hist = run(cfg, dir, arg[2] == 'resume')
  files.write_atomic(out, fingerprint(model, opt, hist, dir))
  os.exit(0)
end

local TMP = T.tmpdir()
local FLOWERLUA = os.getenv('FLOWERLUA') or './flowerlua'
local SELF = 'tests/lua/test_train_resume.lua'
local pid = tonumber(io.open('/proc/self/stat'):read('l'):match('^(%d+)'))
local util = require('flower.core')._util
-- the real SIGINT to this process (through popen: os.execute's system() ignores SIGINT while it
-- waits, and an ignored signal is dropped); it has arrived when pclose returns
local function sigint_self()
  if not util then return train.request_interrupt('SIGINT') end
  local p = io.popen('kill -INT ' .. pid)
  p:read('a'); p:close()
end
local function killed(ok, how, code) return not ok and ((how == 'exit' and code == 137) or (how == 'signal' and code == 9)) end

local REFERENCE, WRITES = {}, {}
for _, cfg in ipairs(CONFIGS) do
  T.test(cfg.name .. ': the uninterrupted run', function()
    local dir = files.join(TMP, cfg.name, 'reference')
    local model, opt, hist = run(cfg, dir, false)
    T.eq(hist.stopped, cfg.stops)
    T.check(files.exists(files.join(dir, 'best.h5')), 'a best checkpoint')
    REFERENCE[cfg.name] = fingerprint(model, opt, hist, dir)
    -- how many checkpoints it writes (epochs, and best.h5 when it improved)
    WRITES[cfg.name] = #hist.rows
    local best = cfg.save_best or 'val_acc'
    local mode = (best:find('acc') and 1 or -1)
    local b
    for _, r in ipairs(hist.rows) do
      if b == nil or mode * r[best] > mode * b then b = r[best]; WRITES[cfg.name] = WRITES[cfg.name] + 1 end
    end
    -- the schedules do what they say
    local lrs = {}
    for i, r in ipairs(hist.rows) do lrs[i] = r.lr end
    if cfg.name == 'cosine_by_epoch' then
      T.eq(lrs[1], 0.02); T.near(lrs[2], 0.015, 1e-15); T.near(lrs[3], 0.005, 1e-15); T.near(lrs[4], 0, 0, 1e-18)
    elseif cfg.name == 'step_decay_by_epoch' then
      T.eq(table.concat(lrs, ','), '0.02,0.02,0.01,0.01')
    elseif cfg.name == 'reduce_lr_on_plateau' then
      T.eq(table.concat(lrs, ','), '0.02,0.02,0.01,0.01')
    end
  end)
end

-- SIGINT after every step of every epoch, then a resume
for _, cfg in ipairs(CONFIGS) do
  T.test(cfg.name .. ': SIGINT after every step of every epoch, resumed, equals the uninterrupted run', function()
    local nsteps = #loader()
    local points = 0
    for e = 1, EPOCHS do
      for k = 1, nsteps do
        local dir = files.join(TMP, cfg.name, string.format('int-%d-%d', e, k))
        local sent = false
        local _, _, h1 = run(cfg, dir, false, function(ep, st)
          if ep == e and st == k and not sent then
            sent = true
            sigint_self()
          end
        end)
        if sent then   -- (an early-stopped run never reaches the later epochs)
          T.eq(h1.stopped, 'interrupted', string.format('stopped at epoch %d step %d', e, k))
          T.eq(h1.interrupted, 'SIGINT')
          T.eq(train.interrupted(), nil, 'the interrupt is consumed once reported')
          local model, opt, h2 = run(cfg, dir, true)
          same(fingerprint(model, opt, h2, dir), REFERENCE[cfg.name], string.format('%s, SIGINT at epoch %d step %d',
            cfg.name, e, k))
          points = points + 1
        end
      end
    end
    T.check(points >= 2 * nsteps, 'interrupt points ' .. points)
  end)
end

-- SIGKILL in a child process: before and after the rename of every checkpoint write, then resumed
local function child(cfg, dir, killpoint)
  local out = files.join(dir, 'fingerprint.txt')
  local cmd = string.format('%s%s %s --child %s %s %s %s >%s 2>&1', killpoint and ('FLOWER_KILLPOINT=' .. killpoint .. ' ') or '',
    FLOWERLUA, SELF, killpoint and 'run' or 'resume', cfg.name, dir, out, files.join(dir, 'child.log'))
  files.mkdir(dir)
  local ok, how, code = os.execute(cmd)
  return ok, how, code, out
end

-- (the configurations whose state is not a function of the epoch alone: every stateful callback
-- together, and a schedule by optimizer step; the others are covered by the SIGINT test's epoch ends)
for _, cfg in ipairs({ BY_NAME.all_together, BY_NAME.schedule_by_step }) do
  T.test(cfg.name .. ': SIGKILL before and after every checkpoint rename, resumed, equals the uninterrupted run', function()
    local kills = 0
    for n = 1, WRITES[cfg.name] do
      for _, point in ipairs({ 'checkpoint.before_rename', 'checkpoint.after_rename' }) do
        local dir = files.join(TMP, cfg.name, string.format('kill-%s-%d', point, n))
        local ok, how, code = child(cfg, dir, point .. ':' .. n)
        T.check(killed(ok, how, code), string.format('%s:%d: the child was not killed (%s %s): %s',
          point, n, tostring(how), tostring(code), files.read(files.join(dir, 'child.log'))))
        kills = kills + 1
        local rok, _, _, out = child(cfg, dir)
        T.check(rok, 'the resume failed: ' .. files.read(files.join(dir, 'child.log')))
        same(files.read(out), REFERENCE[cfg.name], string.format('%s, SIGKILL at %s:%d', cfg.name, point, n))
        -- the killed write's temporary is cleaned up by the resume
        local ls = io.popen('ls ' .. files.shell_quote(dir) .. ' | grep -c tmp-'):read('l')
        T.eq(ls, '0', 'temporaries left in ' .. dir)
      end
    end
    -- one more arrival than there are writes: the run is never killed (and the child's run equals this one's)
    local dir = files.join(TMP, cfg.name, 'kill-none')
    T.check((child(cfg, dir, 'checkpoint.after_rename:' .. (WRITES[cfg.name] + 1))), 'more writes than counted')
    same(files.read(files.join(dir, 'fingerprint.txt')), REFERENCE[cfg.name], cfg.name .. ', not killed')
  end)
end

T.test('all_together: SIGKILL after every optimizer step (mid-epoch), resumed, equals the uninterrupted run', function()
  local cfg = BY_NAME.all_together
  local total = 0
  for n = 1, EPOCHS * #loader() do
    local dir = files.join(TMP, cfg.name, 'kill-step-' .. n)
    local ok, how, code = child(cfg, dir, 'train.step:' .. n)
    if ok then break end   -- (early stopping ends the run before this step)
    T.check(killed(ok, how, code), 'killed: ' .. tostring(how) .. ' ' .. tostring(code))
    local rok, _, _, out = child(cfg, dir)
    T.check(rok, 'the resume failed: ' .. files.read(files.join(dir, 'child.log')))
    same(files.read(out), REFERENCE[cfg.name], 'all_together, SIGKILL after step ' .. n)
    total = total + 1
  end
  T.check(total >= 8, 'steps killed: ' .. total)
end)

---------------------------------------------------------------------------------------------------
-- Issue 14 point 3: a Ctrl-C in the last epoch of a stage is not lost

T.test('a Ctrl-C in the last epoch of a stage stops fit_stages; the resume goes on with the next stage', function()
  local stages = { { epochs = 2, train = 'head', lr = 0.01 }, { epochs = 2, train = 'all', lr = 0.005 } }
  local function go(dir, resume, at_step)
    local m = make_model()
    if resume then flower.manual_seed(99) end
    local logs = {}
    local h = train.fit_stages(m, stages, { train = loader(at_step), valid = data.FeatureLoader { x = XV, y = YV, batch_size = 16 },
      checkpoint_dir = dir, resume = resume, progress = false, log = function(s) logs[#logs + 1] = s end,
      make_optimizer = function(st) return optim.Adam { lr = st.lr } end })
    return m, h, logs
  end
  local ref, href = go(files.join(TMP, 'stages-ref'), false)
  T.eq(#href.rows, 4)
  for _, k in ipairs({ 2, 4 }) do   -- mid-way through the stage's last epoch, and at its very last step
    local dir = files.join(TMP, 'stages-int-' .. k)
    local ran = {}
    local m, h, logs = go(dir, false, function(e, step)
      ran[e] = true
      if e == 2 and step == k then
        sigint_self()
      end
    end)
    T.eq(h.stopped, 'interrupted'); T.eq(h.interrupted, 'SIGINT')
    T.eq(ran[3], nil, 'the second stage did not start')
    T.eq(#h.rows, k == 4 and 2 or 1)
    T.eq(train.interrupted(), nil)
    if k == 4 then T.check(logs[#logs]:find('in the last epoch', 1, true), logs[#logs]) end
    local m2, h2 = go(dir, true)
    T.eq(#h2.rows, 4)
    T.same_weights(m2, ref)
    for i = 1, 4 do T.eq(h2.rows[i].val_loss, href.rows[i].val_loss, 'val_loss of epoch ' .. i) end
  end
end)

os.execute('rm -rf ' .. files.shell_quote(TMP))
T.done()
