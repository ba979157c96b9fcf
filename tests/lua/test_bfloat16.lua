-- bfloat16 on the CPU: conversions (round to nearest even), promotion, every op computed in float32
-- and rounded once (checked against float64 references on the same values), the mixed-precision nn
-- kernels (bfloat16 activations, float32 parameters and gradients) and their refusals.
-- The GPU's bfloat16 kernels are compared with these in tests/lua/test_cuda.lua.
local flower = require 'flower'
local nn = require 'flower.nn'
local T = require 'flower.test'
local C = nn.C

local ULP = 2 ^ -8   -- bfloat16 keeps 8 significant bits: one rounding is within 2^-9 relative

-- every element: |got - ref| <= rel*|ref| + atol (ref in float64, computed from the same bf16 values)
local function each_close(got, ref, rel, atol, msg)
  T.eq(table.concat(got:size(), 'x'), table.concat(ref:size(), 'x'), (msg or '') .. ' shape')
  local g, r = got:double(), ref:double()
  local excess = ((g - r):abs() - r:abs() * rel):max():item()
  if not (excess <= (atol or 0)) then
    error(string.format('%s: an element is %.3g beyond %g relative (+%g)', msg or 'values', excess, rel, atol or 0), 2)
  end
end

local function randn_bf16(...) return flower.randn(...):bfloat16() end

T.test('bfloat16: conversions round to nearest even and keep NaN and infinities', function()
  local src = flower.tensor({1, 1 + 2 ^ -8, 1 + 3 * 2 ^ -8, -2.75, 257, 3.4e38, 1e39, -1 / 0, 0 / 0, -0.0, 1e-40})
  local b = src:bfloat16()
  T.eq(b:dtype(), 'bfloat16')
  T.eq(b:type(), 'torch.BFloat16Tensor')
  local want = {1, 1, 1 + 2 ^ -6, -2.75, 256, 1 / 0, 1 / 0, -1 / 0}
  for i, v in ipairs(want) do T.eq(b[i], v, 'element ' .. i) end
  T.check(b[9] ~= b[9], 'NaN stays NaN')
  T.eq(1 / b[10], -1 / 0, 'negative zero keeps its sign')
  T.near(b[11], 1e-40, 0, 2 ^ -133, 'subnormals are kept (bfloat16 spacing there: 2^-133)')
  -- widening back is exact
  local back = b:float()
  for i = 1, 8 do T.eq(back[i], b[i]) end
  -- from and to integers: through float32, saturating into the integer range
  T.eq(flower.tensor({255, 256, 257}, 'int32'):bfloat16():totable()[3], 256)
  local ints = flower.tensor({3.5, -3.5, 1e10, 0 / 0}):bfloat16():int():totable()
  T.eq(ints[1], 3); T.eq(ints[2], -3); T.eq(ints[3], 2147483647); T.eq(ints[4], 0)
  T.eq(flower.tensor({300, -5}):bfloat16():byte():totable()[1], 255)
  -- strided sources and a transposed copy (the 2-byte tiled path)
  local m = flower.randn(40, 70)
  local mt = m:t():bfloat16():contiguous()
  T.allclose(mt:float(), m:t(), ULP, 0)
  T.eq(mt:float():t():contiguous():bfloat16():float():sub(mt:float():t()):abs():max():item(), 0)
end)

T.test('bfloat16: names, creation and promotion', function()
  T.eq(flower.zeros(2, 3, 'bfloat16'):dtype(), 'bfloat16')
  T.eq(flower.full({2}, 1.5, 'bfloat16')[2], 1.5)
  T.eq(flower.tensor({1, 2}):type('bfloat16'):dtype(), 'bfloat16')
  T.eq(flower.rand(3, 'bfloat16'):dtype(), 'bfloat16')
  local b = flower.ones(3):bfloat16()
  T.eq((b + flower.ones(3)):dtype(), 'float32', 'bfloat16 with float32 gives float32')
  T.eq((b + flower.ones(3, 'float64')):dtype(), 'float64')
  T.eq((b + flower.ones(3, 'int64')):dtype(), 'bfloat16', 'with integers it stays bfloat16')
  T.eq((b * 2):dtype(), 'bfloat16')
  T.eq((b:eq(b)):dtype(), 'uint8')
  T.eq(b:mean():dtype(), 'float32', 'means of bfloat16 are float32')
  T.eq(b:sum():dtype(), 'bfloat16')
  T.raises(function() flower.zeros(2, 'bfloat8') end, 'bfloat16')
  T.check(tostring(b):find('BFloat16Tensor', 1, true), 'printed with its type')
end)

