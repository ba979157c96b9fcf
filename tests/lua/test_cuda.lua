-- The CUDA backend: every op on the GPU against the CPU backend on the same random inputs.
-- Runs in every build. Without a device (CPU-only build, or no GPU/driver) it checks that the API
-- says so clearly, and prints one `ok - <group> # SKIP no CUDA device (...)` line per GPU group:
-- those groups did not run. Tolerances: float32 results within 1e-4 relative of the CPU's (1e-5 for
-- element-wise ops); TF32 GEMMs and convolutions within 1e-2 (10-bit mantissa inputs); integer
-- results, copies, uniform and integer random draws exactly equal. bfloat16 groups (near the end)
-- compare with the CPU's bfloat16 kernels; their tolerances are documented there.
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
local ALL = {'float32', 'float64', 'int32', 'int64', 'uint8'}
local function is_float(dt) return dt == 'float32' or dt == 'float64' end

-- a random CPU tensor of dtype dt (integers in a small signed range, uint8 in 0..255)
local function rnd(dt, ...)
  local size = {...}
  if is_float(dt) then return flower.randn(size, dt) end
  if dt == 'uint8' then return flower.randint(0, 255, size, 'uint8') end
  return flower.randint(-50, 50, size, dt)
end

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

gpu('cuda round trip of every dtype, contiguous and strided', function()
  for _, dt in ipairs(ALL) do
    local t = rnd(dt, 3, 4, 5)
    local g = t:cuda()
    T.eq(g:is_cuda(), true)
    T.eq(g:get_device(), 0)
    T.eq(g:device(), 'cuda')
    T.check(rawequal(g:cuda(), g), 'cuda() of a cuda tensor is itself')
    T.check(g:cpu():equal(t), dt .. ': round trip')
    local tt = t:transpose(1, 3)                          -- strided host source
    T.check(tt:cuda():cpu():equal(tt), dt .. ': strided source')
    T.check(g:transpose(1, 3):cpu():equal(tt), dt .. ': strided device source')
    T.check(g:narrow(2, 2, 2):cpu():equal(t:narrow(2, 2, 2)), dt .. ': narrowed view')
    for _, dt2 in ipairs(ALL) do                          -- conversions on the device
      T.check(g:type(dt2):cpu():equal(t:type(dt2)), dt .. ' -> ' .. dt2)
    end
  end
  local e = flower.zeros(0, 3):cuda()                      -- empty tensors
  T.eq(e:cpu():numel(), 0)
end)

gpu('cuda copy into views and fill', function()
  local g = flower.zeros(4, 6):cuda()
  local src = flower.randn(4, 2)
  g:narrow(2, 3, 2):copy(src:cuda())
  local want = flower.zeros(4, 6)
  want:narrow(2, 3, 2):copy(src)
  same(g, want, 0, 0, 'copy into narrowed view')
  g:fill(2.5)
  same(g, flower.full({4, 6}, 2.5), 0, 0, 'fill')
  local gi = flower.zeros(5, 'int32'):cuda()
  gi:fill(3e10)                                            -- saturates like the CPU
  T.check(gi:cpu():equal(flower.zeros(5, 'int32'):fill(3e10)), 'saturating fill')
  g:zero()
  same(g, flower.zeros(4, 6), 0, 0, 'zero')
end)

gpu('cuda element-wise binary ops with broadcasting', function()
  for _, dt in ipairs(ALL) do
    local a, b = rnd(dt, 3, 1, 5), rnd(dt, 1, 4, 5)
    local ga, gb = a:cuda(), b:cuda()
    for _, op in ipairs {'add', 'sub', 'mul', 'maximum', 'minimum', 'eq', 'ne', 'lt', 'le', 'gt', 'ge'} do
      same(ga[op](ga, gb), a[op](a, b), 1e-6, 0, dt .. ' ' .. op)
    end
    if is_float(dt) then
      same(ga / gb, a / b, 1e-6, 0, dt .. ' div')
      same(ga:abs():pow(gb), a:abs():pow(b), 1e-5, 0, dt .. ' pow')
    end
    same(ga + 3, a + 3, 1e-6, 0, dt .. ' + scalar')
    same(ga:transpose(1, 3) * 2, a:transpose(1, 3) * 2, 1e-6, 0, dt .. ' strided * scalar')
  end
  -- NaN propagation of maximum/minimum
  local x = flower.tensor({1, 0 / 0, 3}); local y = flower.tensor({0 / 0, 2, 1})
  local gm = x:cuda():maximum(y:cuda()):cpu()
  T.check(gm[1] ~= gm[1] and gm[2] ~= gm[2] and gm[3] == 3, 'maximum propagates NaN')
end)

gpu('cuda element-wise unary ops', function()
  for _, dt in ipairs(ALL) do
    local a = rnd(dt, 6, 7)
    local g = a:cuda()
    for _, op in ipairs {'neg', 'abs', 'relu'} do same(g[op](g), a[op](a), 0, 0, dt .. ' ' .. op) end
    same(g:clamp(-3, 7), a:clamp(-3, 7), 0, 0, dt .. ' clamp')
    same(g:pow(2), a:pow(2), 1e-6, 0, dt .. ' pow 2')
    if is_float(dt) then
      for _, op in ipairs {'exp', 'tanh', 'sigmoid'} do same(g[op](g), a[op](a), 1e-5, 1e-7, dt .. ' ' .. op) end
      local p = a:abs() + 0.1
      same(p:cuda():log(), p:log(), 1e-5, 1e-7, dt .. ' log')
      same(p:cuda():sqrt(), p:sqrt(), 1e-6, 0, dt .. ' sqrt')
    end
    local c = g:clone(); c:add_(1)
    same(c, a + 1, 0, 0, dt .. ' in place')
  end
  local gi = flower.tensor({250, 3, 0}, 'uint8'):cuda()
  same(gi + 10, flower.tensor({250, 3, 0}, 'uint8') + 10, 0, 0, 'uint8 wraps')
end)

