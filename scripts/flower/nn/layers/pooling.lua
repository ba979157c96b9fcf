-- Pooling layers (loaded by flower.nn): MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D,
-- GlobalMaxPooling2D, with Keras's options and names; see the protocol at the top of flower/nn.lua.

return function(nn, util)
local C = nn.C
local Layer, class = nn.Layer, nn.class
local pair = nn.pair
local new_layer, set, check_padding = util.new_layer, util.set, util.check_padding
local want_rank, dims = util.want_rank, util.dims
local window_of, spatial_out = util.window_of, util.spatial_out

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

end
