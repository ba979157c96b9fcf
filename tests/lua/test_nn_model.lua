-- Graphs and training: shape inference and its errors, freezing (no backward into a frozen prefix,
-- frozen weights bit-identical), nested models, Sequential, output_of, fused inference, Dropout,
-- and small networks that learn.
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local train = require 'flower.train'
local T = require 'flower.test'

-- counts calls of a layer method
local function spy(layer, method)
  local n = {count = 0}
  local orig = layer[method]
  layer[method] = function(...) n.count = n.count + 1; return orig(...) end
  return n
end

T.test('shape inference and Keras names', function()
  nn.reset_names()
  local x = nn.Input{224, 224, 3}
  T.eq(x.layer.name, 'input_1')
  local y = nn.ZeroPadding2D{padding = 3}(x)
  y = nn.Conv2D{filters = 64, kernel_size = 7, strides = 2}(y)
  T.eq(y.layer.name, 'conv2d')
  T.eq(nn.shape_str(y.shape), '(None, 112, 112, 64)')
  y = nn.MaxPooling2D{pool_size = 3, strides = 2, padding = 'same'}(y)
  T.eq(nn.shape_str(y.shape), '(None, 56, 56, 64)')
  local z = nn.Conv2D{filters = 8, kernel_size = 3}(y)
  T.eq(z.layer.name, 'conv2d_1')
  T.eq(nn.ReLU{}.name, 're_lu')
  T.eq(nn.BatchNormalization{}.name, 'batch_normalization')
  T.eq(nn.DepthwiseConv2D{kernel_size = 3}.name, 'depthwise_conv2d')
  T.eq(nn.GlobalAveragePooling2D{}.name, 'global_average_pooling2d')
  -- unknown spatial size
  local u = nn.Input{-1, -1, 3}
  local v = nn.Conv2D{filters = 4, kernel_size = 3, strides = 2, padding = 'same'}(u)
  T.eq(nn.shape_str(v.shape), '(None, None, None, 4)')
  T.eq(nn.shape_str(nn.GlobalAveragePooling2D{}(v).shape), '(None, 4)')
end)

T.test('errors name the layer and say what does not fit', function()
  local x = nn.Input{8, 8, 3}
  local a = nn.Conv2D{filters = 4, kernel_size = 1, name = 'a'}(x)
  local b = nn.Conv2D{filters = 5, kernel_size = 1, name = 'b'}(x)
  T.raises(function() nn.Add{name = 'sum'}{a, b} end,
    "layer 'sum' (Add): input 2 has shape (None, 8, 8, 5), input 1 has (None, 8, 8, 4)")
  T.raises(function() nn.MaxPooling2D{pool_size = 9, name = 'big'}(x) end, "layer 'big' (MaxPooling2D)")
  T.raises(function() nn.Dense{units = 3, name = 'd'}(nn.Input{-1}) end, "layer 'd' (Dense): the last dim")
  T.raises(function() nn.Conv2D{filters = 3, kernel_size = 3, name = 'c'}(nn.Input{5}) end,
    "layer 'c' (Conv2D): expects an image (H, W, C)")
  T.raises(function() nn.Conv2D{filters = 3, kernel_size = 3, pading = 'same'} end, "unknown option 'pading'")
  T.raises(function() nn.Conv2D{filters = 3, kernel_size = 3, padding = 'full'} end, "padding must be 'valid' or 'same'")
  T.raises(function() nn.Conv2D{filters = 0, kernel_size = 3} end, 'filters must be an integer >= 1')
  local reused = nn.Dense{units = 2}
  reused(nn.Input{3})
  T.raises(function() reused(nn.Input{3}) end, 'sharing a layer')
  local m = nn.Model(x, a)
  T.raises(function() m:forward(flower.zeros(2, 8, 8, 2)) end, "input 1 ('")
  T.raises(function() m:forward(flower.zeros(8, 8, 3)) end, 'must have 4 dims')
  m:evaluate()
  m:forward(flower.zeros(1, 8, 8, 3))
  T.raises(function() m:backward(flower.zeros(1, 8, 8, 3), flower.zeros(1, 8, 8, 4)) end,
    'backward needs a forward in training mode')
  -- a kernel error deep in a graph names the layer
  local y = nn.Dense{units = 2, name = 'head'}(nn.Input{4})
  local m2 = nn.Model(y.layer._nodes[1].inputs[1], y)
  m2:type('float64')
  T.raises(function() m2:forward(flower.zeros(2, 4)) end, 'input 1 is float32, the model is float64')
  local c = nn.Conv2D{filters = 2, kernel_size = 1, name = 'conv64'}
  c:_infer({3, 3, 2})
  c:type('float64')
  T.raises(function() c:forward(flower.zeros(1, 3, 3, 2)) end,
    "layer 'conv64' (Conv2D): conv2d_forward: kernel has dtype float64, expected float32")
  local d1 = nn.Dense{units = 2, name = 'dup'}(nn.Input{3})
  local d2 = nn.Dense{units = 2, name = 'dup'}(d1)
  T.raises(function() nn.Model(d1.layer._nodes[1].inputs[1], d2) end, 'the name "dup" is used twice')
end)