gpu('cuda where', function()
  local a, b = flower.randn(4, 5), flower.randn(4, 5)
  local m = a:gt(b)
  same(flower.where(m:cuda(), a:cuda(), b:cuda()), flower.where(m, a, b), 0, 0, 'where')
  same(flower.where(m:cuda(), a:cuda(), 0), flower.where(m, a, 0), 0, 0, 'where with a number')
end)

gpu('cuda reductions over everything and each dim', function()
  for _, dt in ipairs(ALL) do
    local a = rnd(dt, 4, 33, 7)
    local g = a:cuda()
    for _, op in ipairs {'sum', 'mean', 'max', 'min', 'argmax', 'argmin', 'var', 'std'} do
      same(g[op](g), a[op](a), 1e-6, 1e-6, dt .. ' ' .. op .. '()')
      for d = 1, 3 do
        same(g[op](g, d), a[op](a, d), 1e-6, 1e-6, dt .. ' ' .. op .. '(' .. d .. ')')
        same(g[op](g, d, true), a[op](a, d, true), 1e-6, 1e-6, dt .. ' ' .. op .. '(' .. d .. ', keepdim)')
      end
    end
    if dt ~= 'uint8' then
      local _, gi = g:max(2)
      local _, ci = a:max(2)
      same(gi, ci, 0, 0, dt .. ' max indices')
    end
  end
  local big = flower.randn(1000003)                       -- many blocks, a ragged tail
  same(big:cuda():sum(), big:sum(), 1e-6, 1e-6, 'large sum')
  same(big:cuda():var(), big:var(), 1e-6, 0, 'large var')
  same(big:cuda():argmax(), big:argmax(), 0, 0, 'large argmax')
  local wide = flower.randn(3, 5000)                      -- block-per-output path
  same(wide:cuda():sum(2), wide:sum(2), 1e-6, 1e-6, 'wide rows sum')
  same(wide:cuda():argmin(2), wide:argmin(2), 0, 0, 'wide rows argmin')
  local n = flower.tensor({{1, 0 / 0, 5}, {2, 9, 9}})   -- NaN wins, first occurrence wins
  same(n:cuda():argmax(2), n:argmax(2), 0, 0, 'argmax with NaN and ties')
  local ties = flower.tensor({3, 1, 3, 1})
  same(ties:cuda():argmax(), ties:argmax(), 0, 0, 'first maximum')
  same(ties:cuda():argmin(), ties:argmin(), 0, 0, 'first minimum')
end)

gpu('cuda matmul (cuBLAS), float32 without and with TF32, float64', function()
  local old = cuda.allow_tf32(false)
  local cases = {
    {{5, 7}, {7, 3}}, {{1, 64}, {64, 9}}, {{2, 5, 7}, {7, 3}}, {{2, 5, 7}, {2, 7, 3}},
    {{3, 1, 4, 6}, {2, 6, 5}}, {{7}, {7, 4}}, {{4, 7}, {7}}, {{130, 257}, {257, 65}},
  }
  for _, dt in ipairs(FLOATS) do
    for _, c in ipairs(cases) do
      local a, b = flower.randn(table.unpack(c[1])):type(dt), flower.randn(table.unpack(c[2])):type(dt)
      local name = dt .. ' ' .. table.concat(c[1], 'x') .. ' @ ' .. table.concat(c[2], 'x')
      same(a:cuda():matmul(b:cuda()), a:matmul(b), 1e-4, 1e-5, name)
    end
    local a, b = flower.randn(9, 6):type(dt), flower.randn(5, 9):type(dt)
    same(a:cuda():t():matmul(b:cuda():t()), a:t():matmul(b:t()), 1e-4, 1e-5, dt .. ' transposed operands')
    local out = flower.randn(6, 5):type(dt)
    local gout = out:cuda()
    nn.gemm(gout, a:cuda(), b:cuda(), true, true, 0.5, 2)
    nn.gemm(out, a, b, true, true, 0.5, 2)
    same(gout, out, 1e-4, 1e-5, dt .. ' gemm alpha/beta')
  end
  cuda.allow_tf32(true)
  local a, b = flower.randn(128, 256), flower.randn(256, 64)
  same(a:cuda():matmul(b:cuda()), a:matmul(b), 1e-2, 1e-2, 'tf32 matmul')
  cuda.allow_tf32(old)
end)

gpu('cuda softmax and logsoftmax', function()
  for _, dt in ipairs(FLOATS) do
    local a = flower.randn(3, 4, 300):type(dt) * 5
    for d = 1, 3 do
      same(a:cuda():softmax(d), a:softmax(d), 1e-5, 1e-7, dt .. ' softmax dim ' .. d)
      same(a:cuda():logsoftmax(d), a:logsoftmax(d), 1e-5, 1e-6, dt .. ' logsoftmax dim ' .. d)
    end
  end
end)

gpu('cuda random streams equal the CPU streams', function()
  for _, dt in ipairs(FLOATS) do
    flower.manual_seed(1234)
    local c = flower.empty(10007, dt):uniform_(-2, 3)
    flower.manual_seed(1234)
    local g = flower.empty(10007, dt):cuda():uniform_(-2, 3)
    T.check(g:cpu():equal(c), dt .. ': uniform bit-identical')
    flower.manual_seed(99)
    c = flower.empty(10007, dt):normal_(1, 2)
    flower.manual_seed(99)
    g = flower.empty(10007, dt):cuda():normal_(1, 2)
    -- device log/cos are within 1 ulp of glibc's: equal after rounding to float32, 1 ulp in float64
    T.allclose(g:cpu(), c, dt == 'float32' and 1e-7 or 1e-15, 0, dt .. ': normal')
  end
  local c = nn.rng_uniform(flower.empty(777), 42, 1000)
  local g = nn.rng_uniform(flower.empty(777):cuda(), 42, 1000)
  T.check(g:cpu():equal(c), 'rng_uniform at an offset')
end)

-- conv/pool cases: {N,H,W,C}, kernel {KH,KW,Cin,Cout}, strides, dilation, padding
local conv_cases = {
  {{2, 9, 9, 3}, {3, 3, 3, 8}, 1, 1, 'same'},
  {{2, 9, 10, 4}, {3, 3, 4, 5}, 2, 1, 'same'},     -- asymmetric padding (bottom/right)
  {{2, 8, 8, 6}, {1, 1, 6, 16}, 1, 1, 'valid'},
  {{1, 11, 11, 3}, {7, 7, 3, 4}, 2, 1, 'valid'},
  {{2, 10, 10, 4}, {3, 3, 4, 4}, 1, 2, 'same'},    -- dilation
  {{2, 8, 8, 5}, {2, 2, 5, 3}, 2, 1, 'same'},
}