T.test('bfloat16: element-wise ops, reductions and softmax are float32 results rounded once', function()
  local a, b = randn_bf16(6, 50), randn_bf16(6, 50)
  local ad, bd = a:double(), b:double()
  each_close(a + b, ad + bd, ULP, 0, 'add')
  each_close(a * b, ad * bd, ULP, 0, 'mul')
  local den = b:abs() + 1   -- itself rounded to bfloat16
  each_close(a / den, ad / den:double(), ULP, 0, 'div')
  each_close(a:exp(), ad:exp(), ULP, 0, 'exp')
  each_close(a:tanh(), ad:tanh(), ULP, 1e-7, 'tanh')
  each_close(a:sigmoid(), ad:sigmoid(), ULP, 1e-7, 'sigmoid')
  each_close(a:abs():sqrt(), ad:abs():sqrt(), ULP, 0, 'sqrt')
  each_close(a:clamp(-0.5, 0.5), ad:clamp(-0.5, 0.5), 0, 0, 'clamp')
  local row = randn_bf16(50)   -- broadcast over the rows
  each_close(a + row, ad + row:double(), ULP, 0, 'broadcast add')
  each_close(flower.where(a:gt(b), a, b), flower.where(ad:gt(bd), ad, bd), 0, 0, 'where')
  -- reductions accumulate in float32: the sum of 50 values is one rounding plus float32 error
  each_close(a:sum(2), ad:sum(2), ULP, 1e-5, 'sum')
  each_close(a:mean(2), ad:mean(2), 1e-6, 1e-6, 'mean (float32)')
  each_close(a:max(2), ad:max(2), 0, 0, 'max')
  T.eq((a:argmax(2) - ad:argmax(2)):abs():max():item(), 0, 'argmax')
  each_close(a:softmax(2), ad:softmax(2), ULP, 1e-7, 'softmax')
end)

T.test('bfloat16: matmul into bfloat16 or float32, gemm accumulating into float32', function()
  local a, b = randn_bf16(7, 33), randn_bf16(33, 5)
  local ref = a:double():matmul(b:double())
  local y = a:matmul(b)
  T.eq(y:dtype(), 'bfloat16')
  each_close(y, ref, ULP, 1e-5, 'matmul')
  local xb = randn_bf16(3, 7, 33)
  local yb = xb:matmul(b)
  T.eq(table.concat(yb:size(), 'x'), '3x7x5'); T.eq(yb:dtype(), 'bfloat16')
  each_close(yb, xb:double():matmul(b:double()), ULP, 1e-5, 'batched matmul, shared right operand')
  local out = flower.ones(33, 5)   -- float32 master gradient: out = x^T @ g + out
  C.gemm(out, randn_bf16(7, 33):double():bfloat16(), flower.zeros(7, 5, 'bfloat16'), true, false, 1, 1)
  T.allclose(out, flower.ones(33, 5), 0, 0, 'zero product leaves the accumulator')
  local x, g = randn_bf16(7, 33), randn_bf16(7, 5)
  local acc = flower.full({33, 5}, 0.25)
  C.gemm(acc, x, g, true, false, 1, 1)
  T.eq(acc:dtype(), 'float32')
  T.allclose(acc, x:double():t():matmul(g:double()) + 0.25, 1e-6, 1e-6, 'gemm bf16 x bf16 -> float32')
  T.raises(function() C.gemm(flower.zeros(33, 5, 'float64'), x, g, true, false, 1, 0) end, 'bfloat16')
end)

T.test('bfloat16: random numbers are the float32 stream rounded', function()
  flower.manual_seed(7)
  local f = flower.rand(1000)
  local n = flower.randn(1000)
  flower.manual_seed(7)
  local bf = flower.rand(1000, 'bfloat16')
  local bn = flower.randn(1000, 'bfloat16')
  T.eq((bf:float() - f:bfloat16():float()):abs():max():item(), 0)
  T.eq((bn:float() - n:bfloat16():float()):abs():max():item(), 0)
end)

-- ---------------------------------------------------------------- nn kernels

local function win_of(x, k, s, pad) return (C.window(x:size(2), x:size(3), k, k, s, s, 1, 1, pad)) end