-- issue 14: wrong calls are refused at the door, naming the model and saying what was expected and
-- what was found
T.test('forward, backward and predict check their arguments before anything runs', function()
  local x = nn.Input{8, 8, 3, name = 'img'}
  local y = nn.GlobalAveragePooling2D{}(nn.Conv2D{filters = 4, kernel_size = 3}(x))
  local m = nn.Model(x, nn.Dense{units = 2, name = 'head'}(y), {name = 'tiny'})
  local good = flower.randn(2, 8, 8, 3)
  T.raises(function() m:forward(nil) end, "layer 'tiny' (Model): forward expects a tensor Nx8x8x3, got nil")
  T.raises(function() m:forward('x') end, 'forward expects a tensor Nx8x8x3, got string')
  T.raises(function() m:forward({good, good}) end, 'forward expects 1 input tensor(s) (a tensor Nx8x8x3), got 2')
  T.raises(function() m:forward(flower.randn(8, 8, 3)) end,
    "input 1 ('img') must have 4 dims (batch, 8, 8, 3), got 3 (shape 8x8x3)")
  T.raises(function() m:forward(flower.randn(2, 8, 8, 4)) end,
    "input 1 ('img') has 4 channels, the model expects 3 (shape 2x8x8x4, expected Nx8x8x3)")
  T.raises(function() m:forward(flower.randn(2, 9, 8, 3)) end, "has shape 2x9x8x3, the model expects Nx8x8x3")
  T.raises(function() m:forward(flower.zeros({2, 8, 8, 3}, 'int64')) end,
    "input 1 ('img') is int64, the layers reading it compute in float32")
  T.raises(function() m:forward(good:double()) end, 'input 1 is float64, the model is float32')
  -- several inputs: a list of one tensor per input, one batch size
  local a, b = nn.Input{4, name = 'a'}, nn.Input{4, name = 'b'}
  local two = nn.Model({a, b}, nn.Add{}{a, b}, {name = 'two'})
  T.raises(function() two:forward(flower.randn(2, 4)) end,
    "layer 'two' (Model): forward expects 2 input tensor(s) (a list of 2 tensors {Nx4, Nx4}), got 1")
  T.raises(function() two:forward({nil, flower.randn(2, 4)}) end, "input 1 ('a') must be a tensor Nx4, got nil")
  T.raises(function() two:forward({flower.randn(2, 4), flower.randn(3, 4)}) end,
    "input 2 ('b') has batch size 3, input 1 has 2")
  -- an integer input is fine where a Preprocess layer reads it
  local img = nn.Input{4, 4, 3}
  local pm = nn.Model(img, nn.Preprocess{mode = 'tf'}(img))
  T.eq(pm:forward(flower.zeros({1, 4, 4, 3}, 'uint8')):dtype(), 'float32')
  -- backward: gradOutput of the output's shape and width, and the input as forward took it
  m:training()
  m:forward(good)
  T.raises(function() m:backward(good, nil) end,
    "layer 'tiny' (Model): backward: gradOutput must be a tensor of the output's shape 2x2, got nil")
  T.raises(function() m:backward(good, flower.randn(2, 3)) end,
    'backward: gradOutput 1 has shape 2x3, output 1 has 2x2')
  T.raises(function() m:backward(good, flower.randn(2, 2):double()) end,
    'backward: gradOutput 1 is float64, output 1 is float32')
  T.raises(function() m:backward(good, flower.zeros({2, 2}, 'int64')) end, 'backward: gradOutput 1 is int64')
  T.raises(function() m:backward(nil, flower.randn(2, 2)) end, 'backward expects a tensor Nx8x8x3, got nil')
  m:backward(good, flower.randn(2, 2))   -- the refused calls left the forward's state usable
  T.check(m:layer('head').grads.kernel:abs():sum():item() > 0, 'no gradient after the refused calls')
  -- predict: the input and the batch size
  T.raises(function() m:predict(nil) end, "layer 'tiny' (Model): predict expects a tensor Nx8x8x3, got nil")
  T.raises(function() m:predict(good, 0) end, 'predict: batch_size must be an integer >= 1, got 0')
  T.raises(function() m:predict(flower.randn(2, 8, 8, 4)) end, 'has 4 channels, the model expects 3')
  T.allclose(two:predict({flower.ones(3, 4), flower.ones(3, 4)}, 2), flower.full({3, 4}, 2))
  -- standalone layers and an unbuilt Sequential
  local d = nn.Dense{units = 2, name = 'lonely'}
  T.raises(function() d:forward(nil) end,
    "layer 'lonely' (Dense): forward expects a tensor (N, ...) with a batch dim, got nil")
  T.raises(function() d:forward(flower.randn(3)) end, 'got a float32 tensor of shape 3')
  d:forward(flower.randn(2, 3))
  T.raises(function() d:forward(flower.randn(2, 5)) end,
    "layer 'lonely' (Dense): input has 5 features, the kernel expects 3")
  T.raises(function() d:backward(flower.randn(2, 3), flower.randn(2, 5)) end,
    "gradOutput must be a tensor of the output's shape 2x2, got a float32 tensor of shape 2x5")
  T.raises(function() nn.Add{name = 'plus'}:forward(flower.randn(2, 3)) end,
    "layer 'plus' (Add): forward expects a list of tensors (N, ...), got a float32 tensor")
  T.raises(function() nn.Sequential{nn.Dense{units = 2}, name = 'seq'}:forward(nil) end,
    "layer 'seq' (Sequential): forward expects a tensor (N, ...) with a batch dim, got nil")
end)