local function window(xs, ks, s, d, pad)
  local win = nn.window(xs[2], xs[3], ks[1], ks[2], s, s, d, d, pad)
  return win
end

gpu('cuda conv2d forward/backward (cuDNN) against the CPU', function()
  local old = cuda.allow_tf32(false)
  for i, c in ipairs(conv_cases) do
    for _, dt in ipairs(FLOATS) do
      local x, w = flower.randn(table.unpack(c[1])):type(dt), flower.randn(table.unpack(c[2])):type(dt)
      local win = window(c[1], c[2], c[3], c[4], c[5])
      local name = ('%s case %d'):format(dt, i)
      local y = nn.conv2d(x, w, win)
      local gy_ = nn.conv2d(x:cuda(), w:cuda(), win)
      same(gy_, y, 1e-4, 1e-5, name .. ' forward')
      local F = c[2][4]
      local scale, shift = flower.randn(F):type(dt), flower.randn(F):type(dt)
      same(nn.conv2d(x:cuda(), w:cuda(), win, scale:cuda(), shift:cuda(), true),
           nn.conv2d(x, w, win, scale, shift, true), 1e-4, 1e-5, name .. ' forward + scale/shift/relu')
      local gy = flower.randn(table.unpack(y:size())):type(dt)
      same(nn.conv2d_backward_data(gy:cuda(), w:cuda(), x:size(), win), nn.conv2d_backward_data(gy, w, x:size(), win),
           1e-4, 1e-5, name .. ' backward data')
      local gw, gb = flower.randn(table.unpack(c[2])):type(dt), flower.randn(F):type(dt)
      local ggw, ggb = gw:cuda(), gb:cuda()
      nn.conv2d_backward_filter(x, gy, win, gw, gb, 0.5)
      nn.conv2d_backward_filter(x:cuda(), gy:cuda(), win, ggw, ggb, 0.5)
      same(ggw, gw, 1e-4, 1e-4, name .. ' backward filter (accumulating)')
      same(ggb, gb, 1e-4, 1e-4, name .. ' bias gradient')
    end
  end
  cuda.allow_tf32(true)
  local c = conv_cases[1]
  local x, w = flower.randn(table.unpack(c[1])), flower.randn(table.unpack(c[2]))
  local win = window(c[1], c[2], c[3], c[4], c[5])
  same(nn.conv2d(x:cuda(), w:cuda(), win), nn.conv2d(x, w, win), 1e-2, 1e-2, 'tf32 forward')
  cuda.allow_tf32(old)
  local st = cuda.conv_stats()
  T.check(st.plans > 0, 'cuDNN plans were cached')
  T.check(math.type(st.max_workspace) == 'integer' and st.max_workspace >= 0, 'largest workspace in bytes')
  print(('# cuDNN plans %d, direct-kernel fallback calls %d, largest workspace %d bytes'):format(st.plans,
    st.fallback_calls, st.max_workspace))
end)

gpu('cuda depthwise forward/backward against the CPU', function()
  local old = cuda.allow_tf32(false)
  for i, c in ipairs {{{2, 9, 9, 4}, {3, 3, 4, 2}, 1, 'same'}, {{2, 10, 10, 3}, {3, 3, 3, 1}, 2, 'same'},
                      {{1, 7, 7, 5}, {5, 5, 5, 1}, 1, 'valid'}} do
    local x, w = flower.randn(table.unpack(c[1])), flower.randn(table.unpack(c[2]))
    local win = window(c[1], c[2], c[3], 1, c[4])
    local y = nn.depthwise(x, w, win)
    same(nn.depthwise(x:cuda(), w:cuda(), win), y, 1e-4, 1e-5, 'depthwise forward ' .. i)
    local gy = flower.randn(table.unpack(y:size()))
    same(nn.depthwise_backward_data(gy:cuda(), w:cuda(), x:size(), win),
         nn.depthwise_backward_data(gy, w, x:size(), win), 1e-4, 1e-5, 'depthwise backward data ' .. i)
    local gw = flower.zeros(table.unpack(c[2]))
    local ggw = gw:cuda()
    nn.depthwise_backward_filter(x, gy, win, gw)
    nn.depthwise_backward_filter(x:cuda(), gy:cuda(), win, ggw)
    same(ggw, gw, 1e-4, 1e-4, 'depthwise backward filter ' .. i)
  end
  cuda.allow_tf32(old)
end)

gpu('cuda pooling forward/backward against the CPU', function()
  for _, dt in ipairs(FLOATS) do
    for i, c in ipairs {{{2, 9, 9, 3}, 3, 2, 'same'}, {{2, 8, 8, 4}, 2, 2, 'valid'}, {{1, 7, 6, 2}, 3, 1, 'same'}} do
      local x = flower.randn(table.unpack(c[1])):type(dt)
      local win = nn.window(c[1][2], c[1][3], c[2], c[2], c[3], c[3], 1, 1, c[4])
      for _, kind in ipairs {'max', 'avg'} do
        local name = ('%s %s pool case %d'):format(dt, kind, i)
        local y = nn.pool2d(x, kind, win)
        same(nn.pool2d(x:cuda(), kind, win), y, 1e-6, 0, name)
        local gy = flower.randn(table.unpack(y:size())):type(dt)
        same(nn.pool2d_backward(gy:cuda(), x:cuda(), kind, win), nn.pool2d_backward(gy, x, kind, win), 1e-6, 1e-7,
             name .. ' backward')
      end
    end
  end
end)

