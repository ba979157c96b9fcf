-- Devices in the nn library: model:cuda() / model:cpu(), and the rule that every tensor the layers,
-- losses and optimizers make while running is made on the device of a tensor that already exists
-- (nn.like), so that a model moved to a GPU never meets a host tensor of its own making.
-- This file runs on any build; the GPU comparison itself is in test_cuda.lua.
package.path = 'tests/lua/?.lua;' .. package.path
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local T = require 'flower.test'

-- A small net with every layer type (Preprocess, ZeroPadding2D, Conv2D, BatchNormalization, ReLU,
-- DepthwiseConv2D, SeparableConv2D, Add, ScaledAdd, Scale, Concatenate, Activation, both poolings,
-- both global poolings, Reshape, Flatten, Dropout, Dense, Softmax).
-- channels: input channels (3 by default); with_preprocess = false leaves the Preprocess layer out.
local function every_layer_net(softmax, channels, with_preprocess)
  nn.reset_names()
  local x = nn.Input{6, 6, channels or 3}
  local y = x
  if with_preprocess ~= false then y = nn.Preprocess{mode = 'torch'}(y) end
  y = nn.ZeroPadding2D{padding = 1}(y)
  y = nn.Conv2D{filters = 4, kernel_size = 3, use_bias = false}(y)
  y = nn.BatchNormalization{}(y)
  y = nn.ReLU{}(y)
  local d = nn.DepthwiseConv2D{kernel_size = 3, padding = 'same'}(y)
  local s = nn.SeparableConv2D{filters = 4, kernel_size = 3, padding = 'same'}(y)
  local a = nn.Add{}{d, s}
  a = nn.ScaledAdd{scale = 0.3}{a, y}
  a = nn.Scale{scale = 0.5}(a)
  local c = nn.Concatenate{}{a, y}
  c = nn.Activation('relu')(c)
  local p = nn.MaxPooling2D{pool_size = 2}(c)
  local q = nn.AveragePooling2D{pool_size = 2}(c)
  local g = nn.Add{}{nn.GlobalAveragePooling2D{}(p), nn.GlobalMaxPooling2D{}(q)}
  local f = nn.Flatten{}(nn.Reshape{target_shape = {2, 4}}(g))
  f = nn.Dropout{rate = 0.2}(f)
  local o = nn.Dense{units = 3}(f)
  if softmax then o = nn.Softmax{}(o) end
  return nn.Model(x, o)
end

local function batch()
  flower.manual_seed(3)
  return flower.empty(8, 6, 6, 3):uniform_(0, 255), flower.tensor({1, 2, 3, 1, 2, 3, 1, 2}, 'int64')
end

T.test('model:cuda() without CUDA raises the build error and leaves the model on the host', function()
  local m = every_layer_net()
  local k0 = m:layer('conv2d').kernel
  local xb, yb = batch()
  if not flower.cuda.built() then
    T.raises(function() m:cuda() end, 'model:cuda: cuda: flowerlua was built without CUDA (rebuild with `make CUDA=1`)')
    T.raises(function() m:layer('dense'):cuda() end, "layer 'dense' (Dense): cuda: flowerlua was built without CUDA")
  elseif not flower.cuda.available() then
    T.raises(function() m:cuda() end, 'model:cuda: ')
  else
    T.raises(function() m:cuda(flower.cuda.device_count()) end, 'model:cuda: ')
  end
  T.raises(function() m:cuda(-1) end, 'model:cuda: cuda: device must be an integer >= 0, got -1')
  T.check(rawequal(m:layer('conv2d').kernel, k0), 'a failed cuda() replaced a weight')
  T.eq(m:get_device(), -1)
  T.eq(m:layer('conv2d'):get_device(), -1)
  -- still trains on the host
  local loss = nn.CategoricalCrossentropy{from_logits = true}
  local opt = optim.SGD{lr = 0.05}
  m:training()
  m:zero_grad()
  local o = m:forward(xb)
  local l0 = loss:forward(o, yb)
  m:backward(xb, loss:backward(o, yb))
  opt:step(m)
  T.check(l0 == l0 and l0 > 0, 'loss ' .. tostring(l0))
  T.check(not m:layer('conv2d').kernel:equal(k0:clone():zero()), 'kernel is zero')
end)

-- replaces flower's constructors with functions that raise while fn runs
local function without_constructors(fn)
  local names = {'zeros', 'ones', 'empty', 'full', 'tensor', 'rand', 'randn', 'arange', 'linspace'}
  local saved = {}
  for _, n in ipairs(names) do
    saved[n] = flower[n]
    flower[n] = function() error('flower.' .. n .. ' called inside the nn library (use nn.like)', 2) end
  end
  local ok, err = pcall(fn)
  for _, n in ipairs(names) do flower[n] = saved[n] end
  if not ok then error(err, 0) end
end

