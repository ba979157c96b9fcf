-- Data-parallel scaling on the CPU, beside PyTorch's DistributedDataParallel (Debian's torch, gloo)
-- in the same run: 1 and 2 ranks of one thread each, a small CNN (64x64 input) and ResNet50 (224x224)
-- at batch 8 per rank, SGD with momentum. For each framework and rank count it prints the step
-- time, the scaling efficiency (images/s on 2 ranks / twice images/s on 1), the exposed all-reduce
-- time per step and the volume reduced per step:
-- measured the same way for both: the 2-rank step minus the same step without gradient reduction
-- (PyTorch: under ddp.no_sync(), whose all-reduce otherwise overlaps the backward pass in buckets;
-- ours: the context's no_sync, ours reduces after the backward pass in buckets, not overlapped: on
-- these cores a background reduction would compete with the backward pass for the same core).
-- Ours also prints the time inside flower.dist's collectives (dist.stats), waits included.
-- Then, from the measured volume, the ring all-reduce's cost per ResNet50 step at NVLink (150 GB/s
-- per direction, A100/H100 class) and 100 Gb/s InfiniBand (12.5 GB/s), for 2 and 8 GPUs.
--
-- Usage: flowerlua tests/bench/dist.lua [steps=3] [models=small_cnn,resnet50]
--   (each measurement: one warm-up step, then `steps` timed ones; mean reported)
local flower = require 'flower'
local args = arg or {}

local function build(name)
  local nn = require 'flower.nn'
  flower.manual_seed(0)
  if name == 'resnet50' then
    return require('flower.models').resnet50 { include_top = true }, 224, 1000
  end
  -- conv3x3(32) relu maxpool conv3x3(64) relu maxpool conv3x3(128) relu GAP dense(10): the same in
  -- tests/bench/dist_ddp.py
  local x = nn.Input { 64, 64, 3 }
  local y = nn.Conv2D { filters = 32, kernel_size = 3, padding = 'same', activation = 'relu' }(x)
  y = nn.MaxPooling2D { pool_size = 2 }(y)
  y = nn.Conv2D { filters = 64, kernel_size = 3, padding = 'same', activation = 'relu' }(y)
  y = nn.MaxPooling2D { pool_size = 2 }(y)
  y = nn.Conv2D { filters = 128, kernel_size = 3, padding = 'same', activation = 'relu' }(y)
  y = nn.GlobalAveragePooling2D {}(y)
  y = nn.Dense { units = 10, activation = 'softmax' }(y)
  return nn.Model(x, y), 64, 10
end

-------------------------------------------------------------------------------- one rank (child)

if args[1] == '--worker' then
  local name, steps = args[2], tonumber(args[3])
  flower.setnumthreads(1)
  local dist, train, optim = flower.dist, require 'flower.train', require 'flower.optim'
  local now = require('flower.files').now
  local model, size, classes = build(name)
  model:training()
  flower.manual_seed(1 + dist.rank())
  local batch = { x = flower.rand(8, size, size, 3):mul(255), y = flower.randint(1, classes, 8):type('int64'), n = 8 }
  local lossfn = train.make_loss('categorical_crossentropy')
  local opt = optim.SGD { lr = 0.001, momentum = 0.9 }
  local D = dist.fit_context(model, {}, nil)
  if D then D:broadcast_weights(model) end
  local function step()
    if D then D:step(model, batch, nil, lossfn, opt, {}) else train.step(model, batch, lossfn, opt, {}) end
  end
  local function timed()
    step()
    if D then dist.barrier() end
    local t0 = now()
    for _ = 1, steps do step() end
    return (now() - t0) / steps
  end
  local s0, b0 = dist.stats()
  local t = timed()
  local s1, b1 = dist.stats()
  local t_local = t
  if D then D.no_sync = true; t_local = timed(); D.no_sync = false end
  local _, gs = model:parameters()
  local bytes = 0
  for _, g in ipairs(gs) do bytes = bytes + g:numel() * 4 end
  -- the slowest rank's step is the job's
  local all = dist.allreduce_numbers({ t, t - t_local, (s1 - s0) / (steps + 1) }, 'max')
  if dist.is_main() then
    print(string.format('RESULT %.5f %.5f %d %d %.5f', all[1], math.max(0, all[2]), bytes, (b1 - b0) / (steps + 1), all[3]))
  end
  os.exit(0)
