-- Convolution speed for ResNet50-shaped layers at batch 8: flowerlua's kernels beside PyTorch
-- (Debian's python3-torch, oneDNN) and TensorFlow (the .venv's tensorflow-cpu) on the same shapes,
-- in the same run, with ratios (peer time / our time: > 1 means we are faster). "ours" is the
-- default (float32 convolutions on oneDNN or our GEMM kernels, whichever measured faster, see
-- core/cpu/nn_conv.c); the "own GEMM" column forces our GEMM kernels for every operation.
-- Optionally (`rss`): peak resident memory of a ResNet50 training step and of inference, each in
-- its own process, ours (flower.models.resnet50) beside torchvision's resnet50.
--
-- Usage: flowerlua tests/bench/layers.lua [reps=5] [threads=2] [rss [batch=32]]
local flower = require 'flower'
local nn = require 'flower.nn'
local C = nn.C

local args = arg or {}

-------------------------------------------------------------------------------- rss children

local function peak_rss_mb() return require('flower.memory').peak() / 2^20 end

if args[1] == '--rss-child' then
  local mode, batch = args[2], tonumber(args[3])
  flower.setnumthreads(tonumber(args[4]) or 2)
  local models = require 'flower.models'
  local m = models.resnet50{include_top = true, input_shape = {224, 224, 3}, preprocess = false}
  local x = flower.randn(batch, 224, 224, 3)
  local t0 = C.now()
  if mode == 'train' then
    local optim, train = require 'flower.optim', require 'flower.train'
    m:training()
    train.step(m, {x = x, y = flower.ones(batch):type('int64')}, train.make_loss('categorical_crossentropy'),
      optim.SGD{lr = 0.01, momentum = 0.9})
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

local inputs = {}
local function measure_ours(into, engine)
  C.conv_engine(engine)
  for _, c in ipairs(cases) do
    local t = inputs[c.name]
    if not t then
      local x = flower.randn(N, c.h, c.h, c.cin)
      local w = flower.randn(c.k, c.k, c.cin, c.cout) * 0.05
      local win = C.window(c.h, c.h, c.k, c.k, c.s, c.s, 1, 1, c.padding)
      local y = C.conv2d(x, w, win)
      t = {x = x, w = w, win = win, gy = flower.randn(y:size()), gw = flower.zeros(w:size()),
           macs = N * y:size(2) * y:size(3) * c.cout * c.k * c.k * c.cin}
      y:free()
      inputs[c.name] = t
    end
    local r = into[c.name] or {fwd = math.huge, bwd_data = math.huge, bwd_filter = math.huge}
    r.fwd = math.min(r.fwd, best(function() C.conv2d(t.x, t.w, t.win):free() end))
    r.bwd_data = math.min(r.bwd_data, best(function() C.conv2d_backward_data(t.gy, t.w, t.x, t.win):free() end))
    r.bwd_filter = math.min(r.bwd_filter, best(function() C.conv2d_backward_filter(t.x, t.gy, t.win, t.gw, nil, 0) end))
    r.bwd = r.bwd_data + r.bwd_filter
    r.gflops = 2 * t.macs / r.fwd * 1e-9
    into[c.name] = r
  end
  C.conv_engine('auto')
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

local function loadavg()
  local f = io.open('/proc/loadavg')
  if not f then return '?' end
  local l = f:read('l')
  f:close()
  return l:match('^(%S+ %S+ %S+)')
end

-- ours before and after the peers (best of both), so that a burst of load from other processes
-- does not land on one side only
local load_before = loadavg()
local ours, own = {}, {}
measure_ours(ours, 'auto')
measure_ours(own, 'own')
local peers = {{'own GEMM', own}, {'torch NCHW', peer('torch')}, {'torch NHWC', peer('torch_nhwc')},
               {'TF NHWC', peer('tf')}}
measure_ours(own, 'own')
measure_ours(ours, 'auto')

local function ms(t) return t and string.format('%7.2f', t * 1e3) or '      -' end
local function ratio(p, o) return (p and o) and string.format('%5.2f', p / o) or '    -' end

print(string.format('Convolutions, batch %d, %d threads, best of %d (ms; x = peer time / ours, > 1: ours faster)', N,
  threads, reps))
print('load average before / after: ' .. load_before .. ' / ' .. loadavg() .. ' (other processes share the cores)')
local head = string.format('%-25s %7s %5s %7s', 'layer', 'fwd', 'GF/s', 'bwd')
for _, p in ipairs(peers) do head = head .. string.format(' | %-10s fwd x bwd x', p[1]) end
print(head)
local tot = {fwd = 0, bwd = 0}
local ptot = {}
for i = 1, #peers do ptot[i] = {fwd = 0, bwd = 0} end
for _, c in ipairs(cases) do
  local o = ours[c.name]
  local line = string.format('%-25s %s %5.1f %s', c.name, ms(o.fwd), o.gflops, ms(o.bwd))
  tot.fwd, tot.bwd = tot.fwd + o.fwd, tot.bwd + o.bwd
  for i, p in ipairs(peers) do
    local r = p[2] and p[2][c.name]
    line = line .. string.format(' | %10s %s %s', '', ratio(r and r.fwd, o.fwd), ratio(r and r.bwd, o.bwd))
    if r then ptot[i].fwd, ptot[i].bwd = ptot[i].fwd + r.fwd, ptot[i].bwd + r.bwd end
  end
  print(line)
end
local line = string.format('%-25s %s %5s %s', 'sum', ms(tot.fwd), '', ms(tot.bwd))
for i, p in ipairs(peers) do
  line = line .. string.format(' | %10s %s %s', '', ratio(p[2] and ptot[i].fwd, tot.fwd), ratio(p[2] and ptot[i].bwd, tot.bwd))
end
print(line)
for _, p in ipairs(peers) do
  if not p[2] then print('(' .. p[1] .. ' peer unavailable: .venv/bin/python with torch / tensorflow)') end
end

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
