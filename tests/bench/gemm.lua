-- sgemm throughput: flower.matmul against numpy's matmul at 512, 1024 and 2048, on this machine in
-- the same run. Both end in an OpenBLAS sgemm, so the ratio measures what flowerlua adds.
--
-- Usage: flowerlua tests/bench/gemm.lua [rounds=7]
--
-- Environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE may be set on some machines to steer
-- OpenBLAS's kernel choice. The numpy peer runs with both unset; so that the comparison is fair
-- this script re-runs itself with both unset too when it finds them set (reported in the output).
local flower = require 'flower'

local reps = tonumber(arg and arg[1]) or 7
local sizes = { 512, 1024, 2048 }

local steer = os.getenv('OPENBLAS_CORETYPE') or os.getenv('OPENBLAS_L2_SIZE')
if steer and not os.getenv('FLOWER_GEMM_CHILD') then
  local exe = arg[-1] or 'flowerlua'
  local cmd = string.format('env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE FLOWER_GEMM_CHILD=1 %s %s %d',
    exe, arg[0], reps)
  print('OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set here; running both sides with them unset')
  local ok = os.execute(cmd)
  os.exit(ok and 0 or 1)
end

-- wall clock: flower.core._util.now (bindings/l_util.c), monotonic and fine: one product per timing
local now = require('flower.core')._util.now

-- One timing of n x n sgemm (seconds per product); inputs made once per size.
local inputs = {}
local function time_ours(n)
  if not inputs[n] then
    inputs[n] = { flower.randn(n, n), flower.randn(n, n) }
    flower.matmul(inputs[n][1], inputs[n][2]):free()   -- warm up: threads, pages
  end
  local a, b = inputs[n][1], inputs[n][2]
  local t0 = now()
  flower.matmul(a, b):free()
  return now() - t0
end

-- numpy peers: Debian's python3-numpy (linked to the same system libopenblas as flowerlua: the
-- fair comparison) and the test venv's numpy (pip wheel with its own bundled OpenBLAS)
local script = [[
import sys, time
import numpy as np
reps = int(sys.argv[1])
for arg in sys.argv[2:]:
    n = int(arg)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        c = a @ b
        del c
        best = min(best, time.perf_counter() - t0)
    print(n, best, flush=True)
]]

local function run_peer(py, nreps)
  if not io.open(py) then return nil end
  local tmp = os.tmpname()
  local f = assert(io.open(tmp, 'w'))
  f:write(script)
  f:close()
  local p = io.popen(string.format('env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE %s %s %d %s 2>/dev/null', py, tmp,
    nreps, table.concat(sizes, ' ')))
  local res = {}
  for line in p:lines() do
    local n, g = line:match('^(%d+)%s+(%S+)')
    if n then res[tonumber(n)] = tonumber(g) end
  end
  p:close()
  os.remove(tmp)
  return next(res) and res or nil
end

-- Rounds alternate the three sides (numpy A, numpy B, flowerlua; one timing per size each), and
-- each side keeps its best: on a shared machine a burst of load then hits every side alike.
local best = { ours = {}, A = {}, B = {} }
local have_a, have_b = io.open('/usr/bin/python3') ~= nil, io.open('.venv/bin/python') ~= nil
local function keep(tab, res)
  for n, t in pairs(res or {}) do if not tab[n] or t < tab[n] then tab[n] = t end end
end
for _ = 1, reps do
  if have_a then keep(best.A, run_peer('/usr/bin/python3', 1)) end
  if have_b then keep(best.B, run_peer('.venv/bin/python', 1)) end
  for _, n in ipairs(sizes) do keep(best.ours, { [n] = time_ours(n) }) end
end
if not next(best.A) and not next(best.B) then
  io.stderr:write('gemm: no numpy peer found (/usr/bin/python3 or .venv/bin/python with numpy): run make deps\n')
  os.exit(1)
end

local function gflops(n, t) return t and 2 * n ^ 3 / t / 1e9 end
print(string.format('sgemm float32 n x n, best of %d rounds, %d threads', reps, flower.getnumthreads()))
print('numpy A: /usr/bin/python3 (Debian numpy, same libopenblas); numpy B: .venv/bin/python (pip numpy, bundled OpenBLAS)')
print(string.format('%6s %10s %10s %8s %10s %8s', 'n', 'flower', 'numpy A', 'ratio A', 'numpy B', 'ratio B'))
local function cell(v) return v and string.format('%.1f', v) or 'n/a' end
local function ratio(a, b) return b and string.format('%.3f', a / b) or 'n/a' end
for _, n in ipairs(sizes) do
  local ours, ga, gb = gflops(n, best.ours[n]), gflops(n, best.A[n]), gflops(n, best.B[n])
  print(string.format('%6d %10.1f %10s %8s %10s %8s', n, ours, cell(ga), ratio(ours, ga), cell(gb), ratio(ours, gb)))
end
print('(GFLOP/s = 2 n^3 / seconds / 1e9; ratio = flower / numpy)')
