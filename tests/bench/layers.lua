-- Convolution speed for ResNet50-shaped layers at batch 8: flowerlua's kernels beside PyTorch
-- (Debian's python3-torch, oneDNN) and TensorFlow (the .venv's tensorflow-cpu) on the same shapes,
-- in the same run, with ratios (peer time / our time: > 1 means we are faster).
-- Optionally (`rss`): peak resident memory of a ResNet50 training step and of inference, each in
-- its own process, ours (flower.models.resnet50) beside torchvision's resnet50.
--
-- Usage: flowerlua tests/bench/layers.lua [reps=5] [threads=2] [rss [batch=32]]
local flower = require 'flower'
local nn = require 'flower.nn'
local C = nn.C

local args = arg or {}

-------------------------------------------------------------------------------- rss children

local function peak_rss_mb()
  local f = io.open('/proc/self/status')
  local s = f:read('a')
  f:close()
  return tonumber(s:match('VmHWM:%s*(%d+)')) / 1024
end

if args[1] == '--rss-child' then
  local mode, batch = args[2], tonumber(args[3])
  flower.setnumthreads(tonumber(args[4]) or 2)
  local models = require 'flower.models'
  local m = models.resnet50{include_top = true, input_shape = {224, 224, 3}}
  local x = flower.randn(batch, 224, 224, 3)
  local t0 = C.now()
  if mode == 'train' then
    local optim = require 'flower.optim'
    local opt = optim.SGD{lr = 0.01, momentum = 0.9}
    local loss = nn.CategoricalCrossentropy{}
    local lab = flower.ones(batch):type('int64')
    m:training()
    m:zero_grad()
    local out = m:forward(x)
    loss:forward(out, lab)
    m:backward(x, loss:backward(out, lab))
    opt:step(m)
  else
    m:evaluate()
    m:forward(x)
  end
  print(string.format('%.1f %.3f', peak_rss_mb(), C.now() - t0))
  os.exit(0)
end

local reps = tonumber(args[1]) or 5
local threads = tonumber(args[2]) or 2
flower.setnumthreads(threads)

-------------------------------------------------------------------------------- convolutions

local N = 8
local cases = {
  {name = 'conv1 7x7/2 3->64 @224', h = 224, cin = 3, cout = 64, k = 7, s = 2, padding = 'same'},
  {name = 'res2 1x1 64->64 @56', h = 56, cin = 64, cout = 64, k = 1, s = 1, padding = 'valid'},
  {name = 'res2 3x3 64->64 @56', h = 56, cin = 64, cout = 64, k = 3, s = 1, padding = 'same'},
  {name = 'res2 1x1 64->256 @56', h = 56, cin = 64, cout = 256, k = 1, s = 1, padding = 'valid'},
  {name = 'res3 1x1/2 256->128 @56', h = 56, cin = 256, cout = 128, k = 1, s = 2, padding = 'valid'},
  {name = 'res3 3x3 128->128 @28', h = 28, cin = 128, cout = 128, k = 3, s = 1, padding = 'same'},
  {name = 'res4 3x3 256->256 @14', h = 14, cin = 256, cout = 256, k = 3, s = 1, padding = 'same'},
  {name = 'res4 1x1 1024->256 @14', h = 14, cin = 1024, cout = 256, k = 1, s = 1, padding = 'valid'},
  {name = 'res5 3x3 512->512 @7', h = 7, cin = 512, cout = 512, k = 3, s = 1, padding = 'same'},
}
for _, c in ipairs(cases) do c.n = N end

local function best(fn)
  fn()
  local t = math.huge
  for _ = 1, reps do
    local t0 = C.now()
    fn()
    t = math.min(t, C.now() - t0)
  end
  return t
end

local ours = {}
for _, c in ipairs(cases) do
  local x = flower.randn(N, c.h, c.h, c.cin)
  local w = flower.randn(c.k, c.k, c.cin, c.cout) * 0.05
  local win = C.window(c.h, c.h, c.k, c.k, c.s, c.s, 1, 1, c.padding)
  local y = C.conv2d(x, w, win)
  local gy = flower.randn(y:size())
  local gw = flower.zeros(w:size())
  local r = {}
  r.fwd = best(function() C.conv2d(x, w, win):free() end)
  r.bwd_data = best(function() C.conv2d_backward_data(gy, w, x, win):free() end)
  r.bwd_filter = best(function() C.conv2d_backward_filter(x, gy, win, gw, nil, 0) end)
  r.bwd = r.bwd_data + r.bwd_filter
  local macs = N * y:size(2) * y:size(3) * c.cout * c.k * c.k * c.cin
  r.gflops = 2 * macs / r.fwd * 1e-9
  ours[c.name] = r
  x:free(); y:free(); gy:free()
end

