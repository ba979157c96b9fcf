-- Finite-difference gradient checks in float64 for every layer (input and every trainable weight),
-- and for a whole graph with a residual branch, a concatenation and BatchNorm in both modes.
package.path = 'tests/lua/?.lua;' .. package.path
local flower = require 'flower'
local nn = require 'flower.nn'
local T = require 'flower.test'
local R = require 'nn_ref'

flower.manual_seed(1234)

-- f(params) = sum(forward(x) * gy); checks d f / d x and d f / d w for each trainable weight
local function check_layer(name, make, shapes, opts)
  opts = opts or {}
  T.test('finite differences: ' .. name, function()
    local layer = make()
    local xs = {}
    for i, s in ipairs(shapes) do xs[i] = flower.randn(s, 'float64') * (opts.scale or 1) end
    if opts.positive then for _, x in ipairs(xs) do x:abs_():add_(0.5) end end
    local x = #xs == 1 and xs[1] or xs
    local ss = {}
    for i, t in ipairs(xs) do local s = t:size(); table.remove(s, 1); ss[i] = s end
    layer:_infer(#xs == 1 and ss[1] or ss)
    layer:type('float64')
    for _, w in ipairs(layer:weights()) do   -- random weights (BN variances positive)
      if w.name == 'moving_variance' or w.name == 'gamma' then w.tensor:uniform_(0.5, 1.5)
      else w.tensor:normal_(0, 0.5) end
    end
    if opts.eval then layer:evaluate() else layer:training() end
    local function fwd()
      if opts.reset then opts.reset(layer) end
      return layer:forward(x)
    end
    local y = fwd()
    local gy = flower.randn(y:size(), 'float64')
    local function f() return (fwd() * gy):sum():item() end
    fwd()
    layer:zero_grad()
    local gx = layer:backward(x, gy)
    local gxs = flower.is_tensor(gx) and {gx} or gx
    for i, t in ipairs(xs) do R.fd_check(T, name .. ' input ' .. i, f, t, gxs[i], opts.tol or 1e-6) end
    local n = 0
    for _, w in ipairs(layer:trainable_weights()) do
      R.fd_check(T, name .. ' ' .. w.name, f, w.tensor, w.grad:clone(), opts.tol or 1e-6)
      n = n + 1
    end
    T.eq(n, opts.nweights or n)
  end)
end

check_layer('Conv2D 3x3/1 same + bias', function() return nn.Conv2D{filters = 3, kernel_size = 3, padding = 'same'} end,
  {{2, 5, 4, 2}}, {nweights = 2})
check_layer('Conv2D 3x3/2 same even (asymmetric pad)', function()
  return nn.Conv2D{filters = 2, kernel_size = 3, strides = 2, padding = 'same', use_bias = false} end, {{2, 6, 6, 2}},
  {nweights = 1})
check_layer('Conv2D 1x1 pointwise', function() return nn.Conv2D{filters = 3, kernel_size = 1} end, {{2, 3, 3, 4}})
check_layer('Conv2D 1x1/2', function() return nn.Conv2D{filters = 3, kernel_size = 1, strides = 2} end, {{2, 5, 5, 2}})
check_layer('Conv2D 1x7 + relu', function()
  return nn.Conv2D{filters = 2, kernel_size = {1, 7}, padding = 'same', activation = 'relu'} end, {{1, 3, 8, 2}})
check_layer('Conv2D dilated 3x3 tanh', function()
  return nn.Conv2D{filters = 2, kernel_size = 3, dilation_rate = 2, padding = 'same', activation = 'tanh'} end,
  {{1, 6, 6, 2}})
check_layer('DepthwiseConv2D 3x3/2 m2', function()
  return nn.DepthwiseConv2D{kernel_size = 3, strides = 2, padding = 'same', depth_multiplier = 2} end, {{2, 6, 5, 3}},
  {nweights = 2})
check_layer('SeparableConv2D 3x3', function()
  return nn.SeparableConv2D{filters = 3, kernel_size = 3, padding = 'same'} end, {{2, 5, 5, 2}}, {nweights = 3})
check_layer('BatchNormalization training', function() return nn.BatchNormalization{} end, {{3, 2, 3, 4}},
  {nweights = 2})
check_layer('BatchNormalization inference', function() return nn.BatchNormalization{} end, {{3, 2, 3, 4}},
  {eval = true, nweights = 2})
check_layer('BatchNormalization scale=False, 2-d', function() return nn.BatchNormalization{scale = false} end,
  {{6, 3}}, {nweights = 1})
check_layer('BatchNormalization frozen', function() return nn.BatchNormalization{trainable = false} end,
  {{3, 2, 2, 3}}, {nweights = 0})
for _, a in ipairs({'relu', 'sigmoid', 'tanh', 'softmax', 'linear'}) do
  check_layer('Activation ' .. a, function() return nn.Activation(a) end, {{2, 3, 5}})
end
check_layer('ReLU', function() return nn.ReLU{} end, {{3, 4}})
check_layer('MaxPooling2D 3/2 same', function() return nn.MaxPooling2D{pool_size = 3, strides = 2, padding = 'same'} end,
  {{2, 6, 7, 2}})
check_layer('AveragePooling2D 3/1 same', function()
  return nn.AveragePooling2D{pool_size = 3, strides = 1, padding = 'same'} end, {{2, 4, 5, 2}})
check_layer('AveragePooling2D 2 valid', function() return nn.AveragePooling2D{} end, {{1, 5, 4, 3}})
check_layer('GlobalAveragePooling2D', function() return nn.GlobalAveragePooling2D{} end, {{2, 3, 4, 5}})
check_layer('GlobalMaxPooling2D', function() return nn.GlobalMaxPooling2D{} end, {{2, 3, 4, 5}})
check_layer('Dense relu', function() return nn.Dense{units = 4, activation = 'relu'} end, {{3, 5}}, {nweights = 2})
check_layer('Dense softmax rank 3', function() return nn.Dense{units = 3, activation = 'softmax'} end, {{2, 3, 4}})
check_layer('Dropout (seeded, training)', function() return nn.Dropout{rate = 0.3, seed = 5} end, {{4, 6}},
  {reset = function(l) l._offset = 0 end})
check_layer('Flatten', function() return nn.Flatten{} end, {{2, 2, 3, 2}})
check_layer('Reshape', function() return nn.Reshape{target_shape = {3, -1}} end, {{2, 2, 3, 2}})
check_layer('Concatenate', function() return nn.Concatenate{} end, {{2, 3, 2, 2}, {2, 3, 2, 3}})
check_layer('Add of 3', function() return nn.Add{} end, {{2, 4}, {2, 4}, {2, 4}})
check_layer('Scale', function() return nn.Scale{scale = 0.17} end, {{2, 4}})
check_layer('ScaledAdd', function() return nn.ScaledAdd{scale = 0.2} end, {{2, 2, 2, 3}, {2, 2, 2, 3}})
check_layer('ZeroPadding2D', function() return nn.ZeroPadding2D{padding = {{1, 0}, {2, 1}}} end, {{2, 2, 3, 2}})
for _, m in ipairs({'caffe', 'tf', 'torch'}) do
  check_layer('Preprocess ' .. m, function() return nn.Preprocess{mode = m} end, {{2, 2, 2, 3}}, {scale = 50})
end

T.test('finite differences: a graph with a residual branch, concatenation and BatchNorm', function()
  nn.reset_names()
  local x = nn.Input{6, 6, 2}
  local a = nn.Conv2D{filters = 3, kernel_size = 3, padding = 'same'}(x)
  a = nn.BatchNormalization{}(a)
  a = nn.Activation('tanh')(a)
  local b = nn.Conv2D{filters = 3, kernel_size = 1}(x)
  local s = nn.Add{}{a, b}
  local c = nn.Concatenate{}{s, b}
  local p = nn.MaxPooling2D{pool_size = 2}(c)
  local d = nn.SeparableConv2D{filters = 2, kernel_size = 3, padding = 'same'}(p)
  local g = nn.GlobalAveragePooling2D{}(d)
  local o = nn.Dense{units = 3}(g)
  local m = nn.Model(x, o):type('float64')
  m.input_grad = true
  for _, mode in ipairs({'training', 'evaluate'}) do
    m[mode](m)
    m.grad_enabled = true
    local xin = flower.randn({2, 6, 6, 2}, 'float64')
    local gy = flower.randn({2, 3}, 'float64')
    local function f() return (m:forward(xin) * gy):sum():item() end
    m:forward(xin)
    m:zero_grad()
    local gx = m:backward(xin, gy)
    R.fd_check(T, mode .. ' input', f, xin, gx, 1e-6)
    for _, w in ipairs(m:trainable_weights()) do R.fd_check(T, mode .. ' ' .. w.path, f, w.tensor, w.grad:clone(), 1e-6) end
  end
end)

T.test('training with fused BN+ReLU / Add+ReLU / ScaledAdd+ReLU: finite differences, same as unfused', function()
  nn.reset_names()
  local x = nn.Input{5, 5, 3}
  local a = nn.Conv2D{filters = 3, kernel_size = 3, padding = 'same'}(x)
  a = nn.BatchNormalization{}(a)
  a = nn.ReLU{}(a)
  local s = nn.Activation('relu')(nn.Add{}{a, x})
  local b = nn.Conv2D{filters = 3, kernel_size = 1}(s)
  local r = nn.Activation('relu')(nn.ScaledAdd{scale = 0.3}{s, b})
  local o = nn.Dense{units = 2}(nn.GlobalAveragePooling2D{}(r))
  local m = nn.Model(x, o):type('float64')
  -- random biases too: with zero biases, positions where a ReLU output is 0 would sit exactly on the
  -- next ReLU's kink and finite differences would see half the slope
  for _, w in ipairs(m:weights()) do
    if w.name == 'moving_variance' or w.name == 'gamma' then w.tensor:uniform_(0.5, 1.5)
    else w.tensor:normal_(0, 0.5) end
  end
  m.input_grad = true
  m:training()
  local plan = m:_plan(true)
  local nf = 0
  for _, f in pairs(plan.fused) do if f.kind == 'relu' then nf = nf + 1 end end
  T.eq(nf, 3, 'relu fusions in training')
  local xin = flower.randn({2, 5, 5, 3}, 'float64')
  local gy = flower.randn({2, 2}, 'float64')
  local function f() return (m:forward(xin) * gy):sum():item() end
  local out = m:forward(xin):clone()
  m:zero_grad()
  local gx = m:backward(xin, gy):clone()
  R.fd_check(T, 'input', f, xin, gx, 1e-6)
  local grads = {}
  for i, w in ipairs(m:trainable_weights()) do
    grads[i] = w.grad:clone()
    R.fd_check(T, w.path, f, w.tensor, grads[i], 1e-6)
  end
  nn.fusion = false
  local out2 = m:forward(xin)
  m:zero_grad()
  local gx2 = m:backward(xin, gy)
  nn.fusion = true
  T.allclose(out2, out, 1e-12)
  T.allclose(gx2, gx, 1e-12)
  for i, w in ipairs(m:trainable_weights()) do T.allclose(w.grad, grads[i], 1e-12, 1e-14, w.path) end
end)

T.done()
