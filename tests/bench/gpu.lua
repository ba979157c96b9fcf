-- GPU benchmark: ResNet50 training-step and inference throughput (img/s) and peak device memory at
-- batch 128, 224x224, beside PyTorch (torchvision resnet50, channels_last; tests/bench/gpu_torch.py)
-- on the same GPU in the same run, plus kernel-level peers (sgemm, a 3x3 convolution). Prints a
-- table with ratios flowerlua / PyTorch (for img/s and TFLOP/s higher is better, for ms and MiB
-- lower is better). Targets (issue 7): >= 1.0x PyTorch eager in each mode, peak memory no more.
--
-- Modes: fp32 with TF32 allowed (the default precision), and bf16 mixed precision
-- (model:mixed_precision('bfloat16'): bf16 activations and kernel copies, float32 master weights
-- and optimizer state), beside torch.autocast(bfloat16) on the same torchvision model.
--
-- Usage: flowerlua tests/bench/gpu.lua [batch=128] [steps=20]
--        flowerlua tests/bench/gpu.lua --dry   (no GPU: the model part, fp32 and bf16, on the CPU
--                                              at batch 2, 64x64, one step: checks the code runs)
-- Environment: FLOWER_PYTHON (default python3) runs the PyTorch peer.
--
-- Each side runs in its own process, one after the other (never two on the GPU at once); ours
-- as `flowerlua tests/bench/gpu.lua --child kernels|model B S`, so that a failure in one part still
-- leaves the others in the table (marked n/a with the reason).
local flower = require 'flower'
local cuda = flower.cuda
local core = require 'flower.core'

local function result(key, value) print(string.format('RESULT %s %.6g', key, value)); io.stdout:flush() end

-- wall clock: flower.core._util.now (bindings/l_util.c); each timing syncs the GPU first
local now = core._util.now

-- drains the device (nothing to drain in --dry mode, on the CPU)
local sync = function() cuda.synchronize() end

-- seconds per call of fn over reps calls, after warm-up, the device drained before each clock read
local function timed(fn, reps, warmup)
  for _ = 1, warmup or 2 do fn() end
  sync()
  local t0 = now()
  for _ = 1, reps do fn() end
  sync()
  return (now() - t0) / reps
end

-------------------------------------------------------------------------------- children

local function child_kernels(batch)
  local n = 8192
  local a, b = flower.randn(n, n):cuda(), flower.randn(n, n):cuda()
  for _, mode in ipairs {{false, 'sgemm_fp32_tflops'}, {true, 'sgemm_tf32_tflops'}} do
    cuda.allow_tf32(mode[1])
    local s = timed(function() a:matmul(b):free() end, 5)
    result(mode[2], 2 * n ^ 3 / s / 1e12)
  end
  cuda.allow_tf32(true)
  a:free(); b:free()
  local nn = core._nn
  local x = flower.randn(batch, 56, 56, 64):cuda()
  local w = flower.randn(3, 3, 64, 64):cuda()
  local gy = flower.randn(batch, 56, 56, 64):cuda()
  local gw = flower.zeros(3, 3, 64, 64):cuda()
  local win = nn.window(56, 56, 3, 3, 1, 1, 1, 1, 'same')
  result('conv3x3_fwd_ms', 1e3 * timed(function() nn.conv2d(x, w, win):free() end, 10))
  result('conv3x3_bwd_data_ms', 1e3 * timed(function() nn.conv2d_backward_data(gy, w, x, win):free() end, 10))
  result('conv3x3_bwd_filter_ms', 1e3 * timed(function() nn.conv2d_backward_filter(x, gy, win, gw) end, 10))
end

