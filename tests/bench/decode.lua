-- Decode benchmark: images/s to decode a JPEG, resize it (shorter side to 256) and center-crop
-- 224x224, on a fixed set of 600x450 photos from the synthetic generator (quality 90, 4:2:0),
-- for flowerlua's loader (1 and 2 worker threads) beside Pillow, OpenCV and PyTurboJPEG on the same
-- files in the same run (tests/bench/decode_peers.py; one and two processes). Then end-to-end loader
-- throughput for batches of 32 at 299x299 float32 ('eval' and 'train' transforms).
--
--   ./flowerlua tests/bench/decode.lua [--files 128] [--repeat 3] [--runs 3] [--workers 1,2]
--
-- Every number is the best of --runs measurements (the machine may be shared); flowerlua's after a
-- warm-up epoch, the peers after a warm-up image. No assertions: this prints a table with ratios.
local flower = require 'flower'
local data = require 'flower.data'
local files = require 'flower.files'
local D = flower._data

local opts = { files = 128, ['repeat'] = 3, runs = 3, workers = '1,2' }
do
  local i = 1
  while i <= #arg do
    local k = arg[i]:match('^%-%-(.+)$')
    if not k or opts[k] == nil or arg[i + 1] == nil then
      io.stderr:write('usage: flowerlua tests/bench/decode.lua [--files N] [--repeat N] [--runs N] [--workers 1,2]\n')
      os.exit(2)
    end
    opts[k] = tonumber(arg[i + 1]) or arg[i + 1]
    i = i + 2
  end
end
local workers = {}
for w in tostring(opts.workers):gmatch('%d+') do workers[#workers + 1] = tonumber(w) end

local PY = os.getenv('PYTHON') or '.venv/bin/python'
local DIR = (os.getenv('BUILD') or 'build') .. '/bench/decode'
local now = D.now

-- the fixed set: written once, reused while the file count matches
local function photo_set(n)
  files.mkdir(DIR)
  local paths, jobs = {}, {}
  for i = 1, n do
    local p = string.format('%s/%04d.jpg', DIR, i)
    paths[i] = p
    if not files.exists(p) then
      jobs[#jobs + 1] = { path = p, category = (i - 1) % 20, w = 600, h = 450, quality = 90, seed = 1000 + i }
    end
  end
  if #jobs > 0 then D.flowers_write(jobs, 20, 2) end
  files.write_atomic(DIR .. '/list.txt', table.concat(paths, '\n') .. '\n')
  return paths
end

local paths = photo_set(opts.files)
local rep = {}
for _ = 1, opts['repeat'] do for _, p in ipairs(paths) do rep[#rep + 1] = p end end
local ds = data.new_dataset{ paths = rep }

-- best-of-runs images/s of one loader configuration, in the steady state: one epoch first to warm
-- up (the batch buffers' first-touch page faults are expensive in a VM; the loader reuses its
-- buffers from then on), then --runs timed epochs
local function loader_rate(cfg)
  local l = data.Loader(cfg)
  for _ in l:epoch(0) do end
  local best = 0
  for e = 1, opts.runs do
    local t0, n = now(), 0
    for b in l:epoch(e) do n = n + b.n end
    best = math.max(best, n / (now() - t0))
  end
  l:close()
  return best
end

print(string.format('decode + resize (shorter side 256, bilinear/area) + center crop 224x224: %d JPEGs of 600x450 '
  .. '(quality 90, 4:2:0) x %d, best of %d runs', opts.files, opts['repeat'], opts.runs))
local rows = {}
for _, w in ipairs(workers) do
  local r = loader_rate{ ds, batch_size = 32, workers = w, dtype = 'uint8', transform = 'eval', size = 224 }
  rows[#rows + 1] = { tool = 'flowerlua', version = 'flowerlua ' .. flower.version .. ' Loader (uint8 batches)', workers = w, ips = r }
end

-- the peers, same files, same run
local cjson = require 'cjson'
local cmd = string.format('%s tests/bench/decode_peers.py %s 256 224 %d %d %s', PY, DIR .. '/list.txt',
  opts['repeat'], opts.runs, table.concat(workers, ' '))
local p = io.popen(cmd)
for line in p:lines() do
  local ok, r = pcall(cjson.decode, line)
  if ok and type(r) == 'table' and r.tool then
    rows[#rows + 1] = { tool = r.tool, version = r.version, workers = math.tointeger(r.workers), ips = r.images_per_s }
  end
end
local okp = p:close()
if not okp then io.stderr:write('warning: the peers did not all run (' .. cmd .. '); run `make deps`\n') end

local function rate(tool, w)
  for _, r in ipairs(rows) do if r.tool == tool and r.workers == w then return r.ips end end
end

print(string.format('%-52s %7s %10s %10s %12s', 'tool', 'workers', 'images/s', 'vs Pillow', 'flowerlua is'))
for _, w in ipairs(workers) do
  local pil, ours = rate('pillow', w), rate('flowerlua', w)
  for _, r in ipairs(rows) do
    if r.workers == w then
      print(string.format('%-52s %7d %10.0f %9s %12s', r.version, w, r.ips,
        pil and string.format('%.2fx', r.ips / pil) or '-',
        (ours and r.tool ~= 'flowerlua') and string.format('%.2fx', ours / r.ips) or ''))
    end
  end
end
local ours1, pil1 = rate('flowerlua', 1), rate('pillow', 1)
if ours1 and pil1 then
  local fastest, fname = 0, nil
  for _, r in ipairs(rows) do
    if r.workers == 1 and r.tool ~= 'flowerlua' and r.ips > fastest then fastest, fname = r.ips, r.version end
  end
  print(string.format('per core: flowerlua %.2fx Pillow (target >= 2x); %.2fx the fastest other (%s; target >= 1x)',
    ours1 / pil1, ours1 / fastest, fname))
end

-- end-to-end loader throughput: batches of 32 at 299x299, float32, beside PyTorch's DataLoader
print()
print('loader: batches of 32 at 299x299 float32, same photos; flowerlua NHWC 0..255, PyTorch NCHW 0..1')
local torch_rates = {}
local lp = io.popen(string.format('%s tests/bench/decode_peers.py --loader %s 299 32 %d %d %s', PY, DIR .. '/list.txt',
  opts['repeat'], opts.runs, table.concat(workers, ' ')))
for line in lp:lines() do
  local ok, r = pcall(cjson.decode, line)
  if ok and type(r) == 'table' and r.tool then torch_rates[r.transform .. math.tointeger(r.workers)] = r end
end
lp:close()
print(string.format('%-40s %7s %10s %10s %28s', 'transform', 'workers', 'images/s', 'batches/s', 'PyTorch DataLoader images/s'))
for _, tf in ipairs({ 'eval', 'train' }) do
  for _, w in ipairs(workers) do
    local r = loader_rate{ ds, batch_size = 32, workers = w, transform = tf, size = 299, shuffle = true, seed = 1 }
    local desc = tf == 'eval' and "'eval' (shorter side 342, center crop)" or "'train' (random-resized crop + flip)"
    local t = torch_rates[tf .. w]
    print(string.format('%-40s %7d %10.0f %10.1f %28s', desc, w, r, r / 32,
      t and string.format('%.0f (flowerlua %.2fx)', t.images_per_s, r / t.images_per_s) or '-'))
  end
end
for _, t in pairs(torch_rates) do print('(' .. t.version .. ')') break end