local cjson = require 'cjson'
local function peer(which)
  local cmd = string.format(".venv/bin/python tests/bench/layers_peers.py %s %d %d '%s' 2>/dev/null", which, threads,
    reps, cjson.encode(cases))
  local p = io.popen(cmd)
  local out = p:read('a')
  p:close()
  local ok, res = pcall(cjson.decode, out:match('{.*}') or '')
  if not ok then return nil end
  return res
end
local torch, tf = peer('torch'), peer('tf')

local function ms(t) return t and string.format('%8.2f', t * 1e3) or '       -' end
local function ratio(p, o) return (p and o) and string.format('%6.2f', p / o) or '     -' end

print(string.format('Convolutions, batch %d, %d threads, best of %d (ms; ratio = peer / ours, > 1: ours faster)', N,
  threads, reps))
print(string.format('%-26s %8s %6s | %8s %8s %6s %6s | %8s %8s %6s %6s', 'layer', 'fwd', 'GF/s', 'bwd', 'torch f',
  'fwd x', 'bwd x', 'tf fwd', 'tf bwd', 'fwd x', 'bwd x'))
local tot = {o = 0, ob = 0, tf = 0, tb = 0, ff = 0, fb = 0}
for _, c in ipairs(cases) do
  local o, t, f = ours[c.name], torch and torch[c.name], tf and tf[c.name]
  print(string.format('%-26s %s %6.1f | %s %s %s %s | %s %s %s %s', c.name, ms(o.fwd), o.gflops, ms(o.bwd),
    ms(t and t.fwd), ratio(t and t.fwd, o.fwd), ratio(t and t.bwd, o.bwd), ms(f and f.fwd), ms(f and f.bwd),
    ratio(f and f.fwd, o.fwd), ratio(f and f.bwd, o.bwd)))
  tot.o, tot.ob = tot.o + o.fwd, tot.ob + o.bwd
  if t then tot.tf, tot.tb = tot.tf + t.fwd, tot.tb + t.bwd end
  if f then tot.ff, tot.fb = tot.ff + f.fwd, tot.fb + f.bwd end
end
print(string.format('%-26s %s %6s | %s %s %s %s | %s %s %s %s', 'sum', ms(tot.o), '', ms(tot.ob), ms(tot.tf),
  ratio(torch and tot.tf, tot.o), ratio(torch and tot.tb, tot.ob), ms(tot.ff), ms(tot.fb),
  ratio(tf and tot.ff, tot.o), ratio(tf and tot.fb, tot.ob)))
if not torch then print('(PyTorch peer unavailable: .venv/bin/python with torch)') end
if not tf then print('(TensorFlow peer unavailable: .venv/bin/python with tensorflow)') end

-------------------------------------------------------------------------------- peak memory

if args[3] == 'rss' then
  local batch = tonumber(args[4]) or 32
  local exe = args[-1] or './flowerlua'
  local function run(cmd)
    local p = io.popen(cmd)
    local out = p:read('a')
    p:close()
    local rss, t = out:match('([%d%.]+) ([%d%.]+)%s*$')
    return tonumber(rss), tonumber(t)
  end
  local torch_script = [[
import resource, sys, time, torch, torchvision
torch.set_num_threads(%d)
m = torchvision.models.resnet50()
x = torch.randn(%d, 3, 224, 224)
t0 = time.perf_counter()
if '%s' == 'train':
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    m.train(); opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(m(x), torch.zeros(%d, dtype=torch.long))
    loss.backward(); opt.step()
else:
    m.eval()
    with torch.no_grad(): m(x)
print('%%.1f %%.3f' %% (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t0))
]]
  print(string.format('\nPeak resident memory, ResNet50 at batch %d (MB; seconds for the one step)', batch))
  print(string.format('%-12s %10s %8s %10s %8s %8s', 'mode', 'ours MB', 's', 'torch MB', 's', 'ratio'))
  for _, mode in ipairs({'train', 'infer'}) do
    local o, ot = run(string.format('%s tests/bench/layers.lua --rss-child %s %d %d', exe, mode, batch, threads))
    local py = string.format(torch_script, threads, batch, mode, batch)
    local f = io.open('/tmp/flowerlua_rss_peer.py', 'w')
    f:write(py)
    f:close()
    local t, tt = run('.venv/bin/python /tmp/flowerlua_rss_peer.py 2>/dev/null')
    os.remove('/tmp/flowerlua_rss_peer.py')
    print(string.format('%-12s %10s %8s %10s %8s %8s', mode, o and string.format('%.0f', o) or '-',
      ot and string.format('%.2f', ot) or '-', t and string.format('%.0f', t) or '-',
      tt and string.format('%.2f', tt) or '-', (o and t) and string.format('%.2f', o / t) or '-'))
  end
end
