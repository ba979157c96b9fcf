-- flower: the Lua face of flowerlua. The C core (`flower.core`) provides tensors and kernels;
-- submodules (flower.nn, flower.optim, flower.data, ...) load on first use.
local core = require 'flower.core'

local flower = {}
for k, v in pairs(core) do flower[k] = v end

local submodules = {
  nn = true, optim = true, data = true, models = true, keras = true, train = true,
  cli = true, h5 = true, test = true, report = true, ensemble = true, progress = true,
  files = true, predict = true, recipe = true, export = true, pipeline = true, smallnets = true,
  tensorboard = true, dist = true,
}

return setmetatable(flower, {
  __index = function(t, k)
    if k == 'load_npy' or k == 'save_npy' or k == 'help' then
      local f = require(k == 'help' and 'flower.help' or 'flower.npy')[k]
      rawset(t, k, f)
      return f
    end
    if submodules[k] then
      local m = require('flower.' .. k)
      rawset(t, k, m)
      return m
    end
  end,
  -- the REPL completes these names too, though they load only on first use
  __complete = function()
    local names = { 'load_npy', 'save_npy', 'help' }
    for k in pairs(submodules) do names[#names + 1] = k end
    return names
  end,
})