T.test('bfloat16: convolutions take bfloat16 activations and kernels, float32 bias and gradients', function()
  local x, w = randn_bf16(2, 9, 9, 4), randn_bf16(3, 3, 4, 6)
  local bias = flower.randn(6)
  local win = win_of(x, 3, 2, 'same')
  local y = C.conv2d(x, w, win, nil, bias, true)
  T.eq(y:dtype(), 'bfloat16')
  local ref = C.conv2d(x:double(), w:double(), win, nil, bias:double(), true)
  each_close(y, ref, ULP, 1e-5, 'conv2d forward')
  local gy = randn_bf16(table.unpack(y:size()))
  each_close(C.conv2d_backward_data(gy, w, x:size(), win), C.conv2d_backward_data(gy:double(), w:double(), x:size(), win),
    ULP, 1e-5, 'conv2d backward data')
  -- the gradients go into float32 accumulators (beta 1 adds to what is there)
  local gw, gb = flower.full({3, 3, 4, 6}, 0.5), flower.full({6}, -1)
  C.conv2d_backward_filter(x, gy, win, gw, gb, 1)
  T.eq(gw:dtype(), 'float32')
  local rgw, rgb = flower.zeros(3, 3, 4, 6, 'float64'), flower.zeros(6, 'float64')
  C.conv2d_backward_filter(x:double(), gy:double(), win, rgw, rgb, 0)
  -- the kernel's weight gradient is rounded to bfloat16 once before it is added
  each_close(gw:double() - 0.5, rgw, ULP, 1e-5, 'conv2d backward filter (accumulated)')
  each_close(gb:double() + 1, rgb, 1e-6, 1e-5, 'bias gradient (float32 sum)')
  -- beta 0 overwrites whatever was there (the bias gradient then goes straight into gb)
  local gw0, gb0 = flower.full({3, 3, 4, 6}, 7), flower.full({6}, 7)
  C.conv2d_backward_filter(x, gy, win, gw0, gb0, 0)
  each_close(gw0, rgw, ULP, 1e-5, 'conv2d backward filter (overwritten)')
  each_close(gb0, rgb, 1e-6, 1e-5, 'bias gradient (overwritten)')
  -- depthwise
  local dw = randn_bf16(3, 3, 4, 2)
  local dbias = flower.randn(8)
  local yd = C.depthwise(x, dw, win, nil, dbias, false)
  each_close(yd, C.depthwise(x:double(), dw:double(), win, nil, dbias:double(), false), ULP, 1e-5, 'depthwise forward')
  local gyd = randn_bf16(table.unpack(yd:size()))
  local gdw = flower.zeros(3, 3, 4, 2)
  C.depthwise_backward_filter(x, gyd, win, gdw, nil, 0)
  local rdw = flower.zeros(3, 3, 4, 2, 'float64')
  C.depthwise_backward_filter(x:double(), gyd:double(), win, rdw, nil, 0)
  each_close(gdw, rdw, ULP, 1e-5, 'depthwise backward filter')
  each_close(C.depthwise_backward_data(gyd, dw, x:size(), win),
    C.depthwise_backward_data(gyd:double(), dw:double(), x:size(), win), ULP, 1e-5, 'depthwise backward data')
end)

