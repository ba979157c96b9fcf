-- Every layer against Keras (tf-keras) on the cases of tests/reference/gen_layers.py: outputs
-- (rel. 1e-4), input and weight gradients (1e-3), moving statistics after a training step.
package.path = 'tests/lua/?.lua;' .. package.path
local flower = require 'flower'
local nn = require 'flower.nn'
local T = require 'flower.test'
local R = require 'nn_ref'
local cjson = require 'cjson'

local M = R.load('gen_layers', 'layers')

local function cfg_of(case)
  local c = {}
  for k, v in pairs(case.config) do
    if k == 'kernel_regularizer' then v = nn.l2(v.l2) end
    c[k] = v
  end
  c.name = case.name
  return c
end

local function arrays(case, list)
  local r = {}
  for i, ref in ipairs(list) do r[i] = R.array(M, case.name, ref) end
  return r
end

local ncases = 0
for _, case in ipairs(M.layers) do
  ncases = ncases + 1
  T.test('keras ' .. case.name, function()
    local layer = nn[case.class](cfg_of(case))
    local xs = arrays(case, case.inputs)
    local x = #xs == 1 and xs[1] or xs
    local shapes = {}
    for i, t in ipairs(xs) do local s = t:size(); table.remove(s, 1); shapes[i] = s end
    layer:_infer(#xs == 1 and shapes[1] or shapes)
    -- weights in Keras order, with Keras's names
    local names = {}
    for i, w in ipairs(layer:weights()) do names[i] = w.name end
    T.eq(table.concat(names, ','), table.concat(case.weight_names, ','), 'weight names')
    if #case.weights > 0 then layer:set_weights(arrays(case, case.weights)) end
    layer.trainable = case.trainable
    if case.training then layer:training() else layer:evaluate() end
    local y = layer:forward(x)
    T.allclose(y, R.array(M, case.name, case.y), 1e-4, 1e-6, 'output')
    layer:zero_grad()
    local gx = layer:backward(x, R.array(M, case.name, case.gy))
    local gxs = flower.is_tensor(gx) and {gx} or gx
    for i, ref in ipairs(case.gx) do
      T.allclose(gxs[i], R.array(M, case.name, ref), 1e-3, 1e-6, 'input gradient ' .. i)
    end
    -- parameter gradients (Keras's loss also holds the regularizers: add their gradient 2*l*w)
    T.eq(#layer:trainable_weights(), #case.trainable_names, 'number of trainable weights')
    for i, n in ipairs(case.trainable_names) do
      local g = layer.grads[n]
      T.check(g ~= nil, 'no gradient for ' .. n)
      local reg = layer.regularizers and layer.regularizers[n]
      if reg then g = g + layer[n] * (2 * reg.l2) end
      T.allclose(g, R.array(M, case.name, case.gw[i]), 1e-3, 1e-6, 'gradient of ' .. n)
    end
    if not case.trainable then
      for _, n in ipairs(case.weight_names) do T.check(layer.grads[n] == nil, 'frozen layer got a gradient for ' .. n) end
    end
    -- weights after the step: BatchNorm's moving statistics in training mode, unchanged otherwise
    for i, w in ipairs(layer:get_weights()) do
      T.allclose(w, R.array(M, case.name, case.weights_after[i]), 1e-4, 1e-6, 'weight after: ' .. case.weight_names[i])
    end
    if case.reg_loss ~= 0 then T.near(nn.regularization_loss(layer), case.reg_loss, 1e-4) end
  end)
end

T.test('reference covers every layer type', function()
  local seen = {}
  for _, c in ipairs(M.layers) do seen[c.class] = true end
  for _, k in ipairs({'Conv2D', 'DepthwiseConv2D', 'SeparableConv2D', 'BatchNormalization', 'Activation', 'ReLU',
      'MaxPooling2D', 'AveragePooling2D', 'GlobalAveragePooling2D', 'GlobalMaxPooling2D', 'Dense', 'Flatten',
      'Reshape', 'Concatenate', 'Add', 'Scale', 'ScaledAdd', 'ZeroPadding2D', 'Preprocess'}) do
    T.check(seen[k], 'no Keras reference for ' .. k)
  end
  T.check(ncases >= 50, 'expected at least 50 layer cases, got ' .. ncases)
end)

-- losses and metrics
for _, c in ipairs(M.losses) do
  T.test('keras loss ' .. c.name, function()
    local out = R.array(M, 'loss_' .. c.name, c.output)
    local target = c.target ~= cjson.null and R.array(M, 'loss_' .. c.name, c.target)
      or R.array(M, 'loss_' .. c.name, c.labels)
    local loss = nn.CategoricalCrossentropy{from_logits = c.from_logits, label_smoothing = c.label_smoothing}
    T.near(loss:forward(out, target), c.loss, 1e-5)
    T.allclose(loss:backward(out, target), R.array(M, 'loss_' .. c.name, c.grad), 1e-4, 1e-7, 'gradient')
  end)
end

T.test('keras metrics accuracy and top-k (ties count inside)', function()
  local m = M.metrics[1]
  local s, l = R.array(M, 'metrics', m.scores), R.array(M, 'metrics', m.labels)
  T.near(nn.accuracy(s, l), m.accuracy, 1e-6)
  for k, v in pairs(m.top_k) do T.near(nn.top_k_accuracy(s, l, tonumber(k)), v, 1e-6, 0, 'top ' .. k) end
end)

-- summaries: the same text as Keras's model.summary()
T.test('summary matches Keras (functional, with a frozen layer)', function()
  nn.reset_names()
  local x = nn.Input{shape = {9, 9, 3}, name = 'input_1'}
  local y = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same', use_bias = false, name = 'conv1'}(x)
  y = nn.BatchNormalization{name = 'bn1'}(y)
  y = nn.Activation{'relu', name = 'act1'}(y)
  local s = nn.Conv2D{filters = 4, kernel_size = 1, strides = 2, name = 'short'}(x)
  local p = nn.MaxPooling2D{pool_size = 3, strides = 2, padding = 'same', name = 'max_pooling2d'}(y)
  local a = nn.Add{name = 'add'}{p, s}
  local c = nn.Concatenate{name = 'concatenate'}{a, s}
  local g = nn.GlobalAveragePooling2D{name = 'global_average_pooling2d'}(c)
  local o = nn.Dense{units = 5, activation = 'softmax', name = 'predictions'}(g)
  local m = nn.Model(x, o, {name = 'tiny'})
  m:layer('short').trainable = false
  T.eq(m:summary{print_fn = false}, M.summaries[1].text)
end)

T.test('summary matches Keras (sequential)', function()
  local seq = nn.Sequential({nn.Input{shape = {8}, name = 'input_2'}, nn.Dense{units = 4, name = 'dense_a'},
    nn.ReLU{name = 'relu_a'}, nn.Dense{units = 3, name = 'dense_b'}}, {name = 'seq'})
  T.eq(seq:summary{print_fn = false}, M.summaries[2].text)
end)

T.done()
