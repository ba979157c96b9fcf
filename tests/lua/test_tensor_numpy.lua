-- Tensor ops against numpy: tests/reference/gen_numpy.py writes build/ref/numpy_cases.json (inputs,
-- op, expected output computed by numpy in the dtype flowerlua promises); this runs each case and
-- compares. Also checks the Philox streams against the generator's independent implementation.
local flower = require 'flower'
local T = require 'flower.test'
local cjson = require 'cjson'

local build = os.getenv('BUILD') or 'build'
local refdir = build .. '/ref'
local ref = refdir .. '/numpy_cases.json'
local gen = 'tests/reference/gen_numpy.py'

local function mtime(path)
  local p = io.popen('stat -c %Y ' .. path .. ' 2>/dev/null')
  local v = tonumber(p:read('*l') or '')
  p:close()
  return v
end

-- regenerate when missing or older than the generator
if not mtime(ref) or mtime(ref) < mtime(gen) then
  local py = io.open('.venv/bin/python') and '.venv/bin/python' or '/usr/bin/python3'
  local ok = os.execute(py .. ' ' .. gen .. ' ' .. refdir .. ' >/dev/null')
  if not ok then
    print('not ok - numpy reference: running ' .. py .. ' ' .. gen .. ' failed (is numpy installed? make deps)')
    os.exit(1)
  end
end
local f = assert(io.open(ref))
local data = cjson.decode(f:read('a'))
f:close()
-- cjson reads every number as a float: shapes back to integers
local function ints(t) for i, v in ipairs(t) do t[i] = math.tointeger(v) or v end return t end
for _, c in ipairs(data.cases) do
  for _, s in ipairs(c.inputs) do ints(s.shape) end
  if c.expected.shape then ints(c.expected.shape) else for _, e in ipairs(c.expected) do ints(e.shape) end end
  if c.args.perm then ints(c.args.perm) end
end

local function mk(spec)
  local t = flower.tensor(spec.data, spec.dtype)
  if #spec.shape == 0 then return t:view({}) end
  return t:view(spec.shape)
end

local function tol(dtype, op)
  if dtype == 'float32' then
    if op == 'var' or op == 'std' or op == 'matmul' then return 1e-4, 1e-5 end
    return 2e-6, 1e-6
  elseif dtype == 'float64' then
    return 1e-12, 1e-12
  end
  return 0, 0
end

local function compare(got, want, op, what)
  T.eq(got:dtype(), want.dtype, what .. ' dtype')
  T.eq(table.concat(got:size(), 'x'), table.concat(want.shape, 'x'), what .. ' shape')
  local flat = got:contiguous():view(got:numel()):totable()
  if got:dim() == 0 then flat = { got:item() } end
  local rtol, atol = tol(want.dtype, op)
  for i, w in ipairs(want.data) do
    local g = flat[i]
    if w == cjson.null then error(what .. ': null in reference') end
    local same = g == w or (g ~= g and w ~= w)
    if not same then
      if rtol == 0 then
        error(string.format('%s: element %d is %s, numpy gives %s', what, i, tostring(g), tostring(w)))
      end
      if not (math.abs(g - w) <= atol + rtol * math.abs(w)) then
        error(string.format('%s: element %d is %.9g, numpy gives %.9g', what, i, g, w))
      end
    end
  end
end

local binops = { add = true, sub = true, mul = true, div = true, maximum = true, minimum = true, pow = true,
  eq = true, ne = true, lt = true, le = true, gt = true, ge = true }
local unops = { neg = true, exp = true, log = true, sqrt = true, abs = true, tanh = true, sigmoid = true,
  relu = true }

local function run(case)
  local x = {}
  for i, s in ipairs(case.inputs) do x[i] = mk(s) end
  local a = case.args
  local op = case.op
  local dim = a.dim ~= cjson.null and a.dim or nil
  if binops[op] then return x[1][op](x[1], x[2]) end
  if unops[op] then return x[1][op](x[1]) end
  if op == 'clamp' then return x[1]:clamp(a.lo, a.hi) end
  if op == 'pows' then return x[1]:pow(a.p) end
  if op == 'sum' or op == 'mean' or op == 'argmax' or op == 'argmin' then return x[1][op](x[1], dim, a.keepdim) end
  if op == 'var' or op == 'std' then return x[1][op](x[1], dim, a.keepdim, a.correction) end
  if op == 'max' or op == 'min' then
    local v, i = x[1][op](x[1], dim, a.keepdim)
    if dim then return { v, i } end
    return v
  end
  if op == 'matmul' then
    local p, q = x[1], x[2]
    if a.transpose_a then p = p:transpose(-1, -2) end
    if a.transpose_b then q = q:transpose(-1, -2) end
    return flower.matmul(p, q)
  end
  if op == 'softmax' then return x[1]:softmax(a.dim) end
  if op == 'logsoftmax' then return x[1]:logsoftmax(a.dim) end
  if op == 'where' then return flower.where(x[1], x[2], x[3]) end
  if op == 'permute' then return x[1]:permute(a.perm):contiguous() end
  if op == 'transpose_sum' then return x[1]:transpose(1, 3):sum(1) end
  if op == 'narrow' then return x[1]:narrow(a.dim, a.start, a.len) end
  if op == 'expand_add' then return x[1]:expand(x[2]:size()) + x[2] end
  if op == 'stride_copy' then
    -- every other row of dim 2 via slicing a clone, compared with numpy's x[:, ::2, :]
    local src = x[1]
    local out = flower.zeros(src:size(1), math.ceil(src:size(2) / 2), src:size(3))
    for j = 1, out:size(2) do out[{ {}, j, {} }] = src[{ {}, 2 * j - 1, {} }] end
    return out
  end
  error('unknown op ' .. op)
end

-- group by op so a failure names the case, and the runner counts one line per group
local groups, order = {}, {}
for _, c in ipairs(data.cases) do
  local g = c.name:match('^(%S+)')
  if not groups[g] then groups[g] = {}; order[#order + 1] = g end
  table.insert(groups[g], c)
end
for _, g in ipairs(order) do
  T.test('numpy ' .. g .. ' (' .. #groups[g] .. ' cases)', function()
    for _, c in ipairs(groups[g]) do
      local ok, res = pcall(run, c)
      if not ok then error(c.name .. ': ' .. tostring(res)) end
      if c.expected.shape then
        compare(res, c.expected, c.op, c.name)
      else
        for i, e in ipairs(c.expected) do compare(res[i], e, c.op, c.name .. ' output ' .. i) end
      end
    end
  end)
end

T.test('philox streams match the Python implementation', function()
  for _, r in ipairs(data.rng) do
    flower.manual_seed(r.seed)
    if r.skip then flower.rand(r.skip) end
    local t
    if r.call == 'rand' then t = flower.rand(r.n, r.dtype)
    elseif r.call == 'randn' then t = flower.randn(r.n, r.dtype)
    elseif r.call == 'randint' then t = flower.randint(r.p0, r.p1 - 1, r.n)
    elseif r.call == 'uniform_' then t = flower.empty(r.n, r.dtype):uniform_(r.p0, r.p1) end
    local got = t:totable()
    for i, w in ipairs(r.expected) do
      local what = string.format('%s seed %d element %d', r.call, r.seed, i)
      if r.kind == 'normal' then T.near(got[i], w, r.dtype == 'float32' and 1e-6 or 1e-12, 1e-12, what)
      else T.eq(got[i], w, what) end
    end
  end
end)

T.done()
