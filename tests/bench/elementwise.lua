-- float32 element-wise math: exp, log, tanh, sigmoid (and add as a memory-bound reference) on a
-- contiguous tensor, flowerlua against numpy in the same run. Each side allocates its result
-- (t:exp() / np.exp(x)), so both pay for one output buffer per call.
--
-- Usage: flowerlua tests/bench/elementwise.lua [n=1000000 [rounds=7]]
--
-- flowerlua is timed on 1 thread (numpy's element-wise ufuncs are single-threaded, so this is the
-- like-for-like column) and on flower.getnumthreads() threads. numpy's sigmoid peer is
-- 1 / (1 + np.exp(-x)) (numpy has no sigmoid; that expression is what users write).
-- Peers: .venv/bin/python (pip numpy: SIMD exp/log/tanh dispatched at run time) and
-- /usr/bin/python3 (Debian numpy) when present.
local flower = require 'flower'
local core = require 'flower.core'

local n = tonumber(arg and arg[1]) or 1000000
local reps = tonumber(arg and arg[2]) or 7
local now = assert(type(core._util) == 'table' and core._util.now, 'elementwise: flower.core._util.now is missing')

-- inputs: the same ranges on both sides (values differ: each side draws its own)
flower.manual_seed(0)
local inputs = {
  exp = flower.randn(n) * 4,                   -- e^-12 .. e^12 mostly
  log = flower.rand(n) * 100 + 1e-3,           -- positive
  tanh = flower.randn(n) * 3,
  sigmoid = flower.randn(n) * 4,
  add = flower.randn(n),
}
local ops = { 'exp', 'log', 'tanh', 'sigmoid', 'add' }
local run = {
  exp = function(x) return x:exp() end,
  log = function(x) return x:log() end,
  tanh = function(x) return x:tanh() end,
  sigmoid = function(x) return x:sigmoid() end,
  add = function(x) return x + x end,
}

-- seconds per call: the fastest single call among `reps` rounds of about 20 ms of calls each (on a
-- shared machine the minimum is the run that other processes disturbed least; both sides are
-- timed this way)
local function time_ours(op, threads)
  local saved = flower.getnumthreads()
  flower.setnumthreads(threads)
  local x, f = inputs[op], run[op]
  f(x):free()
  local t0 = now()
  f(x):free()
  local once = now() - t0
  local inner = math.max(1, math.floor(0.02 / math.max(once, 1e-7)))
  local best = math.huge
  for _ = 1, reps * inner do
    t0 = now()
    local y = f(x)
    best = math.min(best, now() - t0)
    y:free()
  end
  flower.setnumthreads(saved)
  return best
end

local script = [[
import sys, time
import numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
inputs = {
    "exp": rng.standard_normal(n, dtype=np.float32) * np.float32(4),
    "log": rng.random(n, dtype=np.float32) * np.float32(100) + np.float32(1e-3),
    "tanh": rng.standard_normal(n, dtype=np.float32) * np.float32(3),
    "sigmoid": rng.standard_normal(n, dtype=np.float32) * np.float32(4),
    "add": rng.standard_normal(n, dtype=np.float32),
}
one = np.float32(1)
fns = {
    "exp": np.exp, "log": np.log, "tanh": np.tanh,
    "sigmoid": lambda x: one / (one + np.exp(-x)),
    "add": lambda x: x + x,
}
for op in ["exp", "log", "tanh", "sigmoid", "add"]:
    x, f = inputs[op], fns[op]
    f(x)
    t0 = time.perf_counter(); f(x); once = time.perf_counter() - t0
    inner = max(1, int(0.02 / max(once, 1e-7)))
    best = float("inf")
    for _ in range(reps * inner):
        t0 = time.perf_counter()
        y = f(x)
        best = min(best, time.perf_counter() - t0)
        del y
    print(op, best, flush=True)
]]

local function run_peer(py)
  local fh = io.open(py)
  if not fh then return nil end
  fh:close()
  local tmp = os.tmpname()
  local f = assert(io.open(tmp, 'w'))
  f:write(script)
  f:close()
  local p = io.popen(string.format('%s %s %d %d 2>/dev/null', py, tmp, n, reps))
  local res = {}
  for line in p:lines() do
    local op, t = line:match('^(%a+)%s+(%S+)')
    if op then res[op] = tonumber(t) end
  end
  p:close()
  os.remove(tmp)
  return next(res) and res or nil
end

local peerB = run_peer('.venv/bin/python')
local peerA = run_peer('/usr/bin/python3')
if not peerA and not peerB then
  io.stderr:write('elementwise: no numpy peer found (.venv/bin/python or /usr/bin/python3 with numpy): run make deps\n')
  os.exit(1)
end
local nt = flower.getnumthreads()
local one, many = {}, {}
for _, op in ipairs(ops) do
  one[op] = time_ours(op, 1)
  many[op] = time_ours(op, nt)
end

print(string.format('float32 element-wise, n = %d, fastest call of %d rounds x 20 ms, ns per element', n, reps))
print('numpy B: .venv/bin/python (pip numpy); numpy A: /usr/bin/python3 (Debian numpy)')
print(string.format('%-8s %9s %9s %9s %9s %9s %9s', 'op', 'flower 1t', 'flower ' .. nt .. 't', 'numpy B',
  'ratio B', 'numpy A', 'ratio A'))
local function ns(t) return t and string.format('%.3f', t / n * 1e9) or 'n/a' end
local function ratio(a, b) return b and string.format('%.2f', a / b) or 'n/a' end
for _, op in ipairs(ops) do
  local b, a = peerB and peerB[op], peerA and peerA[op]
  print(string.format('%-8s %9s %9s %9s %9s %9s %9s', op, ns(one[op]), ns(many[op]), ns(b), ratio(one[op], b),
    ns(a), ratio(one[op], a)))
end
print('(ratio = flower on 1 thread / numpy: below 1 is faster than numpy)')
