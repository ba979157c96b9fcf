-- Merge layers (loaded by flower.nn): Concatenate, Add, ScaledAdd, with Keras's options and names;
-- several inputs (multi = true); see the protocol at the top of flower/nn.lua.
local flower = require 'flower'

return function(nn, util)
local C = nn.C
local Layer = nn.Layer
local copy_shape = nn._copy_shape
local layer_class = util.layer_class

-- Keras axis (0 = batch, negative from the end) -> 1-based tensor dim for a rank-r tensor (with batch)
local function keras_axis(axis, r, owner)
  local d = axis < 0 and r + 1 + axis or axis + 1
  if d < 2 or d > r then error(string.format('%s: axis %d is out of range for inputs of rank %d', owner, axis, r), 0) end
  return d
end

local Concatenate = layer_class('Concatenate', Layer, {'axis'}, function(self, opts, o)
  self.axis = math.tointeger(opts.axis or -1)
  if not self.axis then error(o .. ': axis must be an integer', 3) end
end)
Concatenate.multi = true

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

local Add = layer_class('Add', Layer, {})
Add.multi = true

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

-- y = a + scale * b: InceptionResNetV2's scaled residual (Keras: a Lambda, CustomScaleLayer in
-- Keras 3). Inputs in Keras's order {x, up}.
local ScaledAdd = layer_class('ScaledAdd', Layer, {'scale'}, util.scale_option)
ScaledAdd.multi = true

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

end
