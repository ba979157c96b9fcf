-- flower.memory: the process's resident memory per stage, and the memory budget.
--
--   local memory = require 'flower.memory'
--   memory.parse('8G')            -- 8589934592 (bytes; K, M, G, T suffixes are powers of 1024)
--   memory.budget(cfg.memory_budget)   -- bytes: the option, or half of RAM without one
--   memory.rss(), memory.peak()   -- resident bytes now, and the most since the start or the last reset
--   memory.stage(run, 'ensemble: fit')  -- logs and records the peak since the last stage, gives freed
--                                       -- host memory back and starts the next stage's peak
-- Peaks are the kernel's (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs):
-- everything resident counts, the allocator's cache, HDF5's and Lua's heaps included.
local memory = {}

local function status_kb(field)
  local f = io.open('/proc/self/status', 'r')
  if not f then return nil end
  local text = f:read('a')
  f:close()
  local v = text:match(field .. ':%s+(%d+) kB')
  return v and tonumber(v) * 1024 or nil
end

function memory.rss() return status_kb('VmRSS') end
function memory.peak() return status_kb('VmHWM') end

-- Starts a new peak: the kernel's high-water mark and the host allocator's.
function memory.reset_peak()
  local f = io.open('/proc/self/clear_refs', 'w')
  if f then f:write('5'); f:close() end
  require('flower').memory('reset_peak')
end

-- Physical memory in bytes (MemTotal).
function memory.total()
  local f = io.open('/proc/meminfo', 'r')
  if not f then return nil end
  local text = f:read('a')
  f:close()
  local v = text:match('MemTotal:%s+(%d+) kB')
  return v and tonumber(v) * 1024 or nil
end

local UNITS = { [''] = 1, B = 1, K = 1024, M = 1024 ^ 2, G = 1024 ^ 3, T = 1024 ^ 4 }

-- Bytes from a number or a size such as '8G', '512M', '1.5GiB', '4096'.
function memory.parse(v, what)
  what = what or 'memory size'
  if math.type(v) == 'integer' and v > 0 then return v end
  if type(v) == 'number' and v > 0 then return math.floor(v) end
  if type(v) == 'string' then
    local num, unit = v:upper():match('^%s*([%d%.]+)%s*([KMGT]?)I?B?%s*$')
    local n = tonumber(num)
    if n and n > 0 and UNITS[unit] then return math.floor(n * UNITS[unit]) end
  end
  error(string.format("%s: expected a size such as 8G, 512M or a byte count, got '%s'", what, tostring(v)), 2)
end

-- The budget in bytes: v parsed, or half of RAM (4 GiB where RAM is unknown).
function memory.budget(v, what)
  if v ~= nil then return memory.parse(v, what) end
  local t = memory.total()
  return t and t // 2 or 4 * 1024 ^ 3
end

function memory.format(bytes)
  if not bytes then return '?' end
  if bytes >= 1024 ^ 3 then return string.format('%.2f GiB', bytes / 1024 ^ 3) end
  return string.format('%.0f MiB', bytes / 1024 ^ 2)
end

-- Ends a stage of a run: logs its peak resident memory, records {stage, peak} in run.memory (the
-- report's memory table), gives the host allocator's free pages back so that the next stage's
-- resident size follows what it uses, and starts the next stage's peak.
function memory.stage(run, name)
  local peak = memory.peak()
  collectgarbage('collect')
  require('flower').memory('release')
  run.memory = run.memory or {}
  run.memory[#run.memory + 1] = { stage = name, peak = peak }
  run:log('memory: %s: peak resident %s', name, memory.format(peak))
  memory.reset_peak()
  return peak
end

return memory
