-- Convolution layers (loaded by flower.nn): Conv2D, DepthwiseConv2D, SeparableConv2D, with Keras's
-- options, weights and names. Each folds a following inference BatchNormalization and ReLU into its
-- output (folds_affine, _forward_fused); see the protocol at the top of flower/nn.lua.

return function(nn, util)
local C = nn.C
local Layer = nn.Layer
local pair, check_int = nn.pair, nn._check_int
local layer_class, check_padding = util.layer_class, util.check_padding
local want_rank, dims = util.want_rank, util.dims
local check_reg, get_activation = util.check_reg, util.get_activation
local activate, activation_backward = util.activate, util.activation_backward
local window_of, spatial_out = util.window_of, util.spatial_out

-- The options every convolution shares: the window, padding, activation and bias; with_options(...)
-- adds a layer's own names to theirs.
local shared_options = {'kernel_size', 'strides', 'padding', 'dilation_rate', 'activation', 'use_bias',
  'bias_initializer', 'bias_regularizer', 'data_format'}
local function with_options(...) return table.move(shared_options, 1, #shared_options, select('#', ...) + 1, {...}) end

-- reads them (from a layer's init: errors at level 4 point at the caller of new)
local function window_options(self, opts)
  local o = self:owner()
  if opts.kernel_size == nil then error(o .. ': kernel_size is required', 4) end
  self.kh, self.kw = pair(opts.kernel_size, 'kernel_size', o)
  self.sh, self.sw = pair(opts.strides or 1, 'strides', o)
  self.dh, self.dw = pair(opts.dilation_rate or 1, 'dilation_rate', o)
  self.padding = check_padding(opts.padding or 'valid', o, 5)
  self.activation = get_activation(opts.activation, o, 5)
  self.use_bias = opts.use_bias ~= false
  self.bias_initializer = nn._get_init(opts.bias_initializer or 'zeros', o)
  self.regularizers = {bias = check_reg(opts.bias_regularizer, 'bias_regularizer', o, 5)}
  return o
end

-- the initializer and regularizer options of each kernel weight: prefix 'depthwise' reads
-- depthwise_initializer (kept as self.depthwise_initializer) and depthwise_regularizer for the
-- weight `prefix .. '_kernel'` (Conv2D's prefix 'kernel' names the weight 'kernel')
local function kernel_options(self, opts, o, ...)
  for _, prefix in ipairs {...} do
    local weight = prefix == 'kernel' and 'kernel' or prefix .. '_kernel'
    self[prefix .. '_initializer'] = nn._get_init(opts[prefix .. '_initializer'] or 'glorot_uniform', o)
    self.regularizers[weight] = check_reg(opts[prefix .. '_regularizer'], prefix .. '_regularizer', o, 5)
  end
end

-- build and output_shape of an image layer: (H, W, C) with C known, and C matching the kernel
local function check_image(self, s, kernel)
  want_rank(s, 3, self, 'an image (H, W, C)')
  if s[3] < 1 then error('the channel dim of the input must be known', 0) end
  if kernel and s[3] ~= kernel:size(3) then
    error(string.format('input has %d channels, the kernel expects %d', s[3], kernel:size(3)), 0)
  end
end

-- output_shape: the input checked against the kernel that reads it, then the window's H, W and
-- `channels` out
local function image_out(self, s, kernel, channels)
  check_image(self, s, kernel)
  local oh, ow = spatial_out(self, s)
  return {oh, ow, channels}
end

-- hooks of the layer protocol (flower/nn.lua): a convolution without its own activation takes a
-- following inference BatchNormalization (and ReLU) into its output
local function folds_affine(self) return not self.activation end

-- ---------------------------------------------------------------- Conv2D

local Conv2D = layer_class('Conv2D', Layer, with_options('filters', 'kernel_initializer', 'kernel_regularizer',
  'groups'), function(self, opts)
  local o = window_options(self, opts)
  self.filters = check_int(opts.filters, 'filters', o)
  if (self.sh > 1 or self.sw > 1) and (self.dh > 1 or self.dw > 1) then
    error(o .. ': strides > 1 together with dilation_rate > 1 is not supported (as in Keras)', 3)
  end
  if opts.groups and opts.groups ~= 1 then error(o .. ': groups other than 1 are not supported', 3) end
  kernel_options(self, opts, o, 'kernel')
end)

function Conv2D:build(s)
  check_image(self, s)
  self:add_weight('kernel', self.kernel_initializer({self.kh, self.kw, s[3], self.filters}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({self.filters}, self.dtype)) end
end

function Conv2D:output_shape(s) return image_out(self, s, self.kernel, self.filters) end

Conv2D.needs = util.weighted_needs
Conv2D.folds_affine = folds_affine
function Conv2D:can_omit_bias() return self.bias ~= nil and not self.activation end

-- omit_bias: the executor leaves the bias to a following batch-statistics BatchNormalization
-- (Model:_plan's 'bias_bn' fusion)
function Conv2D:_forward(x, keep, omit_bias)
  local d = dims(x)
  local win = window_of(self, d[2], d[3])
  self._xshape = d
  local y = C.conv2d(x, self:_kernel('kernel', x:dtype(), true), win, nil, not omit_bias and self.bias or nil,
    self.activation == 'relu')
  return activate(self, y)
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
function Conv2D:can_fold_pad(pad, height, width)
  if self.activation or height < 0 or width < 0 or self.dh ~= 1 or self.dw ~= 1 then return false end
  local w = window_of(self, height + pad[1] + pad[2], width + pad[3] + pad[4])
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

-- backward of a one-kernel convolution: kernel `name`, and the C kernels giving its gradient
-- (filter_fn) and the input's (data_fn)
local function kernel_backward(self, name, filter_fn, data_fn, x, y, gy, need_gin, need_params)
  gy = activation_backward(self, gy, y)
  local d = self._xshape
  local win = window_of(self, d[2], d[3])
  if need_params then conv_param_grads(self, name, x, gy, win, filter_fn) end
  if need_gin then return data_fn(gy, self:_kernel(name, gy:dtype()), d, win) end
end

function Conv2D:_backward(x, y, gy, need_gin, need_params)
  return kernel_backward(self, 'kernel', C.conv2d_backward_filter, C.conv2d_backward_data, x, y, gy, need_gin,
    need_params)
end

-- ---------------------------------------------------------------- DepthwiseConv2D

local DepthwiseConv2D = layer_class('DepthwiseConv2D', Layer, with_options('depth_multiplier',
  'depthwise_initializer', 'depthwise_regularizer'), function(self, opts)
  local o = window_options(self, opts)
  self.depth_multiplier = check_int(opts.depth_multiplier or 1, 'depth_multiplier', o)
  kernel_options(self, opts, o, 'depthwise')
end)

function DepthwiseConv2D:build(s)
  check_image(self, s)
  self:add_weight('depthwise_kernel',
    self.depthwise_initializer({self.kh, self.kw, s[3], self.depth_multiplier}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({s[3] * self.depth_multiplier}, self.dtype)) end
end

function DepthwiseConv2D:output_shape(s)
  return image_out(self, s, self.depthwise_kernel, s[3] * self.depth_multiplier)
end

DepthwiseConv2D.needs = util.weighted_needs
DepthwiseConv2D.folds_affine = folds_affine

function DepthwiseConv2D:_forward(x)
  local d = dims(x)
  self._xshape = d
  local y = C.depthwise(x, self:_kernel('depthwise_kernel', x:dtype(), true), window_of(self, d[2], d[3]), nil,
    self.bias, self.activation == 'relu')
  return activate(self, y)
end

function DepthwiseConv2D:_forward_fused(x, scale, shift, relu)
  local d = dims(x)
  return C.depthwise(x, self:_kernel('depthwise_kernel', x:dtype(), true), window_of(self, d[2], d[3]), scale, shift,
    relu)
end

function DepthwiseConv2D:_backward(x, y, gy, need_gin, need_params)
  return kernel_backward(self, 'depthwise_kernel', C.depthwise_backward_filter, C.depthwise_backward_data, x, y, gy,
    need_gin, need_params)
end

-- ---------------------------------------------------------------- SeparableConv2D

local SeparableConv2D = layer_class('SeparableConv2D', Layer, with_options('filters', 'depth_multiplier',
  'depthwise_initializer', 'pointwise_initializer', 'depthwise_regularizer', 'pointwise_regularizer'),
  function(self, opts)
  local o = window_options(self, opts)
  self.filters = check_int(opts.filters, 'filters', o)
  self.depth_multiplier = check_int(opts.depth_multiplier or 1, 'depth_multiplier', o)
  kernel_options(self, opts, o, 'depthwise', 'pointwise')
  self._pwin = {kh = 1, kw = 1}
end)

function SeparableConv2D:build(s)
  check_image(self, s)
  local m = self.depth_multiplier
  self:add_weight('depthwise_kernel', self.depthwise_initializer({self.kh, self.kw, s[3], m}, self.dtype))
  self:add_weight('pointwise_kernel', self.pointwise_initializer({1, 1, s[3] * m, self.filters}, self.dtype))
  if self.use_bias then self:add_weight('bias', self.bias_initializer({self.filters}, self.dtype)) end
end

function SeparableConv2D:output_shape(s) return image_out(self, s, self.depthwise_kernel, self.filters) end

SeparableConv2D.needs = util.weighted_needs
SeparableConv2D.folds_affine = folds_affine

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
  return activate(self, y)
end

function SeparableConv2D:_backward(x, y, gy, need_gin, need_params)
  gy = activation_backward(self, gy, y)
  local mid = self._mid
  if not mid then error('backward without a forward that kept its state', 0) end
  self._mid = nil
  local d = self._xshape
  local win = window_of(self, d[2], d[3])
  if need_params then conv_param_grads(self, 'pointwise_kernel', mid, gy, self._pwin, C.conv2d_backward_filter) end
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

end
