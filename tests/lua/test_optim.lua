-- Optimizers, schedules and (flower.train's) ReduceLROnPlateau against Keras (tests/reference/gen_layers.py), plus
-- per-layer learning rates, frozen weights, regularizers and state save/restore.
package.path = 'tests/lua/?.lua;' .. package.path
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local T = require 'flower.test'
local R = require 'nn_ref'

local M = R.load('gen_layers', 'layers')

for _, c in ipairs(M.optimizers) do
  T.test('keras optimizer ' .. c.name .. ' over 5 steps', function()
    local case = 'opt_' .. c.name
    local cfg = {}
    for k, v in pairs(c.config) do if k ~= 'kind' then cfg[k] = v end end
    local opt = optim[c.config.kind](cfg)
    local recs = {}
    for i, ref in ipairs(c.w0) do
      local w = R.array(M, case, ref)
      recs[i] = {path = 'w' .. i, name = 'kernel', tensor = w, grad = flower.zeros(w:size())}
    end
    for s, gstep in ipairs(c.grads) do
      for i, ref in ipairs(gstep) do recs[i].grad:copy(R.array(M, case, ref)) end
      opt:step(recs)
      for i, ref in ipairs(c.after[s]) do
        T.allclose(recs[i].tensor, R.array(M, case, ref), 1e-5, 1e-6, string.format('step %d weight %d', s, i))
      end
    end
    T.eq(opt.iterations, #c.grads)
  end)
end

T.test('learning-rate schedules match Keras (cosine, piecewise, step)', function()
  for _, s in ipairs(M.schedules) do
    local sched
    if s.kind == 'cosine' then sched = optim.cosine(s.config)
    elseif s.kind == 'piecewise' then sched = optim.piecewise(s.config)
    else sched = optim.step_decay(s.config) end
    for i, v in ipairs(s.values) do T.near(sched(i - 1), v, 1e-6, 0, s.kind .. ' step ' .. (i - 1)) end
  end
end)

T.test('schedule drives the optimizer lr by iteration', function()
  local opt = optim.SGD{lr = optim.step_decay{lr = 0.1, decay_steps = 2, decay_rate = 0.5}}
  local w = flower.ones(3)
  local rec = {path = 'w', name = 'kernel', tensor = w, grad = flower.ones(3)}
  local lrs = {}
  for i = 1, 5 do lrs[i] = opt:get_lr(); opt:step({rec}) end
  T.near(lrs[1], 0.1); T.near(lrs[2], 0.1); T.near(lrs[3], 0.05); T.near(lrs[5], 0.025)
  T.near(w[1], 1 - (0.1 + 0.1 + 0.05 + 0.05 + 0.025), 1e-6)
end)

T.test('train.ReduceLROnPlateau matches Keras (patience, min_delta, cooldown, min_lr)', function()
  local train = require 'flower.train'
  local p = M.plateau
  local opt = optim.SGD{lr = 1.0}
  local cfg = {monitor = 'val_loss'}
  for k, v in pairs(p.config) do cfg[k] = v end
  local rop = train.ReduceLROnPlateau(cfg)
  for i, m in ipairs(p.metrics) do T.near(rop:update(m, opt), p.lr[i], 1e-6, 0, 'epoch ' .. i) end
  -- and as a callback of fit, from the logs
  local opt2, cb = optim.SGD{lr = 1.0}, train.ReduceLROnPlateau(cfg)
  for i, m in ipairs(p.metrics) do
    cb:on_epoch_end({optimizer = opt2, log = function() end}, i, {val_loss = m})
    T.near(opt2.lr, p.lr[i], 1e-6, 0, 'callback, epoch ' .. i)
  end
end)

-- a two-layer model: one frozen Dense, one trainable Dense with L2
local function two_layers()
  nn.reset_names()
  local x = nn.Input{4}
  local h = nn.Dense{units = 3, name = 'frozen'}(x)
  local y = nn.Dense{units = 2, name = 'head', kernel_regularizer = nn.l2(0.01)}(h)
  local m = nn.Model(x, y)
  m:layer('frozen').trainable = false
  return m
end

T.test('frozen layers are never touched (bit-identical), weight decay and L2 skip them', function()
  flower.manual_seed(3)
  local m = two_layers()
  local frozen_k = m:layer('frozen').kernel:clone()
  local frozen_b = m:layer('frozen').bias:clone()
  local opt = optim.Adam{lr = 0.1, weight_decay = 0.1}
  local x = flower.randn(5, 4)
  for _ = 1, 3 do
    m:zero_grad()
    local y = m:forward(x)
    m:backward(x, y:clone():fill(1))
    opt:step(m)
  end
  T.check(m:layer('frozen').kernel:equal(frozen_k), 'frozen kernel changed')
  T.check(m:layer('frozen').bias:equal(frozen_b), 'frozen bias changed')
  T.check(m:layer('frozen').grads.kernel == nil, 'a frozen layer accumulated a gradient')
  local paths = {}
  for _, r in ipairs(m:trainable_weights()) do paths[#paths + 1] = r.path end
  T.eq(table.concat(paths, ' '), 'head/kernel head/bias')
  for path in pairs(opt.slots) do T.check(path:sub(1, 5) == 'head/', 'optimizer state for ' .. path) end
end)

T.test('L2 regularizer adds 2*l2*w to the gradient, only on the regularized kernel', function()
  local m = two_layers()
  local head = m:layer('head')
  local w0 = head.kernel:clone()
  local opt = optim.SGD{lr = 0.5}
  m:zero_grad()
  local x = flower.randn(2, 4)
  m:forward(x)
  m:backward(x, flower.zeros(2, 2))                 -- data gradient zero: only the penalty acts
  opt:step(m)
  T.allclose(head.kernel, w0 * (1 - 0.5 * 2 * 0.01), 1e-6)
  T.near(nn.regularization_loss(m), 0.01 * (head.kernel * head.kernel):sum():item(), 1e-6)
end)

T.test('per-layer learning-rate multipliers', function()
  local recs = {
    {path = 'a/kernel', name = 'kernel', layer = {name = 'a'}, tensor = flower.zeros(2), grad = flower.ones(2)},
    {path = 'b/kernel', name = 'kernel', layer = {name = 'b'}, tensor = flower.zeros(2), grad = flower.ones(2)},
  }
  optim.SGD{lr = 0.1, lr_mult = {a = 0.1}}:step(recs)
  T.near(recs[1].tensor[1], -0.01, 1e-6); T.near(recs[2].tensor[1], -0.1, 1e-6)
  optim.SGD{lr = 0.1, lr_mult = function(r) return r.layer.name == 'b' and 0 or 1 end}:step(recs)
  T.near(recs[1].tensor[1], -0.11, 1e-6); T.near(recs[2].tensor[1], -0.1, 1e-6)
end)

T.test('optimizer state saves and restores: resumed steps equal uninterrupted ones', function()
  local function run(n, opt, w, gs, from)
    for s = from, n do
      opt:step({{path = 'w', name = 'kernel', tensor = w, grad = gs[s]:clone()}})
    end
  end
  flower.manual_seed(9)
  local gs = {}
  for i = 1, 6 do gs[i] = flower.randn(4) end
  local w1 = flower.ones(4)
  local a = optim.Adam{lr = 0.01}
  run(6, a, w1, gs, 1)
  local w2 = flower.ones(4)
  local b = optim.Adam{lr = 0.01}
  run(3, b, w2, gs, 1)
  local st = b:state()
  local c = optim.Adam{lr = 0.01}
  c:load_state(st)
  b.slots.w.m:fill(99)                                 -- the restored state is a copy
  run(6, c, w2, gs, 4)
  T.check(w1:equal(w2), 'resumed Adam differs from the uninterrupted run')
  T.eq(c.iterations, 6)
  T.raises(function() optim.SGD{}:load_state(st) end, 'state is of a Adam optimizer')
end)

T.test('optimizer options are checked', function()
  T.raises(function() optim.SGD{lr = -1} end, 'lr must be a number')
  T.raises(function() optim.Adam{betas = 1} end, "unknown option 'betas'")
  T.raises(function() optim.SGD{clipnorm = 1, global_clipnorm = 1} end, 'not both')
  T.raises(function() optim.SGD{}:step(42) end, 'expected a model')
end)

T.done()
