-- Activation memory: an inference frees each value after its last reader and reuses the freed
-- blocks, with outputs bit-identical to a run that frees nothing (nn.reuse = false); feature taps,
-- several outputs and the caller's tensors stay valid; in-place layers never write into storage
-- that another tensor shares; training keeps what backward reads.
package.path = 'tests/lua/?.lua;' .. package.path
local flower = require 'flower'
local nn = require 'flower.nn'
local T = require 'flower.test'

-- A small net with every path the executor treats apart: padding folded into a convolution, a
-- ZeroPadding2D before pooling (not folded), Conv -> BN -> ReLU fused, Add and ReLU in place, a
-- separable convolution, a concatenation, a view (Reshape) feeding an in-place ReLU, global pooling
-- and Dense. Activations are 1 MB and more at batch 4, so they go through the allocator's cache.
local function net()
  nn.reset_names()
  local x = nn.Input{64, 64, 3}
  local y = nn.Conv2D{filters = 16, kernel_size = 3, use_bias = false, name = 'stem'}(
    nn.ZeroPadding2D{padding = 1, name = 'stem_pad'}(x))
  y = nn.ReLU{name = 'stem_relu'}(nn.BatchNormalization{name = 'stem_bn'}(y))
  local p = nn.MaxPooling2D{pool_size = 3, strides = 1, name = 'pool'}(nn.ZeroPadding2D{padding = 1, name = 'pool_pad'}(y))
  local a = nn.BatchNormalization{name = 'a_bn'}(nn.Conv2D{filters = 16, kernel_size = 3, padding = 'same', name = 'a'}(p))
  local s = nn.Activation('relu')(nn.Add{name = 'add'}{a, p})
  for i = 1, 4 do   -- a chain: without reuse every link stays allocated
    s = nn.ReLU{}(nn.BatchNormalization{}(nn.Conv2D{filters = 16, kernel_size = 1, name = 'chain' .. i}(s)))
  end
  local b1 = nn.Conv2D{filters = 8, kernel_size = 1, name = 'b1'}(s)
  local b2 = nn.SeparableConv2D{filters = 8, kernel_size = 3, padding = 'same', name = 'b2'}(s)
  local r = nn.ReLU{name = 'r'}(nn.Reshape{target_shape = {64, 64, 8}, name = 'rs'}(b1))
  local c = nn.Concatenate{name = 'cat'}{b1, b2, s, r}
  local g = nn.GlobalAveragePooling2D{name = 'avg_pool'}(c)
  local m = nn.Model(x, nn.Dense{units = 5, name = 'out'}(g))
  flower.manual_seed(3)
  T.randomize_batchnorm(m)
  return m
end

-- runs fn with nn.reuse set, restoring it (and the collector) whatever happens
local function with(reuse, fn)
  local was = nn.reuse
  nn.reuse = reuse
  local ok, err = pcall(fn)
  nn.reuse = was
  collectgarbage('restart')
  if not ok then error(err, 0) end
end

local function clones(v)
  if flower.is_tensor(v) then return v:clone() end
  local r = {}
  for i, t in ipairs(v) do r[i] = t:clone() end
  return r
end

T.test('inference outputs are bit-identical with and without buffer reuse', function()
  local m = net():evaluate()
  local x = flower.randn(4, 64, 64, 3)
  local ref, tap_ref
  local tap = m:output_of('cat')
  with(false, function()
    flower.memory('release')
    ref = m:forward(x):clone()
    tap_ref = tap:forward(x):clone()
  end)
  flower.memory('release')
  local first = m:forward(x):clone()          -- fresh blocks
  local second = m:forward(x)                 -- blocks recycled from the first pass
  T.check(first:equal(ref), 'first pass differs from the run without reuse')
  T.check(second:equal(ref), 'second pass (recycled buffers) differs from the run without reuse')
  T.check(tap:forward(x):equal(tap_ref), 'feature tap differs')
  T.check(m._state == nil, 'inference kept state for backward')
end)

T.test('inference frees activations after their last reader: live bytes return, peak drops', function()
  local m = net():evaluate()
  local x = flower.randn(4, 64, 64, 3)
  m:forward(x)                                 -- builds nothing new later (weights, coefficients)
  local peak = {}
  for _, reuse in ipairs({false, true}) do
    with(reuse, function()
      collectgarbage()
      collectgarbage('stop')                   -- what is freed is freed by the executor
      flower.memory('release')
      local before = flower.memory('reset_peak')
      local y = m:forward(x)
      local after = flower.memory()
      peak[reuse] = after.peak - before.peak
      if reuse then
        local left = after.live - before.live - y:numel() * 4
        T.check(left < 64 * 1024, string.format('%d bytes of activations left after the forward', left))
      end
    end)
  end
  -- the most live at once is the concatenation: its 16 + 8 + 8 + 8 input channels and as many output
  -- ones (5 activations of 16 channels), plus the free pages the allocator keeps (at most 1/8 of
  -- its peak in use) and its rounding of blocks to 64 KB
  local act = 4 * 64 * 64 * 16 * 4             -- one 16-channel activation
  T.check(peak[false] > 10 * act, string.format('without reuse the peak should hold every activation (%d)', peak[false]))
  T.check(peak[true] <= 7 * act, string.format('peak with reuse %d bytes, %d without', peak[true], peak[false]))
end)

