-- Pooling layers (loaded by flower.nn): MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D,
-- GlobalMaxPooling2D, with Keras's options and names; see the protocol at the top of flower/nn.lua.

return function(nn, util)
local C = nn.C
local Layer = nn.Layer
local pair = nn.pair
local layer_class, check_padding = util.layer_class, util.check_padding
local want_rank, dims = util.want_rank, util.dims
local window_of, spatial_out = util.window_of, util.spatial_out

-- ---------------------------------------------------------------- pooling

-- the window of a pooling layer over input dims d: its own, or the whole image for a global one
local function local_window(self, d) return (window_of(self, d[2], d[3])) end
local function global_window(_, d) return {kh = d[2], kw = d[3]} end

-- pools x; a training forward of max pooling keeps the argmax (int32, output-sized) for backward
-- instead of the input (needs() stays false, false)
local function pool_forward(self, x, keep, window)
  local d = dims(x)
  self._xshape, self._argmax = d, nil
  local win = window(self, d)
  if self.kind == 'max' and keep then
    local y, am = C.pool2d(x, 'max', win, true)
    self._argmax = am
    return y
  end
  return C.pool2d(x, self.kind, win)
end

-- gy (output-shaped, 4-d) -> dL/dx; max pooling without a kept argmax reads its input x
local function pool_backward(self, x, gy, need_gin, window)
  local am = self._argmax
  self._argmax = nil
  if not need_gin then return nil end
  local d = self._xshape
  local win = window(self, d)
  if self.kind == 'max' and not am then
    if not x then error('backward without a forward that kept its state', 0) end
    return C.pool2d_backward(gy, x, 'max', win)
  end
  local gx = C.pool2d_backward(gy, d, self.kind, win, am)
  if am then am:free() end
  return gx
end

local function pool_class(name, kind)
  local cls = layer_class(name, Layer, {'pool_size', 'strides', 'padding', 'data_format'}, function(self, opts, o)
    self.kind = kind
    self.kh, self.kw = pair(opts.pool_size or 2, 'pool_size', o)
    if opts.strides ~= nil then self.sh, self.sw = pair(opts.strides, 'strides', o)
    else self.sh, self.sw = self.kh, self.kw end
    self.padding = check_padding(opts.padding or 'valid', o)
  end)
  function cls:output_shape(s)
    want_rank(s, 3, self, 'an image (H, W, C)')
    local oh, ow = spatial_out(self, s)
    return {oh, ow, s[3]}
  end
  function cls:_forward(x, keep) return pool_forward(self, x, keep, local_window) end
  function cls:_backward(x, y, gy, need_gin) return pool_backward(self, x, gy, need_gin, local_window) end
end
pool_class('MaxPooling2D', 'max')
pool_class('AveragePooling2D', 'avg')

local function global_pool_class(name, kind)
  local cls = layer_class(name, Layer, {'keepdims', 'data_format'}, function(self, opts)
    self.keepdims = opts.keepdims == true
    self.kind = kind
  end)
  function cls:output_shape(s)
    want_rank(s, 3, self, 'an image (H, W, C)')
    if self.keepdims then return {1, 1, s[3]} end
    return {s[3]}
  end
  function cls:_forward(x, keep)
    local y = pool_forward(self, x, keep, global_window)
    if self.keepdims then return y end
    local d = self._xshape
    local v = y:view(d[1], d[4])
    y:free()   -- the view holds the storage
    return v
  end
  function cls:_backward(x, y, gy, need_gin)
    local d = self._xshape
    return pool_backward(self, x, gy:reshape(d[1], 1, 1, d[4]), need_gin, global_window)
  end
end
global_pool_class('GlobalAveragePooling2D', 'avg')
global_pool_class('GlobalMaxPooling2D', 'max')

end
