-- Preprocessing layers (loaded by flower.nn): Preprocess, Keras Applications' preprocess_input;
-- see the protocol at the top of flower/nn.lua.
local flower = require 'flower'

return function(nn, util)
local C = nn.C
local layer_class, copy_shape = util.layer_class, nn._copy_shape

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
local Preprocess = layer_class('Preprocess', nn.Layer, {'mode'}, function(self, opts, o)
  local m = opts.mode or 'caffe'
  if m ~= 'caffe' and m ~= 'tf' and m ~= 'torch' then
    error(o .. ": mode must be 'caffe', 'tf' or 'torch', got " .. tostring(m), 3)
  end
  self.mode = m
  self.out_dtype = self.dtype
end, 'mode')

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