gpu('cuda batch norm (train forward, fused ReLU, backward both modes) against the CPU', function()
  for _, dt in ipairs(FLOATS) do
    for _, relu in ipairs {false, true} do
      local x = (flower.randn(4, 5, 6, 7) * 3 + 1):type(dt)
      local gamma, beta = flower.randn(7):type(dt), flower.randn(7):type(dt)
      local rm, rv = flower.randn(7):type(dt), flower.rand(7):type(dt)
      local grm, grv = rm:cuda(), rv:cuda()
      local unbiased = not relu                               -- both settings of the running variance
      local name = ('%s bn (relu %s)'):format(dt, tostring(relu))
      local y, mean, inv = nn.batchnorm_train(x, gamma, beta, rm, rv, 0.9, 1e-3, unbiased, relu)
      local gy_, gmean, ginv = nn.batchnorm_train(x:cuda(), gamma:cuda(), beta:cuda(), grm, grv, 0.9, 1e-3, unbiased,
                                                  relu)
      same(gy_, y, 1e-4, 1e-5, name .. ' forward')
      same(gmean, mean, 1e-5, 1e-6, name .. ' mean')
      same(ginv, inv, 1e-5, 1e-6, name .. ' invstd')
      same(grm, rm, 1e-5, 1e-6, name .. ' running mean')
      same(grv, rv, 1e-5, 1e-6, name .. ' running var')
      local gy = flower.randn(4, 5, 6, 7):type(dt)
      local ry, gry = relu and y or nil, relu and gy_ or nil
      for _, training in ipairs {true, false} do
        local gg, gb = flower.randn(7):type(dt), flower.randn(7):type(dt)
        local ggg, ggb = gg:cuda(), gb:cuda()
        local gx = nn.batchnorm_backward(x, gy, mean, inv, gamma, training, gg, gb, 1, true, ry)
        local ggx = nn.batchnorm_backward(x:cuda(), gy:cuda(), gmean, ginv, gamma:cuda(), training, ggg, ggb, 1, true,
                                          gry)
        local bname = name .. (training and ' backward (training)' or ' backward (inference)')
        same(ggx, gx, 1e-4, 1e-5, bname .. ' gx')
        same(ggg, gg, 1e-4, 1e-5, bname .. ' ggamma')
        same(ggb, gb, 1e-4, 1e-5, bname .. ' gbeta')
      end
    end
  end
end)

gpu('cuda channel affine and activation gradients', function()
  for _, dt in ipairs(FLOATS) do
    local x = flower.randn(3, 4, 5):type(dt)
    local s, b = flower.randn(5):type(dt), flower.randn(5):type(dt)
    same(nn.channel_affine(x:cuda(), s:cuda(), b:cuda(), true), nn.channel_affine(x, s, b, true), 1e-6, 0, dt .. ' affine')
    local g = x:cuda()
    nn.channel_affine(g, nil, b:cuda(), false, g)
    same(g, nn.channel_affine(x, nil, b, false), 1e-6, 0, dt .. ' affine in place')
    local gy = flower.randn(3, 4, 5):type(dt)
    for _, act in ipairs {'relu', 'sigmoid', 'tanh', 'softmax'} do
      local y = act == 'relu' and x:relu() or act == 'sigmoid' and x:sigmoid() or act == 'tanh' and x:tanh()
                or x:softmax()
      same(nn.act_backward(act, gy:cuda(), y:cuda()), nn.act_backward(act, gy, y), 1e-5, 1e-7, dt .. ' ' .. act)
    end
  end
end)