T.test('layers, losses and optimizers allocate only through nn.like (on a reference tensor\'s device)', function()
  local xb, yb = batch()
  local probs = nn.one_hot(yb, 3)
  for _, case in ipairs{
    {optim.SGD{lr = 0.05, momentum = 0.9, nesterov = true, weight_decay = 0.01}, false},
    {optim.Adam{lr = 0.01, clipnorm = 1}, true},
  } do
    local opt, softmax = case[1], case[2]
    local m = every_layer_net(softmax)          -- built (weights initialised) before the patch
    local loss = nn.CategoricalCrossentropy{from_logits = not softmax, label_smoothing = 0.1}
    local before = m:layer('dense').kernel:clone()
    without_constructors(function()
      m:training()
      for step = 1, 2 do
        m:zero_grad()
        local o = m:forward(xb)
        local tgt = step == 1 and yb or probs     -- labels (one-hot inside the loss) and probabilities
        loss:forward(o, tgt)
        m:backward(xb, loss:backward(o, tgt))
        opt:step(m)
      end
      m:evaluate()
      local o = m:forward(xb)                     -- the fused inference path
      nn.accuracy(o, yb)
      nn.top_k_accuracy(o, yb, 2)
      nn.one_hot(yb, 3, 'float64', o)
      -- a standalone layer's lazily made gradients
      local dense = m:layer('dense')
      dense:zero_grad()
      dense:parameters()
    end)
    T.check(not m:layer('dense').kernel:equal(before), 'the optimizer did not move the weights')
  end
  -- and the patch itself works (so the test above can fail)
  T.raises(function() without_constructors(function() flower.zeros(2) end) end, 'flower.zeros called inside')
  T.check(flower.zeros(2):numel() == 2, 'constructors restored')
end)

T.test('nn.like: dtype, fill and device follow the reference', function()
  local r = flower.zeros({2, 3}, 'float64')
  local a = nn.like(r, {4})
  T.eq(a:dtype(), 'float64'); T.eq(a:size()[1], 4); T.eq(a:sum():item(), 0)
  T.eq(nn.like(r, {2}, 'float32', 1.5):sum():item(), 3)
  T.eq(nn.like(r, nil, 'float32', {1, 2, 3}):totable()[3], 3)
  T.eq(nn.like(r, {5}, nil, 'empty'):numel(), 5)
  T.eq(nn.device_of(a), nil)
  T.check(rawequal(nn.to_device(a, nil), a), 'to_device(host tensor, nil) copied')
end)

-- the loss trajectory of this net and batch, recorded with flowerlua before the nn library became
-- device-aware (same seeds, same steps); the comparison is bit-for-bit, so it runs on the
-- convolution kernels of that recording (our own; oneDNN, the default since, rounds differently)
local RECORDED = '2.6799864768981934 2.6539413928985596 1.668418288230896 1.7377370595932007 ' ..
                 '1.1503422260284424 1.6379063129425049 1.0140864849090576 1.1740957498550415'

local function trajectory(call_cpu)
  flower.manual_seed(5)
  local m = every_layer_net(false, 2, false)
  local loss = nn.CategoricalCrossentropy{from_logits = true}
  local xb = flower.empty(8, 6, 6, 2):uniform_(-1, 1)
  local yb = flower.tensor({1, 2, 3, 1, 2, 3, 1, 2}, 'int64')
  local out = {}
  for _, opt in ipairs{optim.Adam{lr = 0.01}, optim.SGD{lr = 0.05, momentum = 0.9, weight_decay = 0.01}} do
    for _ = 1, 4 do
      if call_cpu then
        local k = m:layer('conv2d').kernel
        local mm = m:layer('batch_normalization').moving_mean
        T.check(rawequal(m:cpu(), m), 'model:cpu() returns the model')
        T.check(rawequal(m:layer('conv2d').kernel, k), 'model:cpu() replaced a host weight')
        T.check(rawequal(m:layer('batch_normalization').moving_mean, mm), 'model:cpu() replaced a moving statistic')
      end
      m:zero_grad()
      local o2 = m:forward(xb)
      out[#out + 1] = string.format('%.17g', loss:forward(o2, yb))
      m:backward(xb, loss:backward(o2, yb))
      opt:step(m)
    end
  end
  return table.concat(out, ' ')
end

T.test('model:cpu() is a no-op on a host model; training is bit-identical to the recorded run', function()
  T.eq(trajectory(true), trajectory(false))
  nn.C.conv_engine('own')
  local ok, plain = pcall(trajectory, false)
  nn.C.conv_engine('auto')
  T.check(ok, plain)
  T.eq(plain, RECORDED)
end)

T.test('a layer built after cuda()/cpu() gets its weights on the remembered device', function()
  local l = nn.Dense{units = 2}
  l:cpu()
  T.eq(l:get_device(), -1)
  local y = l:forward(flower.ones(3, 4))
  T.eq(y:size()[2], 2)
  T.eq(nn.device_of(l.kernel), nil)
end)

T.done()
