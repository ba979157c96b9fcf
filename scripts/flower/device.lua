-- flower.device: where tensors, models and runs compute. The one place that reads device names:
--   'cpu'          the host
--   'cuda'         device 0 of the accelerator backend (a `make CUDA=1` build), 'cuda:<n>' device n
--   'auto'         device 0 of the accelerator when one is available, else the host
-- Lua code holds a device as nil (the host) or the index of an accelerator device (0, 1, ...), as
-- layers and models do (model:get_device() is -1 or that index); device.name(dev) gives its name.
-- Tensors move with t:to(name) (any registered backend, bindings/l_device.c), models with
-- device.move; flower.backends() lists what the build has.
--
--   device.resolve(spec [, who])  -> nil or an index; a device that is not there raises here,
--                                    "<who>: device '<spec>': <reason>", so a run fails before it starts
--   device.available()            -> true, or false and why not
--   device.name(dev)              -> 'cpu' or 'cuda:<n>';  device.describe(dev) adds the device's model
--   device.of(x)                  -> nil or the index of a tensor's, layer's or model's device
--   device.move(x, dev)           -> x (tensor, layer or model) on dev; a tensor already there is itself
--   device.upload(t, dev)         -> a host tensor on dev without waiting for the copy (pinned memory
--                                    is read by DMA while the host goes on); t itself for the host
local core = require 'flower.core'

local device = {}

-- The accelerator of device names and its Lua face (built, available, device_count,
-- unavailable_reason, device_name, to_device_async): the CUDA backend, registered in core/backend.c.
local ACCEL = 'cuda'
local accel = core[ACCEL]

local function bad_spec(spec, who)
  error(string.format("%s: device must be 'cpu', '%s', '%s:<n>' or 'auto', got %s", who, ACCEL, ACCEL,
    type(spec) == 'string' and ("'" .. spec .. "'") or tostring(spec)), 0)
end

function device.available()
  if accel.available() then return true end
  return false, accel.unavailable_reason()
end

-- spec: nil, false or 'cpu' (the host); 'cuda', 'cuda:<n>' or an integer n; 'auto'
function device.resolve(spec, who)
  who = who or 'device'
  if spec == nil or spec == false or spec == 'cpu' then return nil end
  if spec == 'auto' then return accel.available() and 0 or nil end
  local dev
  if math.type(spec) == 'integer' then dev = spec
  elseif type(spec) == 'string' then
    if spec == ACCEL then dev = 0 else dev = math.tointeger(tonumber(spec:match('^' .. ACCEL .. ':(%d+)$'))) end
  end
  if dev == nil or dev < 0 then bad_spec(spec, who) end
  if not accel.available() then
    error(string.format("%s: device '%s': %s", who, tostring(spec), accel.unavailable_reason()), 0)
  end
  local n = accel.device_count()
  if dev >= n then
    error(string.format("%s: device '%s': there %s %d %s device%s (0..%d)", who, tostring(spec), ACCEL:upper(),
      n == 1 and 'is' or 'are', n, n == 1 and '' or 's', n - 1), 0)
  end
  return dev
end

function device.name(dev)
  if dev == nil then return 'cpu' end
  return ACCEL .. ':' .. dev
end

function device.describe(dev)
  if dev == nil then return 'cpu' end
  return string.format('%s, %s', device.name(dev), accel.device_name(dev))
end

local function is_tensor(x) return core.is_tensor(x) end

function device.of(x)
  if is_tensor(x) then
    local d = x:get_device()
    return d >= 0 and d or nil
  end
  local d = x.get_device and x:get_device() or -1
  if d ~= nil and d >= 0 then return d end
  return nil
end

function device.move(x, dev)
  if is_tensor(x) then return x:to(device.name(dev)) end
  if dev == nil then return x:cpu() end
  return x:cuda(dev)
end

function device.upload(t, dev)
  if dev == nil then return t end
  return accel.to_device_async(t, dev)
end

return device