T.test('feature taps, several outputs and repeated forwards return valid tensors', function()
  local full = net():evaluate()
  local x = flower.randn(4, 64, 64, 3)
  -- several outputs, one of them (stem_relu) also read by later layers, one a Reshape view
  local nodes = {}
  for _, name in ipairs({'out', 'stem_relu', 'avg_pool', 'rs', 'add'}) do nodes[#nodes + 1] = full:layer(name)._nodes[1] end
  local m = nn.Model(full.inputs[1], nodes)
  m:evaluate()
  local ref
  with(false, function() ref = clones(m:forward(x)) end)
  local outs = m:forward(x)
  for i, t in ipairs(outs) do T.check(t:equal(ref[i]), 'output ' .. i .. ' differs') end
  local kept = clones(outs)
  local outs2 = m:forward(x)                   -- the first call's tensors stay the caller's
  for i, t in ipairs(outs) do
    T.check(t:equal(kept[i]), 'output ' .. i .. ' of the first forward changed after the second')
    T.check(outs2[i]:equal(ref[i]), 'output ' .. i .. ' of the second forward differs')
    T.check(not rawequal(t, outs2[i]), 'the second forward returned the same tensor object')
  end
  -- a tap of an inner layer, on a model that shares the layers
  local tap = full:output_of('pool')
  local p = tap:forward(x)
  T.eq(table.concat(p:size(), 'x'), '4x64x64x16')
  local p_ref
  with(false, function() p_ref = tap:forward(x) end)
  T.check(p:equal(p_ref), 'the tap differs')
end)

T.test('in-place layers never write into storage another tensor shares', function()
  -- a ReLU on a Reshape view of the caller's input
  nn.reset_names()
  local x = nn.Input{4}
  local m = nn.Model(x, nn.Activation('relu')(nn.Reshape{target_shape = {2, 2}}(x))):evaluate()
  local t = flower.tensor({{-1, 2, -3, 4}})
  local t0 = t:clone()
  local y = m:forward(t)
  T.check(t:equal(t0), 'the caller\'s input was overwritten through a view')
  T.check(y:equal(flower.tensor({{{0, 2}, {0, 4}}})), 'wrong output')
  -- a ReLU on a view of a value that a later Add still reads
  local a = nn.Input{4}
  local h = nn.Dense{units = 4, name = 'd'}(a)
  local r = nn.Activation('relu')(nn.Reshape{target_shape = {4}, name = 'rs'}(h))
  local m2 = nn.Model(a, nn.Add{}{h, r})
  local xin = flower.randn(3, 4)
  m2:evaluate()
  local fast = m2:forward(xin):clone()
  local ref
  with(false, function() ref = m2:forward(xin) end)
  T.check(fast:equal(ref), 'a shared value was overwritten in place')
  -- is_shared itself
  local s = flower.zeros(2, 3)
  T.eq(s:is_shared(), false)
  local v = s:view(6)
  T.eq(s:is_shared(), true)
  T.eq(v:is_shared(), true)
  v:free()
  T.eq(s:is_shared(), false)
end)

T.test('training keeps what backward reads: gradients bit-identical with and without reuse', function()
  local m = net():training()
  m.input_grad = true
  local x = flower.randn(4, 64, 64, 3)
  local gy = flower.randn(4, 5)
  local function step()
    m:zero_grad()
    local out = m:forward(x):clone()
    local gx = m:backward(x, gy):clone()
    local _, grads = m:parameters()
    return out, gx, clones(grads)
  end
  -- moving statistics change with each training forward: restore them between runs
  local saved = {}
  for _, w in ipairs(m:weights()) do saved[#saved + 1] = w.tensor:clone() end
  local function restore() for i, w in ipairs(m:weights()) do w.tensor:copy(saved[i]) end end
  local o1, g1, p1
  with(false, function() o1, g1, p1 = step() end)
  restore()
  local o2, g2, p2 = step()
  restore()
  local o3, g3, p3 = step()                   -- recycled buffers
  for _, r in ipairs({{o2, g2, p2}, {o3, g3, p3}}) do
    T.check(r[1]:equal(o1), 'training output differs')
    T.check(r[2]:equal(g1), 'input gradient differs')
    for i = 1, #p1 do T.check(r[3][i]:equal(p1[i]), 'parameter gradient ' .. i .. ' differs') end
  end
  T.check(m._state == nil, 'backward left state behind')
end)

T.test('memory stats and freed tensors', function()
  local t = flower.randn(3)
  t:free()
  T.raises(function() return t + 1 end, 'freed')
  T.raises(function() return t:sum() end, 'freed')
  T.raises(function() flower.memory('bogus') end, "invalid option 'bogus'")
  local s = flower.memory()
  for _, k in ipairs({'live', 'host', 'cached', 'peak'}) do T.check(math.type(s[k]) == 'integer', k) end
  T.check(s.peak >= s.host + s.cached, 'peak below what is held now')
  local big = flower.zeros(1 << 20)            -- 4 MB
  big:free()
  local c = flower.memory().cached
  T.eq(flower.memory('release').cached, 0)
  T.check(c >= 4 << 20 or c == 0, 'a freed 4 MB block is cached (or the cache is off)')
end)

T.done()
