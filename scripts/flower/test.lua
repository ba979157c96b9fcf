-- flower.test: the small test harness used by tests/lua and usable by recipes.
--   local T = require 'flower.test'
--   T.test('name', function() T.eq(1, 1) end)
--   T.done()        -- exits non-zero if anything failed
-- Each test prints `ok - name` or `not ok - name: message` (the runner counts those lines).
local T = {}
local failed, passed = 0, 0

local function fmt(v)
  if type(v) == 'string' then return string.format('%q', v) end
  return tostring(v)
end

function T.test(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if ok then
    passed = passed + 1
    print('ok - ' .. name)
  else
    failed = failed + 1
    print('not ok - ' .. name .. ': ' .. tostring(err):gsub('\n', '\n    '))
  end
end

function T.check(cond, msg) if not cond then error(msg or 'check failed', 2) end end

function T.eq(got, want, msg)
  if got ~= want then
    error(string.format('%sexpected %s, got %s', msg and (msg .. ': ') or '', fmt(want), fmt(got)), 2)
  end
end

-- |got - want| <= atol + rtol * |want|, for numbers
function T.near(got, want, rtol, atol, msg)
  rtol, atol = rtol or 1e-6, atol or 0
  if not (math.abs(got - want) <= atol + rtol * math.abs(want)) then
    error(string.format('%sexpected %.10g, got %.10g', msg and (msg .. ': ') or '', want, got), 2)
  end
end

-- fn must raise an error whose message contains `pattern` (plain text match)
function T.raises(fn, pattern, msg)
  local ok, err = pcall(fn)
  if ok then error((msg and (msg .. ': ') or '') .. 'expected an error containing ' .. fmt(pattern), 2) end
  if pattern and not tostring(err):find(pattern, 1, true) then
    error(string.format('%serror %s does not contain %s', msg and (msg .. ': ') or '', fmt(tostring(err)), fmt(pattern)), 2)
  end
  return err
end

-- Tensors (or numbers) equal within max |a-b| <= atol + rtol*max|b|, shapes equal.
function T.allclose(a, b, rtol, atol, msg)
  local flower = require 'flower'
  rtol, atol = rtol or 1e-5, atol or 1e-8
  if type(b) == 'table' then b = flower.tensor(b, a:dtype()) end
  local sa, sb = table.concat(a:size(), 'x'), table.concat(b:size(), 'x')
  if sa ~= sb then error(string.format('%sshape %s, expected %s', msg and (msg .. ': ') or '', sa, sb), 2) end
  if a:numel() == 0 then return end
  local da, db = a:double(), b:double()
  local diff = (da - db):abs():max():item()
  local scale = db:abs():max():item()
  if not (diff <= atol + rtol * scale) then
    error(string.format('%smax |diff| %.3g exceeds %.3g (rtol %g, atol %g, max |ref| %.3g)',
      msg and (msg .. ': ') or '', diff, atol + rtol * scale, rtol, atol, scale), 2)
  end
end

-- Every weight tensor of models a and b identical, bit for bit (same count, same order).
function T.same_weights(a, b)
  local wa, wb = a:weights(), b:weights()
  T.eq(#wa, #wb, 'weight count')
  for i = 1, #wa do
    if not wa[i].tensor:equal(wb[i].tensor) then error('weight ' .. wa[i].path .. ' differs', 2) end
  end
end

-- Helpers shared by tests that call out to Python reference generators.
T.python = os.getenv('PYTHON') or '.venv/bin/python'

function T.sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

-- Runs a shell command: its output (stdout and stderr, then a last line "rc=<exit status>") and
-- the exit status as a number.
function T.capture(cmd)
  local p = io.popen(cmd .. ' 2>&1; echo "rc=$?"')
  local out = p:read('a')
  p:close()
  return out, tonumber(out:match('rc=(%d+)%s*$'))
end

function T.slurp(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('a')
  f:close()
  return s
end

-- A fresh temporary directory.
function T.tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(T.sh('mkdir -p ' .. dir), 'cannot create ' .. dir)
  return dir
end

-- A 4-class problem in 10 dims, the class being which of 4 fixed directions a point leans to (the
-- directions drawn with seed 0): for each size n_i, x_i (n_i, 10) drawn with seed i and its labels.
--   local XT, YT, XV, YV = T.leaning_classes(256, 96)
function T.leaning_classes(...)
  local flower = require 'flower'
  flower.manual_seed(0)
  local W = flower.randn({10, 4})
  local out = {}
  for i, n in ipairs {...} do
    flower.manual_seed(i)
    local x = flower.randn({n, 10})
    out[#out + 1] = x
    out[#out + 1] = x:matmul(W):argmax(2):view(-1)
  end
  return table.unpack(out)
end

-- Loaders over leaning_classes data: the training set shuffled (seed 7) in batches of bs (default 32),
-- the validation set in order in batches of 48.
--   local tl, vl = T.leaning_loaders(XT, YT, XV, YV)
function T.leaning_loaders(xt, yt, xv, yv, bs)
  local data = require 'flower.data'
  return data.FeatureLoader { x = xt, y = yt, batch_size = bs or 32, shuffle = true, seed = 7 },
         data.FeatureLoader { x = xv, y = yv, batch_size = 48 }
end

-- The classifier the training tests fit to leaning_classes: Dense(16) 'fc1' -> BatchNormalization
-- 'bn1' -> ReLU 'relu1' -> Dropout(rate, seed 5) 'drop' -> Dense(4) 'head' (logits), model 'mlp',
-- its weights drawn with seed 123.
function T.leaning_mlp(rate)
  local flower, nn = require 'flower', require 'flower.nn'
  nn.reset_names()
  flower.manual_seed(123)
  local x = nn.Input { 10 }
  local h = nn.Dense { units = 16, name = 'fc1' }(x)
  h = nn.BatchNormalization { name = 'bn1' }(h)
  h = nn.Activation { activation = 'relu', name = 'relu1' }(h)
  h = nn.Dropout { rate = rate, seed = 5, name = 'drop' }(h)
  return nn.Model(x, nn.Dense { units = 4, name = 'head' }(h), { name = 'mlp' })
end

-- Fits one small model (Dense(8, relu) -> BatchNormalization -> Dense(3)) twice on the same `rows`
-- random rows, with distributed and sync_batchnorm on and off, and checks that every weight agrees
-- within `tol`; `fit` holds train.fit options both runs share (device = 'cuda', ...), valid = true
-- validates on the training rows. Returns the two histories (distributed first).
function T.fit_distributed_and_plain(rows, tol, fit)
  local flower, nn, optim, data, train = require 'flower', require 'flower.nn', require 'flower.optim',
    require 'flower.data', require 'flower.train'
  flower.manual_seed(0)
  local X = flower.randn(rows, 6)
  local Y = X:matmul(flower.randn(6, 3)):argmax(2):view(-1)
  local ms, hs = {}, {}
  for k, d in ipairs({ true, false }) do
    nn.reset_names()
    flower.manual_seed(5)
    local i = nn.Input { 6 }
    ms[k] = nn.Model(i, nn.Dense { units = 3 }(nn.BatchNormalization {}(nn.Dense { units = 8, activation = 'relu' }(i))))
    local o = { train = data.FeatureLoader { x = X, y = Y, batch_size = 8, shuffle = true, seed = 1 },
      valid = fit.valid and data.FeatureLoader { x = X, y = Y, batch_size = 16 } or nil, optimizer = optim.Adam { lr = 0.01 },
      epochs = 2, progress = false, log = function() end, distributed = d, sync_batchnorm = d }
    for key, v in pairs(fit) do if key ~= 'valid' then o[key] = v end end
    hs[k] = train.fit(ms[k], o)
  end
  local wb = ms[2]:weights()
  for i, w in ipairs(ms[1]:weights()) do
    T.check((w.tensor:cpu() - wb[i].tensor:cpu()):abs():max():item() < tol, w.path)
  end
  return hs[1], hs[2]
end

-- Gives every BatchNormalization layer of model m the statistics and parameters of a trained one
-- (moving means near 0, variances in [0.5, 2], gamma in [0.5, 1.5]), drawn from the global
-- generator: fresh layers (mean 0, variance 1, gamma 1, beta 0) would hide mistakes in their use.
function T.randomize_batchnorm(m)
  for _, l in ipairs(m:layers()) do
    if l.class_name == 'BatchNormalization' then
      l.moving_mean:normal_(0, 0.3); l.moving_variance:uniform_(0.5, 2)
      if l.gamma then l.gamma:uniform_(0.5, 1.5) end
      if l.beta then l.beta:normal_(0, 0.3) end
    end
  end
  return m
end

-- Runs `python generator outdir` unless outdir/stamp is newer than the generator; never skips:
-- a generator that fails is an error naming it. Returns outdir/stamp.
function T.reference(generator, outdir, stamp)
  local path = outdir .. '/' .. stamp
  if not T.sh(string.format('[ %s -nt %s ]', path, generator)) then
    assert(T.sh(string.format('%s %s %s', T.python, generator, outdir)),
      'cannot generate references with ' .. T.python .. ' ' .. generator .. ' (run make deps)')
  end
  return path
end

function T.done()
  io.stdout:flush()
  if failed > 0 then os.exit(1) end
end

T.counts = function() return passed, failed end
return T
