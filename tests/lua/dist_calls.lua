-- Every flower.dist call under `mpirun -np 2` (tests/sh/test_dist.sh runs it), including wrong use.
-- Each rank prints its own `ok - [rank r] name` lines; the shell test counts them.
-- usage: dist_calls.lua [one-sided]   (one-sided: rank 0 calls a collective rank 1 never joins)
local flower = require 'flower'
local T = require 'flower.test'
local dist = flower.dist

local r, n = dist.rank(), dist.size()
local function test(name, fn) T.test(string.format('[rank %d] %s', r, name), fn) end
local function fails(fn, pattern)
  local ok, err = pcall(fn)
  T.check(not ok, 'expected an error matching ' .. pattern)
  T.check(tostring(err):find(pattern, 1, true), 'error "' .. tostring(err) .. '" lacks "' .. pattern .. '"')
  return err
end
-- '1,2,3' for a tensor's values (integers without '.0')
local function list(t)
  local out = {}
  for i, v in ipairs(t:contiguous():view(-1):double():totable()) do out[i] = string.format('%g', v) end
  return table.concat(out, ',')
end

if arg[1] == 'one-sided' then
  dist.set_timeout(tonumber(arg[2]) or 2)
  if r == 0 then
    local ok, err = pcall(dist.allreduce, flower.ones(3))
    print('rank 0 error: ' .. tostring(err))
    T.check(not ok)
    -- the job is over for this rank: every later call says so
    local ok2, err2 = pcall(dist.barrier)
    print('rank 0 after: ' .. tostring(err2))
  end
  os.exit(0)      -- rank 0 exits 0, but after a timeout the exit aborts the job
end

test('rank, size, local_rank, is_main', function()
  T.eq(n, 2)
  T.check(r == 0 or r == 1)
  T.eq(dist.local_rank(), r)            -- one host
  T.eq(dist.local_size(), 2)
  T.eq(dist.is_main(), r == 0)
end)

test('barrier', function() dist.barrier(); dist.barrier() end)

test('allreduce sum, mean, max, min (float32, float64, int64)', function()
  local t = flower.tensor({ 1, 2, 3 }):mul(r + 1)                  -- rank 0: 1 2 3, rank 1: 2 4 6
  T.check(dist.allreduce(t) == t, 'returns its argument')
  T.eq(list(t), '3,6,9')
  local m = flower.tensor({ 1, 2 }, 'float64'):mul(r + 1)
  dist.allreduce(m, 'mean')
  T.eq(list(m), '1.5,3')
  local i = flower.tensor({ 5, -1 }, 'int64'):mul(r + 1)
  dist.allreduce(i, 'max')
  T.eq(list(i), '10,-1')
  local j = flower.tensor({ 5, -1 }, 'int64'):mul(r + 1)
  dist.allreduce(j, 'min')
  T.eq(list(j), '5,-2')
end)

test('allreduce of a non-contiguous view writes through', function()
  local base = flower.zeros(3, 4)
  base:fill(r + 1)
  local v = base:t()                                              -- 4x3 strided view
  dist.allreduce(v)
  T.eq(base:sum():item(), 3 * 12)
end)

test('allreduce of a large tensor (several MB)', function()
  local t = flower.ones(3 * 1000 * 1000):mul(r + 1)
  dist.allreduce(t)
  T.eq(t:min():item(), 3)
  T.eq(t:max():item(), 3)
end)

test('broadcast from root 0 and root 1, shapes kept', function()
  local t = flower.tensor({ { 1, 2 }, { 3, 4 } }):add(10 * r)
  dist.broadcast(t, 0)
  T.eq(list(t:view(-1)), '1,2,3,4')
  local u = flower.tensor({ 7, 8 }):add(10 * r)
  dist.broadcast(u, 1)
  T.eq(list(u), '17,18')
  local b = flower.tensor({ 1, 2 }):bfloat16():add(r)                -- moved as bits
  dist.broadcast(b, 0)
  T.eq(list(b:float()), '1,2')
end)

