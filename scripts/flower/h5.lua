-- flower.h5: HDF5 files (libhdf5 through flower.core._h5).
--
--   local h5 = require 'flower.h5'
--   local f <close> = h5.open('weights.h5', 'r')     -- 'r' read, 'w' create/truncate, 'a' read-write
--   local k = f:read('/conv1/conv1/kernel:0')        -- a float32 tensor (any rank, any numeric dtype)
--   f:read_slice('/train_x', 1001, 500)              -- rows 1001..1500 (1-based) of a big dataset
--   f:attr('/', 'layer_names')                       -- strings, numbers or lists of them (nil if absent)
--   f:list('/conv1')  f:exists(p)  f:kind(p)  f:shape(p)  f:dtype(p)  f:attrs(p)
--   f:write('/a/b', t, {compress=4, chunk={64, 2048}}) -- creates groups /a; replaces an old /a/b
--   f:write('/names', {'x.jpg', 'y.jpg'})             -- a list of strings (variable-length UTF-8)
--   f:append_rows('/train_x', t)                     -- extendible, chunked; returns the row count
--   f:set_attr('/', 'layer_names', {'conv1', 'bn1'}) -- string lists are fixed-length, as Keras's
--   f:truncate_rows('/train_x', n)                   -- keeps the first n rows of an append_rows dataset
--   f:create_group('/a/b')  f:remove(p)  f:flush()  f:close()
--
--   local w <close> = h5.open_untrusted('downloaded.h5')  -- a file flowerlua did not write (below)
--
-- Datasets read: float16/float32 -> float32, float64 -> float64, uint8/bool -> uint8, other
-- integers up to 32 bits -> int32, wider -> int64. String datasets read as Lua lists.
-- Children list in creation order for groups that track it (all groups this module creates),
-- else in name order (h5py's default). Errors name the file, the object and what was found.
local core = require 'flower.core'
local C = core._h5

local h5 = {}

h5.open = C.open
h5.fsync = C.fsync

-- Opens a file flowerlua did not write (weights from the internet), read-only: libhdf5 parses it
-- in a child process under memory, CPU-time and per-answer time limits, and this process gets
-- only checked names, shapes, attributes and array bytes back (core/io/h5_sandbox.c). A crash or
-- hang in libhdf5 fails the call with a message and leaves flowerlua running; the handle then
-- fails every call. Same methods as h5.open's files (writes fail). opts: timeout (seconds one
-- answer may take, default 60), memory (bytes the reader may allocate, default 2 GiB), cpu
-- (its CPU seconds, default 3600). keras.load_weights / load_model / inspect open files this way.
-- h5.untrusted_limits: defaults for every open_untrusted (the Keras loaders' too), e.g. a test's
-- {timeout = 3}.
h5.untrusted_limits = {}
function h5.open_untrusted(path, opts)
  local o = {untrusted = true}
  for k, v in pairs(h5.untrusted_limits) do o[k] = v end
  for k, v in pairs(opts or {}) do o[k] = v end
  return C.open(path, 'r', o)
end

local function alive(pid) local f = io.open('/proc/' .. pid .. '/stat', 'r'); if f then f:close() end return f ~= nil end

-- Removes the `path .. '.tmp-<pid>'` files of writers that were killed (their process is gone).
-- Returns how many it removed.
function h5.remove_stale_tmp(path)
  local p = io.popen("ls -1d -- '" .. path:gsub("'", "'\\''") .. "'.tmp-* 2>/dev/null")
  local n, me = 0, tostring(C.getpid())
  for line in p:lines() do
    local pid = line:match('%.tmp%-(%d+)$')
    if pid and pid ~= me and not alive(pid) and os.remove(line) then n = n + 1 end
  end
  p:close()
  return n
end

-- Writes a file atomically: fn(f) fills a temporary `path .. '.tmp-<pid>'` opened for writing;
-- on success it is closed, synced to disk and renamed over `path`, so readers see either the old
-- file or the complete new one. If fn raises, the temporary is closed and removed and the error
-- propagates unchanged. Temporaries that killed writers left beside `path` are removed first.
-- Returns fn's results.
function h5.write_atomic(path, fn)
  assert(type(path) == 'string', 'h5.write_atomic: path must be a string')
  assert(type(fn) == 'function', 'h5.write_atomic: fn must be a function')
  h5.remove_stale_tmp(path)
  local tmp = path .. '.tmp-' .. C.getpid()
  local f = C.open(tmp, 'w')
  local res = table.pack(pcall(fn, f))
  if not res[1] then
    pcall(f.close, f)
    os.remove(tmp)
    error(res[2], 0)
  end
  local ok, err = pcall(function()
    f:close()
    C.fsync(tmp)
  end)
  require('flower.files').killpoint('h5.write_atomic.before_rename')
  if ok then
    local renamed, rerr = os.rename(tmp, path)
    if not renamed then ok, err = false, 'h5.write_atomic: cannot rename ' .. tmp .. ' to ' .. path .. ': ' .. tostring(rerr) end
  end
  if not ok then
    os.remove(tmp)
    error(err, 0)
  end
  return table.unpack(res, 2, res.n)
end

-- Reads one dataset from a file and closes it.
function h5.read(path, dataset)
  local f <close> = C.open(path, 'r')
  return f:read(dataset)
end

return h5