-- ResNet50 training step (SGD with momentum, softmax cross-entropy on random labels) and inference,
-- in fp32/TF32 and then in bf16 mixed precision on the same model and optimizer. dry: on the CPU,
-- 64x64 inputs, one warm-up (the code path only; the numbers mean nothing).
local function child_model(batch, steps, dry)
  local models = require 'flower.models'
  local nn = require 'flower.nn'
  local optim = require 'flower.optim'
  local size = dry and 64 or 224
  local m = models.resnet50{include_top = true, classifier_activation = false, input_shape = {size, size, 3}, preprocess = false}
  if type(m.cuda) ~= 'function' then
    error('flower.nn models have no :cuda() yet: the model-level benchmark needs Model:cuda()', 0)
  end
  local up = function(t) return t:cuda() end
  if dry then up = function(t) return t end else m:cuda() end
  local x = up(flower.randn(batch, size, size, 3))
  local labels = up(flower.randint(1, 1000, batch))
  local opt = optim.SGD{lr = 0.01, momentum = 0.9}
  local function step()
    m:zero_grad()
    local y = m:forward(x)
    local _, g = nn.softmax_cross_entropy(y, labels)
    m:backward(x, g)
    opt:step(m)
  end
  local warm = dry and 1 or 3
  local function profile(mode)
    -- where a training step's time goes, per layer class: host time alone (kernel launches, Lua),
    -- then with the device drained around every layer (what each layer costs on the GPU)
    m:training()
    local C, now0 = nn.C, nn.C.now
    for _, synced in ipairs {false, true} do
      if synced then C.now = function() sync(); return now0() end end
      nn.profile = {}
      local s = timed(step, 3, 1)
      print(('# profile %s, %s: %.1f ms per step'):format(mode, synced and 'device drained per layer' or 'host time', 1e3 * s))
      for line in nn.profile_report(nn.profile):gmatch('[^\n]+') do print('#   ' .. line) end
      nn.profile = nil
    end
    C.now = now0
  end
  for _, mode in ipairs {'fp32', 'bf16'} do
    m:mixed_precision(mode == 'bf16' and 'bfloat16' or false)
    m:training()
    for _ = 1, warm do step() end
    sync()
    if not dry then cuda.reset_peak_memory_stats() end
    local s = timed(step, steps, 0)
    result('train_' .. mode .. '_img_s', batch / s)
    if not dry then
      local st = cuda.memory_stats()
      result('train_' .. mode .. '_peak_alloc_mib', st.peak_allocated / 2 ^ 20)
      result('train_' .. mode .. '_peak_reserved_mib', st.peak_reserved / 2 ^ 20)
      local keys = {}
      for k in pairs(st) do keys[#keys + 1] = k end
      table.sort(keys)
      for _, k in ipairs(keys) do print(('# %s memory_stats.%s = %s'):format(mode, k, tostring(st[k]))) end
      local cs = cuda.conv_stats()
      print(('# %s cuDNN plans %d, largest workspace %.1f MiB'):format(mode, cs.plans, cs.max_workspace / 2 ^ 20))
    end
    m:evaluate()
    result('infer_' .. mode .. '_img_s', batch / timed(function() m:forward(x) end, steps, dry and 1 or 3))
    if os.getenv('FLOWER_BENCH_PROFILE') then profile(mode) end
  end
  -- the masters stayed float32 through the bf16 steps
  for _, w in ipairs(m:weights()) do
    if w.tensor:dtype() ~= 'float32' then error('weight ' .. w.path .. ' is ' .. w.tensor:dtype(), 0) end
  end
end

-- The whole data path: train.fit on JPEGs (decoded and augmented by the loader's worker threads,
-- uploaded asynchronously) at the resolution of the model benchmark, pinned and pageable batches.
-- img/s of the epochs after the first (cuDNN's engine timing runs in the first) against the
-- synthetic-batch step above shows how much of the input pipeline the overlap hides.
local function child_fit(batch)
  local data, train, models, optim = require 'flower.data', require 'flower.train', require 'flower.models',
                                     require 'flower.optim'
  local root = (os.getenv('TMPDIR') or '/tmp') .. '/flowerlua-gpu-fit'
  if not io.open(root .. '/train.json') then
    require('flower.recipe').run_script('make_flowers.lua', {'--out', root, '--classes', '8', '--train-per-class',
      tostring(2 * batch), '--test', '0', '--min-size', '320x240', '--max-size', '400x300', '--workers', '16', '--quiet'})
  end
  local ds = data.kaggle(root)
  local workers = tonumber(os.getenv('FLOWER_BENCH_WORKERS')) or 12
  for _, pin in ipairs {true, false} do
    local m = models.resnet50{include_top = true, classes = 8, classifier_activation = false,
                              input_shape = {224, 224, 3}, preprocess = false}
    local loader = data.Loader{ds, batch_size = batch, shuffle = true, seed = 1, workers = workers,
                               transform = 'train', size = 224, pin_memory = pin}
    local h = train.fit(m, {train = loader, optimizer = optim.SGD{lr = 0.01, momentum = 0.9}, epochs = 4,
                            device = 'cuda', log = function() end, progress = false, save_best = false})
    loader:close()
    local sum, n = 0, 0
    for i = 2, #h.rows do sum = sum + h.rows[i].images_per_s; n = n + 1 end
    result(pin and 'fit_pinned_img_s' or 'fit_pageable_img_s', sum / n)
    m = nil
    collectgarbage(); collectgarbage()
    cuda.empty_cache()
  end
end

if arg[1] == '--dry' then
  sync = function() end
  print('# --dry: the model part on the CPU, batch 2, 64x64, 1 step (checks the code path; no timings to read)')
  child_model(2, 1, true)
  return
end

if arg[1] == '--child' then
  if not cuda.available() then error('gpu bench: no CUDA device: ' .. cuda.unavailable_reason()) end
  local batch, steps = tonumber(arg[3]) or 128, tonumber(arg[4]) or 20
  cuda.benchmark(true)          -- like torch.backends.cudnn.benchmark = True in the peer
  cuda.allow_tf32(true)
  print('# ' .. cuda.device_name())
  if arg[2] == 'kernels' then child_kernels(batch)
  elseif arg[2] == 'fit' then child_fit(batch)
  else child_model(batch, steps) end
  return
end

-------------------------------------------------------------------------------- the parent

local batch, steps = tonumber(arg[1]) or 128, tonumber(arg[2]) or 20
if not cuda.available() then
  print('gpu bench: SKIP no CUDA device (' .. cuda.unavailable_reason() .. ')')
  return
end
local exe = arg[-1] or 'flowerlua'
local python = os.getenv('FLOWER_PYTHON') or 'python3'
local script = arg[0]
local limit = tonumber(os.getenv('FLOWER_BENCH_TIMEOUT')) or 300   -- seconds per part
local peer = script:gsub('gpu%.lua$', 'gpu_torch.py')

-- runs cmd, echoing its output; returns {key = value} from RESULT lines and a failure note or nil
local function run(label, cmd)
  print(('## %s: %s'):format(label, cmd))
  local p = io.popen(cmd .. ' 2>&1')
  local r, last = {}, {}
  for line in p:lines() do
    local k, v = line:match('^RESULT (%S+) (%S+)$')
    if k then r[k] = tonumber(v) else print('   ' .. line) end
    last[#last + 1] = line
    if #last > 3 then table.remove(last, 1) end
  end
  local ok, _, code = p:close()
  local note = nil
  if not ok then note = ('exit %s: %s'):format(tostring(code), (last[#last] or ''):sub(1, 160)) end
  return r, note
end

local ours, notes = {}, {}
for _, part in ipairs {'kernels', 'model', 'fit'} do
  local r, note = run('flowerlua ' .. part, ('timeout %d %s %s --child %s %d %d'):format(limit, exe, script, part, batch, steps))
  for k, v in pairs(r) do ours[k] = v end
  if note then notes[#notes + 1] = 'flowerlua ' .. part .. ': ' .. note end
end
local theirs, tnote = run('pytorch', ('timeout %d %s %s %d %d'):format(limit, python, peer, batch, steps))
if tnote then notes[#notes + 1] = 'pytorch: ' .. tnote end

local rows = {
  {'train_fp32_img_s', 'ResNet50 train img/s, fp32/TF32', true},
  {'train_bf16_img_s', 'ResNet50 train img/s, bf16 mixed', true},
  {'infer_fp32_img_s', 'ResNet50 inference img/s, fp32/TF32', true},
  {'infer_bf16_img_s', 'ResNet50 inference img/s, bf16', true},
  {'train_fp32_peak_alloc_mib', 'peak allocated MiB, fp32 train', false},
  {'train_fp32_peak_reserved_mib', 'peak reserved MiB, fp32 train', false},
  {'train_bf16_peak_alloc_mib', 'peak allocated MiB, bf16 train', false},
  {'train_bf16_peak_reserved_mib', 'peak reserved MiB, bf16 train', false},
  {'fit_pinned_img_s', 'train.fit on JPEGs img/s, pinned', true},
  {'fit_pageable_img_s', 'train.fit on JPEGs img/s, pageable', true},
  {'sgemm_fp32_tflops', 'sgemm 8192 TFLOP/s, fp32', true},
  {'sgemm_tf32_tflops', 'sgemm 8192 TFLOP/s, TF32', true},
  {'conv3x3_fwd_ms', ('conv 3x3 64->64 %dx56x56 fwd ms'):format(batch), false},
  {'conv3x3_bwd_data_ms', 'conv 3x3 backward data ms', false},
  {'conv3x3_bwd_filter_ms', 'conv 3x3 backward filter ms', false},
}
local function fmt(v) return v and string.format('%.4g', v) or 'n/a' end
print()
print(('GPU benchmark, batch %d, %d timed steps'):format(batch, steps))
print(('| %-38s | %10s | %10s | %-22s |'):format('metric', 'flowerlua', 'PyTorch', 'ratio (flowerlua/torch)'))
print(('|%s|%s|%s|%s|'):format(('-'):rep(40), ('-'):rep(12), ('-'):rep(12), ('-'):rep(24)))
for _, row in ipairs(rows) do
  local a, b = ours[row[1]], theirs[row[1]]
  local ratio = (a and b and b > 0) and string.format('%.2fx (%s better)', a / b, row[3] and 'higher' or 'lower') or 'n/a'
  print(('| %-38s | %10s | %10s | %-22s |'):format(row[2], fmt(a), fmt(b), ratio))
end
for _, n in ipairs(notes) do print('note: ' .. n) end