-- issue 12: summary() prints its table once and returns nothing (Keras), so the REPL shows it once;
-- print_fn = false returns the text instead of printing it
T.test('summary does one thing: prints, or returns the text', function()
  local m = nn.Sequential{nn.Input{3}, nn.Dense{units = 2}}
  local printed = {}
  T.eq(select('#', m:summary{print_fn = function(t) printed[#printed + 1] = t end}), 0)
  T.eq(#printed, 1)
  local text = m:summary{print_fn = false}
  T.eq(text, printed[1])
  T.check(text:find('Total params: 8 ', 1, true), 'table')
  T.raises(function() m:summary{print_fn = 'stdout'} end, 'print_fn must be a function or false')
  T.raises(function() m:summary('wide') end, 'expected a table of options')
  T.raises(function() m:summary{line_length = 0} end, 'line_length must be an integer >= 20, got 0')
end)

-- an error in a layer's options points at the line that made the layer (it pointed at its caller,
-- or nowhere)
T.test('a bad option raises at the line that made the layer', function()
  local line
  local function make(opts)
    line = debug.getinfo(1, 'l').currentline + 1
    local layer = nn.Conv2D(opts)
    return layer
  end
  for _, opts in ipairs {{filters = 2}, {filters = 2, kernel_size = 3, padding = 'full'},
      {filters = 2, kernel_size = 3, paddin = 'same'}, {filters = 2, kernel_size = 3, activation = 'swoosh'}} do
    local err = T.raises(function() make(opts) end)
    T.check(err:find('test_nn_model.lua:' .. line .. ':', 1, true), 'no position of the call in: ' .. err)
  end
  local function drop() local d = nn.Dropout(2); return d end
  T.check(T.raises(drop, 'rate must be a number'):find('test_nn_model.lua:' .. debug.getinfo(drop, 'S').linedefined),
    'Dropout error without the position of the call')
end)

T.test('layers, keras_layers order, layer(), output_of()', function()
  nn.reset_names()
  local x = nn.Input{6, 6, 2}
  local a = nn.Conv2D{filters = 3, kernel_size = 3, padding = 'same', name = 'a'}(x)
  local b = nn.Conv2D{filters = 3, kernel_size = 1, name = 'b'}(x)
  local s = nn.Add{name = 's'}{a, b}
  local g = nn.GlobalAveragePooling2D{name = 'avg_pool'}(s)
  local o = nn.Dense{units = 2, name = 'out'}(g)
  local m = nn.Model(x, o)
  local names = {}
  for i, l in ipairs(m:layers()) do names[i] = l.name end
  T.eq(table.concat(names, ' '), 'input_1 a b s avg_pool out')
  names = {}
  for i, l in ipairs(m:keras_layers()) do names[i] = l.name end
  T.eq(table.concat(names, ' '), 'input_1 a b s avg_pool out')
  T.eq(m:layer('s').class_name, 'Add')
  T.raises(function() m:layer('nope') end, "no layer named 'nope'")
  local feat = m:output_of('avg_pool')
  local xin = flower.randn(3, 6, 6, 2)
  m:evaluate(); feat:evaluate()
  local f = feat:forward(xin)
  T.eq(table.concat(f:size(), 'x'), '3x3')
  local manual = m:layer('out'):forward(f)
  T.allclose(m:forward(xin), manual, 1e-6)
  local total = m:count_params()
  T.eq(total, 3 * 3 * 2 * 3 + 3 + 2 * 3 + 3 + 3 * 2 + 2)
end)

T.test('fused Conv+BN+ReLU inference equals the layer-by-layer result', function()
  flower.manual_seed(7)
  local x = nn.Input{9, 9, 3}
  local y = nn.Conv2D{filters = 6, kernel_size = 3, strides = 2, padding = 'same'}(x)
  y = nn.BatchNormalization{}(y)
  y = nn.Activation('relu')(y)
  local z = nn.SeparableConv2D{filters = 4, kernel_size = 3, padding = 'same', use_bias = false}(y)
  z = nn.BatchNormalization{}(z)
  local w = nn.BatchNormalization{}(y)
  w = nn.ReLU{}(w)
  local o = nn.Concatenate{}{z, nn.Conv2D{filters = 4, kernel_size = 1}(w)}
  local m = nn.Model(x, o)
  T.randomize_batchnorm(m)
  m:evaluate()
  local xin = flower.randn(2, 9, 9, 3)
  local plan = m:_plan(false)
  local nf = 0
  for _ in pairs(plan.fused) do nf = nf + 1 end
  T.eq(nf, 3, 'fused groups (conv+bn+relu, sepconv+bn, bn+relu)')
  local fused = m:forward(xin):clone()
  nn.fusion = false
  local plain = m:forward(xin)
  nn.fusion = true
  T.allclose(fused, plain, 1e-5)
  T.check(m._state == nil, 'inference kept state for backward')
end)

T.test('inference with folded padding and in-place Add/BN/ReLU equals the plain run; inputs untouched', function()
  flower.manual_seed(17)
  nn.reset_names()
  local x = nn.Input{10, 9, 4}
  local a = nn.ZeroPadding2D{padding = {{3, 2}, {2, 4}}}(x)
  a = nn.Conv2D{filters = 4, kernel_size = 5, strides = 2}(a)                -- padding folded, + BN + ReLU
  a = nn.ReLU{}(nn.BatchNormalization{}(a))
  local b = nn.Conv2D{filters = 4, kernel_size = 3, strides = 2, padding = 'same'}(
    nn.ZeroPadding2D{padding = 1}(x))                                          -- padding folded, plain conv
  local c = nn.Activation('relu')(nn.Add{}{a, b})                             -- in place
  local d = nn.BatchNormalization{}(c)                                        -- in place (inference)
  local e = nn.ScaledAdd{scale = 0.3}{d, nn.Conv2D{filters = 4, kernel_size = 1}(d)}
  local g = nn.Add{}{e, nn.Conv2D{filters = 4, kernel_size = 1}(e), a}
  local m = nn.Model(x, nn.Activation('relu')(g))
  T.randomize_batchnorm(m)
  m:evaluate()
  local plan = m:_plan(false)
  local nfold = 0
  for _ in pairs(plan.padfold) do nfold = nfold + 1 end
  T.eq(nfold, 2, 'folded paddings')
  local xin = flower.randn(2, 10, 9, 4)
  local x0 = xin:clone()
  local into = spy(m:layer('add'), '_forward_into')
  local into_bn = spy(m:layer('batch_normalization_1'), '_forward_into')
  local fast = m:forward(xin):clone()
  T.check(into.count == 1 and into_bn.count == 1, 'Add / BN did not run in place')
  T.check(xin:equal(x0), 'the model input was overwritten')
  nn.fusion, nn.inplace = false, false
  local plain = m:forward(xin)
  nn.fusion, nn.inplace = true, true
  T.allclose(fast, plain, 1e-5)
  -- an output that is also read by a later layer is not overwritten either
  local y1 = nn.Activation('relu')
  local o1 = y1(x)
  local o2 = nn.BatchNormalization{}(o1)
  local m2 = nn.Model(x, {o1, o2})
  m2:evaluate()
  local outs = m2:forward(xin)
  T.allclose(outs[1], xin:relu(), 0)
end)

-- a frozen base (conv + BN) followed by a trainable head
local function frozen_base_model()
  nn.reset_names()
  local x = nn.Input{8, 8, 2}
  local y = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same', name = 'base_conv'}(x)
  y = nn.BatchNormalization{name = 'base_bn'}(y)
  y = nn.ReLU{name = 'base_relu'}(y)
  local base = nn.Model(x, y, {name = 'base'})
  local x2 = nn.Input{8, 8, 2}
  local h = base(x2)
  h = nn.Conv2D{filters = 3, kernel_size = 3, padding = 'same', name = 'head_conv'}(h)
  h = nn.GlobalAveragePooling2D{}(h)
  h = nn.Dense{units = 2, name = 'head_dense'}(h)
  return nn.Model(x2, h, {name = 'full'}), base
end

T.test('frozen prefix: no backward into it, fused forward, weights and BN statistics bit-identical', function()
  flower.manual_seed(11)
  local m, base = frozen_base_model()
  base.trainable = false
  local conv, bn = base:layer('base_conv'), base:layer('base_bn')
  local k0, mm0, mv0 = conv.kernel:clone(), bn.moving_mean:clone(), bn.moving_variance:clone()
  local cb, bb = spy(conv, '_backward'), spy(bn, '_backward')
  local cf = spy(conv, '_forward')
  local opt = optim.SGD{lr = 0.1, momentum = 0.9, weight_decay = 0.01}
  m:training()
  local loss = nn.CategoricalCrossentropy{from_logits = true}
  local xin, lab = flower.randn(4, 8, 8, 2), flower.tensor({1, 2, 2, 1}, 'int64')
  local head0 = m:layer('head_dense').kernel:clone()
  for _ = 1, 3 do train.step(m, {x = xin, y = lab}, train.make_loss(loss), opt) end
  T.eq(cb.count, 0, 'backward calls into the frozen conv')
  T.eq(bb.count, 0, 'backward calls into the frozen BN')
  T.eq(cf.count, 0, 'the frozen conv ran unfused')
  T.check(conv.kernel:equal(k0), 'frozen kernel changed')
  T.check(bn.moving_mean:equal(mm0) and bn.moving_variance:equal(mv0), 'frozen BN statistics changed')
  T.check(not m:layer('head_dense').kernel:equal(head0), 'the head did not train')
  local total, trainable = m:count_params()
  T.eq(total - trainable, 4 * 3 * 3 * 2 + 4 + 4 * 4)
  local text = m:summary{print_fn = false}
  T.check(text:find('base (Functional)', 1, true), 'nested model not shown as Functional')
  -- unfrozen, the same model trains the base too, and BN uses batch statistics
  base.trainable = true
  m:zero_grad()
  local out = m:forward(xin)
  m:backward(xin, loss:backward(out, lab))
  T.check(cb.count == 1 and bb.count == 1, 'the unfrozen base got no backward')
  T.check(not bn.moving_mean:equal(mm0), 'BN statistics did not move in training mode')
end)

T.test('a layer frozen by trainable=false inside a trainable model', function()
  local m = frozen_base_model()
  local hc = m:layer('head_conv')
  hc.trainable = false
  local b = spy(hc, '_backward')
  m:training()
  m:zero_grad()
  local xin = flower.randn(2, 8, 8, 2)
  local out = m:forward(xin)
  m:backward(xin, out:clone():fill(1))
  -- head_conv passes the gradient on to the (trainable) base but accumulates none itself
  T.eq(b.count, 1)
  T.check(hc.grads.kernel == nil, 'frozen layer accumulated a kernel gradient')
  T.check(m:layer('base'):layer('base_conv').grads.kernel:abs():sum():item() > 0, 'base got no gradient')
end)

T.test('Sequential: lazy build, add, as a layer, summary', function()
  nn.reset_names()
  local s = nn.Sequential{nn.Dense{units = 4, activation = 'relu'}, nn.Dense{units = 2}}
  local y = s:forward(flower.randn(3, 5))
  T.eq(table.concat(y:size(), 'x'), '3x2')
  s:add(nn.Activation('softmax'))
  T.allclose(s:forward(flower.ones(2, 5)):sum(2, true), {{1}, {1}}, 1e-6)
  local s2 = nn.Sequential{nn.Input{6}, nn.Dense{units = 3}}
  local outer = nn.Model(s2.inputs[1], nn.Dense{units = 1}(s2.outputs[1]))
  T.eq(#outer:trainable_weights(), 4)
  local s3 = nn.Sequential{nn.Dense{units = 3, input_shape = {7}}}
  T.eq(nn.shape_str(s3.outputs[1].shape), '(None, 3)')
end)

T.test('Dropout: inverted scaling, eval identity, seeded reproducibility', function()
  local d = nn.Dropout{rate = 0.25, seed = 42}
  local x = flower.ones(200, 50)
  local y = d:forward(x)
  local kept = y:gt(0):type('float32'):mean():item()
  T.near(kept, 0.75, 0.04)
  T.near(y:max():item(), 1 / 0.75, 1e-6)
  local g = d:backward(x, flower.ones(200, 50))
  T.check(g:equal(y), 'backward uses the forward mask')
  local d2 = nn.Dropout{rate = 0.25, seed = 42}
  T.check(d2:forward(x):equal(y), 'same seed, same mask')
  T.check(not d:forward(x):equal(y), 'the next call draws a new mask')
  d:evaluate()
  T.check(rawequal(d:forward(x), x), 'evaluate mode is the identity')
end)

T.test('model:type float64 and parameters()', function()
  local m = frozen_base_model()
  m:type('float64')
  local out = m:forward(flower.randn({2, 8, 8, 2}, 'float64'))
  T.eq(out:dtype(), 'float64')
  local ps, gs = m:parameters()
  T.eq(#ps, #gs)
  T.eq(#ps, 2 + 2 + 2 + 2)     -- base conv kernel,bias; BN gamma,beta; head conv; head dense
  T.eq(ps[1]:dtype(), 'float64')
end)

-- separable synthetic images: a bright horizontal bar (class 1), vertical bar (2) or diagonal (3)
local function bars(n, seed)
  flower.manual_seed(seed)
  local x = flower.randn(n, 8, 8, 1) * 0.3
  local lab = {}
  for i = 1, n do
    local c = (i % 3) + 1
    local p = math.random(1, 8)
    local img = x:narrow(1, i, 1)
    if c == 1 then img:narrow(2, p, 1):add_(1)
    elseif c == 2 then img:narrow(3, p, 1):add_(1)
    else for k = 1, 8 do img:narrow(2, k, 1):narrow(3, k, 1):add_(1) end end
    lab[i] = c
  end
  return x, flower.tensor(lab, 'int64')
end

T.test('a tiny CNN learns a separable problem to > 95% (fixed seed)', function()
  math.randomseed(5)
  local xtr, ytr = bars(240, 1)
  local xte, yte = bars(120, 2)
  flower.manual_seed(3)
  nn.reset_names()
  local m = nn.Sequential{
    nn.Input{8, 8, 1},
    nn.Conv2D{filters = 8, kernel_size = 3, padding = 'same', use_bias = false},
    nn.BatchNormalization{}, nn.ReLU{},
    nn.MaxPooling2D{pool_size = 2},
    nn.Conv2D{filters = 8, kernel_size = 3, activation = 'relu'},
    nn.GlobalAveragePooling2D{},
    nn.Dense{units = 3},
  }
  local opt = optim.Adam{lr = 0.01}
  local loss = train.make_loss(nn.CategoricalCrossentropy{from_logits = true})
  m:training()
  for _ = 1, 12 do
    for s = 1, 240, 24 do
      train.step(m, {x = xtr:narrow(1, s, 24), y = ytr:narrow(1, s, 24)}, loss, opt)
    end
  end
  local acc = nn.accuracy(m:predict(xte, 40), yte)
  T.check(acc > 0.95, 'test accuracy ' .. acc)
end)

T.test('a net with a residual branch, a concatenation and a frozen prefix trains', function()
  math.randomseed(8)
  local xtr, ytr = bars(120, 4)
  flower.manual_seed(21)
  nn.reset_names()
  local x = nn.Input{8, 8, 1}
  local stem = nn.Conv2D{filters = 6, kernel_size = 3, padding = 'same', name = 'stem'}(x)
  stem = nn.BatchNormalization{name = 'stem_bn'}(stem)
  stem = nn.ReLU{}(stem)
  local br = nn.Conv2D{filters = 6, kernel_size = 3, padding = 'same'}(stem)
  br = nn.BatchNormalization{}(br)
  local res = nn.Activation('relu')(nn.Add{}{stem, br})
  local side = nn.Conv2D{filters = 4, kernel_size = 1}(stem)
  local cat = nn.Concatenate{}{res, side}
  local out = nn.Dense{units = 3}(nn.GlobalAveragePooling2D{}(cat))
  local m = nn.Model(x, out)
  m:layer('stem').trainable = false
  m:layer('stem_bn').trainable = false
  local k0 = m:layer('stem').kernel:clone()
  local opt = optim.Adam{lr = 0.01}
  local loss = nn.CategoricalCrossentropy{from_logits = true}
  m:training()
  local first, last
  for epoch = 1, 8 do
    local tot = 0
    for s = 1, 120, 20 do
      local xb, yb = xtr:narrow(1, s, 20), ytr:narrow(1, s, 20)
      m:zero_grad()
      local o = m:forward(xb)
      tot = tot + loss:forward(o, yb)
      m:backward(xb, loss:backward(o, yb))
      opt:step(m)
    end
    if epoch == 1 then first = tot end
    last = tot
  end
  T.check(last < 0.6 * first, string.format('loss %.3f -> %.3f', first, last))
  T.check(m:layer('stem').kernel:equal(k0), 'the frozen stem changed')
end)

T.test('a conv bias before a training BatchNormalization moves into its moving mean: the step equals the unfused one', function()
  local function make()
    flower.manual_seed(21)
    nn.reset_names()
    local x = nn.Input{6, 6, 3}
    local y = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same', name = 'conv'}(x)
    y = nn.ReLU{}(nn.BatchNormalization{name = 'bn'}(y))
    local m = nn.Model(x, nn.Dense{units = 2}(nn.GlobalAveragePooling2D{}(y)))
    m:layer('conv').bias:copy(flower.randn(4) * 3)   -- a bias far from zero
    return m
  end
  flower.manual_seed(22)
  local xb, labels = flower.randn(5, 6, 6, 3), flower.tensor({1, 2, 2, 1, 2}, 'int64')
  local loss = nn.CategoricalCrossentropy{from_logits = true}
  local function step(fusion)
    nn.fusion = fusion
    local m = make()
    m:training()
    nn.profile = {}
    local o = m:forward(xb)
    m:backward(xb, loss:backward(o, labels))
    local prof = nn.profile
    nn.profile, nn.fusion = nil, true
    return m, o, prof
  end
  local mf, of, pf = step(true)
  local mu, ou, pu = step(false)
  T.check(pf['fused Conv2D forward'] and not pu['fused Conv2D forward'], 'the fusion ran only when enabled')
  T.allclose(of, ou, 1e-5, 1e-6, 'logits')
  local cf, cu = mf:layer('conv'), mu:layer('conv')
  T.allclose(cf.grads.kernel, cu.grads.kernel, 1e-5, 1e-6, 'kernel gradient')
  T.allclose(cf.grads.bias, cu.grads.bias, 1e-4, 1e-6, 'bias gradient (about zero: the BN cancels it)')
  local bf, bu = mf:layer('bn'), mu:layer('bn')
  T.allclose(bf.moving_mean, bu.moving_mean, 1e-6, 1e-7, 'moving mean includes the bias')
  T.check(bu.moving_mean:sub(bf.moving_mean):abs():max():item() < 1e-5, 'moving means agree')
  T.allclose(bf.moving_variance, bu.moving_variance, 1e-6, 1e-7, 'moving variance')
end)

T.done()