test('all_gather: rank order, first dim may differ', function()
  local t = flower.ones(r + 1, 2):mul(r + 1)                      -- rank 0: 1 row of 1, rank 1: 2 rows of 2
  local g = dist.all_gather(t)
  T.eq(table.concat(g:size(), 'x'), '3x2')
  T.eq(list(g:view(-1)), '1,1,2,2,2,2')
  local s = dist.all_gather(flower.tensor({ r }, 'int64'))
  T.eq(list(s), '0,1')
end)

test('allreduce_numbers', function()
  local s = dist.allreduce_numbers({ r, 1, 0.5 })
  T.eq(s[1], 1); T.eq(s[2], 2); T.eq(s[3], 1)
end)

test('gradient buckets: scaled sum, tensors bigger and smaller than a bucket', function()
  local a, b, c = flower.ones(5):mul(r + 1), flower.ones(2, 3):mul(r + 1), flower.ones(100):mul(r + 1)
  require('flower.core')._dist.allreduce_grads({ a, b, c }, 0.5, 16 * 4)   -- buckets of 16 floats
  for _, t in ipairs({ a, b, c }) do
    T.eq(t:min():item(), 1.5); T.eq(t:max():item(), 1.5)
  end
  -- a host tensor of 64K elements or more is reduced in place, between packed small ones
  local s1, big, s2 = flower.ones(3):mul(r + 1), flower.ones(300, 300):mul(r + 1), flower.ones(7):mul(r + 1)
  require('flower.core')._dist.allreduce_grads({ s1, big, s2 }, 0.5)
  for _, t in ipairs({ s1, big, s2 }) do
    T.eq(t:min():item(), 1.5); T.eq(t:max():item(), 1.5)
  end
end)

-- wrong use: the same error on every rank, and the job goes on
test('mismatched shapes: a clear error naming both ranks, on every rank', function()
  local t = r == 0 and flower.zeros(2, 3) or flower.zeros(3, 3)
  local err = fails(function() dist.allreduce(t) end, 'the ranks disagree')
  T.check(err:find('rank 0 called allreduce of a host float32 tensor[2,3]', 1, true), err)
  T.check(err:find('rank 1 called allreduce of a host float32 tensor[3,3]', 1, true), err)
end)

test('mismatched dtypes and operations', function()
  fails(function() dist.allreduce(r == 0 and flower.zeros(2) or flower.zeros(2):double()) end, 'float64')
  fails(function() dist.allreduce(flower.zeros(2), r == 0 and 'sum' or 'max') end, 'the ranks disagree')
  local e = fails(function()
    if r == 0 then dist.broadcast(flower.zeros(2), 0) else dist.barrier() end
  end, 'the ranks disagree')
  T.check(e:find('barrier', 1, true) and e:find('broadcast', 1, true), e)
end)

test('all_gather: trailing dims must agree', function()
  fails(function() dist.all_gather(flower.zeros(2, r + 1)) end, 'beyond the first dim')
end)

test('bad arguments are refused before anything is sent', function()
  fails(function() dist.allreduce(flower.zeros(2), 'prod') end, "op must be 'sum', 'mean', 'max' or 'min'")
  fails(function() dist.allreduce(flower.zeros(2, 'int64'), 'mean') end, "op 'mean' needs a float tensor")
  fails(function() dist.allreduce(flower.zeros(2):bfloat16()) end, 'convert with :float()')
  fails(function() dist.broadcast(flower.zeros(2), 2) end, 'root must be a rank 0..1, got 2')
  fails(function() dist.allreduce('x') end, 'expected a tensor')
  fails(function() dist.set_timeout(0) end, 'positive number of seconds')
end)

test('the job still works after the errors', function()
  local t = flower.ones(2)
  dist.allreduce(t)
  T.eq(t:sum():item(), 4)
end)

T.done()
