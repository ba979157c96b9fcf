-- The CUDA backend from Lua: what is particular to it (the caching allocator, out-of-memory
-- handling, streams and asynchronous uploads, fused multi-tensor optimizer steps, the TF32 setting,
-- errors), the tensor methods, and a model and a training run on the GPU against the CPU.
-- Every op and nn kernel against the CPU's, per dtype, is tests/c/test_backend_ops.c (for every
-- registered backend). Runs in every build. Without a device (CPU-only build, or no GPU/driver) it
-- checks that the API says so clearly, and prints one `ok - <group> # SKIP no CUDA device (...)` line
-- per GPU group: those groups did not run. Tolerances: float32 within 1e-4 relative of the CPU's,
-- TF32 within 1e-2 (10-bit mantissa inputs), integer results and copies exactly equal.
local flower = require 'flower'
local T = require 'flower.test'
local cuda = flower.cuda
local nn = flower._nn

-- ---------------------------------------------------------------- both builds, no device needed

T.test('cuda api is present', function()
  for _, k in ipairs {'built', 'available', 'unavailable_reason', 'device_count', 'empty_cache', 'memory_stats',
                      'device_name', 'synchronize', 'allow_tf32', 'benchmark', 'deterministic', 'conv_stats',
                      'adam_step', 'sgd_step', 'reset_peak_memory_stats'} do
    T.eq(type(cuda[k]), 'function', 'flower.cuda.' .. k)
  end
  T.eq(type(cuda.built()), 'boolean')
  T.eq(math.type(cuda.device_count()), 'integer')
  T.eq(cuda.available(), cuda.built() and cuda.device_count() > 0)
end)

T.test('cpu tensors: cpu() is the identity, is_cuda false', function()
  local t = flower.tensor({1, 2, 3})
  T.check(rawequal(t:cpu(), t), 't:cpu() of a cpu tensor is the tensor itself')
  T.eq(t:is_cuda(), false)
  T.eq(t:get_device(), -1)
  T.eq(t:device(), 'cpu')
end)

