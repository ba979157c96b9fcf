-- Helpers shared by the layer families (flower/nn/layers/*.lua): option checks, windows of the
-- spatial layers, activations. Loaded once by flower.nn, which hands the table to every family.
return function(nn)
local C = nn.C
local Layer = nn.Layer
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
    error(cls.class_name .. ": only data_format='channels_last' is supported", 3)
  end
  return self, opts
end

-- level: where the error points (default 4: the caller of X.new that called this)
-- layer_class(name, parent, options, init [, shorthand]): a layer class, registered as nn[name].
-- Its new(opts) takes a table of options -- or, with a shorthand, a bare value of that option
-- (nn.Dropout(0.5)) -- rejects any it does not know (options: their names, and 1 where a first
-- positional entry is allowed), runs Layer.init (name, trainable, dtype, ...) and then
-- init(self, opts, owner), where owner names the layer for messages. An error init raises at
-- level 3 points at the caller of new.
local function layer_class(name, parent, options, init, shorthand)
  local cls = nn.class(name, parent or Layer)
  nn[name] = cls
  local allowed = set(table.unpack(options))
  function cls.new(opts)
    if shorthand and opts ~= nil and type(opts) ~= 'table' then opts = {[shorthand] = opts} end
    local self, o = new_layer(cls, opts, allowed)
    if init then init(self, o, self:owner()) end
    return self
  end
  return cls
end

-- init of a layer whose one option is a required number `scale` (Scale, ScaledAdd)
local function scale_option(self, opts, owner)
  if type(opts.scale) ~= 'number' then error(owner .. ': scale (a number) is required', 3) end
  self.scale = opts.scale
end

local function check_padding(p, owner, level)
  if p ~= 'valid' and p ~= 'same' then
    error(string.format("%s: padding must be 'valid' or 'same', got %s", owner, tostring(p)), level or 4)
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
local function check_reg(r, what, owner, level)
  if r == nil then return nil end
  if type(r) ~= 'table' or type(r.l2) ~= 'number' or r.l2 < 0 then
    error(string.format('%s: %s must be nn.l2(l) (a table {l2 = l})', owner, what), level or 4)
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

local function get_activation(a, owner, level)
  if a == nil then return nil end
  local f = activations[a]
  if not f then
    error(string.format("%s: unknown activation '%s' (known: linear, relu, sigmoid, softmax, tanh)", owner,
      tostring(a)), level or 4)
  end
  if a == 'linear' then return nil end
  return a
end

-- y -> the layer's activation of y, for a layer whose kernel fused only a ReLU into y
local function activate(self, y)
  if self.activation and self.activation ~= 'relu' then return nn._activate(self.activation, y) end
  return y
end

-- gy through the layer's activation, by its output y (gy itself without an activation)
local function activation_backward(self, gy, y)
  if not self.activation then return gy end
  return C.act_backward(activations[self.activation].bwd, gy, y)
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

-- needs() of a layer with weights and an optional activation: backward reads x for the weight
-- gradients and y for the activation's derivative
local function weighted_needs(self, need_gin, need_params)
  return need_params, self.activation ~= nil
end

return {layer_class = layer_class, scale_option = scale_option, check_padding = check_padding,
        want_rank = want_rank, dims = dims, check_reg = check_reg, activations = activations,
        get_activation = get_activation, activate = activate, activation_backward = activation_backward,
        window_of = window_of, spatial_out = spatial_out, weighted_needs = weighted_needs}
end
