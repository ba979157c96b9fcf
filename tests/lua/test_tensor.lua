-- flower.Tensor from Lua: creation, dtypes, views sharing storage, indexing, broadcasting, math,
-- reductions, printing, memory (__gc/__close), the RNG, and every error path.
-- Numerical agreement with numpy is in test_tensor_numpy.lua.
local flower = require 'flower'
local T = require 'flower.test'

local function shape(t) return table.concat(t:size(), 'x') end
local DTYPES = { 'float32', 'float64', 'int32', 'int64', 'uint8' }

-- ---------------------------------------------------------------- creation

T.test('tensor from nested tables and back', function()
  local t = flower.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
  T.eq(shape(t), '2x3'); T.eq(t:dtype(), 'float32'); T.eq(t:dim(), 2); T.eq(t:numel(), 6); T.eq(#t, 2)
  local back = t:totable()
  T.eq(back[2][3], 6.0); T.eq(#back, 2); T.eq(#back[1], 3)
  T.eq(flower.tensor(3.5):dim(), 0)
  T.eq(flower.tensor(3.5):item(), 3.5)
  T.eq(shape(flower.tensor({})), '0')
  T.eq(flower.tensor({ true, false }, 'uint8'):totable()[1], 1)
  local c = flower.tensor(t, 'int32')             -- from a tensor: a converted copy
  T.eq(c:dtype(), 'int32'); T.eq(c[2][3], 6)
  T.eq(math.type(c[2][3]), 'integer')
end)

T.test('every dtype round-trips values', function()
  for _, dt in ipairs(DTYPES) do
    local t = flower.tensor({ { 1, 2 }, { 3, 250 } }, dt)
    T.eq(t:dtype(), dt)
    T.eq(t[2][2], 250, dt)
    T.eq(t:sum():item(), 256, dt)
    local z = flower.zeros(2, 2, dt)
    z:copy(t)
    T.check(z:equal(t), dt .. ' copy')
  end
  -- int64 beyond 2^53 stays exact
  local big = math.maxinteger - 5
  local t = flower.tensor({ big }, 'int64')
  T.eq(t[1], big)
  T.eq(flower.full({ 2 }, 0, 'int64'):fill(big)[2], big)
end)

T.test('zeros ones empty full with varargs or a table', function()
  T.eq(shape(flower.zeros(2, 3)), '2x3')
  T.eq(shape(flower.zeros({ 2, 3 })), '2x3')
  T.eq(flower.ones(2, 3, 'float64'):dtype(), 'float64')
  T.eq(flower.ones({ 4 }, 'int32'):sum():item(), 4)
  T.eq(flower.full({ 2, 2 }, 7):sum():item(), 28)
  T.eq(flower.full({ 2 }, 7, 'uint8'):dtype(), 'uint8')
  T.eq(shape(flower.empty(0, 5)), '0x5')
  T.eq(flower.zeros():dim(), 0)                     -- no size: a 0-d tensor
  local t = flower.zeros(1, 1, 1, 1, 1, 1, 1, 2)   -- 8 dims
  T.eq(t:dim(), 8)
end)

T.test('arange and linspace', function()
  T.eq(table.concat(flower.arange(5):totable(), ','), '0.0,1.0,2.0,3.0,4.0')
  T.eq(table.concat(flower.arange(2, 5, 'int64'):totable(), ','), '2,3,4')
  T.eq(table.concat(flower.arange(1, 2, 0.25, 'float64'):totable(), ','), '1.0,1.25,1.5,1.75')
  T.eq(flower.arange(5, 0, -2):numel(), 3)
  T.eq(flower.arange(3, 3):numel(), 0)
  local l = flower.linspace(0, 1, 5, 'float64'):totable()
  T.eq(l[1], 0.0); T.eq(l[3], 0.5); T.eq(l[5], 1.0)
  T.eq(flower.linspace(2, 3, 1):item(), 2.0)
end)

T.test('fromstring and tostring_raw', function()
  local s = string.pack('<i4i4i4i4i4i4', 1, 2, 3, 4, 5, 6)
  local t = flower.fromstring(s, 'int32', 2, 3)
  T.eq(shape(t), '2x3'); T.eq(t[2][1], 4)
  T.eq(t:t():tostring_raw(), string.pack('<i4i4i4i4i4i4', 1, 4, 2, 5, 3, 6))
  T.eq(shape(flower.fromstring(s, 'uint8')), '24')
  local f = flower.tensor({ 1.5, -2 }, 'float64')
  T.eq(flower.fromstring(f:tostring_raw(), 'float64'):equal(f), true)
end)

-- ---------------------------------------------------------------- dtypes

T.test('dtype conversions', function()
  local t = flower.tensor({ -1.7, 2.5, 300 })
  T.eq(t:int():dtype(), 'int32'); T.eq(t:int()[1], -1)
  T.eq(t:long()[3], 300)
  T.eq(t:byte()[1], 0)      -- float to uint8 saturates
  T.eq(t:byte()[3], 255)
  T.eq(t:double():dtype(), 'float64')
  T.eq(t:float(), t)         -- already float32: the tensor itself
  T.eq(t:type(), 'torch.FloatTensor')
  T.eq(t:type('int64'):dtype(), 'int64')
  T.eq(t:device(), 'cpu')
  T.eq(flower.tensor({ 0 / 0 }):int()[1], 0)   -- NaN to int is 0, not undefined
end)

T.test('type promotion', function()
  local i = flower.tensor({ 1, 2 }, 'int32')
  local f = flower.tensor({ 1, 2 })
  T.eq((i + f):dtype(), 'float32')
  T.eq((i + flower.tensor({ 1, 2 }, 'int64')):dtype(), 'int64')
  T.eq((f + f:double()):dtype(), 'float64')
  T.eq((i + 1):dtype(), 'int32')              -- integer number keeps the integer dtype
  T.eq((i + 0.5):dtype(), 'float32')          -- fractional number: float32
  T.eq((i / i):dtype(), 'float32')            -- true division
  T.eq((i / 2)[1], 0.5)
  T.eq(i:eq(1):dtype(), 'uint8')
  T.eq(i:sum():dtype(), 'int64')
  T.eq(i:mean():dtype(), 'float32')
  T.eq(i:exp():dtype(), 'float32')
  T.eq(i:pow(2):dtype(), 'int32')
  T.eq(i:pow(0.5):dtype(), 'float32')
  T.eq(flower.tensor({ 250 }, 'uint8'):add(10)[1], 4)   -- uint8 arithmetic wraps like numpy
end)

-- ---------------------------------------------------------------- views

T.test('views share storage', function()
  local t = flower.zeros(3, 4)
  local v = t:view(12)
  v[5] = 7
  T.eq(t[2][1], 7)
  local tr = t:t()
  T.eq(tr:is_contiguous(), false)
  tr[{ 4, 3 }] = 9
  T.eq(t[3][4], 9)
  local n = t:narrow(2, 2, 2)
  T.eq(shape(n), '3x2'); T.eq(n:storage_offset(), 2)
  n:fill(1)
  T.eq(t:sum():item(), 7 + 9 + 6)
  local s = t:select(1, 2)
  s:zero()
  T.eq(t[2][4], 0)
  local r = t:reshape(2, 6)
  r[1][1] = 5
  T.eq(t[1][1], 5)                      -- reshape of a contiguous tensor is a view
  local rt = t:t():reshape(12)          -- of a transposed one, a copy
  rt[1] = 100
  T.eq(t[1][1], 5)
end)

T.test('a view keeps its storage alive', function()
  local v
  do
    local t = flower.arange(10)
    v = t:narrow(1, 4, 3)
  end
  collectgarbage(); collectgarbage()
  T.eq(table.concat(v:totable(), ','), '3.0,4.0,5.0')
end)

T.test('view / reshape sizes', function()
  local t = flower.arange(24)
  T.eq(shape(t:view(2, 3, 4)), '2x3x4')
  T.eq(shape(t:view(-1, 4)), '6x4')
  T.eq(shape(t:view({ 4, -1 })), '4x6')
  T.eq(shape(t:view(2, 3, 4):transpose(1, 2):reshape(-1)), '24')
  -- splitting and merging dims of a non-contiguous view without copying
  local p = t:view(2, 3, 4):permute(2, 1, 3)      -- 3x2x4, last dim contiguous
  local q = p:view(3, 2, 2, 2)
  T.eq(q:storage_offset(), 1)
  q[{ 2, 1, 2, 1 }] = -1
  T.eq(t[4 + 2 + 1], -1)
  T.eq(t:view(1, 24):squeeze():dim(), 1)
  T.eq(shape(t:view(2, 12):unsqueeze(2)), '2x1x12')
  T.eq(shape(t:view(2, 12):unsqueeze(-1)), '2x12x1')
  T.eq(shape(t:view(2, 1, 12):squeeze(2)), '2x12')
  T.eq(shape(t:view(2, 12):squeeze(1)), '2x12')   -- size > 1: unchanged
end)

T.test('random views: reshape, ops and copies agree with contiguous copies', function()
  math.randomseed(7)
  for _ = 1, 200 do
    -- a random 4-d tensor, permuted and narrowed: an arbitrary strided view
    local sz = { math.random(1, 4), math.random(1, 4), math.random(1, 4), math.random(1, 4) }
    local base = flower.arange(sz[1] * sz[2] * sz[3] * sz[4]):view(sz)
    local perm = { 1, 2, 3, 4 }
    for i = 4, 2, -1 do local j = math.random(1, i); perm[i], perm[j] = perm[j], perm[i] end
    local v = base:permute(perm)
    local d = math.random(1, 4)
    if v:size(d) > 1 then v = v:narrow(d, 2, v:size(d) - 1) end
    local c = v:contiguous()
    T.check(v:equal(c), 'contiguous copy')
    -- reshape to the flat size and to a random factorisation; view where it works must agree
    local flat = v:reshape(-1)
    T.check(flat:equal(c:view(-1)), 'reshape -1')
    local ok, w = pcall(v.view, v, -1)
    if ok then T.check(w:equal(c:view(-1)), 'view -1') end
    local n = v:numel()
    local f = 1
    for k = 2, n do if n % k == 0 and math.random() < 0.5 then f = k; break end end
    local r = v:reshape(f, n // f)
    T.check(r:equal(c:view(f, n // f)), 'reshape f x n/f')
    ok, w = pcall(v.view, v, f, n // f)
    if ok then T.check(w:equal(r), 'view f x n/f') end
    -- element-wise ops and reductions on the strided view
    T.check((v * 2 + v):equal(c * 3), 'arith on views')
    T.eq(v:sum():item(), c:sum():item())
    local dd = math.random(1, 4)
    T.check(v:sum(dd):equal(c:sum(dd)), 'sum over dim ' .. dd)
    T.check(v:max(dd):equal(c:max(dd)), 'max over dim ' .. dd)
  end
end)

T.test('transpose permute expand contiguous clone', function()
  local t = flower.arange(6):view(2, 3)
  T.eq(shape(t:transpose(1, 2)), '3x2')
  T.eq(t:transpose(1, 2)[3][2], 5)
  T.eq(shape(flower.zeros(2, 3, 4):permute(3, 1, 2)), '4x2x3')
  T.eq(shape(flower.zeros(2, 3, 4):permute({ 3, 1, 2 })), '4x2x3')
  local e = flower.tensor({ 1, 2, 3 }):view(3, 1):expand(3, 4)
  T.eq(shape(e), '3x4'); T.eq(e:stride()[2], 0); T.eq(e[3][4], 3)
  T.eq(shape(flower.tensor({ 1, 2, 3 }):expand(2, 3)), '2x3')
  T.eq(shape(flower.tensor({ 1, 2, 3 }):view(3, 1):expand(-1, 2)), '3x2')
  local c = t:t():contiguous()
  T.eq(c:is_contiguous(), true); T.eq(c[1][2], 3)
  T.eq(t:contiguous(), t)
  local k = t:clone()
  k[1][1] = 50
  T.eq(t[1][1], 0)
end)

T.test('indexing and slicing', function()
  local t = flower.arange(12):view(3, 4)
  T.eq(t[2][3], 6)
  T.eq(t[-1][-1], 11)
  T.eq(t[{ 2, 3 }], 6)
  T.eq(shape(t[2]), '4')
  T.eq(shape(t[{ { 1, 2 } }]), '2x4')
  T.eq(shape(t[{ {}, 2 }]), '3')
  T.eq(shape(t[{ { 2, -1 }, { 2, 3 } }]), '2x2')
  T.eq(t[{ { 2, -1 }, { 2, 3 } }][2][1], 9)
  T.eq(shape(t[{ { 2 } }]), '1x4')
  T.eq(shape(t[{ { 3, 2 } }]), '0x4')   -- empty range
  t[1] = 5
  T.eq(t[1]:sum():item(), 20)
  t[{ {}, 1 }] = flower.tensor({ -1, -2, -3 })
  T.eq(t[3][1], -3)
  t[{ { 2, 3 }, { 3, 4 } }] = 0
  T.eq(t[2][3] + t[3][4], 0)
  t[{ 1, 2 }] = 42
  T.eq(t[1][2], 42)
  t[2] = flower.tensor({ 9 })                -- broadcast assignment
  T.eq(t[2]:sum():item(), 36)
  local v = flower.arange(4)
  v[2] = 10
  T.eq(v[2], 10)
  T.eq(t.nosuchmethod, nil)
end)

T.test('copy broadcasts, converts and handles overlap', function()
  local t = flower.zeros(2, 3)
  t:copy(flower.tensor({ 1, 2, 3 }, 'int64'))
  T.eq(t[2][3], 3)
  local sq = flower.arange(9):view(3, 3)
  sq:copy(sq:t())                          -- source overlaps destination
  T.eq(sq[1][2], 3); T.eq(sq[2][1], 1)
  local a = flower.arange(5)
  a:narrow(1, 2, 4):copy(a:narrow(1, 1, 4))  -- shifted overlap
  T.eq(table.concat(a:totable(), ','), '0.0,0.0,1.0,2.0,3.0')
end)

-- ---------------------------------------------------------------- math

T.test('operators with numbers on either side', function()
  local t = flower.tensor({ 1, 2, 4 })
  T.eq(table.concat((t + 1):totable(), ','), '2.0,3.0,5.0')
  T.eq(table.concat((1 + t):totable(), ','), '2.0,3.0,5.0')
  T.eq(table.concat((10 - t):totable(), ','), '9.0,8.0,6.0')
  T.eq(table.concat((t * 2):totable(), ','), '2.0,4.0,8.0')
  T.eq(table.concat((8 / t):totable(), ','), '8.0,4.0,2.0')
  T.eq(table.concat((-t):totable(), ','), '-1.0,-2.0,-4.0')
  T.eq(table.concat((t ^ 2):totable(), ','), '1.0,4.0,16.0')
  T.eq(table.concat((2 ^ t):totable(), ','), '2.0,4.0,16.0')
  T.check(t ~= t:clone(), '__eq is identity')
  T.check(t == t)
end)

T.test('broadcasting rules', function()
  local a = flower.ones(2, 1, 3)
  local b = flower.arange(4):view(4, 1)
  local c = a + b
  T.eq(shape(c), '2x4x3'); T.eq(c[2][4][3], 4)
  T.eq(shape(flower.ones(3) * flower.ones(2, 1)), '2x3')
  T.eq(shape(flower.ones(0, 3) + flower.ones(3)), '0x3')
  T.eq(shape(flower.tensor(2) * flower.ones(2, 2)), '2x2')
end)

T.test('in-place ops return the tensor and write through views', function()
  local t = flower.ones(2, 3)
  T.eq(t:add_(1), t)
  T.eq(t:sum():item(), 12)
  t:mul_(flower.tensor({ 1, 2, 3 }))
  T.eq(t[2][3], 6)
  t:narrow(2, 1, 1):sub_(2)
  T.eq(t[1][1], 0)
  t:div_(2); T.eq(t[2][3], 3)
  t:pow_(2); T.eq(t[2][3], 9)
  t:neg_(); T.eq(t[2][3], -9)
  t:abs_(); t:sqrt_(); T.eq(t[2][3], 3)
  t:clamp_(1, 2); T.eq(t[2][3], 2); T.eq(t[1][1], 1)
  t:maximum_(1.5); T.eq(t[1][1], 1.5)
  t:minimum_(flower.tensor({ 0, 5, 5 })); T.eq(t[1][1], 0)
  local r = flower.tensor({ -1, 2 }); r:relu_(); T.eq(r[1], 0)
  local e = flower.zeros(2); e:exp_(); T.eq(e[1], 1)
  e:log_(); T.eq(e[1], 0)
  local s = flower.zeros(1); s:sigmoid_(); T.eq(s[1], 0.5)
  s:tanh_(); T.near(s[1], math.tanh(0.5), 1e-6)
  local i = flower.tensor({ 5 }, 'int32')
  i:add_(2); T.eq(i[1], 7)
  i:mul_(3); T.eq(i[1], 21)
end)

T.test('unary functions and clamp', function()
  local t = flower.tensor({ -2, 0, 3 })
  T.eq(table.concat(t:relu():totable(), ','), '0.0,0.0,3.0')
  T.eq(table.concat(t:clamp(-1, 1):totable(), ','), '-1.0,0.0,1.0')
  T.eq(table.concat(t:clamp(0):totable(), ','), '0.0,0.0,3.0')
  T.eq(table.concat(t:clamp(nil, 0):totable(), ','), '-2.0,0.0,0.0')
  T.eq(t:abs()[1], 2)
  T.near(t:exp()[3], math.exp(3), 1e-6)
  T.near(t:sigmoid()[1], 1 / (1 + math.exp(2)), 1e-6)
  T.eq(flower.tensor({ 4 }):sqrt()[1], 2)
  T.eq(flower.exp(flower.zeros(1))[1], 1)       -- module-level form
  local i = flower.tensor({ -3, 4 }, 'int64')
  T.eq(i:abs()[1], 3); T.eq(i:neg()[2], -4); T.eq(i:relu()[1], 0)
  T.eq(flower.tensor({ 2 }, 'int32'):pow(-1)[1], 0.5)           -- negative exponent: float32
  T.eq(flower.tensor({ 2 }, 'int32'):pow(flower.tensor({ -1 }, 'int32'))[1], 0)   -- integer tensor power truncates
end)

T.test('comparisons and where', function()
  local a = flower.tensor({ 1, 2, 3 })
  local m = a:gt(1.5)
  T.eq(m:dtype(), 'uint8'); T.eq(table.concat(m:totable(), ','), '0,1,1')
  T.eq(table.concat(a:eq(flower.tensor({ 1, 0, 3 })):totable(), ','), '1,0,1')
  T.eq(table.concat(a:ne(2):totable(), ','), '1,0,1')
  T.eq(table.concat(a:le(2):totable(), ','), '1,1,0')
  T.eq(table.concat(a:lt(2):totable(), ','), '1,0,0')
  T.eq(table.concat(a:ge(2):totable(), ','), '0,1,1')
  T.eq(table.concat(flower.where(m, a, 0):totable(), ','), '0.0,2.0,3.0')
  T.eq(table.concat(flower.where(m, -1, a):totable(), ','), '1.0,-1.0,-1.0')
  T.eq(shape(flower.where(flower.ones(2, 1, 'uint8'), a, 0)), '2x3')
  local n = flower.tensor({ 0 / 0, 1 })
  T.eq(n:eq(n)[1], 0)          -- NaN is unequal to itself
end)

T.test('reductions over all and over a dim', function()
  local t = flower.arange(6):view(2, 3)
  T.eq(t:sum():dim(), 0)
  T.eq(t:sum():item(), 15)
  T.eq(t:mean():item(), 2.5)
  T.eq(shape(t:sum(1)), '3'); T.eq(shape(t:sum(1, true)), '1x3')
  T.eq(shape(t:sum(-1)), '2')
  T.eq(table.concat(t:sum(2):totable(), ','), '3.0,12.0')
  local v, i = t:max(2)
  T.eq(table.concat(v:totable(), ','), '2.0,5.0')
  T.eq(table.concat(i:totable(), ','), '3,3')      -- 1-based
  T.eq(i:dtype(), 'int64')
  local v2, i2 = t:min(1, true)
  T.eq(shape(v2), '1x3'); T.eq(i2[1][1], 1)
  T.eq(t:max():item(), 5); T.eq(t:min():item(), 0)
  T.eq(t:argmax():item(), 6); T.eq(t:argmin():item(), 1)
  T.eq(table.concat(t:argmax(1):totable(), ','), '2,2,2')
  T.near(t:var():item(), 3.5, 1e-6)
  T.near(t:var(nil, false, 0):item(), 35 / 12, 1e-6)
  T.near(t:std():item(), math.sqrt(3.5), 1e-6)
  T.near(t:std(2)[1], 1, 1e-6)
  T.eq(flower.tensor({ 1, 5, 5 }):argmax():item(), 2)     -- first occurrence
  T.check(flower.tensor({ 1, 0 / 0, 3 }):max():item() ~= flower.tensor({ 1, 0 / 0, 3 }):max():item(), 'NaN propagates')
  T.eq(flower.zeros(0):sum():item(), 0)
  T.eq(flower.tensor({ 7 }, 'uint8'):sum():dtype(), 'int64')
  T.eq(flower.sum(t):item(), 15)
end)

T.test('large tensors go through the threaded paths', function()
  local n = 300000
  local t = flower.arange(n, 'float64')
  T.eq(t:sum():item(), (n - 1) * n / 2)
  T.eq(t:max():item(), n - 1)
  T.eq(t:argmax():item(), n)
  T.eq((t * 2 - t):sum():item(), (n - 1) * n / 2)
  local m = t:view(600, 500)
  T.eq(m:sum(1)[500], 599 * 600 / 2 * 500 + 600 * 499)
  T.eq(m:t():contiguous():sum(2)[1], 599 * 600 / 2 * 500)
  local old = flower.getnumthreads()
  flower.setnumthreads(1)
  T.eq(flower.getnumthreads(), 1)
  T.eq(t:sum():item(), (n - 1) * n / 2)
  flower.setnumthreads(old)
  local s = flower.randn(1000, 200):softmax(2):sum(2)
  T.near(s:min():item(), 1, 1e-5); T.near(s:max():item(), 1, 1e-5)
end)

T.test('matmul', function()
  local a = flower.tensor({ { 1, 2, 3 }, { 4, 5, 6 } })
  local b = flower.tensor({ { 1, 0 }, { 0, 1 }, { 1, 1 } })
  local c = a:matmul(b)
  T.eq(shape(c), '2x2'); T.eq(c[1][1], 4); T.eq(c[2][2], 11)
  T.eq(flower.matmul(a, a:t())[2][2], 77)
  T.eq(shape(flower.matmul(flower.ones(5, 2, 3), flower.ones(3, 4))), '5x2x4')
  T.eq(shape(flower.matmul(flower.ones(3), flower.ones(3, 4))), '4')
  T.eq(flower.matmul(flower.ones(3), flower.ones(3)):dim(), 0)
  T.eq(flower.matmul(flower.ones(3, 0), flower.ones(0, 2)):sum():item(), 0)
  T.eq(flower.matmul(a:double(), b:double()):dtype(), 'float64')
  T.eq(flower.matmul(a, b:double()):dtype(), 'float64')
end)

T.test('softmax and logsoftmax', function()
  local x = flower.tensor({ { 1, 2, 3 }, { 1, 1, 1 } })
  local s = x:softmax(2)
  T.near(s[2][1], 1 / 3, 1e-6)
  T.near(s:sum(2)[1], 1, 1e-6)
  T.near(x:logsoftmax()[2][1], math.log(1 / 3), 1e-6)
  local big = flower.tensor({ 1000, 0 })
  T.near(big:softmax(1)[1], 1, 1e-6)                 -- no overflow
  T.eq(x:int():softmax(2):dtype(), 'float32')
end)

T.test('float32 exp, log, tanh, sigmoid: within 3e-7 relative of float64, extremes included', function()
  -- a wide sweep of magnitudes, both signs, through a strided view as well as contiguously
  local v = {}
  for e = -40, 38, 0.37 do v[#v + 1] = 10 ^ e; v[#v + 1] = -(10 ^ e) end
  for x = -110, 95, 0.731 do v[#v + 1] = x end
  local x = flower.tensor(v)
  for _, op in ipairs({ 'exp', 'log', 'tanh', 'sigmoid' }) do
    local src = op == 'log' and x:abs() or x
    local got = src[op](src):double()
    local want = src:double()[op](src:double())          -- float64: libm
    local strided = flower.stack({ src, src }, 2):select(2, 2)
    T.check(strided[op](strided):equal(src[op](src)), op .. ': a strided view gives the same bits')
    -- where float64's result overflows float32, float32 gives inf; elsewhere the relative error
    -- (subnormal results: against the smallest normal, i.e. their absolute precision)
    local over = want:float():abs():eq(math.huge)
    T.check(got:abs():eq(math.huge):equal(over), op .. ': inf exactly where the result overflows float32')
    local rel = (got - want):abs():div(want:abs():clamp(1.17549435e-38, math.huge))
    rel = flower.where(over, 0, rel)
    T.check(rel:max():item() < 3e-7, op .. ': max relative error ' .. rel:max():item())
  end
  local special = flower.tensor({ math.huge, -math.huge, 0 / 0, 0, -1 })
  local function tab(t) return t:totable() end
  local e, l = tab(special:exp()), tab(special:log())
  T.check(e[1] == math.huge and e[2] == 0 and e[3] ~= e[3] and e[4] == 1, 'exp specials')
  T.check(l[1] == math.huge and l[3] ~= l[3] and l[4] == -math.huge and l[5] ~= l[5], 'log specials')
  local th, sg = tab(special:tanh()), tab(special:sigmoid())
  T.check(th[1] == 1 and th[2] == -1 and th[3] ~= th[3] and sg[1] == 1 and sg[2] == 0 and sg[3] ~= sg[3], 'tanh/sigmoid specials')
  T.check(flower.tensor({ -100 }):sigmoid()[1] > 0, 'sigmoid(-100) = 3.7e-44 is a subnormal, not 0')
end)

-- ---------------------------------------------------------------- printing

T.test('tostring like Torch7', function()
  local s = tostring(flower.tensor({ { 1, 2 }, { 3, 40 } }))
  T.eq(s, '  1  2\n  3 40\n[torch.FloatTensor of size 2x2, device cpu]')
  local f = tostring(flower.tensor({ 1.5, -2.25 }, 'float64'))
  T.eq(f, '  1.5000\n -2.2500\n[torch.DoubleTensor of size 2, device cpu]')
  T.check(tostring(flower.zeros(2, 3, 4, 'int32')):find('(2,.,.) = ', 1, true), '3-d slices')
  T.check(tostring(flower.zeros(2, 3, 4, 'int64')):find('[torch.LongTensor of size 2x3x4, device cpu]', 1, true))
  T.check(tostring(flower.zeros(1, 'uint8')):find('ByteTensor', 1, true))
  local big = tostring(flower.arange(5000):view(50, 100))
  T.check(big:find('...', 1, true), 'summarised')
  T.check(#big < 2000, 'summary is short: ' .. #big)
  T.check(big:find('4999', 1, true), 'last element shown')
  T.check(tostring(flower.tensor({ 1e-7, 1 })):find('e-07', 1, true), 'small values in e-notation')
  T.check(tostring(flower.tensor({ 0 / 0, 1 / 0 })):find('nan', 1, true))
  T.eq(tostring(flower.zeros(0, 3)), '[torch.FloatTensor of size 0x3, device cpu]')
  T.check(tostring(flower.tensor(2)):find('of size []', 1, true))
end)

-- ---------------------------------------------------------------- memory

T.test('__close frees now and tolerates double calls', function()
  local keep
  do
    local t <close> = flower.zeros(1000)
    keep = t
  end
  T.raises(function() return keep:sum() end, 'freed')
  T.eq(tostring(keep), '[flower.Tensor (freed)]')
  local mt = getmetatable(keep)
  mt.__gc(keep); mt.__close(keep)             -- again: no crash
  collectgarbage()
end)

T.test('garbage collection releases storage', function()
  for _ = 1, 200 do local _ = flower.zeros(1000, 1000) end   -- 800 MB total if nothing were freed
  collectgarbage()
end)

-- ---------------------------------------------------------------- random numbers

T.test('same seed, same stream; offsets advance', function()
  flower.manual_seed(123)
  local a = flower.rand(5)
  local b = flower.randn(3, 'float64')
  flower.manual_seed(123)
  T.check(flower.rand(5):equal(a)); T.check(flower.randn(3, 'float64'):equal(b))
  flower.manual_seed(123)
  local whole = flower.rand(10)
  flower.manual_seed(123)
  local first, second = flower.rand(4), flower.rand(6)
  T.check(flower.cat({ first, second }):equal(whole), 'drawing in two parts continues the stream')
  local st = flower.get_rng_state()
  T.eq(st.seed, 123); T.eq(st.offset, 10)
  local x = flower.rand(3)
  flower.set_rng_state(st)
  T.check(flower.rand(3):equal(x), 'restored state replays')
  flower.manual_seed(124)
  T.check(not flower.rand(5):equal(a), 'another seed differs')
end)

T.test('distributions', function()
  flower.manual_seed(1)
  local u = flower.rand(100000)
  T.check(u:min():item() >= 0 and u:max():item() < 1)
  T.near(u:mean():item(), 0.5, 0.01)
  local n = flower.randn(100000, 'float64')
  T.near(n:mean():item(), 0, 0, 0.02); T.near(n:std():item(), 1, 0.02)
  local r = flower.randint(1, 6, 10000)
  T.eq(r:dtype(), 'int64'); T.eq(r:min():item(), 1); T.eq(r:max():item(), 6)
  T.eq(flower.randint(0, 255, 10, 'uint8'):dtype(), 'uint8')
  local w = flower.empty(2, 500):uniform_(-2, -1)
  T.check(w:max():item() < -1 and w:min():item() >= -2)
  local g = flower.empty(20000):normal_(3, 0.5)
  T.near(g:mean():item(), 3, 0, 0.02)
  local nc = flower.zeros(4, 6):t()
  flower.manual_seed(9); nc:uniform_()
  flower.manual_seed(9)
  T.check(nc:contiguous():view(24):equal(flower.rand(24)), 'a strided view gets the stream in element order')
end)

-- ---------------------------------------------------------------- cat / stack

T.test('cat and stack', function()
  local a, b = flower.ones(2, 3), flower.zeros(1, 3)
  T.eq(shape(flower.cat({ a, b })), '3x3')
  T.eq(shape(flower.cat({ a, a }, 2)), '2x6')
  T.eq(shape(flower.stack({ a, a })), '2x2x3')
  T.eq(shape(flower.stack({ a, a }, 3)), '2x3x2')
  T.eq(flower.cat({ a, b:int() }):dtype(), 'float32')
  T.raises(function() flower.cat({ a, flower.ones(2, 4) }) end, 'cat: element 2 has size [2,4]')
  T.raises(function() flower.cat({}) end, 'cat: expected a non-empty list')
  T.raises(function() flower.stack({ a, b }) end, 'stack: element 2')
end)

-- ---------------------------------------------------------------- errors

T.test('error messages name the function, the expectation and what was found', function()
  local t = flower.zeros(2, 3)
  T.raises(function() t:view(7) end, 'view: size [7] is incompatible with 6 elements')
  T.raises(function() t:reshape(4, 2) end, 'reshape: size [4,2] is incompatible with 6 elements')
  T.raises(function() t:view(-1, -1) end, 'only one size may be -1')
  T.raises(function() t:t():view(6) end, 'view: size [6] needs a copy')
  T.raises(function() flower.matmul(flower.zeros(2, 3), flower.zeros(4, 5)) end,
    'matmul: inner dimensions differ: [2,3] x [4,5]')
  T.raises(function() flower.matmul(flower.zeros(2, 3, 'int32'), flower.zeros(3, 2, 'int32')) end,
    'matmul: expected float32, float64 or bfloat16 tensors, got int32 and int32')
  T.raises(function() flower.matmul(flower.zeros(2, 2, 3), flower.zeros(3, 3, 2)) end, 'matmul: shapes [2] and [3] cannot broadcast')
  T.raises(function() flower.matmul(flower.tensor(1), t) end, 'matmul: expected tensors with at least 1 dim')
  T.raises(function() return t + flower.zeros(4) end, 'add: shapes [2,3] and [4] cannot broadcast')
  T.raises(function() return t:mul(flower.zeros(3, 3)) end, 'mul: shapes [2,3] and [3,3] cannot broadcast')
  T.raises(function() return t + 'x' end, 'add: expected a tensor or a number')
  T.raises(function() t:narrow(3, 1, 1) end, 'narrow: dim 3 out of range for a 2-d tensor')
  T.raises(function() t:narrow(2, 3, 2) end, 'narrow: range start 3 length 2 does not fit dim 2 of size 3')
  T.raises(function() t:select(1, 3) end, 'select: index 3 out of range for dim 1 of size 2')
  T.raises(function() t:transpose(1, 3) end, 'transpose: dim 3 out of range')
  T.raises(function() t:permute(1, 1) end, 'permute: dim 1 appears twice')
  T.raises(function() t:permute(1) end, 'permute: expected 2 dims for a 2-d tensor, got 1')
  T.raises(function() t:expand(3, 3) end, 'expand: cannot expand size [2,3] to [3,3]')
  T.raises(function() t:unsqueeze(4) end, 'unsqueeze: dim 4 out of range')
  T.raises(function() t:squeeze(5) end, 'squeeze: dim 5 out of range')
  T.raises(function() t:size(3) end, 'size: dim 3 out of range')
  T.raises(function() t:sum(3) end, 'sum: dim 3 out of range')
  T.raises(function() t:softmax(0) end, 'softmax: dim 0 out of range')
  T.raises(function() flower.zeros(0):max() end, 'max: cannot reduce over an empty dimension')
  T.raises(function() t:item() end, 'item: expected a tensor with one element, got size [2,3]')
  T.raises(function() return #flower.tensor(1) end, 'a 0-d tensor has no length')
  T.raises(function() return t[3] end, 'index: index 3 out of range for dim 1 of size 2')
  T.raises(function() return t[1.5] end, 'index: expected an integer index')
  T.raises(function() return t[{ 1, 2, 3 }] end, 'index: 3 indices for a 2-d tensor')
  T.raises(function() return t[{ { 1, 5 } }] end, 'index: range {1, 5} out of bounds for dim 1 of size 2')
  T.raises(function() return t[{ 'a' }] end, 'index: index 1 must be a number or a table, got string')
  T.raises(function() t[5] = 1 end, 'index assignment: index 5 out of range')
  T.raises(function() t[1] = flower.zeros(4) end, 'copy: source of size [4] cannot broadcast to destination size [3]')
  T.raises(function() t.foo = 1 end, "index assignment: cannot set field 'foo'")
  T.raises(function() t:copy(flower.zeros(3, 3)) end, 'copy: source of size [3,3] cannot broadcast')
  T.raises(function() flower.tensor({ { 1, 2 }, { 3 } }) end, 'tensor: nested table is ragged at depth 2')
  T.raises(function() flower.tensor({ { 1, 2 }, 3 }) end, 'tensor: nested table is ragged at depth 2')
  T.raises(function() flower.tensor({ { 1 }, { { 2 } } }) end, 'ragged at depth 3')
  T.raises(function() flower.tensor({ 'a' }) end, 'tensor: expected numbers in the nested table, found a string')
  T.raises(function() flower.tensor('abc') end, 'tensor: expected a nested table of numbers')
  T.raises(function() flower.zeros(2, 'float16') end, "zeros: unknown dtype 'float16'")
  T.raises(function() flower.zeros(2, 3.5) end, 'zeros: size 2 must be an integer')
  T.raises(function() flower.zeros(-2) end, 'zeros: invalid size')
  T.raises(function() flower.zeros(1, 1, 1, 1, 1, 1, 1, 1, 1) end, 'zeros: at most 8 dims')
  T.raises(function() flower.zeros(1e15, 1e5) end, 'zeros: size [1000000000000000,100000] is too large')
  T.raises(function() flower.zeros(1e6, 1e6, 1e3) end, 'zeros:')
  T.raises(function() flower.full({ 2 }) end, 'full: expected a fill value')
  T.raises(function() flower.arange(0, 1, 0) end, 'arange: step must be a finite nonzero number')
  T.raises(function() flower.arange() end, 'arange: expected arange(n)')
  T.raises(function() flower.linspace(0, 1, -1) end, 'linspace: number of points must be >= 0')
  T.raises(function() flower.rand(2, 'int32') end, 'rand: expected a float dtype, got int32')
  T.raises(function() flower.randint(5, 1, 3) end, 'randint: empty range [5, 1]')
  T.raises(function() flower.randint(0, 300, 3, 'uint8') end, 'randint: range')
  T.raises(function() flower.zeros(2, 'int32'):uniform_() end, 'uniform_: expected a float tensor')
  T.raises(function() flower.zeros(2):normal_(0, -1) end, 'normal: std must be >= 0')
  T.raises(function() flower.set_rng_state({}) end, 'set_rng_state: expected {seed = integer, offset = integer}')
  T.raises(function() flower.fromstring('abc', 'int32', 1) end, 'fromstring: 3 bytes do not hold a int32 tensor of size [1]')
  T.raises(function() flower.fromstring('abc', 'int32') end, 'fromstring: 3 bytes is not a whole number')
  T.raises(function() flower.where(t, t, t) end, 'where: mask must be uint8, got float32')
  T.raises(function() flower.where(t:gt(0), t, flower.zeros(4)) end, 'where: shapes [2,3] and [4] cannot broadcast')
  T.raises(function() t:clamp(2, 1) end, 'clamp: lower bound 2 is above upper bound 1')
  T.raises(function() flower.zeros(2, 'int32'):add_(0.5) end, 'add: cannot write a float32 result into a int32 tensor')
  T.raises(function() flower.zeros(2, 'int32'):exp_() end, 'exp: the result is fractional')
  T.raises(function() flower.zeros(2, 'int32'):div_(2) end, 'div: cannot write a float32 result into a int32 tensor')
  T.raises(function() flower.zeros(2, 1):add_(flower.zeros(3)) end, 'add: result of shapes [2,1] and [3] does not fit the output of size [2,1]')
  T.raises(function() flower.zeros(1, 3):expand(2, 3):add_(1) end, 'cannot write into a tensor whose elements overlap')
  T.raises(function() t:var(nil, false, -1) end, 'var: correction must be >= 0')
  T.raises(function() t:type('float8') end, "type: unknown dtype 'float8'")
  T.raises(function() flower.setnumthreads(0) end, 'setnumthreads: expected 1..1024 threads, got 0')
  T.raises(function() t:add() end, 'add: expected a tensor or a number at argument 2, got no value')
  T.raises(function() flower.Tensor.sum(42) end, 'flower.Tensor expected')
end)

T.test('t:new_zeros / new_empty / new_full follow t\'s dtype and device', function()
  local r = flower.ones(2, 'float64')
  local z = r:new_zeros({2, 3})
  T.eq(z:dtype(), 'float64'); T.eq(z:device(), r:device())
  T.allclose(z, {{0, 0, 0}, {0, 0, 0}})
  T.eq(r:new_empty(4, 'int32'):dtype(), 'int32')
  T.eq(table.concat(r:new_empty(4, 'int32'):size(), 'x'), '4')
  local f = r:new_full({2}, 2.5, 'float32')
  T.eq(f:dtype(), 'float32')
  T.allclose(f, {2.5, 2.5})
  T.raises(function() r:new_full({2}) end, 'new_full: expected a fill value after the size')
  T.raises(function() r:new_zeros({2}, 'complex') end, 'new_zeros')
  T.raises(function() flower.full({2}) end, 'full: expected a fill value after the size')
end)

T.test('index_select: rows or columns by 1-based indices (a list or an integer tensor), in order, repeats allowed', function()
  local t = flower.arange(1, 25):view(4, 3, 2)
  for _, case in ipairs({ { 1, { 4, 1, 2, 3, 3 } }, { 2, { 3, 1 } }, { 3, { 2, 2, 1 } }, { 1, { -1, 2 } } }) do
    local d, idx = case[1], case[2]
    local parts = {}
    for i, k in ipairs(idx) do parts[i] = t:narrow(d, k < 0 and t:size(d) + k + 1 or k, 1) end
    local want = flower.cat(parts, d)
    T.check(t:index_select(d, idx):equal(want), 'list, dim ' .. d)
    T.check(t:index_select(d, flower.tensor(idx):long()):equal(want), 'int64 tensor, dim ' .. d)
    T.check(t:index_select(d, flower.tensor(idx):int()):equal(want), 'int32 tensor, dim ' .. d)
  end
  T.eq(table.concat(t:index_select(1, {}):size(), 'x'), '0x3x2')
  local v = t:transpose(1, 3)   -- a non-contiguous source
  T.check(v:index_select(2, { 3, 1 }):equal(flower.cat({ v:narrow(2, 3, 1), v:narrow(2, 1, 1) }, 2)), 'strided source')
  T.raises(function() t:index_select(1, { 5 }) end, 'index 5 (position 1) is outside 1..4 of dim 1')
  T.raises(function() t:index_select(1, { 1.5 }) end, 'index 1 is number, expected an integer')
  T.raises(function() t:index_select(1, flower.tensor({ 1 })) end, 'indices must be a 1-d integer tensor, got a 1-d float32 tensor')
  T.raises(function() t:index_select(4, { 1 }) end, 'index_select')
end)

T.done()