end

-------------------------------------------------------------------------------- the table

local steps = tonumber(args[1]) or 3
local names = args[2] or 'small_cnn,resnet50'
local exe = os.getenv('FLOWERLUA') or arg[-1] or './flowerlua'
local PY = os.getenv('PYTHON') or '.venv/bin/python'
local MPIRUN = 'mpirun --oversubscribe --allow-run-as-root --bind-to none -np '

local function run(cmd)
  local p = io.popen('timeout 1800 ' .. cmd .. ' 2>&1')     -- a stuck peer fails its row, not the run
  local out = p:read('a')
  p:close()
  local a, b, c, d, e = out:match('RESULT ([%d.e-]+) ([%d.e-]+) (%d+) ([%d.e+-]+) ([%d.e-]+)')
  if not a then io.stderr:write('failed: ', cmd, '\n', out:sub(-600), '\n') return nil end
  return { step = tonumber(a), allreduce = tonumber(b), param_bytes = tonumber(c), reduced = tonumber(d),
           incoll = tonumber(e) }
end

local rows = {}
for name in names:gmatch('[^,]+') do
  local r = { name = name }
  for n = 1, 2 do
    r['ours' .. n] = run(string.format('%s%d %s tests/bench/dist.lua --worker %s %d', MPIRUN, n, exe, name, steps))
    r['torch' .. n] = run(string.format('%s tests/bench/dist_ddp.py %s %d %d', PY, name, n, steps))
  end
  rows[#rows + 1] = r
end

local function ms(v) return v and string.format('%.1f', v * 1e3) or '-' end
local function eff(a, b) return (a and b) and string.format('%.0f%%', 100 * a.step / b.step) or '-' end
print(string.format('flowerlua %s, data parallel over MPI (Open MPI, shared memory) vs PyTorch DDP (gloo); ' ..
  'batch 8 per rank, 1 thread per rank, %d timed steps', flower.version or '?', steps))
print(string.format('%-10s %-9s | %9s %10s %7s | %12s %11s | %8s %10s', 'model', 'framework', '1 rank ms', '2 ranks ms',
  'scaling', 'allreduce ms', 'in coll. ms', 'grad MB', 'reduced MB'))
print(string.rep('-', 100))
for _, r in ipairs(rows) do
  for _, fw in ipairs({ 'ours', 'torch' }) do
    local a, b = r[fw .. '1'], r[fw .. '2']
    print(string.format('%-10s %-9s | %9s %10s %7s | %12s %11s | %8s %10s', r.name, fw == 'ours' and 'flowerlua' or 'pytorch',
      ms(a and a.step), ms(b and b.step), eff(a, b), ms(b and b.allreduce), fw == 'ours' and ms(b and b.incoll) or '-',
      b and string.format('%.1f', b.param_bytes / 1e6) or '-', b and b.reduced > 0 and string.format('%.1f', b.reduced / 1e6) or '-'))
  end
end
print('(scaling: 1-rank step time / 2-rank step time at batch 8 per rank, i.e. images/s per rank kept; allreduce: ' ..
  'the 2-rank step minus the same step without gradient reduction (DDP no_sync / our no_sync), the slowest rank; ' ..
  'in coll.: our time inside collectives per step, waiting for the other rank included)')

-- what the measured volume costs on real interconnects: a ring all-reduce moves 2 (N-1)/N of the
-- buffer through each link, so t = 2 (N-1)/N * bytes / bandwidth (+ latency, negligible here)
for _, r in ipairs(rows) do
  local b = r.ours2 and r.ours2.param_bytes
  if r.name == 'resnet50' and b then
    print(string.format('\nResNet50: %.1f MB of float32 gradients per step (%d parameters); ring all-reduce time per step:',
      b / 1e6, b // 4))
    for _, link in ipairs({ { 'NVLink 150 GB/s', 150e9 }, { 'InfiniBand 100 Gb/s', 12.5e9 } }) do
      local line = {}
      for _, n in ipairs({ 2, 8 }) do
        line[#line + 1] = string.format('%d GPUs %.1f ms', n, 2 * (n - 1) / n * b / link[2] * 1e3)
      end
      print(string.format('  %-20s %s', link[1], table.concat(line, ', ')))
    end
  end
end
