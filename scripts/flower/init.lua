-- flower: the Lua face of flowerlua. The C core (`flower.core`) provides tensors and kernels;
-- submodules (flower.nn, flower.optim, flower.data, ...) load on first use.
local core = require 'flower.core'

local flower = {}
for k, v in pairs(core) do flower[k] = v end

local submodules = {
  nn = true, optim = true, data = true, models = true, keras = true, train = true,
  cli = true, h5 = true, test = true, report = true, ensemble = true,
}

return setmetatable(flower, {
  __index = function(t, k)
    if submodules[k] then
      local m = require('flower.' .. k)
      rawset(t, k, m)
      return m
    end
  end,
})
