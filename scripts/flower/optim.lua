-- flower.optim: optimizers with Keras's update rules and learning-rate schedules.
--
--   local optim = require 'flower.optim'
--   local opt = optim.Adam{lr = 1e-3}                      -- Keras defaults: beta_1 .9, beta_2 .999, eps 1e-7
--   local opt = optim.SGD{lr = 0.01, momentum = 0.9, nesterov = true}
--   -- common options: weight_decay (decoupled, as Keras: w -= w*wd*lr before the update),
--   --   decay_exclude = {'bias', 'gamma', 'beta'} (weight names kept out of weight decay),
--   --   clipnorm (per weight, tf.clip_by_norm), global_clipnorm (tf.clip_by_global_norm),
--   --   lr_mult = {conv1 = 0.1, ...} (per layer name) or function(record) -> multiplier,
--   --   lr = a number or a schedule (optim.cosine{...}, optim.step_decay{...}, optim.piecewise{...}),
--   a function of the optimizer's step; a schedule by epoch is train.LearningRateScheduler(schedule),
--   and ReduceLROnPlateau is train.ReduceLROnPlateau (Keras's callbacks)
--   model:zero_grad(); ...forward/backward...; opt:step(model)   -- or opt:step(list of weight records)
--
-- step() works on model:trainable_weights(): frozen layers are not in that list, so nothing here
-- ever touches them (no update, no weight decay, no regularizer). Per weight, in Keras's order:
-- the L2 regularizer's gradient 2*l2*w is added (Keras puts the penalty in the loss), gradients are
-- clipped, weight decay is applied, then the update. step() scales/adds into the gradient tensors
-- in place; call zero_grad before the next accumulation as usual.
-- State: opt:state() -> {iterations, lr, slots = {[weight path] = {m = t, v = t}}}; opt:load_state(s).
local flower = require 'flower'
local C = require('flower.core')._nn

local optim = {}

local function check_num(v, name, owner, lo, hi)
  if type(v) ~= 'number' or v ~= v or (lo and v < lo) or (hi and v > hi) then
    error(string.format('%s: %s must be a number%s, got %s', owner, name,
      lo and hi and string.format(' in [%g, %g]', lo, hi) or lo and string.format(' >= %g', lo) or '', tostring(v)), 3)
  end
  return v
end

-------------------------------------------------------------------------------- schedules

-- A schedule is a callable table: sched(step) -> lr, with step counting from 0 (Keras's iterations).
local Schedule = {}
Schedule.__index = Schedule
Schedule.__call = function(self, step) return self.fn(step) end
local function schedule(kind, cfg, fn) return setmetatable({kind = kind, config = cfg, fn = fn}, Schedule) end
optim.is_schedule = function(v) return getmetatable(v) == Schedule end

-- Keras CosineDecay(initial, decay_steps, alpha = 0): lr*((1-alpha)*0.5*(1+cos(pi*f)) + alpha) with
-- f = min(step, T)/T (the fraction first, as Keras computes it), so lr*alpha from step T on
function optim.cosine(cfg)
  local lr = check_num(cfg.lr, 'lr', 'optim.cosine', 0)
  local T = check_num(cfg.decay_steps, 'decay_steps', 'optim.cosine', 1)
  local alpha = check_num(cfg.alpha or 0, 'alpha', 'optim.cosine', 0, 1)
  return schedule('cosine', cfg, function(step)
    local f = math.min(step, T) / T
    return lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * f)) + alpha)
  end)
end

-- step decay: Keras ExponentialDecay(lr, decay_steps, decay_rate, staircase=True)
function optim.step_decay(cfg)
  local lr = check_num(cfg.lr, 'lr', 'optim.step_decay', 0)
  local k = check_num(cfg.decay_steps, 'decay_steps', 'optim.step_decay', 1)
  local r = check_num(cfg.decay_rate, 'decay_rate', 'optim.step_decay', 0)
  local stair = cfg.staircase ~= false
  return schedule('step', cfg, function(step)
    local p = step / k
    if stair then p = math.floor(p) end
    return lr * r ^ p
  end)
end

