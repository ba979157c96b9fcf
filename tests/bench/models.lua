-- Whole-model speed on the CPU: forward (inference) and one training step (SGD momentum on softmax
-- cross-entropy) at batch 8 and the native input size, for the four zoo models, beside Keras
-- (tf-keras on the .venv's TensorFlow, all four) and PyTorch (Debian's torchvision: resnet50 and
-- inception_v3) in the same run. Every measurement runs in its own process, so the peak resident
-- memory printed beside it is that step's own (Python's interpreter and imports included for the
-- peers, as a user would see them). Ratios are peer time / our time: > 1 means flowerlua is faster.
--
-- Usage: flowerlua tests/bench/models.lua [reps=2] [threads=2] [models=all] [modes=forward,train] [batch=8]
--   e.g. flowerlua tests/bench/models.lua 3 2 resnet50,inception_v3 forward
local flower = require 'flower'

local args = arg or {}
local PY = os.getenv('PYTHON') or '.venv/bin/python'

local function peak_rss_mb() return require('flower.memory').peak() / 2^20 end

-------------------------------------------------------------------------------- one measurement (child)

if args[1] == '--child' then
  local name, mode = args[2], args[3]
  local batch, reps, threads = tonumber(args[4]), tonumber(args[5]), tonumber(args[6])
  flower.setnumthreads(threads)
  local nn = require 'flower.nn'
  local models = require 'flower.models'
  local now = nn.C.now
  local m = models[name]{include_top = true, preprocess = false}
  local s = m.default_size
  flower.manual_seed(0)
  local x = flower.randn(batch, s, s, 3)
  local step
  if mode == 'forward' then
    m:evaluate()
    step = function() m:forward(x) end
  else
    local optim, train = require 'flower.optim', require 'flower.train'
    local opt = optim.SGD{lr = 0.01, momentum = 0.9}
    local loss = train.make_loss('categorical_crossentropy')
    local batch_xy = {x = x, y = flower.randint(1, 1000, batch):type('int64')}
    m:training()
    step = function() train.step(m, batch_xy, loss, opt) end
  end
  step()
  local best, total = math.huge, 0
  for _ = 1, reps do
    local t0 = now()
    step()
    local t = now() - t0
    best, total = math.min(best, t), total + t
  end
  print(string.format('%.1f %.4f %.4f', peak_rss_mb(), best, total / reps))
  os.exit(0)
end

-------------------------------------------------------------------------------- the table

if args[1] == '--help' or args[1] == '-h' then
  print('usage: flowerlua tests/bench/models.lua [reps=2] [threads=2] [models=all] [modes=forward,train] [batch=8]')
  os.exit(0)
end
for _, p in ipairs {{1, 'reps'}, {2, 'threads'}, {5, 'batch'}} do
  local v = args[p[1]]
  if v and not tonumber(v) then
    error(string.format('models.lua: %s must be a number, got %q (--help for usage)', p[2], v), 0)
  end
end
local reps = tonumber(args[1]) or 2
local threads = tonumber(args[2]) or 2
local names = (args[3] and args[3] ~= 'all') and args[3] or 'resnet50,inception_v3,xception,inception_resnet_v2'
local modes = args[4] or 'forward,train'
local batch = tonumber(args[5]) or 8
local exe = os.getenv('FLOWERLUA') or arg[-1] or './flowerlua'

local function split(s)
  local r = {}
  for w in s:gmatch('[^,]+') do r[#r + 1] = w end
  return r
end

-- runs a child; returns {peak, best, mean} or nil, message
local function measure(cmd)
  local p = io.popen(cmd .. ' 2>&1')
  local out = p:read('a')
  p:close()
  local peak, best, mean = out:match('([%d.]+) ([%d.]+) ([%d.]+)%s*$')
  if not peak then return nil, out:sub(-300) end
  return {peak = tonumber(peak), best = tonumber(best), mean = tonumber(mean)}
end

local torch_has = {resnet50 = true, inception_v3 = true}
print(string.format('flowerlua %s, batch %d, %d threads, best of %d after a warm-up; img/s = batch / best time',
  flower.version or '?', batch, threads, reps))
local rows = {}
for _, name in ipairs(split(names)) do
  for _, mode in ipairs(split(modes)) do
    local r = {name = name, mode = mode}
    r.ours, r.ours_err = measure(string.format('%s tests/bench/models.lua --child %s %s %d %d %d', exe, name, mode,
      batch, reps, threads))
    r.keras, r.keras_err = measure(string.format('%s tests/bench/models_peer.py keras %s %s %d %d %d', PY, name, mode,
      batch, reps, threads))
    if torch_has[name] then
      r.torch, r.torch_err = measure(string.format('%s tests/bench/models_peer.py torch %s %s %d %d %d', PY, name, mode,
        batch, reps, threads))
    end
    rows[#rows + 1] = r
    for _, k in ipairs({'ours', 'keras', 'torch'}) do
      if r[k .. '_err'] then io.stderr:write(string.format('%s %s %s failed: %s\n', name, mode, k, r[k .. '_err'])) end
    end
  end
end

local function ips(m) return m and string.format('%.2f', batch / m.best) or '-' end
local function mb(m) return m and string.format('%.0f', m.peak) or '-' end
local function ratio(a, b) return (a and b) and string.format('%.2fx', a.best / b.best) or '-' end

print()
print(string.format('%-20s %-7s | %9s %9s %9s | %8s %8s | %8s %8s %8s', 'model', 'step', 'ours', 'keras', 'torch',
  'vs keras', 'vs torch', 'MB ours', 'MB keras', 'MB torch'))
print(string.rep('-', 112))
for _, r in ipairs(rows) do
  print(string.format('%-20s %-7s | %9s %9s %9s | %8s %8s | %8s %8s %8s', r.name, r.mode, ips(r.ours), ips(r.keras),
    ips(r.torch), ratio(r.keras, r.ours), ratio(r.torch, r.ours), mb(r.ours), mb(r.keras), mb(r.torch)))
end
print('(img/s: higher is better; vs: peer time / our time, > 1 means flowerlua is faster; MB: peak RSS of the process)')
