-- bfloat16 mixed precision (model:mixed_precision('bfloat16'), train.fit{mixed_precision = ...},
-- recipes' --mixed-precision): float32 master weights, optimizer state and gradients, bfloat16
-- activations and kernel copies, float32 outputs. Checked on the CPU against the float32 path of
-- the same model (itself checked against Keras and finite differences in test_nn_layers/grad) and
-- against Keras's own 'mixed_bfloat16' policy (tests/reference/gen_mixed.py).
--
-- Tolerances. bfloat16 keeps 8 significant bits: one rounding is within 2^-9 relative (about 2e-3),
-- the spacing 2^-8 (4e-3). A forward rounds the input, every kernel and every activation once, and
-- the errors add up along the way. Measured with these seeds (MP_VERBOSE=1 prints every gradient's):
--   forward outputs, max |mixed - float32| / max |float32| (T.allclose's rtol): 4e-3 here, 6e-3
--     against Keras's mixed_bfloat16 on the same weights; held to FWD_TOL = 2e-2;
--   gradients, ||mixed - float32|| / ||float32|| per tensor: up to 2e-2 (the same against Keras's),
--     held to GRAD_TOL = 5e-2; gradients that come back through a training-mode BatchNormalization
--     and max pooling up to 0.11, held to BEHIND_BN_TOL = 0.15 (see grads_close);
--   train.fit, 4 epochs on the synthetic problem: final losses within 0.03 of float32's (measured
--     6e-4 and 3e-3) and the validation accuracy within 2 of 48 samples (measured equal).
package.path = 'tests/lua/?.lua;' .. package.path
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local train = require 'flower.train'
local data = require 'flower.data'
local files = require 'flower.files'
local h5 = require 'flower.h5'
local T = require 'flower.test'

local FWD_TOL = 2e-2
local GRAD_TOL = 5e-2
local BEHIND_BN_TOL = 0.15
local TMP = T.tmpdir()
local quiet = function() end

-- max |a - b| / max |b| (b the float32 reference)
local function rel(a, b)
  local da, db = a:double(), b:double()
  return (da - db):abs():max():item() / math.max(db:abs():max():item(), 1e-30)
end

-- ||a - b|| / ||b|| (2-norms)
local function rel2(a, b)
  local da, db = a:double(), b:double()
  local d = da - db
  return math.sqrt((d * d):sum():item()) / math.max(math.sqrt((db * db):sum():item()), 1e-30)
end

local function close(a, b, tol, what)
  T.eq(a:dtype(), 'float32', what .. ': dtype')
  local r = rel(a, b)
  if not (r <= tol) then error(string.format('%s: relative difference %.3g exceeds %g', what, r, tol), 2) end
  return r
end

-- A small net with every path the executor treats apart: a ZeroPadding2D folded into a convolution
-- at inference, Conv -> BN -> ReLU (fused at inference, BN+ReLU fused in training, the conv bias
-- folded into a batch-statistics BN), Add and ReLU in place, a separable and a depthwise
-- convolution, pooling, a concatenation, a Reshape view, global pooling, Dropout and Dense.
local function net(seed)
  nn.reset_names()
  flower.manual_seed(seed or 3)
  local x = nn.Input{16, 16, 3}
  local y = nn.Conv2D{filters = 8, kernel_size = 3, use_bias = false, name = 'stem'}(
    nn.ZeroPadding2D{padding = 1, name = 'stem_pad'}(x))
  y = nn.ReLU{name = 'stem_relu'}(nn.BatchNormalization{name = 'stem_bn'}(y))
  local p = nn.MaxPooling2D{pool_size = 3, strides = 1, padding = 'same', name = 'pool'}(y)
  local a = nn.BatchNormalization{name = 'a_bn'}(nn.Conv2D{filters = 8, kernel_size = 3, padding = 'same', name = 'a'}(p))
  local s = nn.Activation('relu')(nn.Add{name = 'add'}{a, p})
  local b1 = nn.Conv2D{filters = 4, kernel_size = 1, activation = 'relu', name = 'b1'}(s)
  local b2 = nn.SeparableConv2D{filters = 4, kernel_size = 3, padding = 'same', name = 'b2'}(s)
  local b3 = nn.DepthwiseConv2D{kernel_size = 3, padding = 'same', name = 'b3'}(s)
  local r = nn.ReLU{name = 'r'}(nn.Reshape{target_shape = {16, 16, 4}, name = 'rs'}(b1))
  local c = nn.Concatenate{name = 'cat'}{b1, b2, b3, r}
  local g = nn.GlobalAveragePooling2D{name = 'avg_pool'}(nn.AveragePooling2D{name = 'avg'}(c))
  g = nn.Dropout{rate = 0.2, seed = 9, name = 'drop'}(g)
  local m = nn.Model(x, nn.Dense{units = 5, name = 'out'}(g), {name = 'net'})
  T.randomize_batchnorm(m)
  return m
end

-- Mixed-step gradients gs against reference gradients rs (lists in the same order; names for the
-- messages). Per tensor: ||g - r|| <= GRAD_TOL * ||r|| (2-norms: the largest element alone is a
-- noisy measure), with two exceptions named in `kinds`:
--   'bn': gradients that come back through a training-mode BatchNormalization, whose backward
--     subtracts the gradient's mean and its projection on the normalised input -- a cancellation
--     that magnifies the rounding of its incoming gradient (PyTorch's autocast shows 3-10 % on a
--     kernel there too) -- and through max pooling, where rounding makes near-equal values tie
--     and routes a gradient elsewhere: BEHIND_BN_TOL;
--   'zero': gradients that are zero in exact arithmetic (the bias of a convolution followed by a
--     batch-statistics BatchNormalization cancels in the normalisation), rounding noise in both:
--     max |g - r| <= 2e-2 of the largest gradient element of the step.
-- Returns the worst relative difference.
local function grads_close(gs, rs, names, what, kinds)
  kinds = kinds or {}
  local top = 0
  for _, r in ipairs(rs) do top = math.max(top, r:abs():max():item()) end
  local worst = 0
  T.eq(#gs, #rs, what .. ': gradient count')
  for i, r in ipairs(rs) do
    local name = what .. ': ' .. (names[i] or tostring(i))
    T.eq(gs[i]:dtype(), 'float32', name .. ' dtype')
    local kind = kinds[names[i]]
    if kind == 'zero' then
      local d = (gs[i]:double() - r:double()):abs():max():item()
      if not (d <= 2e-2 * top) then error(string.format('%s: differs by %.3g (largest gradient %.3g)', name, d, top), 2) end
    else
      local e = rel2(gs[i], r)
      local tol = kind == 'bn' and BEHIND_BN_TOL or GRAD_TOL
      worst = math.max(worst, e)
      if os.getenv('MP_VERBOSE') then io.write(string.format('#   %s %.3g\n', name, e)) end
      if not (e <= tol) then error(string.format('%s: relative difference %.3g exceeds %g', name, e, tol), 2) end
    end
  end
  return worst
end

local function clones(list)
  local r = {}
  for i, t in ipairs(list) do r[i] = t:clone() end
  return r
end

local function weights_of(m)
  local r = {}
  for i, w in ipairs(m:weights()) do r[i] = w.tensor:clone() end
  return r
end

-- the weights (moving statistics included) back to `saved`, and seeded Dropout streams to their start
local function set_all(m, saved)
  for i, w in ipairs(m:weights()) do w.tensor:copy(saved[i]) end
  for _, l in ipairs(nn.Model._leaves(m)) do if l._offset then l._offset = 0 end end
end

-- calls fn(layer, x) before every _forward of the model's leaf layers (an instance field shadows the
-- class method); returns a function that removes the spies
local function spy_forward(m, fn)
  local undo = {}
  for _, l in ipairs(nn.Model._leaves(m)) do
    local orig = l._forward
    l._forward = function(self, x, ...)
      fn(self, x)
      return orig(self, x, ...)
    end
    undo[#undo + 1] = l
  end
  return function() for _, l in ipairs(undo) do l._forward = nil end end
end

local function dtype_of(x)
  if flower.is_tensor(x) then return x:dtype() end
  return x[1]:dtype()
end

T.test('mixed_precision: on, off, the getter and bad arguments', function()
  local m = net()
  T.eq(m:mixed_precision(), nil)
  T.eq(m:mixed_precision('bfloat16'), m)
  T.eq(m:mixed_precision(), 'bfloat16')
  m:mixed_precision(false)
  T.eq(m:mixed_precision(), nil)
  m:mixed_precision('bfloat16')
  m:mixed_precision('float32')
  T.eq(m:mixed_precision(), nil)
  local want = "model:mixed_precision: expected 'bfloat16', or false / 'float32' to turn it off"
  T.raises(function() m:mixed_precision('float16') end, want .. ", got 'float16'")
  T.raises(function() m:mixed_precision(16) end, want .. ', got 16')
  T.raises(function() m:mixed_precision(true) end, want .. ', got true')
  T.raises(function() m:mixed_precision(nil) end, want .. ', got nil')
  -- the error points at the caller's line
  local err = T.raises(function() m:mixed_precision('fp16') end, want)
  T.check(err:find('test_mixed_precision.lua', 1, true), err)
  -- float64 weights: mixed precision keeps float32 masters
  local d = net():type('float64')
  T.raises(function() d:mixed_precision('bfloat16') end, "has float64 weights; mixed precision keeps float32 master weights")
  d:mixed_precision(false)   -- turning off is always fine
  m:mixed_precision('bfloat16')
  T.raises(function() m:type('float64') end, "type('float64'): mixed precision keeps float32 master weights")
  m:type('float32')
  -- train.fit and fit_stages check the value before any work
  local started = false
  local tl = setmetatable({ epoch = function() started = true; return function() end end }, { __len = function() return 1 end })
  T.raises(function() train.fit(m, { train = tl, optimizer = optim.SGD{}, mixed_precision = 'half', log = quiet, progress = false }) end,
    "train.fit: mixed_precision: expected 'bfloat16', or false / 'float32' to turn it off, got 'half'")
  T.raises(function() train.fit_stages(m, {{epochs = 1}}, { train = tl, mixed_precision = 2, make_optimizer = optim.SGD }) end,
    'train.fit_stages: mixed_precision: expected')
  T.check(not started, 'nothing ran')
end)

T.test('forward: bfloat16 activations and kernels inside, float32 out, close to the float32 model', function()
  local ref = net()
  local m = net()
  m:mixed_precision('bfloat16')
  local before = weights_of(m)
  local x = flower.randn(4, 16, 16, 3)
  for _, mode in ipairs({'training', 'evaluate'}) do
    ref[mode](ref); m[mode](m)
    local saved = weights_of(m)     -- training updates the moving statistics: both start alike
    local seen = {}
    local undo = spy_forward(m, function(l, xin) seen[l.name] = dtype_of(xin) end)
    local y = m:forward(x)
    undo()
    local y32 = ref:forward(x)
    local r = close(y, y32, FWD_TOL, mode .. ' output')
    io.write(string.format('# %s forward: max relative difference %.2g\n', mode, r))
    if mode == 'training' then
      -- every layer ran on bfloat16 (the input was cast at entry); in inference the fused layers
      -- do not go through _forward
      local count = 0
      for _, l in ipairs(nn.Model._leaves(m)) do
        if seen[l.name] then T.eq(seen[l.name], 'bfloat16', l.name .. ' input dtype'); count = count + 1 end
      end
      T.check(count >= 15, count .. ' layers ran through _forward')   -- the others were fused
      -- the moving statistics are float32 and moved like the float32 model's
      for _, name in ipairs({'stem_bn', 'a_bn'}) do
        T.eq(m:layer(name).moving_mean:dtype(), 'float32')
        T.allclose(m:layer(name).moving_mean, ref:layer(name).moving_mean, 2e-2, 1e-3, name .. ' moving mean')
        T.allclose(m:layer(name).moving_variance, ref:layer(name).moving_variance, 2e-2, 1e-3, name .. ' moving variance')
      end
      set_all(m, saved); set_all(ref, saved)
    end
  end
  -- the kernels that enter convolutions and matrix products have bfloat16 copies; the masters,
  -- biases and BatchNormalization's weights are float32 and (in inference) untouched
  for _, name in ipairs({'stem', 'a', 'b1', 'out'}) do T.eq(m:layer(name)._kc.kernel.t:dtype(), 'bfloat16', name) end
  T.eq(m:layer('b2')._kc.depthwise_kernel.t:dtype(), 'bfloat16')
  T.eq(m:layer('b2')._kc.pointwise_kernel.t:dtype(), 'bfloat16')
  T.eq(m:layer('b3')._kc.depthwise_kernel.t:dtype(), 'bfloat16')
  for i, w in ipairs(m:weights()) do
    T.eq(w.tensor:dtype(), 'float32', w.path)
    T.check(w.tensor:equal(before[i]), w.path .. ' changed')
  end
  -- the caller's input is left as it was; predict gives float32 too
  T.eq(x:dtype(), 'float32')
  local p = m:predict(x, 3)
  T.eq(p:dtype(), 'float32')
  close(p, ref:predict(x, 3), FWD_TOL, 'predict')
end)

T.test('training step: float32 parameters, gradients and optimizer state; gradients close to float32', function()
  local ref, m = net(), net()
  m:mixed_precision('bfloat16')
  ref.input_grad, m.input_grad = true, true
  ref:training(); m:training()
  local x = flower.randn(4, 16, 16, 3)
  local labels = flower.tensor({1, 3, 5, 2}, 'int64')
  local results = {}
  for k, model in ipairs({ref, m}) do
    local opt = optim.SGD{lr = 0.1, momentum = 0.9}
    model:zero_grad()
    local out = model:forward(x)
    T.eq(out:dtype(), 'float32')
    local loss, g = nn.softmax_cross_entropy(out, labels)
    local gx = model:backward(x, g)
    T.eq(gx:dtype(), 'float32', 'input gradient')
    local _, grads = model:parameters()
    local rg = clones(grads)
    opt:step(model)
    results[k] = {loss = loss, gx = gx:clone(), grads = rg, opt = opt}
  end
  T.near(results[2].loss, results[1].loss, 2e-2, 0, 'loss')
  local recs, names = m:trainable_weights(), {}
  for i, rec in ipairs(recs) do
    T.eq(rec.tensor:dtype(), 'float32', rec.path)
    T.eq(rec.grad:dtype(), 'float32', rec.path .. ' gradient')
    names[i] = rec.path
  end
  local behind = {['stem/kernel'] = 'bn', ['a/kernel'] = 'bn', input = 'bn', ['a/bias'] = 'zero'}
  local worst = grads_close(results[2].grads, results[1].grads, names, 'training step', behind)
  worst = math.max(worst, grads_close({results[2].gx}, {results[1].gx}, {'input'}, 'training step', behind))
  io.write(string.format('# gradients: worst relative difference %.2g\n', worst))
  -- the optimizer's state is float32 and the updated masters are close to the float32 step's
  -- (SGD: an update is lr times the gradient; Adam's first step, lr*sign(g), would flip with the
  -- sign of near-zero gradients)
  for path, slots in pairs(results[2].opt.slots) do
    for name, t in pairs(slots) do T.eq(t:dtype(), 'float32', path .. ' ' .. name) end
  end
  local wr = ref:weights()
  for i, w in ipairs(m:weights()) do
    T.eq(w.tensor:dtype(), 'float32', w.path)
    T.allclose(w.tensor, wr[i].tensor, 1e-2, 1e-3, w.path .. ' after the step')
  end
  T.check(m._state == nil and m._mp_st == nil, 'backward left state behind')
end)

-- the synthetic 4-class problem of flower.test
local XT, YT, XV, YV = T.leaning_classes(256, 48)
local function mlp() return T.leaning_mlp(0.2) end

local function fit(model, opts)
  local tl, vl = T.leaning_loaders(XT, YT, XV, YV)
  local o = {train = tl, valid = vl,
             optimizer = optim.Adam{lr = 1e-2}, epochs = 4, progress = false, log = quiet}
  for k, v in pairs(opts or {}) do o[k] = v end
  flower.manual_seed(99)
  return train.fit(model, o), o.optimizer
end

T.test('train.fit{mixed_precision = "bfloat16"} reaches the float32 loss; checkpoints hold the masters', function()
  local h32 = fit(mlp())
  local m = mlp()
  local dir = files.join(TMP, 'ckpt')
  local h16, opt = fit(m, {mixed_precision = 'bfloat16', checkpoint_dir = dir})
  T.eq(m:mixed_precision(), 'bfloat16', 'fit turned it on and left it on')
  local a, b = h32.rows[4], h16.rows[4]
  io.write(string.format('# fit: loss %.4f (float32 %.4f), val_loss %.4f (%.4f), val_acc %.4f (%.4f)\n', b.loss, a.loss,
    b.val_loss, a.val_loss, b.val_acc, a.val_acc))
  T.check(h16.rows[1].loss > b.loss + 0.1, 'it learns')
  T.near(b.loss, a.loss, 0, 0.03, 'training loss')
  T.near(b.val_loss, a.val_loss, 0, 0.03, 'validation loss')
  T.near(b.val_acc, a.val_acc, 0, 2 / 48 + 1e-9, 'validation accuracy')
  -- the checkpoint holds the float32 masters and the float32 optimizer state, and loads into a
  -- float32 model that then evaluates as the mixed one does (within bfloat16's rounding)
  local path = files.join(dir, 'last.h5')
  for _, w in ipairs(m:weights()) do
    local t = h5.read(path, '/model/' .. w.path)
    T.eq(t:dtype(), 'float32', w.path)
    T.check(t:equal(w.tensor), w.path .. ' is not the master')
  end
  for wpath, slots in pairs(opt.slots) do
    for name, t in pairs(slots) do
      local s = h5.read(path, '/optimizer/' .. wpath .. '/' .. name)
      T.eq(s:dtype(), 'float32')
      T.check(s:equal(t), wpath .. ' ' .. name)
    end
  end
  local f = mlp()
  nn.load_checkpoint(path, f)
  T.same_weights(f, m)
  local vl = data.FeatureLoader{x = XV, y = YV, batch_size = 48}
  local e32 = train.evaluate(f, vl, {progress = false})
  local e16 = train.evaluate(m, vl, {progress = false, collect = true, softmax = true})
  T.near(e16.loss, e32.loss, 0, 0.01, 'evaluate loss')
  T.eq(e16.probs:dtype(), 'float32')
  -- and mixed precision off again: the same model evaluates exactly as the float32 one
  m:mixed_precision(false)
  local e = train.evaluate(m, vl, {progress = false})
  T.eq(e.loss, e32.loss)
end)

T.test('nested models: a base inside a classifier, frozen or not, uint8 images through Preprocess', function()
  local function classifier(seed)
    nn.reset_names()
    flower.manual_seed(seed)
    local img = nn.Input{shape = {12, 12, 3}, dtype = 'uint8', name = 'img'}
    local y = nn.Preprocess{mode = 'caffe', name = 'pre'}(img)
    y = nn.Conv2D{filters = 6, kernel_size = 3, strides = 2, padding = 'same', name = 'conv'}(y)
    y = nn.ReLU{name = 'relu'}(nn.BatchNormalization{name = 'bn'}(y))
    y = nn.GlobalAveragePooling2D{name = 'gap'}(y)
    local base = nn.Model(img, y, {name = 'base'})
    local inp = nn.Input{shape = {12, 12, 3}, dtype = 'uint8', name = 'images'}
    local f = base(inp)                                   -- the base as a layer
    local out = nn.Dense{units = 3, name = 'head'}(nn.Dropout{rate = 0.1, seed = 1, name = 'hd'}(f))
    return nn.Model(inp, out, {name = 'clf'}), base
  end
  local x = flower.randint(0, 255, {4, 12, 12, 3}):type('uint8')
  local gy = flower.randn(4, 3)
  for _, frozen in ipairs({false, true}) do
    local ref, rbase = classifier(5)
    local m, base = classifier(5)
    rbase.trainable, base.trainable = not frozen, not frozen
    m:mixed_precision('bfloat16')
    T.eq(base:mixed_precision(), 'bfloat16', 'the nested model follows')
    local seen = {}
    local undo = spy_forward(m, function(l, xin) seen[l.name] = dtype_of(xin) end)
    local outs = {}
    for k, model in ipairs({ref, m}) do
      model:training()
      model:zero_grad()
      local y = model:forward(x)
      model:backward(x, gy)
      local _, grads = model:parameters()
      outs[k] = {y = y:clone(), grads = clones(grads)}
    end
    undo()
    local what = frozen and 'frozen base' or 'trainable base'
    T.eq(seen.pre, 'uint8', 'Preprocess gets the images as they are')
    if not frozen then T.eq(seen.conv, 'bfloat16', 'Preprocess hands on bfloat16') end   -- frozen: fused
    T.eq(seen.hd, 'bfloat16', "the base's output stays bfloat16 inside the classifier")
    close(outs[2].y, outs[1].y, FWD_TOL, what .. ' output')
    T.eq(#outs[2].grads, frozen and 2 or 6, what .. ': gradient count')
    local names = {}
    for i, rec in ipairs(m:trainable_weights()) do names[i] = rec.path end
    grads_close(outs[2].grads, outs[1].grads, names, what, {['base/conv/kernel'] = 'bn', ['base/conv/bias'] = 'zero'})
    -- the base run by itself (a feature extractor) gives float32 features too
    base:evaluate(); rbase:evaluate()
    close(base:forward(x), rbase:forward(x), FWD_TOL, what .. ': the base alone')
  end
  -- a nested model set apart: float32 inside a bfloat16 classifier, cast at its boundary
  local ref = classifier(6)
  local m, base = classifier(6)
  m:mixed_precision('bfloat16')
  base:mixed_precision(false)
  local seen = {}
  local undo = spy_forward(m, function(l, xin) seen[l.name] = dtype_of(xin) end)
  m:training(); ref:training()
  local y = m:forward(x)
  undo()
  T.eq(seen.conv, 'float32', 'the float32 base computes in float32')
  T.eq(seen.hd, 'bfloat16', 'its output enters the bfloat16 head as bfloat16')
  close(y, ref:forward(x), FWD_TOL, 'float32 base in a bfloat16 classifier')
  m:backward(x, gy)
  T.check(base._mp_st == nil and m._mp_st == nil, 'backward left casts behind')
  -- and the reverse: a bfloat16 base inside a float32 classifier
  m:mixed_precision(false)
  base:mixed_precision('bfloat16')
  seen = {}
  undo = spy_forward(m, function(l, xin) seen[l.name] = dtype_of(xin) end)
  y = m:forward(x)
  undo()
  T.eq(seen.conv, 'bfloat16'); T.eq(seen.hd, 'float32')
  close(y, ref:forward(x), FWD_TOL, 'bfloat16 base in a float32 classifier')
  -- output_of and feature taps share the layers and compute as the model does
  m:mixed_precision('bfloat16')
  T.eq(m:output_of('hd'):mixed_precision(), 'bfloat16')
end)

T.test('the bfloat16 kernel copies follow the masters: optimizer steps, set_weights, writes by hand', function()
  local m = net():evaluate()
  m:mixed_precision('bfloat16')
  local x = flower.randn(2, 16, 16, 3)
  local function fresh_equal(what)
    -- a model built with the current weights, never run before: what the mixed forward must give
    local n = net():evaluate()
    set_all(n, weights_of(m))
    n:mixed_precision('bfloat16')
    T.check(m:forward(x):equal(n:forward(x)), what .. ': the forward did not see the new weights')
  end
  m:forward(x)
  m:layer('stem').kernel:mul_(-1.5)                               -- by hand, in place
  fresh_equal('kernel written in place')
  m:layer('out'):set_weights({flower.randn(20, 5), flower.randn(5)})
  fresh_equal('set_weights')
  m:layer('b2').pointwise_kernel = m:layer('b2').pointwise_kernel * 0.5   -- a new tensor
  fresh_equal('kernel replaced')
  m:training()
  m:zero_grad()
  local _, g = nn.softmax_cross_entropy(m:forward(x), flower.tensor({1, 2}, 'int64'))
  m:backward(x, g)
  optim.SGD{lr = 0.5}:step(m)
  m:evaluate()
  fresh_equal('optimizer step')
  -- turned off, the copies are freed
  m:mixed_precision(false)
  for _, l in ipairs(nn.Model._leaves(m)) do T.eq(l._kc, nil, l.name .. ' keeps a copy') end
end)

T.test('executor in mixed precision: fusion close to layer by layer, buffer reuse and in-place exact', function()
  local m = net()
  m:mixed_precision('bfloat16')
  local x = flower.randn(4, 16, 16, 3)
  local function run(flags, train_step)
    local saved = {nn.fusion, nn.reuse, nn.inplace}
    nn.fusion, nn.reuse, nn.inplace = flags[1], flags[2], flags[3]
    local ok, res = pcall(function()
      local w = weights_of(m)
      set_all(m, w)     -- Dropout's stream from its start
      if not train_step then m:evaluate(); return {m:forward(x):clone()} end
      m:training()
      m.input_grad = true
      m:zero_grad()
      local y = m:forward(x):clone()
      local gx = m:backward(x, flower.ones(4, 5)):clone()
      local _, grads = m:parameters()
      local r = {y, gx}
      for _, g in ipairs(grads) do r[#r + 1] = g:clone() end
      set_all(m, w)     -- moving statistics back
      m.input_grad = nil
      return r
    end)
    nn.fusion, nn.reuse, nn.inplace = saved[1], saved[2], saved[3]
    if not ok then error(res, 0) end
    return res
  end
  for _, train_step in ipairs({false, true}) do
    local what = train_step and 'training' or 'inference'
    local base = run({true, true, true}, train_step)
    -- buffer reuse and in-place layers change where values live, not what they are
    local plain = run({true, false, false}, train_step)
    for i = 1, #base do T.check(base[i]:equal(plain[i]), what .. ': reuse/in-place changed result ' .. i) end
    -- fusion rounds once where the layers one by one round twice: close, not equal
    local unfused = run({false, true, true}, train_step)
    close(base[1], unfused[1], FWD_TOL, what .. ': fusion, output')
    if train_step then
      local names = {'input'}
      for _, rec in ipairs(m:trainable_weights()) do names[#names + 1] = rec.path end
      grads_close({table.unpack(base, 2)}, {table.unpack(unfused, 2)}, names, 'fusion',
        {['stem/kernel'] = 'bn', ['a/kernel'] = 'bn', input = 'bn', ['a/bias'] = 'zero'})
    end
  end
  -- nothing of a forward or a training step stays allocated (casts included) beyond what the
  -- float32 model leaves (with the collector stopped: tensors the executor does not free itself,
  -- like the caller's gradient here, stay counted), and repeated steps do not accumulate anything
  local f32 = net()
  local function live_after(model, fn)
    collectgarbage(); collectgarbage('stop')
    local before = flower.memory().live
    fn(model)
    local after = flower.memory().live
    collectgarbage('restart'); collectgarbage()
    return after - before
  end
  local function infer(model) model:evaluate(); return model:forward(x) end
  local function step(model)
    model:training()
    model:zero_grad()
    local y = model:forward(x)
    model:backward(x, flower.ones(4, 5))
    return y
  end
  for _, fn in ipairs({infer, step}) do
    fn(m); fn(f32)
    local lm, lf = live_after(m, fn), live_after(f32, fn)
    T.check(lm <= lf, string.format('%d bytes left by the mixed model, %d by the float32 one', lm, lf))
  end
  collectgarbage()
  local base = flower.memory().live
  for i = 1, 3 do step(m); collectgarbage() end
  T.eq(flower.memory().live, base, 'live bytes after three more steps')
end)

T.test('turned off, the float32 path is bit for bit that of a model that never had it on', function()
  local never, m = net(), net()
  m:mixed_precision('bfloat16')
  local x = flower.randn(4, 16, 16, 3)
  m:evaluate(); m:forward(x)
  m:training(); m.input_grad = true
  local saved = weights_of(m)
  m:zero_grad()
  m:forward(x)
  m:backward(x, flower.ones(4, 5))
  set_all(m, saved)
  m.input_grad = nil
  m:mixed_precision(false)
  for _, mode in ipairs({'evaluate', 'training'}) do
    never[mode](never); m[mode](m)
    never.input_grad, m.input_grad = true, true
    local r = {}
    for k, model in ipairs({never, m}) do
      set_all(model, saved)
      model:zero_grad()
      local y = model:forward(x):clone()
      local res = {y}
      if mode == 'training' then
        res[2] = model:backward(x, flower.ones(4, 5)):clone()
        local _, grads = model:parameters()
        for _, g in ipairs(grads) do res[#res + 1] = g:clone() end
      end
      r[k] = res
    end
    for i = 1, #r[1] do T.check(r[1][i]:equal(r[2][i]), mode .. ': result ' .. i .. ' differs') end
  end
  T.same_weights(never, m)
end)

T.test('recipes take --mixed-precision: the quickstart fine-tunes in bfloat16 and exports float32', function()
  local FLOWERLUA = os.getenv('FLOWERLUA') or './flowerlua'
  local runs = files.join(TMP, 'runs')
  local function sh(args) return (T.capture(FLOWERLUA .. ' experiments/quickstart.lua ' .. args)) end
  local out = sh('--tiny --mixed-precision bfloat16 --run-name mp --runs ' .. runs)
  T.check(out:find('rc=0', 1, true), out)
  local dir = files.join(runs, 'mp')
  T.eq(files.json_read(files.join(dir, 'config.json')).mixed_precision, 'bfloat16')
  local log = T.slurp(files.join(dir, 'log.txt'))
  T.check(select(2, log:gsub('bfloat16 mixed precision', '')) == 2, 'both models fine-tuned in bfloat16:\n' .. log)
  for _, name in ipairs({'train_x', 'valid_x', 'valid_probs'}) do
    T.eq(h5.read(files.join(dir, 'features', 'vgg_tiny.h5'), '/' .. name):dtype(), 'float32', name)
  end
  out = sh('--tiny --mixed-precision float16 --runs ' .. runs)
  T.check(out:find("option --mixed-precision expects one of float32, bfloat16, got 'float16'", 1, true), out)
  T.check(out:find('rc=2', 1, true), out)
  T.check(sh('--help'):find('--mixed-precision float32|bfloat16', 1, true), '--help lists it')
end)

-- On a GPU (a CUDA build with a device; tests/gpu/check.sh): the same mixed-precision step as on
-- the CPU, compared with the CPU's. Both round to bfloat16 at the same places but accumulate in
-- different orders, so they agree within bfloat16's rounding, not bit for bit.
local GPU_TEST = 'on the GPU: a mixed-precision training step and inference match the CPU mixed-precision ones'
if flower.cuda.available() then
  T.test(GPU_TEST, function()
    local cpu, gpu = net(), net()
    cpu:mixed_precision('bfloat16')
    gpu:cuda()
    gpu:mixed_precision('bfloat16')
    cpu.input_grad, gpu.input_grad = true, true
    local x = flower.randn(4, 16, 16, 3)
    local labels = flower.tensor({1, 3, 5, 2}, 'int64')
    local res = {}
    for k, model in ipairs({cpu, gpu}) do
      local xd, ld = x, labels
      if k == 2 then xd, ld = x:cuda(), labels:cuda() end
      model:training()
      model:zero_grad()
      local out = model:forward(xd)
      T.eq(out:dtype(), 'float32')
      local loss, g = nn.softmax_cross_entropy(out, ld)
      local gx = model:backward(xd, g)
      local _, grads = model:parameters()
      local r = {out = out:cpu(), loss = loss, grads = {gx:cpu()}}
      for _, t in ipairs(grads) do r.grads[#r.grads + 1] = t:cpu() end
      model:evaluate()
      r.infer = model:forward(xd):cpu()
      res[k] = r
    end
    for _, l in ipairs(nn.Model._leaves(gpu)) do
      for name, e in pairs(l._kc or {}) do
        T.eq(e.t:dtype(), 'bfloat16', l.name .. ' ' .. name)
        T.check(e.t:is_cuda(), l.name .. ' ' .. name .. ': the copy is on the GPU')
      end
    end
    for _, w in ipairs(gpu:weights()) do T.eq(w.tensor:dtype(), 'float32', w.path) end
    close(res[2].out, res[1].out, FWD_TOL, 'training output')
    close(res[2].infer, res[1].infer, FWD_TOL, 'inference output')
    T.near(res[2].loss, res[1].loss, 1e-2, 0, 'loss')
    local names = {'input'}
    for _, rec in ipairs(gpu:trainable_weights()) do names[#names + 1] = rec.path end
    local worst = grads_close(res[2].grads, res[1].grads, names, 'GPU vs CPU',
      {['stem/kernel'] = 'bn', ['a/kernel'] = 'bn', input = 'bn', ['a/bias'] = 'zero'})
    io.write(string.format('# GPU vs CPU mixed step: worst gradient difference %.2g\n', worst))
  end)
else
  print(('ok - %s # SKIP no CUDA device (%s)'):format(GPU_TEST, flower.cuda.unavailable_reason()))
end

T.test('the GPU benchmark runs its fp32 and bf16 model steps (--dry: on the CPU, tiny)', function()
  local FLOWERLUA = os.getenv('FLOWERLUA') or './flowerlua'
  local out = T.capture(FLOWERLUA .. ' tests/bench/gpu.lua --dry')
  T.check(out:find('rc=0', 1, true), out)
  for _, key in ipairs({'train_fp32_img_s', 'infer_fp32_img_s', 'train_bf16_img_s', 'infer_bf16_img_s'}) do
    T.check(out:find('RESULT ' .. key .. ' ', 1, true), key .. ' missing:\n' .. out)
  end
end)

T.test('Keras mixed_bfloat16 policy on the same weights (tests/reference/gen_mixed.py)', function()
  local R = require 'nn_ref'
  local man = R.load('gen_mixed', 'mixed')
  local c = man.cases[1]
  local arr = function(ref) return R.array(man, c.name, ref) end
  nn.reset_names()
  local x = nn.Input{8, 8, 3}
  local y = nn.Conv2D{filters = 8, kernel_size = 3, padding = 'same', name = 'conv'}(x)
  y = nn.ReLU{name = 'relu'}(nn.BatchNormalization{name = 'bn'}(y))
  y = nn.Conv2D{filters = 8, kernel_size = 3, strides = 2, padding = 'same', name = 'conv2'}(y)
  y = nn.GlobalAveragePooling2D{name = 'gap'}(nn.BatchNormalization{name = 'bn2'}(y))
  local m = nn.Model(x, nn.Dense{units = 4, name = 'dense'}(y))
  for _, l in ipairs(m:layers()) do
    local ws = c.weights[l.name]
    if ws then
      local list = {}
      for i, w in ipairs(ws) do list[i] = arr(w) end
      l:set_weights(list)
    end
  end
  local xin, gy = arr(c.x), arr(c.gy)
  m:evaluate()
  T.allclose(m:forward(xin), arr(c.y_infer_f32), 1e-5, 1e-6, 'our float32 path vs Keras float32 (the weights went in)')
  m:mixed_precision('bfloat16')
  -- inference, then one training forward and backward (loss = sum(y * gy))
  m:evaluate()
  local yk = arr(c.y_infer_mixed)
  local ours = m:forward(xin)
  local r_keras = close(ours, yk, FWD_TOL, 'inference vs Keras mixed_bfloat16')
  io.write(string.format('# inference: ours vs Keras mixed %.2g, vs Keras float32 %.2g; Keras float32 vs Keras mixed %.2g\n',
    r_keras, rel(ours, arr(c.y_infer_f32)), rel(arr(c.y_infer_f32), yk)))
  m:training()
  m.input_grad = true
  m:zero_grad()
  close(m:forward(xin), arr(c.y_train_mixed), FWD_TOL, 'training forward vs Keras mixed_bfloat16')
  local gs, rs, names = {m:backward(xin, gy)}, {arr(c.gx_mixed)}, {'input'}
  for _, g in ipairs(c.grads) do
    local rec
    for _, w in ipairs(m:trainable_weights()) do if w.path == g.path then rec = w end end
    T.check(rec, 'no weight ' .. g.path)
    gs[#gs + 1], rs[#rs + 1], names[#names + 1] = rec.grad, arr(g.value), g.path
  end
  local worst = grads_close(gs, rs, names, 'gradients vs Keras', {['conv/bias'] = 'zero', ['conv2/bias'] = 'zero'})
  io.write(string.format('# gradients vs Keras mixed_bfloat16: worst relative difference %.2g\n', worst))
  for _, s in ipairs(c.moving) do
    T.allclose(m:layer(s.layer)[s.name], arr(s.value), 1e-2, 1e-4, s.layer .. '/' .. s.name .. ' after the step')
  end
  -- what Keras keeps in float32 under the policy, we keep too
  for _, v in ipairs(c.variable_dtypes) do T.eq(v, 'float32') end
end)

T.done()