T.test('bfloat16: batch normalisation keeps parameters and statistics in float32', function()
  local x = (randn_bf16(4, 5, 5, 3):float() * 3 + 1):bfloat16()
  local gamma, beta = flower.randn(3), flower.randn(3)
  local rm, rv = flower.zeros(3), flower.ones(3)
  local y, mean, invstd = C.batchnorm_train(x, gamma, beta, rm, rv, 0.9, 1e-3, true, true)
  T.eq(y:dtype(), 'bfloat16'); T.eq(mean:dtype(), 'float32'); T.eq(invstd:dtype(), 'float32')
  local rm64, rv64 = flower.zeros(3, 'float64'), flower.ones(3, 'float64')
  local yr, mr, ir = C.batchnorm_train(x:double(), gamma:double(), beta:double(), rm64, rv64, 0.9, 1e-3, true, true)
  each_close(y, yr, ULP, 1e-5, 'output (ReLU fused)')
  T.allclose(mean, mr, 1e-6, 1e-6, 'batch mean')
  T.allclose(invstd, ir, 1e-5, 1e-6, 'batch invstd')
  T.allclose(rm, rm64, 1e-6, 1e-6, 'moving mean'); T.allclose(rv, rv64, 1e-5, 1e-6, 'moving variance')
  local gy = randn_bf16(4, 5, 5, 3)
  local gg, gb = flower.zeros(3), flower.zeros(3)
  local gx = C.batchnorm_backward(x, gy, mean, invstd, gamma, true, gg, gb, 0, true, y)
  local gg64, gb64 = flower.zeros(3, 'float64'), flower.zeros(3, 'float64')
  local gxr = C.batchnorm_backward(x:double(), gy:double(), mr, ir, gamma:double(), true, gg64, gb64, 0, true, yr)
  T.eq(gx:dtype(), 'bfloat16'); T.eq(gg:dtype(), 'float32')
  T.allclose(gx, gxr, 2 * ULP, 1e-5, 'input gradient')
  T.allclose(gg, gg64, 1e-4, 1e-5, 'gamma gradient'); T.allclose(gb, gb64, 1e-4, 1e-5, 'beta gradient')
  -- inference form and the other element-wise nn kernels
  each_close(C.channel_affine(x, gamma, beta, true), C.channel_affine(x:double(), gamma:double(), beta:double(), true),
    ULP, 1e-6, 'channel affine')
  local a, b = randn_bf16(2, 3, 3, 4), randn_bf16(2, 3, 3, 4)
  each_close(C.add_act(a, b, 0.17, true), C.add_act(a:double(), b:double(), 0.17, true), ULP, 1e-6, 'add_act')
  local s = a:sigmoid()
  each_close(C.act_backward('sigmoid', b, s), C.act_backward('sigmoid', b:double(), s:double()), ULP, 1e-6, 'act_backward')
end)

T.test('bfloat16: pooling forward and backward', function()
  local x = randn_bf16(2, 7, 7, 3)
  local win = win_of(x, 3, 2, 'same')
  for _, kind in ipairs({'max', 'avg'}) do
    local y = C.pool2d(x, kind, win)
    each_close(y, C.pool2d(x:double(), kind, win), kind == 'max' and 0 or ULP, 1e-6, kind .. ' pool forward')
    local gy = randn_bf16(table.unpack(y:size()))
    local gx = C.pool2d_backward(gy, kind == 'max' and x or x:size(), kind, win)
    local ref = C.pool2d_backward(gy:double(), kind == 'max' and x:double() or x:size(), kind, win)
    each_close(gx, ref, ULP, 1e-6, kind .. ' pool backward')
  end
end)

T.test('bfloat16: losses, optimizers and HDF5 refuse it with a message naming the fix', function()
  local z = randn_bf16(4, 3)
  T.raises(function() C.softmax_xent(z, flower.tensor({0, 1, 2, 0}, 'int64'), 0, 1, true) end,
    'logits must be float32 or float64, got bfloat16')
  local w = randn_bf16(5)
  T.raises(function() C.adam_step(w, w, w, w, 0.1, 0.9, 0.999, 1e-7) end, 'weight must be float32 or float64')
  T.raises(function() C.sgd_step(flower.zeros(5), w, nil, 0.1, 0, false) end, 'gradient has dtype bfloat16')
  -- parameters of a bfloat16 input are float32
  T.raises(function() C.batchnorm_train(randn_bf16(2, 3), randn_bf16(3), nil, nil, nil, 0.9, 1e-3) end,
    'gamma has dtype bfloat16, expected float32 (parameters of a bfloat16 input are float32)')
  T.raises(function() C.channel_affine(randn_bf16(2, 3), flower.ones(3, 'float64'), nil, false) end,
    'expected float32')
  local x = randn_bf16(1, 4, 4, 2)
  local win = win_of(x, 3, 1, 'same')
  T.raises(function() C.conv2d_backward_filter(x, randn_bf16(1, 4, 4, 2), win, flower.zeros(3, 3, 2, 2, 'bfloat16')) end,
    'gradKernel has dtype bfloat16, expected float32')
  T.raises(function() C.conv2d(x, flower.zeros(3, 3, 2, 2), win) end, 'kernel has dtype float32, expected bfloat16')
  local dir = T.tmpdir()
  local h5 = require 'flower.h5'
  local f = h5.open(dir .. '/b.h5', 'w')
  T.raises(function() f:write('w', w) end, 'convert with :float()')
  f:write('w', w:float())
  f:close()
end)