if not cuda.available() then
  T.test('without a device, cuda functions fail with the reason', function()
    local reason = cuda.unavailable_reason()
    T.eq(type(reason), 'string')
    T.check(#reason > 10, 'reason is explained: ' .. reason)
    local t = flower.tensor({1, 2, 3})
    T.raises(function() return t:cuda() end, reason)
    T.raises(function() return cuda.memory_stats() end, 'cuda.memory_stats')
    T.raises(function() return cuda.synchronize() end, 'cuda.synchronize')
    cuda.empty_cache()   -- nothing cached: a no-op, not an error
  end)
end

-- ---------------------------------------------------------------- GPU groups

local groups = {}
local function gpu(name, fn) groups[#groups + 1] = {name, fn} end

local FLOATS = {'float32', 'float64'}
local function is_float(dt) return dt == 'float32' or dt == 'float64' end

-- GPU result (copied back) against the CPU's
local function same(g, c, rtol, atol, msg)
  T.check(g:is_cuda(), (msg or '') .. ': result is not on the GPU')
  local h = g:cpu()
  T.eq(h:dtype(), c:dtype(), msg)
  if not is_float(c:dtype()) then
    T.eq(table.concat(h:size(), 'x'), table.concat(c:size(), 'x'), msg)
    T.check(h:equal(c), (msg or '') .. ': integer results differ')
  else
    T.allclose(h, c, rtol or 1e-5, atol or 1e-6, msg)
  end
end

gpu('cuda tensor methods: cuda(), to(), cpu(), is_cuda, get_device, device', function()
  local t = flower.randn(3, 4)
  local g = t:cuda()
  T.eq(g:is_cuda(), true)
  T.eq(g:get_device(), 0)
  T.eq(g:device(), 'cuda')
  T.check(rawequal(g:cuda(), g), 'cuda() of a cuda tensor is itself')
  T.check(rawequal(g:to('cuda:0'), g), "to('cuda:0') of a tensor there is itself")
  T.check(t:to('cuda'):cpu():equal(t), "to('cuda') and back")
  T.check(g:to('cpu'):equal(t), "to('cpu')")
  T.raises(function() return t:to('cuda:' .. cuda.device_count()) end, 'CUDA device')
  local b = flower.randn(33, 17):bfloat16()                  -- plain bytes, asynchronously
  T.check(cuda.to_device_async(b):cpu():equal(b), 'to_device_async of bfloat16')
end)

-- The TF32 setting: off, float32 GEMMs and convolutions agree with the CPU to float32 precision (the
-- cross-backend test allows TF32's 1e-2); on, within TF32's.
gpu('cuda allow_tf32: float32 precision when off, TF32 when on (matmul, conv2d); cuDNN plan cache', function()
  local old = cuda.allow_tf32(false)
  local a, b = flower.randn(130, 257), flower.randn(257, 65)
  local x, w = flower.randn(2, 9, 10, 4), flower.randn(3, 3, 4, 5)
  local win = nn.window(9, 10, 3, 3, 2, 2, 1, 1, 'same')
  same(a:cuda():matmul(b:cuda()), a:matmul(b), 1e-4, 1e-5, 'strict matmul')
  same(nn.conv2d(x:cuda(), w:cuda(), win), nn.conv2d(x, w, win), 1e-4, 1e-5, 'strict conv2d')
  cuda.allow_tf32(true)
  same(a:cuda():matmul(b:cuda()), a:matmul(b), 1e-2, 1e-2, 'tf32 matmul')
  same(nn.conv2d(x:cuda(), w:cuda(), win), nn.conv2d(x, w, win), 1e-2, 1e-2, 'tf32 conv2d')
  cuda.allow_tf32(old)
  local st = cuda.conv_stats()
  T.check(st.plans > 0, 'cuDNN plans were cached')
  T.check(math.type(st.max_workspace) == 'integer' and st.max_workspace >= 0, 'largest workspace in bytes')
  print(('# cuDNN plans %d, direct-kernel fallback calls %d, largest workspace %d bytes'):format(st.plans,
    st.fallback_calls, st.max_workspace))
end)

gpu('cuda fused Adam and SGD steps (Keras formulas, core/nn.h)', function()
  local shapes = {{3, 4}, {17}, {2, 3, 5}}
  for _, count in ipairs {3, 40} do                        -- 40 tensors: two launches of up to 32
    local w, g, m, v, gw, gg, gm, gv = {}, {}, {}, {}, {}, {}, {}, {}
    for i = 1, count do
      local s = shapes[(i - 1) % #shapes + 1]
      w[i], g[i] = flower.randn(s), flower.randn(s)
      m[i], v[i] = flower.randn(s) * 0.1, flower.rand(s) * 0.1
      gw[i], gg[i], gm[i], gv[i] = w[i]:cuda(), g[i]:cuda(), m[i]:cuda(), v[i]:cuda()
    end
    local lr, b1, b2, eps, t = 0.01, 0.9, 0.999, 1e-7, 3
    local alpha = lr * math.sqrt(1 - b2 ^ t) / (1 - b1 ^ t)
    cuda.adam_step(gw, gg, gm, gv, alpha, b1, b2, eps)
    for i = 1, count do   -- reference in float64
      local gd = g[i]:double()
      local md = m[i]:double() + (gd - m[i]:double()) * (1 - b1)
      local vd = v[i]:double() + (gd * gd - v[i]:double()) * (1 - b2)
      local wd = w[i]:double() - md * alpha / (vd:sqrt() + eps)
      T.allclose(gw[i]:cpu():double(), wd, 1e-5, 1e-7, 'adam w ' .. i)
      T.allclose(gm[i]:cpu():double(), md, 1e-5, 1e-7, 'adam m ' .. i)
      T.allclose(gv[i]:cpu():double(), vd, 1e-5, 1e-7, 'adam v ' .. i)
    end
    for _, nesterov in ipairs {false, true} do
      local q, b = {}, {}
      for i = 1, count do q[i] = w[i]:cuda(); b[i] = m[i]:cuda() end
      cuda.sgd_step(q, gg, b, 0.1, 0.9, nesterov)
      for i = 1, count do
        local gd = g[i]:double()
        local md = m[i]:double() * 0.9 - gd * 0.1
        local wd = w[i]:double() + (nesterov and (md * 0.9 - gd * 0.1) or md)
        T.allclose(q[i]:cpu():double(), wd, 1e-5, 1e-7, 'sgd w ' .. i)
        T.allclose(b[i]:cpu():double(), md, 1e-5, 1e-7, 'sgd m ' .. i)
      end
    end
    local q = {}
    for i = 1, count do q[i] = w[i]:cuda() end
    cuda.sgd_step(q, gg, nil, 0.5)
    for i = 1, count do T.allclose(q[i]:cpu():double(), w[i]:double() - g[i]:double() * 0.5, 1e-6, 1e-7, 'sgd') end
  end
  -- the per-tensor kernels through the front, when the nn binding exposes them: bit-identical to the CPU
  if nn.adam_step then
    local w, g, m, v = flower.randn(50), flower.randn(50), flower.randn(50), flower.rand(50)
    local gw, gm, gv = w:cuda(), m:cuda(), v:cuda()
    nn.adam_step(w, g, m, v, 0.01, 0.9, 0.999, 1e-7)
    nn.adam_step(gw, g:cuda(), gm, gv, 0.01, 0.9, 0.999, 1e-7)
    same(gw, w, 1e-6, 0, 'nn.adam_step'); same(gm, m, 1e-6, 0, 'nn.adam_step m')
  end
  local w1 = {flower.randn(3):cuda()}
  T.raises(function() cuda.adam_step(w1, w1, w1, {}, 1, 0.9, 0.999, 1e-7) end, 'v has 0 tensors')
  T.raises(function() cuda.adam_step({flower.randn(3)}, w1, w1, w1, 1, 0.9, 0.999, 1e-7) end, 'not a CUDA tensor')
  T.raises(function() cuda.sgd_step(w1, {flower.randn(4):cuda()}, nil, 1) end, 'gradient 1 has 4 elements')
end)

gpu('cuda caching allocator: reuse, statistics, empty_cache', function()
  collectgarbage(); collectgarbage()
  cuda.empty_cache()
  local s0 = cuda.memory_stats()
  for _, k in ipairs {'allocated', 'reserved', 'cached', 'peak_allocated', 'peak_reserved', 'device_free',
                      'device_total', 'num_alloc', 'num_cache_hits', 'num_cuda_malloc', 'live_blocks', 'segments',
                      'free_blocks', 'largest_free'} do
    T.eq(math.type(s0[k]), 'integer', k)
  end
  -- after empty_cache every segment still held has a live block in it
  T.check(s0.segments <= s0.live_blocks, 'only segments in use are kept')
  local MiB = 2 ^ 20
  local a = flower.empty(4096, 1024):cuda()                -- 16 MiB: above 10 MiB, a segment of its own
  local s1 = cuda.memory_stats()
  T.check(s1.allocated >= s0.allocated + 16 * MiB, 'allocated grows')
  T.eq(s1.live_blocks, s0.live_blocks + 1, 'one more block')
  a = nil
  collectgarbage(); collectgarbage()
  local s2 = cuda.memory_stats()
  T.check(s2.allocated < s1.allocated, 'freed tensors return their blocks')
  T.check(s2.reserved == s1.reserved, 'blocks are cached, not returned to the driver')
  local mallocs = s2.num_cuda_malloc
  for _ = 1, 20 do local t = flower.empty(4096, 1024):cuda(); t = nil; collectgarbage() end
  T.eq(cuda.memory_stats().num_cuda_malloc, mallocs, 'same-size allocations reuse the cached memory')
  -- a freed block serves smaller sizes too: two halves fit where the whole was
  local h1, h2 = flower.empty(2048, 1024):cuda(), flower.empty(2048, 1024):cuda()
  T.eq(cuda.memory_stats().num_cuda_malloc, mallocs, 'split: no new segment for the halves')
  h1, h2 = nil, nil
  collectgarbage(); collectgarbage()
  local s3 = cuda.memory_stats()
  cuda.empty_cache()
  local s4 = cuda.memory_stats()
  T.check(s4.reserved <= s3.reserved - 16 * MiB, 'empty_cache returns the wholly free segment')
  T.check(s4.segments <= s4.live_blocks, 'and every other wholly free one')
  if s4.live_blocks == 0 then T.eq(s4.cached, 0, 'nothing in use: nothing cached') end
  T.check(s4.peak_allocated >= s1.allocated, 'peak is kept')
end)

gpu('cuda out of memory: a clear error, and the process stays usable', function()
  local total = cuda.memory_stats().device_total
  local n = math.floor(total / 4 * 2)                     -- twice the device
  -- an expanded one-element view: the device allocation fails before any host staging is made
  local err = T.raises(function() return flower.zeros(1):expand(n):cuda() end, 'out of memory')
  print('# ' .. tostring(err):gsub('\n', ' '))
  T.check(tostring(err):find('free', 1, true), 'the message says how much is free')
  local t = flower.ones(1000):cuda()                       -- still usable
  same(t:sum(), flower.ones(1000):sum(), 0, 0, 'works after an OOM')
  T.check(cuda.memory_stats().num_oom >= 1, 'counted')
end)

gpu('cuda errors name the operation', function()
  local g, c = flower.ones(3):cuda(), flower.ones(3)
  T.raises(function() return g + c end, 'different devices')
  T.raises(function() return g:cuda(99) end, 'device 99 does not exist')
  T.raises(function() return nn.conv2d(flower.randn(1, 5, 5, 3):cuda(), flower.randn(3, 3, 4, 2):cuda(),
                                       nn.window(5, 5, 3, 3, 1, 1, 1, 1, 'same')) end, 'conv2d')
  local bad = flower.tensor({1, 7, 2}, 'int64')
  T.raises(function() nn.softmax_xent(flower.randn(3, 5):cuda(), bad:cuda(), 0, 1, false) end,
           'label 7 of row 2 is outside [0, 5)')
  cuda.synchronize()
end)

-- model:cuda(): a small net (Conv2D, BatchNormalization in training mode, ReLU, MaxPooling2D, Dropout
-- in inference mode, global pooling, Dense) trained one SGD+momentum step and one Adam step on the GPU
-- against the same net on the CPU. TF32 is switched off so float32 tolerances apply (1e-4 relative;
-- the Adam step's division by sqrt(v) makes the weights after it looser: 1e-3).
gpu('model:cuda(): forward, backward and optimizer steps equal the CPU model', function()
  local fnn, optim = require 'flower.nn', require 'flower.optim'
  local tf32 = cuda.allow_tf32()
  cuda.allow_tf32(false)
  local function make()
    flower.manual_seed(11)
    fnn.reset_names()
    -- every kind of layer the four ImageNet models use: a residual Add (+ReLU), a concatenation,
    -- depthwise and separable convolutions, a scaled residual, padding, both poolings, global pooling
    local x = fnn.Input{8, 8, 3}
    local y = fnn.Preprocess{mode = 'caffe'}(x)
    y = fnn.Conv2D{filters = 6, kernel_size = 3, padding = 'same', use_bias = false}(y)
    y = fnn.BatchNormalization{}(y)
    y = fnn.ReLU{}(y)
    local r = fnn.SeparableConv2D{filters = 6, kernel_size = 3, padding = 'same', use_bias = false}(y)
    r = fnn.BatchNormalization{}(r)
    y = fnn.ReLU{}(fnn.Add{}{y, r})
    local d = fnn.DepthwiseConv2D{kernel_size = 3, padding = 'same'}(y)
    y = fnn.Concatenate{}{y, d}
    y = fnn.MaxPooling2D{pool_size = 3, strides = 2, padding = 'same'}(y)
    y = fnn.ScaledAdd{scale = 0.2}{y, fnn.Conv2D{filters = 12, kernel_size = 1}(y)}
    y = fnn.ZeroPadding2D{padding = 1}(y)
    local g = fnn.GlobalAveragePooling2D{}(y)
    y = fnn.Conv2D{filters = 4, kernel_size = 3}(y)
    y = fnn.AveragePooling2D{pool_size = 2}(y)
    y = fnn.Flatten{}(y)
    y = fnn.Dropout{rate = 0.5}(fnn.Concatenate{}{y, g})
    return fnn.Model(x, fnn.Dense{units = 3}(y))
  end
  local mc, mg = make(), make()
  local wc, wg = mc:weights(), mg:weights()
  T.eq(#wc, #wg)
  for i = 1, #wc do T.check(wc[i].tensor:equal(wg[i].tensor), 'same initial ' .. wc[i].path) end
  T.check(rawequal(mg:cuda(), mg), 'model:cuda() returns the model')
  T.eq(mg:get_device(), 0)
  wg = mg:weights()
  for i = 1, #wg do T.check(wg[i].tensor:is_cuda(), wg[i].path .. ' is on the GPU') end
  flower.manual_seed(12)
  local xb = flower.rand(6, 8, 8, 3) * 255      -- raw pixels, as the loader hands them out
  local yb = flower.tensor({1, 2, 3, 3, 2, 1}, 'int64')
  local xg, yg = xb:cuda(), yb:cuda()
  local loss = fnn.CategoricalCrossentropy{from_logits = true}
  local function step(m, opt, x, y)
    m:training()
    m:layer('dropout').train = false               -- Dropout in inference mode: no random mask
    m:zero_grad()
    local o = m:forward(x)
    local l = loss:forward(o, y)
    local gx = m:backward(x, loss:backward(o, y))
    opt:step(m)
    return o, l, gx
  end
  local optc = {optim.SGD{lr = 0.05, momentum = 0.9}, optim.Adam{lr = 0.01}}
  local optg = {optim.SGD{lr = 0.05, momentum = 0.9}, optim.Adam{lr = 0.01}}
  for k = 1, 2 do
    local oc, lc, gxc = step(mc, optc[k], xb, yb)
    local og, lg, gxg = step(mg, optg[k], xg, yg)
    same(og, oc, 1e-4, 1e-5, 'step ' .. k .. ' logits')
    T.near(lg, lc, 1e-4, 1e-6, 'step ' .. k .. ' loss')
    if gxg then same(gxg, gxc, 1e-4, 1e-5, 'step ' .. k .. ' input gradient') end
    wc, wg = mc:weights(), mg:weights()
    for i = 1, #wc do
      -- weights after the step, BN moving statistics included
      same(wg[i].tensor, wc[i].tensor, k == 1 and 1e-4 or 1e-3, 1e-5, 'step ' .. k .. ' ' .. wc[i].path)
      local l, n = wc[i].layer, wc[i].name
      if l.grads[n] then
        same(mg:layer(l.name).grads[n], l.grads[n], 1e-4, 1e-5, 'step ' .. k .. ' gradient of ' .. wc[i].path)
      end
    end
    for path, sl in pairs(optg[k].slots) do
      for name, t in pairs(sl) do same(t, optc[k].slots[path][name], 1e-3, 1e-5, 'slot ' .. name .. ' of ' .. path) end
    end
  end
  -- inference (the fused Conv+BN+ReLU path)
  mc:evaluate(); mg:evaluate()
  same(mg:forward(xg), mc:forward(xb), 1e-4, 1e-5, 'inference logits')
  -- a checkpoint of the GPU model holds host data and loads into a CPU model, and back onto the GPU
  local dir = T.tmpdir()
  local p = dir .. '/gpu.ckpt'
  fnn.save_checkpoint(p, mg, {optimizer = optg[2]})
  local back = make()
  fnn.load_checkpoint(p, back, {optimizer = optim.Adam{lr = 0.01}})
  wg = mg:weights()
  local wb = back:weights()
  for i = 1, #wg do T.check(wb[i].tensor:equal(wg[i].tensor:cpu()), 'checkpoint ' .. wg[i].path) end
  local again = make():cuda()
  local opt3 = optim.Adam{lr = 0.01}
  fnn.load_checkpoint(p, again, {optimizer = opt3})
  local wa = again:weights()
  for i = 1, #wa do
    T.check(wa[i].tensor:is_cuda(), 'loaded ' .. wa[i].path .. ' stays on the GPU')
    T.check(wa[i].tensor:cpu():equal(wg[i].tensor:cpu()), 'loaded ' .. wa[i].path)
  end
  for _, sl in pairs(opt3.slots) do for _, t in pairs(sl) do T.check(t:is_cuda(), 'loaded slot on the GPU') end end
  -- and back to the host
  T.check(rawequal(mg:cpu(), mg), 'model:cpu() returns the model')
  for _, w in ipairs(mg:weights()) do T.check(not w.tensor:is_cuda(), w.path .. ' back on the host') end
  T.eq(mg:get_device(), -1)
  os.execute('rm -rf ' .. dir)
  cuda.allow_tf32(tf32)
end)

-- A small synthetic image set in the Kaggle layout, made once (in-process: no interpreter path needed).
local flowers_root
local function flowers()
  if not flowers_root then
    flowers_root = T.tmpdir() .. '/flowers'
    require('flower.recipe').run_script('make_flowers.lua', {'--out', flowers_root, '--classes', '3',
      '--train-per-class', '8', '--test', '0', '--seed', '5', '--min-size', '72x54', '--max-size', '96x72', '--quiet'})
  end
  return require('flower.data').kaggle(flowers_root)
end

-- train.fit on device = 'cuda' (model:cuda(), pinned batches uploaded with to_device_async, labels
-- with y:cuda()) against the same run on the CPU: the same seeds, batches and dropout streams, so the
-- loss curve agrees within 1e-3 relative with TF32 off (float32 summation order is the only
-- difference). The GPU run's checkpoint holds host data and loads into a CPU model.
gpu("train.fit{device = 'cuda'} follows the CPU run; its checkpoint loads on the host", function()
  local train, data, optim, nets = require 'flower.train', require 'flower.data', require 'flower.optim',
                                   require 'flower.smallnets'
  local tf32 = cuda.allow_tf32(false)
  local ds = flowers()
  local dir = T.tmpdir()
  local function run(device)
    require('flower.nn').reset_names()
    local m = nets.build('resnet_tiny', {classes = 3, input_size = 32, width = 4, dropout = 0.2, seed = 3})
    local pin = device == 'cuda'
    local tl = data.Loader{ds, batch_size = 8, shuffle = true, seed = 2, workers = 2, transform = 'train', size = 32,
                           pin_memory = pin}
    local vl = data.Loader{ds, batch_size = 10, workers = 2, transform = 'eval', size = 32, pin_memory = pin}
    T.eq(tl:pinned(), pin, 'loader pinned')
    local h = train.fit(m, {train = tl, valid = vl, optimizer = optim.Adam{lr = 3e-3}, epochs = 3, device = device,
                            log = function() end, progress = false, save_best = false,
                            checkpoint_dir = dir .. '/' .. device})
    local ev = train.evaluate(m, vl, {collect = true, softmax = true, progress = false})
    tl:close(); vl:close()
    return m, h, ev
  end
  local mc, hc, ec = run('cpu')
  local mg, hg, eg = run('cuda')
  T.eq(mc:get_device(), -1)
  T.eq(mg:get_device(), 0, 'the model stays on the GPU')
  T.eq(#hg.rows, #hc.rows)
  for i, r in ipairs(hc.rows) do
    T.near(hg.rows[i].loss, r.loss, 1e-3, 1e-6, 'epoch ' .. i .. ' loss')
    T.near(hg.rows[i].val_loss, r.val_loss, 1e-3, 1e-6, 'epoch ' .. i .. ' val_loss')
    T.eq(math.type(hg.rows[i].loss), 'float', 'losses come back as numbers')
  end
  -- evaluate's collected outputs come back to the host
  T.check(not eg.probs:is_cuda(), 'collected probabilities on the host')
  T.allclose(eg.probs, ec.probs, 1e-2, 1e-4, 'validation probabilities')
  -- weights after 3 epochs of Adam: close (differences compound over steps, hence the looser bound)
  local wc, wg = mc:weights(), mg:weights()
  for i = 1, #wc do
    T.check(wg[i].tensor:is_cuda(), wg[i].path .. ' on the GPU')
    T.allclose(wg[i].tensor:cpu(), wc[i].tensor, 2e-2, 2e-3, 'weight ' .. wc[i].path)
  end
  -- the GPU run's checkpoint (host data) loads into a host model: exactly the GPU weights
  require('flower.nn').reset_names()
  local back = nets.build('resnet_tiny', {classes = 3, input_size = 32, width = 4, dropout = 0.2, seed = 9})
  require('flower.nn').load_checkpoint(dir .. '/cuda/last.h5', back, {optimizer = optim.Adam{lr = 3e-3}})
  local wb = back:weights()
  for i = 1, #wb do
    T.check(not wb[i].tensor:is_cuda(), 'loaded on the host')
    T.check(wb[i].tensor:equal(wg[i].tensor:cpu()), 'checkpoint weight ' .. wb[i].path)
  end
  -- the ensemble's classifier on the GPU follows its CPU run too
  local ensemble = require 'flower.ensemble'
  flower.manual_seed(4)
  local x, y = flower.randn({64, 12}), flower.randint(1, 3, {64}, 'int64')
  local feats = {x = {train = x, valid = x:narrow(1, 1, 32)}, label = {train = y, valid = y:narrow(1, 1, 32)}, classes = 3}
  local c1 = ensemble.fit(feats, {epochs = 3, seed = 1, progress = false, device = 'cpu'})
  local c2 = ensemble.fit(feats, {epochs = 3, seed = 1, progress = false, device = 'cuda'})
  for i, r in ipairs(c1.history.rows) do T.near(c2.history.rows[i].loss, r.loss, 1e-3, 1e-6, 'ensemble loss ' .. i) end
  local p1, p2 = c1:predict(feats, 'valid'), c2:predict(feats, 'valid')
  T.check(not p2:is_cuda(), 'ensemble probabilities on the host')
  T.allclose(p2, p1, 1e-2, 1e-4, 'ensemble probabilities')
  cuda.allow_tf32(tf32)
end)

-- The data path: a pin_memory loader refills its page-locked buffers while their uploads may still
-- be in flight (host_wait must hold a buffer back until its copy is done), and the compute stream is
-- kept busy (big matmuls) so that the copy stream runs ahead and the landing ring's waits matter.
-- Every device batch must equal the host batch it came from.
gpu('to_device_async: many pinned batches in a row arrive intact while the loader refills them', function()
  local data = require 'flower.data'
  local ds = flowers()
  local big = flower.randn({2048, 2048}):cuda()
  for _, dt in ipairs {'uint8', 'float32'} do
    local l = data.Loader{ds, batch_size = 5, shuffle = true, seed = 1, workers = 3, prefetch = 2, transform = 'train',
                          size = 64, dtype = dt, pin_memory = true}
    T.check(l:pinned(), 'pinned loader')
    local devs, hosts = {}, {}
    for e = 1, 5 do
      for b in l:epoch(e) do
        T.check(b.x:is_pinned(), 'batch in page-locked memory')
        for _ = 1, 3 do big = big:matmul(big) * 1e-3 end   -- keep the compute stream busy
        local d = cuda.to_device_async(b.x)
        T.check(d:is_cuda() and d:dtype() == dt, 'a device tensor of the same dtype')
        hosts[#hosts + 1] = b.x:clone()
        devs[#devs + 1] = d
        b = nil
        collectgarbage()   -- the batch's buffer is free for the loader to refill at once
      end
    end
    T.check(#devs >= 20, 'enough batches: ' .. #devs)
    for i = 1, #devs do T.check(devs[i]:cpu():equal(hosts[i]), dt .. ' batch ' .. i .. ' arrived intact') end
    l:close()
  end
  -- kernels queued on an async result see the data (the compute stream waits for the copy)
  local h = flower.rand({256, 1024}):pin_memory()   -- positive: float32 sums stay accurate
  T.check(h:is_pinned())
  local s = 0
  for k = 1, 10 do
    local d = h:cuda{non_blocking = true}
    s = s + (d * k):sum():item()
  end
  T.near(s, h:double():sum():item() * 55, 1e-4, 1e-3, 'sums over async uploads')
  -- pageable and strided sources take the ordinary path and still arrive
  local p = flower.randn({33, 17})
  T.check(cuda.to_device_async(p):cpu():equal(p), 'pageable')
  T.check(cuda.to_device_async(p:t()):cpu():equal(p:t()), 'strided')
  T.check(cuda.to_device_async(flower.empty({0, 4})):numel() == 0, 'empty')
  local g = p:cuda()
  T.check(rawequal(cuda.to_device_async(g), g), 'already there: the tensor itself')
  -- the landing buffers go back with empty_cache
  cuda.synchronize()
  devs, hosts, big, g = nil, nil, nil, nil
  collectgarbage(); collectgarbage()
  cuda.empty_cache()
  local st = cuda.memory_stats()
  T.check(st.segments <= st.live_blocks, 'no wholly free segment left after empty_cache')
end)

-- ---------------------------------------------------------------- bfloat16

gpu('cuda bfloat16: device memory of a bfloat16 tensor is 2 bytes an element and is freed', function()
  collectgarbage(); collectgarbage()
  local s0 = cuda.memory_stats()
  local t = flower.zeros(1024, 1024, 'bfloat16'):cuda()   -- 2 MiB
  local s1 = cuda.memory_stats()
  T.check(s1.allocated >= s0.allocated + 2 * 2 ^ 20, 'allocated grows by 2 MiB')
  T.check(s1.allocated < s0.allocated + 4 * 2 ^ 20, 'not by float32 size')
  local f = t:float()                                       -- a converted copy: 4 MiB more
  T.check(cuda.memory_stats().allocated >= s1.allocated + 4 * 2 ^ 20, 'float32 copy')
  t, f = nil, nil
  collectgarbage(); collectgarbage()
  T.check(cuda.memory_stats().allocated <= s0.allocated, 'freed')
end)

-- FLOWER_GPU_LIST=1 prints the group names; FLOWER_GPU_GROUP=<name> runs that group alone
-- (tests/gpu/check.sh reruns each group in its own process after a crash, so that one sticky CUDA
-- error does not hide the state of the others).
if os.getenv('FLOWER_GPU_LIST') then
  for _, g in ipairs(groups) do print(g[1]) end
  os.exit(0)
end
local only = os.getenv('FLOWER_GPU_GROUP')
if cuda.available() then
  print('# ' .. cuda.device_name())
  for _, g in ipairs(groups) do
    if not only or g[1] == only then T.test(g[1], g[2]) end
  end
else
  local why = cuda.unavailable_reason():gsub('\n', ' ')
  for _, g in ipairs(groups) do print(('ok - %s # SKIP no CUDA device (%s)'):format(g[1], why)) end
end

T.done()
