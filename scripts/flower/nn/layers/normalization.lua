-- Normalisation layers (loaded by flower.nn): BatchNormalization, with Keras's options, weights and
-- names; see the protocol at the top of flower/nn.lua.

return function(nn, util)
local C = nn.C
local Layer = nn.Layer
local copy_shape = nn._copy_shape
local layer_class = util.layer_class

-- ---------------------------------------------------------------- BatchNormalization

local BatchNormalization = layer_class('BatchNormalization', Layer, {'axis', 'momentum', 'epsilon', 'center',
  'scale', 'beta_initializer', 'gamma_initializer', 'moving_mean_initializer', 'moving_variance_initializer'},
  function(self, opts, o)
  local axis = opts.axis or -1
  if type(axis) == 'table' then
    if #axis ~= 1 then error(o .. ': only one normalisation axis is supported', 3) end
    axis = axis[1]
  end
  axis = type(axis) == 'number' and math.tointeger(axis)
  if not axis then error(o .. ': axis must be an integer', 3) end
  self.axis = axis
  self.momentum = opts.momentum or 0.99
  self.epsilon = opts.epsilon or 1e-3
  if type(self.momentum) ~= 'number' or self.momentum < 0 or self.momentum > 1 then
    error(o .. ': momentum must be a number in [0, 1]', 3)
  end
  if type(self.epsilon) ~= 'number' or self.epsilon <= 0 then error(o .. ': epsilon must be a positive number', 3) end
  self.center = opts.center ~= false
  self.scale = opts.scale ~= false
  self.inits = {
    beta = nn._get_init(opts.beta_initializer or 'zeros', o),
    gamma = nn._get_init(opts.gamma_initializer or 'ones', o),
    moving_mean = nn._get_init(opts.moving_mean_initializer or 'zeros', o),
    moving_variance = nn._get_init(opts.moving_variance_initializer or 'ones', o),
  }
end)

function BatchNormalization:build(s)
  -- Keras's axis counts the batch dim as 0: the last one is -1 or #s
  if not (self.axis == -1 or self.axis == #s) then
    error(string.format('only the last axis can be normalised (axis -1 or %d), got %d', #s, self.axis), 0)
  end
  local c = s[#s]
  if c < 1 then error('the channel dim of the input must be known', 0) end
  if self.scale then self:add_weight('gamma', self.inits.gamma({c}, self.dtype)) end
  if self.center then self:add_weight('beta', self.inits.beta({c}, self.dtype)) end
  self:add_weight('moving_mean', self.inits.moving_mean({c}, self.dtype), false)
  self:add_weight('moving_variance', self.inits.moving_variance({c}, self.dtype), false)
end

function BatchNormalization:output_shape(s)
  if s[#s] ~= self.moving_mean:size(1) then
    error(string.format('input has %d channels, the layer has %d', s[#s], self.moving_mean:size(1)), 0)
  end
  return copy_shape(s)
end

-- batch statistics only when training and not frozen (TF2/Keras 3: a frozen BatchNorm runs in
-- inference mode); `_frozen_by` is set by an enclosing model that is frozen
function BatchNormalization:uses_batch_stats()
  return self.train and self.trainable and not self._frozen_by
end

function BatchNormalization:needs(need_gin, need_params)
  if self:uses_batch_stats() then return need_gin or need_params, false end
  return need_params, false
end

-- inference coefficients: y = x*scale + shift
function BatchNormalization:coefficients()
  local inv = 1 / (self.moving_variance + self.epsilon):sqrt()
  local scale = self.gamma and (self.gamma * inv) or inv
  local shift = -(self.moving_mean * scale)
  if self.beta then shift:add_(self.beta) end
  return scale, shift, inv
end

-- relu: a following ReLU fused in (the executor does this); backward then gets relu = true and
-- y is the ReLU's output
BatchNormalization.fuses_relu = true

function BatchNormalization:_forward(x, keep, relu)
  if self:uses_batch_stats() then
    -- tf-keras updates the moving variance with the unbiased batch variance for 4-d inputs (its fused
    -- kernel) and with the biased one otherwise; we follow it
    local y, mean, invstd = C.batchnorm_train(x, self.gamma, self.beta, self.moving_mean, self.moving_variance,
      self.momentum, self.epsilon, x:dim() == 4, relu)
    if keep then self._saved = {mean = mean, invstd = invstd, batch = true} end
    return y
  end
  local scale, shift, inv = self:coefficients()
  if keep then self._saved = {mean = self.moving_mean, invstd = inv, scale = scale, batch = false} end
  return C.channel_affine(x, scale, shift, relu)
end

-- Fusion hooks (protocol in flower/nn.lua). In inference the layer is a per-channel affine that a
-- convolution before it folds into its output (Model:_plan's 'conv' fusion): affine() -> scale,
-- shift, new tensors the caller frees.
function BatchNormalization:is_affine() return not self:uses_batch_stats() end
function BatchNormalization:affine()
  local scale, shift, inv = self:coefficients()
  if inv ~= scale then inv:free() end
  return scale, shift
end

-- With batch statistics a bias before this layer cancels in its output: the convolution may leave
-- it out (Model:_plan's 'bias_bn' fusion), and shift_moving_mean(bias) then moves the moving mean
-- as if the batch had been shifted by it.
function BatchNormalization:absorbs_bias() return self:uses_batch_stats() end
function BatchNormalization:shift_moving_mean(shift)
  C.axpby(self.moving_mean, 1 - self.momentum, shift, 1)
end

-- inference only: y = x*scale + shift (ReLU) written into `out` (an input no one else needs)
function BatchNormalization:can_forward_into() return not self:uses_batch_stats() end
function BatchNormalization:_forward_into(x, relu, out)
  local scale, shift = self:coefficients()
  return C.channel_affine(x, scale, shift, relu, out)
end

function BatchNormalization:_backward(x, y, gy, need_gin, need_params, relu)
  local s = self._saved
  if not s then error('backward without a forward that kept its state', 0) end
  self._saved = nil
  local ry = relu and y or nil
  if not need_params then
    if not need_gin then return nil end
    if not s.batch then
      local g = ry and C.act_backward('relu', gy, ry) or gy
      local gx = C.channel_affine(g, s.scale, nil, false)
      if g ~= gy then g:free() end
      return gx
    end
    return C.batchnorm_backward(x, gy, s.mean, s.invstd, self.gamma, true, nil, nil, 0, true, ry)
  end
  local gg, gb, beta_acc
  if self.gamma then gg, beta_acc = self:grad_beta('gamma') end
  if self.beta then
    local b
    gb, b = self:grad_beta('beta')
    if beta_acc and b ~= beta_acc then   -- mixed fresh/accumulating gradients: separate calls
      C.batchnorm_backward(x, gy, s.mean, s.invstd, self.gamma, s.batch, nil, gb, b, false, ry)
      gb = nil
    end
    beta_acc = beta_acc or b
  end
  return C.batchnorm_backward(x, gy, s.mean, s.invstd, self.gamma, s.batch, gg, gb, beta_acc or 0, need_gin, ry)
end

end