-- Keras PiecewiseConstantDecay(boundaries, values): values[1] while step <= boundaries[1], ...
function optim.piecewise(cfg)
  local b, v = cfg.boundaries, cfg.values
  if type(b) ~= 'table' or type(v) ~= 'table' or #v ~= #b + 1 then
    error('optim.piecewise: expects boundaries (n numbers) and values (n+1 numbers)', 2)
  end
  return schedule('piecewise', cfg, function(step)
    for i = 1, #b do if step <= b[i] then return v[i] end end
    return v[#v]
  end)
end

-------------------------------------------------------------------------------- optimizers

local Optimizer = {}
Optimizer.__index = Optimizer

local common_opts = {lr = true, learning_rate = true, weight_decay = true, decay_exclude = true, clipnorm = true,
                     global_clipnorm = true, lr_mult = true, name = true}

local function new_optimizer(kind, cfg, extra)
  cfg = cfg or {}
  if type(cfg) ~= 'table' then error('optim.' .. kind .. ': expected a table of options', 3) end
  for k in pairs(cfg) do
    if not common_opts[k] and not extra[k] then
      error(string.format("optim.%s: unknown option '%s'", kind, tostring(k)), 3)
    end
  end
  local self = setmetatable({kind = kind, iterations = 0, slots = {}}, Optimizer)
  self.lr = cfg.lr or cfg.learning_rate
  if self.lr == nil then self.lr = kind == 'SGD' and 0.01 or 0.001 end
  if not optim.is_schedule(self.lr) then check_num(self.lr, 'lr', 'optim.' .. kind, 0) end
  self.weight_decay = check_num(cfg.weight_decay or 0, 'weight_decay', 'optim.' .. kind, 0)
  self.decay_exclude = cfg.decay_exclude or {}
  if cfg.clipnorm ~= nil then self.clipnorm = check_num(cfg.clipnorm, 'clipnorm', 'optim.' .. kind, 0) end
  if cfg.global_clipnorm ~= nil then
    self.global_clipnorm = check_num(cfg.global_clipnorm, 'global_clipnorm', 'optim.' .. kind, 0)
  end
  if self.clipnorm and self.global_clipnorm then
    error('optim.' .. kind .. ': use clipnorm or global_clipnorm, not both (as in Keras)', 3)
  end
  self.lr_mult = cfg.lr_mult
  if self.lr_mult ~= nil and type(self.lr_mult) ~= 'table' and type(self.lr_mult) ~= 'function' then
    error('optim.' .. kind .. ': lr_mult must be a table {layer name = multiplier} or a function', 3)
  end
  return self
end

-- SGD{lr = 0.01, momentum = 0, nesterov = false, ...}
function optim.SGD(cfg)
  local self = new_optimizer('SGD', cfg, {momentum = true, nesterov = true})
  cfg = cfg or {}
  self.momentum = check_num(cfg.momentum or 0, 'momentum', 'optim.SGD', 0, 1)
  self.nesterov = cfg.nesterov == true
  return self
end

-- Adam{lr = 0.001, beta_1 = 0.9, beta_2 = 0.999, epsilon = 1e-7, ...} (Keras's defaults and form:
-- epsilon is added to sqrt(v), the bias corrections folded into the step size)
function optim.Adam(cfg)
  local self = new_optimizer('Adam', cfg, {beta_1 = true, beta_2 = true, epsilon = true})
  cfg = cfg or {}
  self.beta_1 = check_num(cfg.beta_1 or 0.9, 'beta_1', 'optim.Adam', 0, 1)
  self.beta_2 = check_num(cfg.beta_2 or 0.999, 'beta_2', 'optim.Adam', 0, 1)
  self.epsilon = check_num(cfg.epsilon or 1e-7, 'epsilon', 'optim.Adam', 0)
  return self
end

-- AdamW as Keras: Adam with weight_decay (default 0.004)
function optim.AdamW(cfg)
  cfg = cfg or {}
  local c = {}
  for k, v in pairs(cfg) do c[k] = v end
  if c.weight_decay == nil then c.weight_decay = 0.004 end
  return optim.Adam(c)
end

-- the learning rate of the coming step
function Optimizer:get_lr()
  if optim.is_schedule(self.lr) then return self.lr(self.iterations) end
  return self.lr
end

-- sets a number learning rate (callbacks: ReduceLROnPlateau, LearningRateScheduler); a schedule
-- owns the rate, so setting one over it is an error rather than a silent replacement
function Optimizer:set_lr(lr)
  if optim.is_schedule(self.lr) then
    error(string.format('optim.%s: the learning rate is a schedule (%s); it cannot also be set to %s '
      .. '(use a number lr with callbacks that change it)', self.kind, self.lr.kind, tostring(lr)), 2)
  end
  self.lr = check_num(lr, 'lr', 'optim.' .. self.kind .. ':set_lr', 0)
end

local function mult_for(self, rec)
  local m = self.lr_mult
  if m == nil then return 1 end
  if type(m) == 'function' then return m(rec) or 1 end
  return (rec.layer and m[rec.layer.name]) or m[rec.path] or 1
end

local function excluded(self, rec)
  for _, pat in ipairs(self.decay_exclude) do
    if rec.name == pat or rec.path:find(pat, 1, true) then return true end
  end
  return false
end

local function slot(self, rec, name)
  local nn = require 'flower.nn'   -- loaded lazily: flower.nn loads optim on first use
  local s = self.slots[rec.path]
  if not s then s = {}; self.slots[rec.path] = s end
  local t = s[name]
  if not t or t:dtype() ~= rec.tensor:dtype() or nn.device_of(t) ~= nn.device_of(rec.tensor) then
    -- on the weight's device; a slot left on another device (after model:cuda()) moves with its values
    if t and t:dtype() == rec.tensor:dtype() then t = nn.to_device(t, nn.device_of(rec.tensor))
    else t = nn.like(rec.tensor, rec.tensor:size()) end
    s[name] = t
  end
  return t
end

-- records: from model:trainable_weights() (a model or layer may be passed directly)
function Optimizer:step(obj)
  local recs = obj
  if type(obj) == 'table' and obj.trainable_weights then recs = obj:trainable_weights() end
  if type(recs) ~= 'table' then error('optimizer:step: expected a model, a layer or a list of weight records', 2) end
  local lr = self:get_lr()
  -- regularizers: the loss's penalty l2*sum(w^2) adds 2*l2*w to the gradient
  for _, r in ipairs(recs) do
    if r.regularizer and r.regularizer.l2 > 0 then C.axpby(r.grad, 2 * r.regularizer.l2, r.tensor, 1) end
  end
  if self.clipnorm then
    for _, r in ipairs(recs) do
      local n = math.sqrt(C.sumsq(r.grad))
      if n > self.clipnorm then C.axpby(r.grad, 0, r.grad, self.clipnorm / n) end
    end
  elseif self.global_clipnorm then
    local t = 0
    for _, r in ipairs(recs) do t = t + C.sumsq(r.grad) end
    t = math.sqrt(t)
    if t > self.global_clipnorm then
      local f = self.global_clipnorm / t
      for _, r in ipairs(recs) do C.axpby(r.grad, 0, r.grad, f) end
    end
  end
  local t = self.iterations + 1
  for _, r in ipairs(recs) do
    local rl = lr * mult_for(self, r)
    if self.weight_decay > 0 and not excluded(self, r) then
      C.axpby(r.tensor, 0, r.tensor, 1 - self.weight_decay * rl)
    end
    if self.kind == 'SGD' then
      local m = self.momentum > 0 and slot(self, r, 'm') or nil
      C.sgd_step(r.tensor, r.grad, m, rl, self.momentum, self.nesterov)
    else
      local m, v = slot(self, r, 'm'), slot(self, r, 'v')
      local alpha = rl * math.sqrt(1 - self.beta_2 ^ t) / (1 - self.beta_1 ^ t)
      C.adam_step(r.tensor, r.grad, m, v, alpha, self.beta_1, self.beta_2, self.epsilon)
    end
  end
  self.iterations = t
end

-- {kind, iterations, lr (a number, when not a schedule), slots = {[path] = {m=, v=}}}: tensors shared,
-- not copied (the checkpoint writer copies them to disk)
function Optimizer:state()
  return {kind = self.kind, iterations = self.iterations, lr = (not optim.is_schedule(self.lr)) and self.lr or nil,
          slots = self.slots}
end

function Optimizer:load_state(s)
  if s.kind ~= self.kind then
    error(string.format('optimizer:load_state: the state is of a %s optimizer, this is %s', tostring(s.kind), self.kind), 2)
  end
  self.iterations = s.iterations
  if s.lr and not optim.is_schedule(self.lr) then self.lr = s.lr end
  local slots = {}
  for path, sl in pairs(s.slots) do
    slots[path] = {}
    for k, t in pairs(sl) do slots[path][k] = t:clone() end
  end
  self.slots = slots
end

optim.Optimizer = Optimizer
return optim
