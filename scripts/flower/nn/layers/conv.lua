-- flower.nn layers (loaded by flower.nn): Keras's layers with Keras's options, weights and names.
-- Each layer implements build / output_shape / _forward / _backward / needs (see flower/nn.lua).
local flower = require 'flower'

return function(nn)
local C = nn.C
local Layer, class = nn.Layer, nn.class
local copy_shape, pair, check_int = nn._copy_shape, nn.pair, nn._check_int

-- Rejects options a layer does not know (Keras raises on unknown keyword arguments too).
local common = {name = true, trainable = true, dtype = true, type_name = true, input_shape = true}
local function check_opts(cls, opts, allowed)
  if opts == nil then return {} end
  if type(opts) ~= 'table' then error(cls.class_name .. ': expected a table of options, got ' .. type(opts), 4) end
  for k in pairs(opts) do
    if not common[k] and not allowed[k] and not (math.type(k) == 'integer' and allowed[1]) then
      local names = {}
      for n in pairs(allowed) do if type(n) == 'string' then names[#names + 1] = n end end
      table.sort(names)
      error(string.format("%s: unknown option '%s' (known: %s)", cls.class_name, tostring(k),
        table.concat(names, ', ')), 4)
    end
  end
  return opts
end

local function set(...)
  local s = {}
  for _, k in ipairs({...}) do s[k] = true end
  return s
end

local function new_layer(cls, opts, allowed)
  opts = check_opts(cls, opts, allowed)
  local self = setmetatable({}, cls)
  Layer.init(self, opts, cls)
  if opts.data_format and opts.data_format ~= 'channels_last' then
    error(cls.class_name .. ": only data_format='channels_last' is supported", 4)
  end
  return self, opts
end

local function check_padding(p, owner)
  if p ~= 'valid' and p ~= 'same' then
    error(string.format("%s: padding must be 'valid' or 'same', got %s", owner, tostring(p)), 4)
  end
  return p
end

local function want_rank(s, r, _, what)
  if #s ~= r then
    error(string.format('expects %s (rank %d without the batch dim), got shape %s', what, r, nn.shape_str(s)), 0)
  end
end

local function dims(x) return x:size() end

-- a regularizer option: nn.l2(l) or {l2 = l}
local function check_reg(r, what, owner)
  if r == nil then return nil end
  if type(r) ~= 'table' or type(r.l2) ~= 'number' or r.l2 < 0 then
    error(string.format('%s: %s must be nn.l2(l) (a table {l2 = l})', owner, what), 4)
  end
  return {kind = 'l2', l2 = r.l2}
end

-- ---------------------------------------------------------------- activations

-- In-place forward on a fresh y; backward through the output (C.act_backward).
local activations = {
  linear = {fwd = function(y) return y end},
  relu = {fwd = function(y) return y:relu_() end, bwd = 'relu'},
  sigmoid = {fwd = function(y) return y:sigmoid_() end, bwd = 'sigmoid'},
  tanh = {fwd = function(y) return y:tanh_() end, bwd = 'tanh'},
  softmax = {fwd = function(y) return y:softmax(-1) end, bwd = 'softmax'},
}
nn.activations = activations

-- y -> activation(y), in place where it can be; a new result frees y (no one else has it)
function nn._activate(name, y)
  local z = activations[name].fwd(y)
  if z ~= y then y:free() end
  return z
end

local function get_activation(a, owner)
  if a == nil then return nil end
  local f = activations[a]
  if not f then
    error(string.format("%s: unknown activation '%s' (known: linear, relu, sigmoid, softmax, tanh)", owner,
      tostring(a)), 4)
  end
  if a == 'linear' then return nil end
  return a
end

-- ---------------------------------------------------------------- windows

-- window for an input of H x W, cached per size; H/W unknown (-1) in shape inference give -1
local function window_of(self, H, W)
  local key = H * 1000003 + W
  local c = self._wins and self._wins[key]
  if c then return c[1], c[2], c[3] end
  local win, oh, ow = C.window(H, W, self.kh, self.kw, self.sh, self.sw, self.dh or 1, self.dw or 1,
    self.padding, self:owner())
  self._wins = self._wins or {}
  self._wins[key] = {win, oh, ow}
  return win, oh, ow
end

local function spatial_out(self, s)
  local H, W = s[1], s[2]
  if H < 0 or W < 0 then
    -- unknown size: only the known one is computed
    local oh, ow = -1, -1
    if H > 0 then local _, o = window_of(self, H, math.max(W, 1) + self.kw * (self.dw or 1)); oh = o end
    if W > 0 then local _, _, o = window_of(self, math.max(H, 1) + self.kh * (self.dh or 1), W); ow = o end
    return oh, ow
  end
  local _, oh, ow = window_of(self, H, W)
  return oh, ow
end

-- ---------------------------------------------------------------- Conv2D

local Conv2D = class('Conv2D', Layer)
nn.Conv2D = Conv2D

local conv_opts = set('filters', 'kernel_size', 'strides', 'padding', 'dilation_rate', 'activation', 'use_bias',
  'kernel_initializer', 'bias_initializer', 'kernel_regularizer', 'bias_regularizer', 'data_format', 'groups')

function Conv2D.new(opts)
  local self
  self, opts = new_layer(Conv2D, opts, conv_opts)
  local o = self:owner()
  self.filters = check_int(opts.filters, 'filters', o)
  if opts.kernel_size == nil then error(o .. ': kernel_size is required', 3) end
  self.kh, self.kw = pair(opts.kernel_size, 'kernel_size', o)
  self.sh, self.sw = pair(opts.strides or 1, 'strides', o)
  self.dh, self.dw = pair(opts.dilation_rate or 1, 'dilation_rate', o)
  if (self.sh > 1 or self.sw > 1) and (self.dh > 1 or self.dw > 1) then
    error(o .. ': strides > 1 together with dilation_rate > 1 is not supported (as in Keras)', 3)
  end
  if opts.groups and opts.groups ~= 1 then error(o .. ': groups other than 1 are not supported', 3) end
  self.padding = check_padding(opts.padding or 'valid', o)
  self.activation = get_activation(opts.activation, o)
  self.use_bias = opts.use_bias ~= false
  self.kernel_initializer = nn._get_init(opts.kernel_initializer or 'glorot_uniform', o)
  self.bias_initializer = nn._get_init(opts.bias_initializer or 'zeros', o)
  self.regularizers = {kernel = check_reg(opts.kernel_regularizer, 'kernel_regularizer', o),
                       bias = check_reg(opts.bias_regularizer, 'bias_regularizer', o)}
  return self
end

function Conv2D:build(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if s[3] < 1 then error('the channel dim of the input must be known', 0) end
  self:add_weight('kernel', self.kernel_initializer({self.kh, self.kw, s[3], self.filters}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({self.filters}, self.dtype)) end
end

function Conv2D:output_shape(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if self.kernel and s[3] ~= self.kernel:size(3) then
    error(string.format('input has %d channels, the kernel expects %d', s[3], self.kernel:size(3)), 0)
  end
  local oh, ow = spatial_out(self, s)
  return {oh, ow, self.filters}
end

function Conv2D:needs(need_gin, need_params)
  return need_params, self.activation ~= nil
end

-- omit_bias: the executor leaves the bias to a following batch-statistics BatchNormalization
-- (Model:_plan's 'bias_bn' fusion)
function Conv2D:_forward(x, keep, omit_bias)
  local d = dims(x)
  local win = window_of(self, d[2], d[3])
  self._xshape = d
  local y = C.conv2d(x, self:_kernel('kernel', x:dtype(), true), win, nil, not omit_bias and self.bias or nil,
    self.activation == 'relu')
  if self.activation and self.activation ~= 'relu' then y = nn._activate(self.activation, y) end
  return y
end

-- Forward with a per-channel affine (and ReLU) folded into the output: used by the executor to fuse
-- a following inference BatchNormalization. shift already includes this layer's bias.
-- pad {t, b, l, r}: a ZeroPadding2D before this layer, folded into the window (no padded copy)
function Conv2D:_forward_fused(x, scale, shift, relu, pad)
  local d = dims(x)
  local k = self:_kernel('kernel', x:dtype(), true)
  if not pad then return C.conv2d(x, k, window_of(self, d[2], d[3]), scale, shift, relu) end
  local w = window_of(self, d[2] + pad[1] + pad[2], d[3] + pad[3] + pad[4])
  local win = {kh = w.kh, kw = w.kw, sh = w.sh, sw = w.sw, dh = w.dh, dw = w.dw,
               pt = w.pt + pad[1], pb = w.pb + pad[2], pl = w.pl + pad[3], pr = w.pr + pad[4]}
  return C.conv2d(x, k, win, scale, shift, relu)
end

-- can a ZeroPadding2D of `pad` be folded in: the combined pads must stay below the window size
function Conv2D:can_fold_pad(pad, H, W)
  if H < 0 or W < 0 or self.dh ~= 1 or self.dw ~= 1 then return false end
  local w = window_of(self, H + pad[1] + pad[2], W + pad[3] + pad[4])
  return w.pt + pad[1] < self.kh and w.pb + pad[2] < self.kh and w.pl + pad[3] < self.kw and w.pr + pad[4] < self.kw
end

-- accumulates dL/dkernel (and bias) from x and gy
local function conv_param_grads(self, kernel_name, x, gy, win, filter_fn)
  local gw, b1 = self:grad_beta(kernel_name)
  if self.use_bias then
    local gb, b2 = self:grad_beta('bias')
    if b1 == b2 then return filter_fn(x, gy, win, gw, gb, b1) end
    filter_fn(x, gy, win, gw, nil, b1)
    local s = gy:sum(1):sum(1):sum(1):view(-1)
    if b2 == 0 then gb:copy(s) else gb:add_(s) end
    return
  end
  filter_fn(x, gy, win, gw, nil, b1)
end

function Conv2D:_backward(x, y, gy, need_gin, need_params)
  if self.activation then gy = C.act_backward(activations[self.activation].bwd, gy, y) end
  local d = self._xshape
  local win = window_of(self, d[2], d[3])
  if need_params then conv_param_grads(self, 'kernel', x, gy, win, C.conv2d_backward_filter) end
  if need_gin then return C.conv2d_backward_data(gy, self:_kernel('kernel', gy:dtype()), d, win) end
end

-- ---------------------------------------------------------------- DepthwiseConv2D

local DepthwiseConv2D = class('DepthwiseConv2D', Layer)
nn.DepthwiseConv2D = DepthwiseConv2D

local dw_opts = set('kernel_size', 'strides', 'padding', 'dilation_rate', 'depth_multiplier', 'activation',
  'use_bias', 'depthwise_initializer', 'bias_initializer', 'depthwise_regularizer', 'bias_regularizer',
  'data_format')

function DepthwiseConv2D.new(opts)
  local self
  self, opts = new_layer(DepthwiseConv2D, opts, dw_opts)
  local o = self:owner()
  if opts.kernel_size == nil then error(o .. ': kernel_size is required', 3) end
  self.kh, self.kw = pair(opts.kernel_size, 'kernel_size', o)
  self.sh, self.sw = pair(opts.strides or 1, 'strides', o)
  self.dh, self.dw = pair(opts.dilation_rate or 1, 'dilation_rate', o)
  self.depth_multiplier = check_int(opts.depth_multiplier or 1, 'depth_multiplier', o)
  self.padding = check_padding(opts.padding or 'valid', o)
  self.activation = get_activation(opts.activation, o)
  self.use_bias = opts.use_bias ~= false
  self.depthwise_initializer = nn._get_init(opts.depthwise_initializer or 'glorot_uniform', o)
  self.bias_initializer = nn._get_init(opts.bias_initializer or 'zeros', o)
  self.regularizers = {depthwise_kernel = check_reg(opts.depthwise_regularizer, 'depthwise_regularizer', o),
                       bias = check_reg(opts.bias_regularizer, 'bias_regularizer', o)}
  return self
end

function DepthwiseConv2D:build(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if s[3] < 1 then error('the channel dim of the input must be known', 0) end
  self:add_weight('depthwise_kernel',
    self.depthwise_initializer({self.kh, self.kw, s[3], self.depth_multiplier}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({s[3] * self.depth_multiplier}, self.dtype)) end
end

function DepthwiseConv2D:output_shape(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if s[3] ~= self.depthwise_kernel:size(3) then
    error(string.format('input has %d channels, the kernel expects %d', s[3], self.depthwise_kernel:size(3)), 0)
  end
  local oh, ow = spatial_out(self, s)
  return {oh, ow, s[3] * self.depth_multiplier}
end

DepthwiseConv2D.needs = Conv2D.needs

function DepthwiseConv2D:_forward(x)
  local d = dims(x)
  self._xshape = d
  local y = C.depthwise(x, self:_kernel('depthwise_kernel', x:dtype(), true), window_of(self, d[2], d[3]), nil,
    self.bias, self.activation == 'relu')
  if self.activation and self.activation ~= 'relu' then y = nn._activate(self.activation, y) end
  return y
end

function DepthwiseConv2D:_forward_fused(x, scale, shift, relu)
  local d = dims(x)
  return C.depthwise(x, self:_kernel('depthwise_kernel', x:dtype(), true), window_of(self, d[2], d[3]), scale, shift,
    relu)
end

function DepthwiseConv2D:_backward(x, y, gy, need_gin, need_params)
  if self.activation then gy = C.act_backward(activations[self.activation].bwd, gy, y) end
  local d = self._xshape
  local win = window_of(self, d[2], d[3])
  if need_params then conv_param_grads(self, 'depthwise_kernel', x, gy, win, C.depthwise_backward_filter) end
  if need_gin then return C.depthwise_backward_data(gy, self:_kernel('depthwise_kernel', gy:dtype()), d, win) end
end

-- ---------------------------------------------------------------- SeparableConv2D

local SeparableConv2D = class('SeparableConv2D', Layer)
nn.SeparableConv2D = SeparableConv2D

local sep_opts = set('filters', 'kernel_size', 'strides', 'padding', 'dilation_rate', 'depth_multiplier',
  'activation', 'use_bias', 'depthwise_initializer', 'pointwise_initializer', 'bias_initializer',
  'depthwise_regularizer', 'pointwise_regularizer', 'bias_regularizer', 'data_format')

function SeparableConv2D.new(opts)
  local self
  self, opts = new_layer(SeparableConv2D, opts, sep_opts)
  local o = self:owner()
  self.filters = check_int(opts.filters, 'filters', o)
  if opts.kernel_size == nil then error(o .. ': kernel_size is required', 3) end
  self.kh, self.kw = pair(opts.kernel_size, 'kernel_size', o)
  self.sh, self.sw = pair(opts.strides or 1, 'strides', o)
  self.dh, self.dw = pair(opts.dilation_rate or 1, 'dilation_rate', o)
  self.depth_multiplier = check_int(opts.depth_multiplier or 1, 'depth_multiplier', o)
  self.padding = check_padding(opts.padding or 'valid', o)
  self.activation = get_activation(opts.activation, o)
  self.use_bias = opts.use_bias ~= false
  self.depthwise_initializer = nn._get_init(opts.depthwise_initializer or 'glorot_uniform', o)
  self.pointwise_initializer = nn._get_init(opts.pointwise_initializer or 'glorot_uniform', o)
  self.bias_initializer = nn._get_init(opts.bias_initializer or 'zeros', o)
  self.regularizers = {depthwise_kernel = check_reg(opts.depthwise_regularizer, 'depthwise_regularizer', o),
                       pointwise_kernel = check_reg(opts.pointwise_regularizer, 'pointwise_regularizer', o),
                       bias = check_reg(opts.bias_regularizer, 'bias_regularizer', o)}
  self._pwin = {kh = 1, kw = 1}
  return self
end

function SeparableConv2D:build(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if s[3] < 1 then error('the channel dim of the input must be known', 0) end
  local m = self.depth_multiplier
  self:add_weight('depthwise_kernel', self.depthwise_initializer({self.kh, self.kw, s[3], m}, self.dtype))
  self:add_weight('pointwise_kernel', self.pointwise_initializer({1, 1, s[3] * m, self.filters}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({self.filters}, self.dtype)) end
end

function SeparableConv2D:output_shape(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if s[3] ~= self.depthwise_kernel:size(3) then
    error(string.format('input has %d channels, the kernel expects %d', s[3], self.depthwise_kernel:size(3)), 0)
  end
  local oh, ow = spatial_out(self, s)
  return {oh, ow, self.filters}
end

SeparableConv2D.needs = Conv2D.needs

function SeparableConv2D:_forward_fused(x, scale, shift, relu, keep)
  local d = dims(x)
  self._xshape = d
  local dt = x:dtype()
  local mid = C.depthwise(x, self:_kernel('depthwise_kernel', dt, true), (window_of(self, d[2], d[3])))
  local y = C.conv2d(mid, self:_kernel('pointwise_kernel', dt, true), self._pwin, scale, shift, relu)
  if keep then self._mid = mid else mid:free() end    -- the pointwise kernel's gradient needs it
  return y
end

function SeparableConv2D:_forward(x, keep)
  local y = self:_forward_fused(x, nil, self.bias, self.activation == 'relu', keep)
  if self.activation and self.activation ~= 'relu' then y = nn._activate(self.activation, y) end
  return y
end

function SeparableConv2D:_backward(x, y, gy, need_gin, need_params)
  if self.activation then gy = C.act_backward(activations[self.activation].bwd, gy, y) end
  local mid = self._mid
  if not mid then error('backward without a forward that kept its state', 0) end
  self._mid = nil
  local d = self._xshape
  local win = window_of(self, d[2], d[3])
  if need_params then
    local gp, b1 = self:grad_beta('pointwise_kernel')
    if self.use_bias then
      local gb, b2 = self:grad_beta('bias')
      if b1 == b2 then
        C.conv2d_backward_filter(mid, gy, self._pwin, gp, gb, b1)
      else
        C.conv2d_backward_filter(mid, gy, self._pwin, gp, nil, b1)
        local s = gy:sum(1):sum(1):sum(1):view(-1)
        if b2 == 0 then gb:copy(s) else gb:add_(s) end
      end
    else
      C.conv2d_backward_filter(mid, gy, self._pwin, gp, nil, b1)
    end
  end
  local gmid
  if need_params or need_gin then
    gmid = C.conv2d_backward_data(gy, self:_kernel('pointwise_kernel', gy:dtype()), mid, self._pwin)
  end
  mid:free()
  if need_params then
    local gd, b = self:grad_beta('depthwise_kernel')
    C.depthwise_backward_filter(x, gmid, win, gd, nil, b)
  end
  if need_gin then return C.depthwise_backward_data(gmid, self:_kernel('depthwise_kernel', gy:dtype()), d, win) end
end

-- ---------------------------------------------------------------- BatchNormalization

local BatchNormalization = class('BatchNormalization', Layer)
nn.BatchNormalization = BatchNormalization

local bn_opts = set('axis', 'momentum', 'epsilon', 'center', 'scale', 'beta_initializer', 'gamma_initializer',
  'moving_mean_initializer', 'moving_variance_initializer')

function BatchNormalization.new(opts)
  local self
  self, opts = new_layer(BatchNormalization, opts, bn_opts)
  local o = self:owner()
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
  return self
end

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

-- the moving mean as if the batch had been shifted by `shift` (C): a convolution's bias that the
-- executor left out of this layer's input (Model:_plan's 'bias_bn' fusion)
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

-- ---------------------------------------------------------------- Activation / ReLU / Softmax

local Activation = class('Activation', Layer)
nn.Activation = Activation

-- nn.Activation('relu'), nn.Activation{'relu', name='act1'} or nn.Activation{activation='relu'}
function Activation.new(opts)
  if type(opts) == 'string' then opts = {activation = opts} end
  local self
  self, opts = new_layer(Activation, opts, set('activation', 1))
  local a = opts.activation or opts[1]
  if a == nil then error(self:owner() .. ': activation is required', 3) end
  self.act = a
  get_activation(a, self:owner())
  return self
end

function Activation:needs() return false, self.act ~= 'linear' end

function Activation:_forward(x)
  if self.act == 'linear' then return x end
  if self.act == 'relu' then return x:relu() end
  if self.act == 'softmax' then return x:softmax(-1) end
  return x[self.act](x)
end

function Activation:can_forward_into() return self.act == 'relu' end
function Activation:_forward_into(x, _, out)
  if out ~= x then out:copy(x) end
  return out:relu_()
end

function Activation:_backward(x, y, gy, need_gin)
  if not need_gin then return nil end
  if self.act == 'linear' then return gy end
  return C.act_backward(activations[self.act].bwd, gy, y)
end

local ReLU = class('ReLU', Activation)
nn.ReLU = ReLU

function ReLU.new(opts)
  local self
  self, opts = new_layer(ReLU, opts, set('max_value', 'negative_slope', 'threshold'))
  if (opts.max_value ~= nil) or (opts.negative_slope or 0) ~= 0 or (opts.threshold or 0) ~= 0 then
    error(self:owner() .. ': only the plain ReLU is supported (no max_value, negative_slope or threshold)', 3)
  end
  self.act = 'relu'
  return self
end

local Softmax = class('Softmax', Activation)
nn.Softmax = Softmax

function Softmax.new(opts)
  local self
  self, opts = new_layer(Softmax, opts, set('axis'))
  if (opts.axis or -1) ~= -1 then error(self:owner() .. ': only axis=-1 is supported', 3) end
  self.act = 'softmax'
  return self
end

-- ---------------------------------------------------------------- pooling

local function pool_class(name, kind)
  local cls = class(name, Layer)
  nn[name] = cls
  function cls.new(opts)
    local self
    self, opts = new_layer(cls, opts, set('pool_size', 'strides', 'padding', 'data_format'))
    local o = self:owner()
    self.kind = kind
    self.kh, self.kw = pair(opts.pool_size or 2, 'pool_size', o)
    if opts.strides ~= nil then self.sh, self.sw = pair(opts.strides, 'strides', o)
    else self.sh, self.sw = self.kh, self.kw end
    self.padding = check_padding(opts.padding or 'valid', o)
    return self
  end
  function cls:output_shape(s)
    want_rank(s, 3, self, 'an image (H, W, C)')
    local oh, ow = spatial_out(self, s)
    return {oh, ow, s[3]}
  end
  -- max pooling keeps the argmax of a training forward (int32, output-sized) instead of its input
  function cls:needs() return false, false end
  function cls:_forward(x, keep)
    local d = dims(x)
    self._xshape = d
    self._argmax = nil
    local win = (window_of(self, d[2], d[3]))
    if kind == 'max' and keep then
      local y, am = C.pool2d(x, kind, win, true)
      self._argmax = am
      return y
    end
    return C.pool2d(x, kind, win)
  end
  function cls:_backward(x, y, gy, need_gin)
    local am = self._argmax
    self._argmax = nil
    if not need_gin then return nil end
    local d = self._xshape
    if kind == 'max' and not am then
      if not x then error('backward without a forward that kept its state', 0) end
      return C.pool2d_backward(gy, x, kind, (window_of(self, d[2], d[3])))
    end
    local gx = C.pool2d_backward(gy, d, kind, (window_of(self, d[2], d[3])), am)
    if am then am:free() end
    return gx
  end
  return cls
end
pool_class('MaxPooling2D', 'max')
pool_class('AveragePooling2D', 'avg')

local function global_pool_class(name, kind)
  local cls = class(name, Layer)
  nn[name] = cls
  function cls.new(opts)
    local self
    self, opts = new_layer(cls, opts, set('keepdims', 'data_format'))
    self.keepdims = opts.keepdims == true
    self.kind = kind
    return self
  end
  function cls:output_shape(s)
    want_rank(s, 3, self, 'an image (H, W, C)')
    if self.keepdims then return {1, 1, s[3]} end
    return {s[3]}
  end
  function cls:needs() return false, false end
  local function win(d) return {kh = d[2], kw = d[3]} end
  function cls:_forward(x, keep)
    local d = dims(x)
    self._xshape = d
    self._argmax = nil
    local y
    if kind == 'max' and keep then
      y, self._argmax = C.pool2d(x, kind, win(d), true)
    else
      y = C.pool2d(x, kind, win(d))
    end
    if self.keepdims then return y end
    local v = y:view(d[1], d[4])
    y:free()   -- the view holds the storage
    return v
  end
  function cls:_backward(x, y, gy, need_gin)
    local am = self._argmax
    self._argmax = nil
    if not need_gin then return nil end
    local d = self._xshape
    local g4 = gy:reshape(d[1], 1, 1, d[4])
    if kind == 'max' and not am then error('backward without a forward that kept its state', 0) end
    local gx = C.pool2d_backward(g4, d, kind, win(d), am)
    if am then am:free() end
    return gx
  end
  return cls
end
global_pool_class('GlobalAveragePooling2D', 'avg')
global_pool_class('GlobalMaxPooling2D', 'max')

-- ---------------------------------------------------------------- Dense

local Dense = class('Dense', Layer)
nn.Dense = Dense

function Dense.new(opts)
  local self
  self, opts = new_layer(Dense, opts, set('units', 'activation', 'use_bias', 'kernel_initializer',
    'bias_initializer', 'kernel_regularizer', 'bias_regularizer'))
  local o = self:owner()
  self.units = check_int(opts.units, 'units', o)
  self.activation = get_activation(opts.activation, o)
  self.use_bias = opts.use_bias ~= false
  self.kernel_initializer = nn._get_init(opts.kernel_initializer or 'glorot_uniform', o)
  self.bias_initializer = nn._get_init(opts.bias_initializer or 'zeros', o)
  self.regularizers = {kernel = check_reg(opts.kernel_regularizer, 'kernel_regularizer', o),
                       bias = check_reg(opts.bias_regularizer, 'bias_regularizer', o)}
  return self
end

function Dense:build(s)
  local d = s[#s]
  if d < 1 then error('the last dim of the input must be known', 0) end
  self:add_weight('kernel', self.kernel_initializer({d, self.units}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({self.units}, self.dtype)) end
end

function Dense:output_shape(s)
  if s[#s] ~= self.kernel:size(1) then
    error(string.format('input has %d features, the kernel expects %d', s[#s], self.kernel:size(1)), 0)
  end
  local r = copy_shape(s)
  r[#r] = self.units
  return r
end

Dense.needs = Conv2D.needs

-- (N, ..., D) -> (M, D) rows
local function rows(x)
  if x:dim() == 2 then return x end
  local d = x:size()
  return x:reshape(-1, d[#d])
end

function Dense:_forward(x)
  local x2 = rows(x)
  self._xshape = x:size()
  local y = x2:matmul(self:_kernel('kernel', x:dtype(), true))
  if self.bias or self.activation == 'relu' then C.channel_affine(y, nil, self.bias, self.activation == 'relu', y) end
  if self.activation and self.activation ~= 'relu' then y = nn._activate(self.activation, y) end
  if x2 ~= x then x2:free() end   -- a view (or copy) of x: the executor frees x
  if x:dim() ~= 2 then
    local s = x:size()
    s[#s] = self.units
    local v = y:view(s)
    y:free()   -- the view holds the storage
    y = v
  end
  return y
end

function Dense:_backward(x, y, gy, need_gin, need_params)
  if self.activation then gy = C.act_backward(activations[self.activation].bwd, gy, y) end
  local g2 = rows(gy)
  if need_params then
    local gw, b = self:grad_beta('kernel')
    C.gemm(gw, rows(x), g2, true, false, 1, b)
    if self.use_bias then
      local gb, bb = self:grad_beta('bias')
      local s = g2:sum(1)
      if bb == 0 then gb:copy(s) else gb:add_(s) end
    end
  end
  if need_gin then
    local gx = g2:matmul(self:_kernel('kernel', gy:dtype()):t())
    if #self._xshape ~= 2 then gx = gx:view(self._xshape) end
    return gx
  end
end

-- ---------------------------------------------------------------- Dropout

local Dropout = class('Dropout', Layer)
nn.Dropout = Dropout

-- Inverted dropout: in training, keeps each element with probability 1-rate and scales it by
-- 1/(1-rate). With `seed`, masks come from the layer's own Philox stream (reproducible, independent
-- of the global generator); without, from the global generator (flower.manual_seed).
function Dropout.new(opts)
  if type(opts) == 'number' then opts = {rate = opts} end
  local self
  self, opts = new_layer(Dropout, opts, set('rate', 'seed', 'noise_shape', 1))
  local rate = opts.rate or opts[1]
  if type(rate) ~= 'number' or rate < 0 or rate >= 1 then
    error(self:owner() .. ': rate must be a number in [0, 1)', 3)
  end
  if opts.noise_shape then error(self:owner() .. ': noise_shape is not supported', 3) end
  self.rate = rate
  self.seed = opts.seed
  self._offset = 0
  return self
end

function Dropout:_forward(x, keep)
  self._mask = nil
  if not self.train or self.rate == 0 then return x end
  local u = nn.like(x, x:size(), nil, 'empty')
  if self.seed then
    C.rng_uniform(u, self.seed, self._offset)
    self._offset = self._offset + u:numel()
  else
    u:uniform_(0, 1)
  end
  local mask = u:ge(self.rate):type(x:dtype()):mul_(1 / (1 - self.rate))
  u:free()
  if keep then self._mask = mask end
  return x * mask
end

function Dropout:_backward(x, y, gy, need_gin)
  local mask = self._mask
  self._mask = nil
  if not need_gin then return nil end
  if not mask then return gy end
  return gy * mask
end

-- ---------------------------------------------------------------- shape layers

local Flatten = class('Flatten', Layer)
nn.Flatten = Flatten

function Flatten.new(opts)
  local self = new_layer(Flatten, opts, set('data_format'))
  return self
end

function Flatten:output_shape(s)
  local n = 1
  for i = 1, #s do
    if s[i] < 0 then return {-1} end
    n = n * s[i]
  end
  return {n}
end

function Flatten:_forward(x)
  self._xshape = x:size()
  return x:reshape(x:size(1), -1)
end

function Flatten:_backward(x, y, gy, need_gin)
  if need_gin then return gy:reshape(self._xshape) end
end

local Reshape = class('Reshape', Layer)
nn.Reshape = Reshape

function Reshape.new(opts)
  local self
  self, opts = new_layer(Reshape, opts, set('target_shape'))
  if type(opts.target_shape) ~= 'table' then error(self:owner() .. ': target_shape is required (a list)', 3) end
  self.target_shape = {}
  for i, v in ipairs(opts.target_shape) do
    self.target_shape[i] = check_int(v, 'target_shape', self:owner(), -1)
    if v == 0 then error(self:owner() .. ': target_shape entries must be positive or -1', 3) end
  end
  return self
end

function Reshape:output_shape(s)
  local n, m, unknown = 1, 1, 0
  for i = 1, #s do n = n * s[i] end
  local r = copy_shape(self.target_shape)
  for i = 1, #r do if r[i] == -1 then unknown = unknown + 1 else m = m * r[i] end end
  if unknown > 1 then error('target_shape may have at most one -1', 0) end
  if n > 0 then
    if unknown == 1 then
      if n % m ~= 0 then error(string.format('cannot reshape %s to %s', nn.shape_str(s), nn.shape_str(r)), 0) end
      for i = 1, #r do if r[i] == -1 then r[i] = n // m end end
    elseif n ~= m then
      error(string.format('cannot reshape %s (%d values) to %s (%d values)', nn.shape_str(s), n,
        nn.shape_str(r), m), 0)
    end
  end
  return r
end

function Reshape:_forward(x)
  self._xshape = x:size()
  local s = {x:size(1)}
  for i, v in ipairs(self.target_shape) do s[i + 1] = v end
  return x:reshape(s)
end

Reshape._backward = Flatten._backward

-- Keras axis (0 = batch, negative from the end) -> 1-based tensor dim for a rank-r tensor (with batch)
local function keras_axis(axis, r, owner)
  local d = axis < 0 and r + 1 + axis or axis + 1
  if d < 2 or d > r then error(string.format('%s: axis %d is out of range for inputs of rank %d', owner, axis, r), 0) end
  return d
end

local Concatenate = class('Concatenate', Layer)
nn.Concatenate = Concatenate

function Concatenate.new(opts)
  local self
  self, opts = new_layer(Concatenate, opts, set('axis'))
  self.axis = math.tointeger(opts.axis or -1)
  if not self.axis then error(self:owner() .. ': axis must be an integer', 3) end
  self.multi = true
  return self
end

function Concatenate:output_shape(ss)
  if #ss < 1 then error('needs at least one input', 0) end
  local r = #ss[1] + 1
  local d = keras_axis(self.axis, r, self:owner()) - 1   -- index into shapes without the batch dim
  local out = copy_shape(ss[1])
  for i = 2, #ss do
    if #ss[i] ~= #ss[1] then
      error(string.format('input %d has rank %d, input 1 has rank %d', i, #ss[i] + 1, r), 0)
    end
    for k = 1, #ss[1] do
      if k ~= d and ss[i][k] ~= ss[1][k] and ss[i][k] >= 0 and ss[1][k] >= 0 then
        error(string.format('input %d has shape %s, input 1 has %s: only axis %d may differ', i,
          nn.shape_str(ss[i]), nn.shape_str(ss[1]), self.axis), 0)
      end
    end
    out[d] = (out[d] < 0 or ss[i][d] < 0) and -1 or out[d] + ss[i][d]
  end
  return out
end

function Concatenate:_forward(xs)
  local dim = keras_axis(self.axis, xs[1]:dim(), self:owner())
  local sizes = {}
  for i = 1, #xs do sizes[i] = xs[i]:size(dim) end
  self._sizes, self._dim = sizes, dim
  return flower.cat(xs, dim)
end

function Concatenate:_backward(xs, y, gy, need_gin)
  if not need_gin then return nil end
  local r, off = {}, 1
  for i, n in ipairs(self._sizes) do
    r[i] = gy:narrow(self._dim, off, n)
    off = off + n
  end
  return r
end

local function same_shapes(self, ss)
  if #ss < 2 then error('needs at least two inputs', 0) end
  for i = 2, #ss do
    local ok = #ss[i] == #ss[1]
    for k = 1, #ss[1] do if ok and ss[i][k] ~= ss[1][k] then ok = false end end
    if not ok then
      error(string.format('input %d has shape %s, input 1 has %s; they must be equal', i, nn.shape_str(ss[i]),
        nn.shape_str(ss[1])), 0)
    end
  end
  return copy_shape(ss[1])
end

local Add = class('Add', Layer)
nn.Add = Add

function Add.new(opts)
  local self = new_layer(Add, opts, {})
  self.multi = true
  return self
end

Add.output_shape = same_shapes
Add.fuses_relu = true

function Add:_forward(xs, keep, relu)
  self._n = #xs
  if #xs == 2 then return C.add_act(xs[1], xs[2], 1, relu) end
  local y = xs[1] + xs[2]
  for i = 3, #xs do y:add_(xs[i]) end
  if relu then y:relu_() end
  return y
end

function Add:can_forward_into() return true end
-- out is one of the inputs (rawequal): it already holds that term, the others are added into it
function Add:_forward_into(xs, relu, out)
  self._n = #xs
  if #xs == 2 then return C.add_act(xs[1], xs[2], 1, relu, out) end
  local skipped = false
  for i = 1, #xs do
    if rawequal(xs[i], out) and not skipped then skipped = true else out:add_(xs[i]) end
  end
  if relu then out:relu_() end
  return out
end

function Add:_backward(xs, y, gy, need_gin, need_params, relu)
  if not need_gin then return nil end
  if relu then gy = C.act_backward('relu', gy, y) end
  local r = {}
  for i = 1, self._n do r[i] = gy end
  return r
end

-- y = scale * x (a constant; Keras would use a Lambda)
local Scale = class('Scale', Layer)
nn.Scale = Scale

function Scale.new(opts)
  local self
  self, opts = new_layer(Scale, opts, set('scale'))
  if type(opts.scale) ~= 'number' then error(self:owner() .. ': scale (a number) is required', 3) end
  self.scale = opts.scale
  return self
end

function Scale:_forward(x) return x * self.scale end
function Scale:_backward(x, y, gy, need_gin) if need_gin then return gy * self.scale end end

-- y = a + scale * b: InceptionResNetV2's scaled residual (Keras: a Lambda, CustomScaleLayer in
-- Keras 3). Inputs in Keras's order {x, up}.
local ScaledAdd = class('ScaledAdd', Layer)
nn.ScaledAdd = ScaledAdd

function ScaledAdd.new(opts)
  local self
  self, opts = new_layer(ScaledAdd, opts, set('scale'))
  if type(opts.scale) ~= 'number' then error(self:owner() .. ': scale (a number) is required', 3) end
  self.scale = opts.scale
  self.multi = true
  return self
end

function ScaledAdd:output_shape(ss)
  if #ss ~= 2 then error('expects exactly two inputs {x, residual}, got ' .. #ss, 0) end
  return same_shapes(self, ss)
end

ScaledAdd.fuses_relu = true

function ScaledAdd:_forward(xs, keep, relu)
  return C.add_act(xs[1], xs[2], self.scale, relu)
end

function ScaledAdd:can_forward_into() return true end
function ScaledAdd:_forward_into(xs, relu, out)
  return C.add_act(xs[1], xs[2], self.scale, relu, out)
end

function ScaledAdd:_backward(xs, y, gy, need_gin, need_params, relu)
  if not need_gin then return nil end
  if relu then gy = C.act_backward('relu', gy, y) end
  return {gy, self.scale == 1 and gy or gy * self.scale}
end

local ZeroPadding2D = class('ZeroPadding2D', Layer)
nn.ZeroPadding2D = ZeroPadding2D

-- padding: n, {ph, pw} or {{top, bottom}, {left, right}} (Keras's forms)
function ZeroPadding2D.new(opts)
  local self
  self, opts = new_layer(ZeroPadding2D, opts, set('padding', 'data_format'))
  local p, o = opts.padding or 1, self:owner()
  if type(p) == 'table' and type(p[1]) == 'table' then
    self.pt, self.pb = pair(p[1], 'padding', o, 0)
    self.pl, self.pr = pair(p[2], 'padding', o, 0)
  else
    local a, b = pair(p, 'padding', o, 0)
    self.pt, self.pb, self.pl, self.pr = a, a, b, b
  end
  return self
end

function ZeroPadding2D:output_shape(s)
  want_rank(s, 3, self, 'an image (H, W, C)')
  return {s[1] < 0 and -1 or s[1] + self.pt + self.pb, s[2] < 0 and -1 or s[2] + self.pl + self.pr, s[3]}
end

function ZeroPadding2D:_forward(x)
  local d = x:size()
  local y = nn.like(x, {d[1], d[2] + self.pt + self.pb, d[3] + self.pl + self.pr, d[4]})
  -- the views are freed at once: left to the collector they would keep y's storage alive after the
  -- executor frees y
  local rows = y:narrow(2, self.pt + 1, d[2])
  local inner = rows:narrow(3, self.pl + 1, d[3])
  inner:copy(x)
  inner:free()
  rows:free()
  self._xshape = d
  return y
end

function ZeroPadding2D:_backward(x, y, gy, need_gin)
  if not need_gin then return nil end
  local d = self._xshape
  local rows = gy:narrow(2, self.pt + 1, d[2])   -- freed at once, as in _forward
  local gx = rows:narrow(3, self.pl + 1, d[3])
  rows:free()
  return gx
end

-- ---------------------------------------------------------------- Preprocess

-- Keras Applications' preprocess_input as a layer, on RGB images (N, H, W, 3) of any dtype
-- (uint8 or float); the output is the layer's dtype (float32 unless model:type changed it), or
-- bfloat16 inside a model running in mixed precision: computed in float32 and rounded once (uint8
-- and bfloat16 pixels are exact in bfloat16, so those go through the bfloat16 kernel directly,
-- which computes in float32 too). A model in mixed precision therefore does not round its float32
-- input before this layer (converts_input).
--   caffe: RGB -> BGR, then subtract the ImageNet means [103.939, 116.779, 123.68] (B, G, R)
--   tf:    x / 127.5 - 1
--   torch: x / 255, then (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] per RGB channel
local Preprocess = class('Preprocess', Layer)
nn.Preprocess = Preprocess

function Preprocess.new(opts)
  if type(opts) == 'string' then opts = {mode = opts} end
  local self
  self, opts = new_layer(Preprocess, opts, set('mode'))
  local m = opts.mode or 'caffe'
  if m ~= 'caffe' and m ~= 'tf' and m ~= 'torch' then
    error(self:owner() .. ": mode must be 'caffe', 'tf' or 'torch', got " .. tostring(m), 3)
  end
  self.mode = m
  self.out_dtype = self.dtype
  return self
end

function Preprocess:output_shape(s)
  if s[#s] ~= 3 then error('expects RGB images with 3 channels, got shape ' .. nn.shape_str(s), 0) end
  return copy_shape(s)
end

function Preprocess:_on_type(dtype) self.out_dtype = dtype end

-- ref: a tensor whose device the coefficients go to (the host without one)
function Preprocess:coefficients(ref)
  local scale, shift
  if self.mode == 'caffe' then
    scale, shift = {1, 1, 1}, {-103.939, -116.779, -123.68}
  elseif self.mode == 'tf' then
    scale, shift = {1 / 127.5, 1 / 127.5, 1 / 127.5}, {-1, -1, -1}
  else
    local mean, std = {0.485, 0.456, 0.406}, {0.229, 0.224, 0.225}
    scale, shift = {}, {}
    for i = 1, 3 do scale[i] = 1 / (255 * std[i]); shift[i] = -mean[i] / std[i] end
  end
  if ref == nil then return flower.tensor(scale, self.dtype), flower.tensor(shift, self.dtype) end
  return nn.like(ref, nil, self.dtype, scale), nn.like(ref, nil, self.dtype, shift)
end

local function flip_channels(x)
  local b, g, r = x:narrow(-1, 3, 1), x:narrow(-1, 2, 1), x:narrow(-1, 1, 1)
  local y = flower.cat({b, g, r}, -1)
  b:free(); g:free(); r:free()
  return y
end

Preprocess.converts_input = true

function Preprocess:_forward(x)
  local dt = x:dtype()
  local mixed = nn._compute == 'bfloat16' and self.dtype == 'float32'
  local work = (mixed and (dt == 'uint8' or dt == 'bfloat16')) and 'bfloat16' or self.dtype
  local xf = dt == work and x or x:type(work)
  if self.mode == 'caffe' then
    local flipped = flip_channels(xf)
    if xf ~= x then xf:free() end
    xf = flipped
  end
  local scale, shift = self:coefficients(xf)
  local y = C.channel_affine(xf, scale, shift, false)
  if xf ~= x then xf:free() end   -- temporaries, as big as the batch
  if mixed and work ~= 'bfloat16' then
    local b = y:type('bfloat16')
    y:free()
    y = b
  end
  return y
end

function Preprocess:_backward(x, y, gy, need_gin)
  if not need_gin then return nil end
  local scale = self:coefficients(gy)
  local g = C.channel_affine(gy, scale, nil, false)
  if self.mode == 'caffe' then g = flip_channels(g) end
  return g
end

end