gpu('cuda fused softmax cross-entropy', function()
  for _, dt in ipairs(FLOATS) do
    local z = (flower.randn(6, 1000) * 4):type(dt)
    for _, ldt in ipairs {'int32', 'int64'} do
      local lab = flower.randint(0, 999, 6, ldt)
      for _, sm in ipairs {0, 0.1} do
        local l, g = nn.softmax_xent(z, lab, sm, 1 / 6, true)
        local gl, gg = nn.softmax_xent(z:cuda(), lab:cuda(), sm, 1 / 6, true)
        same(gl, l, 1e-5, 1e-6, dt .. ' ' .. ldt .. ' loss, smoothing ' .. sm)
        same(gg, g, 1e-5, 1e-7, dt .. ' grad')
      end
    end
    local p = flower.rand(6, 1000):type(dt)
    p = p / p:sum(2, true)
    local l = nn.softmax_xent(z, p, 0, 1, false)
    same(nn.softmax_xent(z:cuda(), p:cuda(), 0, 1, false), l, 1e-5, 1e-6, dt .. ' probability targets')
  end
  local bad = flower.tensor({1, 7, 2}, 'int64')
  T.raises(function() nn.softmax_xent(flower.randn(3, 5):cuda(), bad:cuda(), 0, 1, false) end,
           'label 7 of row 2 is outside [0, 5)')
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

-- The GPU's bfloat16 kernels against the CPU's (core/cpu/bf16.c: float32 stand-ins, one rounding per
-- output) on the same bfloat16 inputs, made on the CPU. Tolerances (bfloat16 keeps 8 significant
-- bits: one rounding is within 2^-9 relative, two roundings of nearly equal float32 values land at
-- most one step, 2^-7 relative, apart):
--   bf_close: outputs rounded once from float32 values that agree to float32 precision (element-wise
--     ops, reductions accumulated in double, softmax, pooling, batch norm, the nn epilogues): every
--     element |gpu - cpu| <= k * 2^-7 * (|cpu| + mean|cpu|) (the mean term covers results near zero
--     after cancellation);
--   bf_sum: convolutions and matrix products, whose float sums run in another order (cuDNN/cuBLAS
--     against the CPU's GEMMs) and whose epilogue rounds twice on the GPU (conv, then scale/shift):
--     max|gpu - cpu| <= 2e-2 * max|cpu|;
--   float32 results (means, variances, statistics, bias and BN parameter gradients): allclose with
--     1e-5..1e-4 relative to the largest magnitude; conversions, copies, fills, max/min/arg*,
--     comparisons, where and uniform random draws: exactly equal.
local BF = 2 ^ -7
local function rb(...) return flower.randn(...):bfloat16() end

local function bf_check_dtype(g, c, msg)
  T.check(g:is_cuda(), (msg or '') .. ': result is not on the GPU')
  local h = g:cpu()
  T.eq(h:dtype(), c:dtype(), msg)
  T.eq(table.concat(h:size(), 'x'), table.concat(c:size(), 'x'), msg)
  return h
end

local function bf_close(g, c, msg, k)
  local h = bf_check_dtype(g, c, msg)
  if c:numel() == 0 then return end
  local hd, cd = h:double(), c:double()
  local mean = cd:abs():mean():item()
  local excess = ((hd - cd):abs() - (cd:abs() + mean) * (BF * (k or 1))):max():item()
  T.check(excess <= 0, ('%s: an element is %.3g beyond %g*(|cpu| + mean|cpu| = %.3g)'):format(msg, excess,
    BF * (k or 1), mean))
end

local function bf_sum(g, c, msg)
  local h = bf_check_dtype(g, c, msg)
  T.allclose(h, c, 2e-2, 0, msg)
end

-- exactly equal values, NaN equal to NaN (in any dtype; compared as float64, exact for all of ours)
local function bf_exact(g, c, msg)
  local h = bf_check_dtype(g, c, msg)
  local hd, cd = h:double(), c:double()
  local hn, cn = hd:ne(hd), cd:ne(cd)
  T.check(hn:equal(cn), (msg or '') .. ': NaN in different places')
  T.check(flower.where(hn, 0, hd):equal(flower.where(cn, 0, cd)), (msg or '') .. ': values differ')
end

gpu('cuda bfloat16: conversions to and from every dtype, copies and round trips', function()
  -- the rounding cases: ties to even (1 + 2^-8 -> 1, 1 + 3*2^-8 -> 1 + 2^-6), overflow to infinity,
  -- NaN, signed zero, subnormals
  local src = flower.tensor({1, 1 + 2 ^ -8, 1 + 3 * 2 ^ -8, -2.75, 257, 3.4e38, 1e39, -1 / 0, 0 / 0, -0.0, 1e-40})
  local want = src:bfloat16()
  local g = src:cuda():bfloat16()
  T.eq(g:dtype(), 'bfloat16')
  bf_exact(g, want, 'float32 -> bfloat16 on the device')
  local h = g:cpu()
  T.eq(h[2], 1, 'tie 1 + 2^-8 rounds to even (1)')
  T.eq(h[3], 1 + 2 ^ -6, 'tie 1 + 3*2^-8 rounds to even (1 + 2^-6)')
  T.eq(h[7], 1 / 0, 'overflow gives infinity')
  T.check(h[9] ~= h[9], 'NaN stays NaN')
  T.eq(1 / h[10], -1 / 0, 'negative zero keeps its sign')
  bf_exact(src:double():cuda():bfloat16(), src:double():bfloat16(), 'float64 -> bfloat16 (through float32)')
  bf_exact(want:cuda():float(), want:float(), 'bfloat16 -> float32 (exact)')
  bf_exact(want:cuda():double(), want:double(), 'bfloat16 -> float64 (exact)')
  -- plain bytes both ways, contiguous and strided, and on-device copies
  local b = rb(3, 4, 5)
  T.check(b:cuda():cpu():equal(b), 'host -> device -> host')
  local bt = b:transpose(1, 3)
  T.check(bt:cuda():cpu():equal(bt), 'strided host source')
  T.check(b:cuda():transpose(1, 3):cpu():equal(bt), 'strided device source')
  T.check(b:cuda():narrow(2, 2, 2):clone():cpu():equal(b:narrow(2, 2, 2)), 'narrowed device copy')
  -- every dtype <-> bfloat16 on the device, from contiguous and strided sources
  for _, dt in ipairs(ALL) do
    local t = rnd(dt, 3, 4, 5)
    if dt == 'int64' or dt == 'int32' then t = t * 1000003 end   -- beyond 8 significant bits: rounding
    bf_exact(t:cuda():bfloat16(), t:bfloat16(), dt .. ' -> bfloat16')
    bf_exact(t:cuda():transpose(1, 3):bfloat16(), t:transpose(1, 3):bfloat16(), dt .. ' -> bfloat16, strided')
    local tb = (is_float(dt) and t * 70 or t):bfloat16()
    bf_exact(tb:cuda():type(dt), tb:type(dt), 'bfloat16 -> ' .. dt)
    bf_exact(tb:cuda():transpose(1, 3):type(dt), tb:transpose(1, 3):type(dt), 'bfloat16 -> ' .. dt .. ', strided')
  end
  -- into integers: saturating, NaN to 0, as on the CPU
  local s = flower.tensor({3.5, -3.5, 1e10, -1e10, 0 / 0, 300, -5}):bfloat16()
  for _, dt in ipairs {'int32', 'int64', 'uint8'} do bf_exact(s:cuda():type(dt), s:type(dt), 'saturating ' .. dt) end
  -- copy into a bfloat16 view of a device tensor (converting strided kernel)
  local dst = flower.zeros(4, 6, 'bfloat16'):cuda()
  local f = flower.randn(2, 4)                              -- copied transposed: a strided source
  dst:narrow(2, 3, 2):copy(f:t():cuda())
  local want2 = flower.zeros(4, 6, 'bfloat16')
  want2:narrow(2, 3, 2):copy(f:t())
  bf_exact(dst, want2, 'float32 copied into a bfloat16 view')
  -- asynchronous upload: plain bytes
  local p = rb(33, 17)
  T.check(cuda.to_device_async(p):cpu():equal(p), 'to_device_async of bfloat16')
  T.eq(flower.zeros(0, 3, 'bfloat16'):cuda():cpu():numel(), 0, 'empty')
end)

gpu('cuda bfloat16: fill', function()
  local g = flower.zeros(4, 6, 'bfloat16'):cuda()
  for _, v in ipairs {2.5, 1 + 2 ^ -8, -1 / 0, 0 / 0, 1e39, 0} do
    g:fill(v)
    bf_exact(g, flower.zeros(4, 6, 'bfloat16'):fill(v), 'fill ' .. tostring(v))
  end
  local c = flower.zeros(4, 6, 'bfloat16')
  g:zero()
  g:narrow(2, 2, 3):fill(-3.3)                              -- a strided view: the fill kernel
  c:narrow(2, 2, 3):fill(-3.3)
  bf_exact(g, c, 'fill of a strided view')
end)

gpu('cuda bfloat16: element-wise binary ops with broadcasting, unary ops, where', function()
  local a, b = rb(3, 1, 5), rb(1, 4, 5)
  local ga, gb = a:cuda(), b:cuda()
  for _, op in ipairs {'add', 'sub', 'mul', 'maximum', 'minimum'} do
    bf_close(ga[op](ga, gb), a[op](a, b), 'binary ' .. op)
  end
  for _, op in ipairs {'eq', 'ne', 'lt', 'le', 'gt', 'ge'} do
    bf_exact(ga[op](ga, gb), a[op](a, b), 'compare ' .. op)
  end
  local den = b:abs() + 1
  bf_close(ga / den:cuda(), a / den, 'div')
  bf_close(ga:abs():pow(gb), a:abs():pow(b), 'pow')
  bf_close(ga + 3, a + 3, '+ scalar')
  bf_close(ga:transpose(1, 3) * 2.5, a:transpose(1, 3) * 2.5, 'strided * scalar')
  local x = flower.tensor({1, 0 / 0, 3}):bfloat16()
  local y = flower.tensor({0 / 0, 2, 1}):bfloat16()
  local gm = x:cuda():maximum(y:cuda()):cpu()
  T.check(gm[1] ~= gm[1] and gm[2] ~= gm[2] and gm[3] == 3, 'maximum propagates NaN')
  -- unary
  local u = rb(6, 7)
  local gu = u:cuda()
  for _, op in ipairs {'neg', 'abs', 'relu'} do bf_exact(gu[op](gu), u[op](u), op) end
  bf_exact(gu:clamp(-0.5, 0.5), u:clamp(-0.5, 0.5), 'clamp')
  for _, op in ipairs {'exp', 'tanh', 'sigmoid'} do bf_close(gu[op](gu), u[op](u), op) end
  bf_close(gu:pow(2), u:pow(2), 'pow 2')
  local p = u:abs() + 0.1
  bf_close(p:cuda():log(), p:log(), 'log')
  bf_close(p:cuda():sqrt(), p:sqrt(), 'sqrt')
  local c = gu:clone(); c:add_(1)
  bf_close(c, u + 1, 'in place')
  -- where
  local ae, be = a:expand(3, 4, 5), b:expand(3, 4, 5)
  local gae, gbe = ga:expand(3, 4, 5), gb:expand(3, 4, 5)
  local m = ae:gt(be)
  bf_exact(flower.where(m:cuda(), gae, gbe), flower.where(m, ae, be), 'where')
  bf_exact(flower.where(m:cuda(), gae, 0), flower.where(m, ae, 0), 'where with a number')
end)

gpu('cuda bfloat16: reductions (sum bfloat16, mean/var/std float32, max/min, arg*)', function()
  local a = rb(4, 33, 7)
  local g = a:cuda()
  local function each(op, check)
    check(g[op](g), a[op](a), op .. '()')
    for d = 1, 3 do
      check(g[op](g, d), a[op](a, d), op .. '(' .. d .. ')')
      check(g[op](g, d, true), a[op](a, d, true), op .. '(' .. d .. ', keepdim)')
    end
  end
  each('sum', bf_close)
  for _, op in ipairs {'mean', 'var', 'std'} do
    each(op, function(x, y, msg) T.eq(y:dtype(), 'float32', msg); same(x, y, 1e-5, 1e-6, msg) end)
  end
  -- bfloat16 has few distinct values: ties are common, and both sides take the first
  for _, op in ipairs {'max', 'min', 'argmax', 'argmin'} do each(op, bf_exact) end
  local _, gi = g:max(2)
  local _, ci = a:max(2)
  bf_exact(gi, ci, 'max indices')
  local big = rb(1000003)                                   -- many blocks, a ragged tail
  bf_close(big:cuda():sum(), big:sum(), 'large sum')
  same(big:cuda():var(), big:var(), 1e-5, 0, 'large var')
  bf_exact(big:cuda():argmax(), big:argmax(), 'large argmax')
  local wide = rb(3, 5000)                                  -- block-per-output path
  bf_close(wide:cuda():sum(2), wide:sum(2), 'wide rows sum')
  bf_exact(wide:cuda():argmin(2), wide:argmin(2), 'wide rows argmin')
  local n = flower.tensor({{1, 0 / 0, 5}, {2, 9, 9}}):bfloat16()
  bf_exact(n:cuda():argmax(2), n:argmax(2), 'argmax with NaN and ties')
end)

gpu('cuda bfloat16: softmax and logsoftmax', function()
  local a = (flower.randn(3, 4, 300) * 5):bfloat16()
  local g = a:cuda()
  for d = 1, 3 do
    bf_close(g:softmax(d), a:softmax(d), 'softmax dim ' .. d)
    bf_close(g:logsoftmax(d), a:logsoftmax(d), 'logsoftmax dim ' .. d)
  end
end)

gpu('cuda bfloat16: random streams equal the CPU bfloat16 streams', function()
  flower.manual_seed(1234)
  local c = flower.empty(10007, 'bfloat16'):uniform_(-2, 3)
  flower.manual_seed(1234)
  local g = flower.empty(10007, 'bfloat16'):cuda():uniform_(-2, 3)
  T.eq(g:dtype(), 'bfloat16')
  bf_exact(g, c, 'uniform: the float32 stream rounded, bit-identical')
  flower.manual_seed(99)
  c = flower.empty(10007, 'bfloat16'):normal_(1, 2)
  flower.manual_seed(99)
  g = flower.empty(10007, 'bfloat16'):cuda():normal_(1, 2)
  -- the float32 normal values agree (almost always bit for bit): at most one bfloat16 step apart
  bf_close(g, c, 'normal')
  local diff = (g:cpu():double() - c:double()):ne(0):double():sum():item()
  T.check(diff <= 2, 'normal: ' .. diff .. ' of 10007 values differ')
  bf_exact(nn.rng_uniform(flower.empty(777, 'bfloat16'):cuda(), 42, 1000),
           nn.rng_uniform(flower.empty(777, 'bfloat16'), 42, 1000), 'rng_uniform at an offset')
end)

gpu('cuda bfloat16: matmul (cuBLAS GemmEx) into bfloat16 and float32', function()
  local cases = {
    {{5, 7}, {7, 3}}, {{1, 64}, {64, 9}}, {{2, 5, 7}, {7, 3}}, {{2, 5, 7}, {2, 7, 3}},
    {{3, 1, 4, 6}, {2, 6, 5}}, {{7}, {7, 4}}, {{4, 7}, {7}}, {{130, 257}, {257, 65}},
  }
  for _, c in ipairs(cases) do
    local a, b = rb(table.unpack(c[1])), rb(table.unpack(c[2]))
    local name = table.concat(c[1], 'x') .. ' @ ' .. table.concat(c[2], 'x')
    local want = a:matmul(b)
    T.eq(want:dtype(), 'bfloat16')
    bf_sum(a:cuda():matmul(b:cuda()), want, name)
  end
  local a, b = rb(9, 6), rb(5, 9)
  bf_sum(a:cuda():t():matmul(b:cuda():t()), a:t():matmul(b:t()), 'transposed operands')
  -- bfloat16 x bfloat16 accumulated into float32 (mixed precision's master gradients): float32
  -- sums of exact products, tight
  for _, beta in ipairs {0, 2} do
    local out = flower.randn(6, 5)
    local gout = out:cuda()
    nn.gemm(gout, a:cuda(), b:cuda(), true, true, 0.5, beta)
    nn.gemm(out, a, b, true, true, 0.5, beta)
    T.eq(gout:dtype(), 'float32')
    same(gout, out, 1e-3, 1e-5, 'gemm bfloat16 -> float32, beta ' .. beta)
  end
  local x, g = rb(130, 257), rb(130, 65)
  local acc = flower.full({257, 65}, 0.25)
  local gacc = acc:cuda()
  nn.gemm(gacc, x:cuda(), g:cuda(), true, false, 1, 1)
  nn.gemm(acc, x, g, true, false, 1, 1)
  same(gacc, acc, 1e-3, 1e-5, 'gemm x^T g + acc into float32')
end)

gpu('cuda bfloat16: conv2d forward/backward (cuDNN) against the CPU', function()
  local fb0 = cuda.conv_stats().fallback_calls
  for i, c in ipairs(conv_cases) do
    local x, w = rb(table.unpack(c[1])), rb(table.unpack(c[2]))
    local win = window(c[1], c[2], c[3], c[4], c[5])
    local name = ('bfloat16 case %d'):format(i)
    local y = nn.conv2d(x, w, win)
    T.eq(y:dtype(), 'bfloat16')
    bf_sum(nn.conv2d(x:cuda(), w:cuda(), win), y, name .. ' forward')
    local F = c[2][4]
    local scale, shift = flower.randn(F), flower.randn(F)   -- float32 beside bfloat16 activations
    bf_sum(nn.conv2d(x:cuda(), w:cuda(), win, scale:cuda(), shift:cuda(), true),
           nn.conv2d(x, w, win, scale, shift, true), name .. ' forward + scale/shift/relu')
    local gy = rb(table.unpack(y:size()))
    bf_sum(nn.conv2d_backward_data(gy:cuda(), w:cuda(), x:size(), win), nn.conv2d_backward_data(gy, w, x:size(), win),
           name .. ' backward data')
    -- float32 master gradients, accumulated by the front (the kernel's contract: beta 0)
    local gw, gb = flower.randn(table.unpack(c[2])), flower.randn(F)
    local ggw, ggb = gw:cuda(), gb:cuda()
    nn.conv2d_backward_filter(x, gy, win, gw, gb, 0.5)
    nn.conv2d_backward_filter(x:cuda(), gy:cuda(), win, ggw, ggb, 0.5)
    T.eq(ggw:dtype(), 'float32')
    same(ggw, gw, 2e-2, 0, name .. ' backward filter (accumulated into float32)')
    same(ggb, gb, 1e-4, 1e-5, name .. ' bias gradient (float32 sum)')
  end
  print(('# bfloat16 convolutions: direct-kernel fallback calls %d'):format(cuda.conv_stats().fallback_calls - fb0))
end)

gpu('cuda bfloat16: depthwise forward/backward against the CPU', function()
  for i, c in ipairs {{{2, 9, 9, 4}, {3, 3, 4, 2}, 1, 'same'}, {{2, 10, 10, 3}, {3, 3, 3, 1}, 2, 'same'},
                      {{1, 7, 7, 5}, {5, 5, 5, 1}, 1, 'valid'}} do
    local x, w = rb(table.unpack(c[1])), rb(table.unpack(c[2]))
    local win = window(c[1], c[2], c[3], 1, c[4])
    local y = nn.depthwise(x, w, win)
    bf_sum(nn.depthwise(x:cuda(), w:cuda(), win), y, 'depthwise forward ' .. i)
    local F = c[2][3] * c[2][4]
    local shift = flower.randn(F)
    bf_sum(nn.depthwise(x:cuda(), w:cuda(), win, nil, shift:cuda(), true), nn.depthwise(x, w, win, nil, shift, true),
           'depthwise forward + bias/relu ' .. i)
    local gy = rb(table.unpack(y:size()))
    bf_sum(nn.depthwise_backward_data(gy:cuda(), w:cuda(), x:size(), win),
           nn.depthwise_backward_data(gy, w, x:size(), win), 'depthwise backward data ' .. i)
    local gw, gb = flower.zeros(table.unpack(c[2])), flower.zeros(F)
    local ggw, ggb = gw:cuda(), gb:cuda()
    nn.depthwise_backward_filter(x, gy, win, gw, gb)
    nn.depthwise_backward_filter(x:cuda(), gy:cuda(), win, ggw, ggb)
    same(ggw, gw, 2e-2, 0, 'depthwise backward filter ' .. i)
    same(ggb, gb, 1e-4, 1e-5, 'depthwise bias gradient ' .. i)
  end
end)

gpu('cuda bfloat16: pooling forward/backward against the CPU', function()
  for i, c in ipairs {{{2, 9, 9, 3}, 3, 2, 'same'}, {{2, 8, 8, 4}, 2, 2, 'valid'}, {{1, 7, 6, 2}, 3, 1, 'same'}} do
    local x = rb(table.unpack(c[1]))
    local win = nn.window(c[1][2], c[1][3], c[2], c[2], c[3], c[3], 1, 1, c[4])
    for _, kind in ipairs {'max', 'avg'} do
      local name = ('bfloat16 %s pool case %d'):format(kind, i)
      local y = nn.pool2d(x, kind, win)
      local gpy = nn.pool2d(x:cuda(), kind, win)
      if kind == 'max' then bf_exact(gpy, y, name) else bf_close(gpy, y, name) end
      local gy = rb(table.unpack(y:size()))
      -- max pooling routes to the first maximum (ties are common in bfloat16): the same on both
      bf_close(nn.pool2d_backward(gy:cuda(), x:cuda(), kind, win), nn.pool2d_backward(gy, x, kind, win),
               name .. ' backward')
      if kind == 'max' then
        local gy2, am = nn.pool2d(x:cuda(), kind, win, true)
        T.eq(am:dtype(), 'int32')
        bf_close(nn.pool2d_backward(gy:cuda(), x:size(), kind, win, am), nn.pool2d_backward(gy, x, kind, win),
                 name .. ' backward through argmax')
        gy2 = nil
      end
    end
  end
end)

gpu('cuda bfloat16: batch norm (float32 parameters and statistics) against the CPU', function()
  for _, relu in ipairs {false, true} do
    local x = (flower.randn(4, 5, 6, 7) * 3 + 1):bfloat16()
    local gamma, beta = flower.randn(7), flower.randn(7)
    local rm, rv = flower.randn(7), flower.rand(7)
    local grm, grv = rm:cuda(), rv:cuda()
    local unbiased = not relu
    local name = ('bfloat16 bn (relu %s)'):format(tostring(relu))
    local y, mean, inv = nn.batchnorm_train(x, gamma, beta, rm, rv, 0.9, 1e-3, unbiased, relu)
    local gy_, gmean, ginv = nn.batchnorm_train(x:cuda(), gamma:cuda(), beta:cuda(), grm, grv, 0.9, 1e-3, unbiased,
                                                relu)
    T.eq(gmean:dtype(), 'float32'); T.eq(ginv:dtype(), 'float32')
    bf_close(gy_, y, name .. ' forward')
    same(gmean, mean, 1e-5, 1e-6, name .. ' mean')
    same(ginv, inv, 1e-5, 1e-6, name .. ' invstd')
    same(grm, rm, 1e-5, 1e-6, name .. ' running mean')
    same(grv, rv, 1e-5, 1e-6, name .. ' running var')
    local gy = rb(4, 5, 6, 7)
    local ry, gry = relu and y or nil, relu and gy_ or nil
    for _, training in ipairs {true, false} do
      local gg, gb = flower.randn(7), flower.randn(7)
      local ggg, ggb = gg:cuda(), gb:cuda()
      local gx = nn.batchnorm_backward(x, gy, mean, inv, gamma, training, gg, gb, 1, true, ry)
      local ggx = nn.batchnorm_backward(x:cuda(), gy:cuda(), gmean, ginv, gamma:cuda(), training, ggg, ggb, 1, true,
                                        gry)
      local bname = name .. (training and ' backward (training)' or ' backward (inference)')
      -- gx = gy*a + x*b + k: the float32 coefficients may differ in their last bits
      bf_close(ggx, gx, bname .. ' gx', 2)
      same(ggg, gg, 1e-4, 1e-5, bname .. ' ggamma')
      same(ggb, gb, 1e-4, 1e-5, bname .. ' gbeta')
    end
  end
end)

gpu('cuda bfloat16: channel affine, activation gradients, add_act', function()
  local x = rb(3, 4, 5)
  local s, b = flower.randn(5), flower.randn(5)
  bf_close(nn.channel_affine(x:cuda(), s:cuda(), b:cuda(), true), nn.channel_affine(x, s, b, true), 'affine')
  local g = x:cuda()
  nn.channel_affine(g, nil, b:cuda(), false, g)
  bf_close(g, nn.channel_affine(x, nil, b, false), 'affine in place')
  local gy = rb(3, 4, 5)
  for _, act in ipairs {'relu', 'sigmoid', 'tanh', 'softmax'} do
    local y = act == 'relu' and x:relu() or act == 'sigmoid' and x:sigmoid() or act == 'tanh' and x:tanh()
              or x:softmax()
    T.eq(y:dtype(), 'bfloat16')
    bf_close(nn.act_backward(act, gy:cuda(), y:cuda()), nn.act_backward(act, gy, y), act .. ' backward')
  end
  local a, c = rb(2, 3, 3, 4), rb(2, 3, 3, 4)
  for _, relu in ipairs {false, true} do
    bf_close(nn.add_act(a:cuda(), c:cuda(), 0.17, relu), nn.add_act(a, c, 0.17, relu),
             'add_act relu ' .. tostring(relu))
  end
  local ga = a:cuda()
  nn.add_act(ga, c:cuda(), 1, true, ga)
  bf_close(ga, nn.add_act(a, c, 1, true), 'add_act in place')
end)

gpu('cuda bfloat16: losses and optimizers refuse it, naming the operation', function()
  local z = rb(4, 3):cuda()
  local err = T.raises(function() nn.softmax_xent(z, flower.tensor({0, 1, 2, 0}, 'int64'):cuda(), 0, 1, true) end,
                       'bfloat16')
  T.check(tostring(err):find('softmax', 1, true), 'the message names the loss: ' .. tostring(err))
  local w = rb(5):cuda()
  err = T.raises(function() nn.adam_step(w, w, w, w, 0.1, 0.9, 0.999, 1e-7) end, 'bfloat16')
  T.check(tostring(err):find('adam_step', 1, true), 'the message names adam_step: ' .. tostring(err))
  -- the fused multi-tensor steps check in the CUDA backend itself
  T.raises(function() cuda.adam_step({w}, {w}, {w}, {w}, 0.1, 0.9, 0.999, 1e-7) end, 'cuda adam_step: bfloat16')
  T.raises(function() cuda.sgd_step({w}, {w}, nil, 0.1) end, 'cuda sgd_step: bfloat16')
  cuda.synchronize()
end)

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
