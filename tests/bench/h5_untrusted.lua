-- The cost of reading a file untrusted (flower.h5.open_untrusted: libhdf5 in a reader process,
-- arrays streamed over a socket) against the in-process read, on a ~700 MB Keras-layout weight file
-- written by h5py (VGG16-like shapes plus many small layers). Each reads every dataset the way
-- keras.load_weights does (attributes, shapes, data); best of N runs, same process, same file.
--   ./flowerlua tests/bench/h5_untrusted.lua [runs=3]
local h5 = require 'flower.h5'
local files = require 'flower.files'
local runs = tonumber(arg and arg[1]) or 3
local path = (os.getenv('BUILD') or 'build') .. '/bench/weights700.h5'

if not files.exists(path) then
  files.mkdir(files.dirname(path))
  local py = [[
import h5py, numpy as np, sys
rng = np.random.default_rng(0)
shapes = [(25088, 4096), (4096, 4096), (4096, 1000), (3, 3, 512, 512), (3, 3, 512, 512), (3, 3, 256, 512)]
shapes += [(3, 3, 512, 512)] * 17 + [(3, 3, 64, 64)] * 150 + [(64,)] * 300
with h5py.File(sys.argv[1], 'w') as f:
    names = []
    for i, s in enumerate(shapes):
        n = 'layer_%03d' % i
        names.append(n.encode())
        g = f.create_group(n)
        g.attrs['weight_names'] = np.array([(n + '/kernel:0').encode()])
        g.create_dataset(n + '/kernel:0', data=rng.standard_normal(s, dtype=np.float32))
    f.attrs['layer_names'] = np.array(names)
]]
  local tmp = path .. '.py'
  local fp = assert(io.open(tmp, 'w')); fp:write(py); fp:close()
  assert(os.execute((os.getenv('PYTHON') or '.venv/bin/python') .. ' ' .. tmp .. ' ' .. path), 'h5py failed')
  os.remove(tmp)
end

local ndatasets
local function load_all(f)
  local bytes = 0
  ndatasets = 0
  for _, n in ipairs(f:attr('/', 'layer_names')) do
    for _, w in ipairs(f:attr('/' .. n, 'weight_names')) do
      local d = '/' .. n .. '/' .. w
      f:shape(d)
      local t = f:read(d)
      bytes = bytes + t:numel() * 4
      ndatasets = ndatasets + 1
    end
  end
  return bytes
end

local function best(open)
  local b, bytes = math.huge, 0
  for _ = 1, runs do
    collectgarbage(); collectgarbage()
    local t0 = files.now()
    local f <close> = open(path)
    bytes = load_all(f)
    f:close()
    b = math.min(b, files.now() - t0)
  end
  return b, bytes
end

local tin, bytes = best(function(p) return h5.open(p, 'r') end)
local tun = best(function(p) return h5.open_untrusted(p) end)
print(string.format('file %s: %.0f MB in %d datasets', path, bytes / 1e6, ndatasets))
print(string.format('in-process  %.3f s  %.0f MB/s', tin, bytes / 1e6 / tin))
print(string.format('untrusted   %.3f s  %.0f MB/s  (%.2fx the in-process time)', tun, bytes / 1e6 / tun, tun / tin))
