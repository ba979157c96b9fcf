-- Core and shape layers (loaded by flower.nn): Dense, Activation, ReLU, Softmax, Dropout, Scale,
-- Flatten, Reshape, ZeroPadding2D, with Keras's options, weights and names; see the protocol at the
-- top of flower/nn.lua.

return function(nn, util)
local C = nn.C
local Layer = nn.Layer
local copy_shape, pair, check_int = nn._copy_shape, nn.pair, nn._check_int
local layer_class, want_rank, check_reg = util.layer_class, util.want_rank, util.check_reg
local activations, get_activation, activate = util.activations, util.get_activation, util.activate

-- ---------------------------------------------------------------- Dense

local Dense = layer_class('Dense', Layer, {'units', 'activation', 'use_bias', 'kernel_initializer',
  'bias_initializer', 'kernel_regularizer', 'bias_regularizer'}, function(self, opts, o)
  self.units = check_int(opts.units, 'units', o)
  self.activation = get_activation(opts.activation, o)
  self.use_bias = opts.use_bias ~= false
  self.kernel_initializer = nn._get_init(opts.kernel_initializer or 'glorot_uniform', o)
  self.bias_initializer = nn._get_init(opts.bias_initializer or 'zeros', o)
  self.regularizers = {kernel = check_reg(opts.kernel_regularizer, 'kernel_regularizer', o),
                       bias = check_reg(opts.bias_regularizer, 'bias_regularizer', o)}
end)

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

Dense.needs = util.weighted_needs

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
  y = activate(self, y)
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
  gy = util.activation_backward(self, gy, y)
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

-- ---------------------------------------------------------------- Activation / ReLU / Softmax

-- nn.Activation('relu'), nn.Activation{'relu', name='act1'} or nn.Activation{activation='relu'}
local Activation = layer_class('Activation', Layer, {'activation', 1}, function(self, opts, o)
  local a = opts.activation or opts[1]
  if a == nil then error(o .. ': activation is required', 3) end
  self.act = a
  get_activation(a, o)
end, 'activation')

function Activation:needs() return false, self.act ~= 'linear' end

function Activation:_forward(x)
  if self.act == 'linear' then return x end
  if self.act == 'relu' then return x:relu() end
  if self.act == 'softmax' then return x:softmax(-1) end
  return x[self.act](x)
end

function Activation:is_relu() return self.act == 'relu' end
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

layer_class('ReLU', Activation, {'max_value', 'negative_slope', 'threshold'}, function(self, opts, o)
  if (opts.max_value ~= nil) or (opts.negative_slope or 0) ~= 0 or (opts.threshold or 0) ~= 0 then
    error(o .. ': only the plain ReLU is supported (no max_value, negative_slope or threshold)', 3)
  end
  self.act = 'relu'
end)

layer_class('Softmax', Activation, {'axis'}, function(self, opts, o)
  if (opts.axis or -1) ~= -1 then error(o .. ': only axis=-1 is supported', 3) end
  self.act = 'softmax'
end)

-- ---------------------------------------------------------------- Dropout

-- Inverted dropout: in training, keeps each element with probability 1-rate and scales it by
-- 1/(1-rate). With `seed`, masks come from the layer's own Philox stream (reproducible, independent
-- of the global generator); without, from the global generator (flower.manual_seed).
local Dropout = layer_class('Dropout', Layer, {'rate', 'seed', 'noise_shape', 1}, function(self, opts, o)
  local rate = opts.rate or opts[1]
  if type(rate) ~= 'number' or rate < 0 or rate >= 1 then error(o .. ': rate must be a number in [0, 1)', 3) end
  if opts.noise_shape then error(o .. ': noise_shape is not supported', 3) end
  self.rate = rate
  self.seed = opts.seed
  self._offset = 0
end, 'rate')

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

local Flatten = layer_class('Flatten', Layer, {'data_format'})

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

local Reshape = layer_class('Reshape', Layer, {'target_shape'}, function(self, opts, o)
  if type(opts.target_shape) ~= 'table' then error(o .. ': target_shape is required (a list)', 3) end
  self.target_shape = {}
  for i, v in ipairs(opts.target_shape) do
    self.target_shape[i] = check_int(v, 'target_shape', o, -1)
    if v == 0 then error(o .. ': target_shape entries must be positive or -1', 3) end
  end
end)

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

-- y = scale * x (a constant; Keras would use a Lambda)
local Scale = layer_class('Scale', Layer, {'scale'}, util.scale_option)

function Scale:_forward(x) return x * self.scale end
function Scale:_backward(x, y, gy, need_gin) if need_gin then return gy * self.scale end end

-- padding: n, {ph, pw} or {{top, bottom}, {left, right}} (Keras's forms)
local ZeroPadding2D = layer_class('ZeroPadding2D', Layer, {'padding', 'data_format'}, function(self, opts, o)
  local p = opts.padding or 1
  if type(p) == 'table' and type(p[1]) == 'table' then
    self.pt, self.pb = pair(p[1], 'padding', o, 0)
    self.pl, self.pr = pair(p[2], 'padding', o, 0)
  else
    local a, b = pair(p, 'padding', o, 0)
    self.pt, self.pb, self.pl, self.pr = a, a, b, b
  end
end)

-- {top, bottom, left, right}: a convolution after it may take the padding into its window
-- (Model:_plan's 'pad' fusion)
function ZeroPadding2D:zero_padding() return {self.pt, self.pb, self.pl, self.pr} end

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
end
