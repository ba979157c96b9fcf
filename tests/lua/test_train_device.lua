-- The device option of flower.train / export / ensemble / recipes and the pinned-batch data path,
-- as far as a machine without a GPU can check them: option validation, failing up front (before any
-- work or file) when CUDA is asked for and absent, device = 'cpu' bit-identical to no option, and
-- pinned loaders / t:pin_memory() falling back to plain memory with the same batches. The GPU side
-- (training on the GPU against the CPU, async copies of pinned batches) is in test_cuda.lua.
local T = require 'flower.test'
local flower = require 'flower'
local optim = require 'flower.optim'
local data = require 'flower.data'
local train = require 'flower.train'
local files = require 'flower.files'
local cuda = flower.cuda

local FLOWERLUA = os.getenv('FLOWERLUA') or './flowerlua'
local TMP = T.tmpdir()
local function tmp(...) return files.join(TMP, ...) end
local quiet = function() end

local XT, YT, XV, YV = T.leaning_classes(128, 48)

local function loaders() return T.leaning_loaders(XT, YT, XV, YV) end
local function make_model() return T.leaning_mlp(0.3) end

-- the message a missing device gives (CPU build: "built without CUDA"; CUDA build: the driver's reason)
local REASON = cuda.unavailable_reason()

T.test('flower.device and t:to: names, moves on the host, the backends of this build', function()
  local device = flower.device
  T.eq(device.name(nil), 'cpu')
  T.eq(device.name(2), 'cuda:2')
  T.eq(device.describe(nil), 'cpu')
  local t = flower.tensor({1, 2, 3})
  T.eq(device.of(t), nil)
  T.check(rawequal(device.move(t, nil), t), 'a host tensor moved to the host is itself')
  T.check(rawequal(t:to('cpu'), t), "t:to('cpu') of a host tensor is itself")
  T.check(rawequal(device.upload(t, nil), t), 'upload to the host is the tensor')
  local m = make_model()
  T.eq(device.of(m), nil)
  T.check(rawequal(device.move(m, nil), m), 'a model moved to the host is itself')
  local names = {}
  for _, b in ipairs(flower.backends()) do names[#names + 1] = b.name end
  T.eq(names[1], 'cpu')
  T.eq(flower.backends()[1].devices, 1)
  T.eq(cuda.built(), names[2] == 'cuda')
  local ok, why = device.available()
  T.eq(ok, cuda.available())
  if not ok then T.eq(why, REASON) end
  T.raises(function() t:to('tpu') end, "to: device 'tpu': no backend 'tpu' in this build (it has: cpu")
  T.raises(function() t:to('cpu:1') end, "to: device 'cpu:1': there is 1 cpu device (0..0)")
  T.raises(function() t:to('cpu:x') end, "the index after ':' must be an integer >= 0")
  if not cuda.available() then T.raises(function() t:to('cuda') end, "to: device 'cuda'") end
end)

T.test('resolve_device: cpu, auto, cuda specs and bad ones', function()
  T.eq(train.resolve_device(nil), nil)
  T.eq(train.resolve_device('cpu'), nil)
  T.eq(train.resolve_device(false), nil)
  T.eq(train.resolve_device('auto'), cuda.available() and 0 or nil)
  for _, bad in ipairs { 'gpu', 'cuda:', 'cuda:x', 'CUDA', -1, 1.5, {} } do
    T.raises(function() train.resolve_device(bad, 'who') end, "who: device must be 'cpu', 'cuda', 'cuda:<n>' or 'auto'",
      tostring(bad))
  end
  if not cuda.available() then
    for _, spec in ipairs { 'cuda', 'cuda:0', 'cuda:3', 0 } do
      local err = T.raises(function() train.resolve_device(spec, 'train.fit') end, REASON, tostring(spec))
      T.check(err:find("train.fit: device '" .. tostring(spec) .. "'", 1, true), err)
    end
  else
    T.eq(train.resolve_device('cuda'), 0)
    T.raises(function() train.resolve_device('cuda:' .. cuda.device_count()) end, 'CUDA device')
  end
end)

if not cuda.available() then
  T.test("fit{device = 'cuda'} without a device fails before any work", function()
    local m = make_model()
    local before = {}
    for i, w in ipairs(m:weights()) do before[i] = w.tensor:clone() end
    local iterated = false
    local tl = { epoch = function() iterated = true; return function() end end }
    setmetatable(tl, { __len = function() return 4 end })
    local dir = tmp('nodevice')
    local err = T.raises(function()
      train.fit(m, { train = tl, optimizer = optim.Adam { lr = 1e-2 }, epochs = 2, device = 'cuda', log = quiet,
                     progress = false, checkpoint_dir = dir, history_csv = tmp('nodevice.csv') })
    end, REASON)
    T.check(err:find("train.fit: device 'cuda'", 1, true), err)
    T.check(not iterated, 'the loader was not started')
    T.check(not files.exists(dir) and not files.exists(tmp('nodevice.csv')), 'nothing written')
    T.eq(m:get_device(), -1)
    for i, w in ipairs(m:weights()) do T.check(w.tensor:equal(before[i]), 'weights untouched: ' .. w.path) end
    -- the same for evaluate, fit_stages, export and the ensemble
    local _, vl = loaders()
    T.raises(function() train.evaluate(m, vl, { device = 'cuda', progress = false }) end, REASON)
    T.raises(function()
      train.fit_stages(m, { { epochs = 1, train = 'all' } }, { train = tl, device = 'cuda', log = quiet,
        make_optimizer = function() error('no optimizer should be made') end })
    end, REASON)
    local export = require 'flower.export'
    T.raises(function()
      export.features(m, { path = tmp('f.h5'), splits = { { 'train', { paths = {} } } }, layer = 'fc1',
                           loader = function() error('no loader should be made') end, device = 'cuda' })
    end, REASON)
    T.check(not files.exists(tmp('f.h5')), 'no feature file')
    local ensemble = require 'flower.ensemble'
    T.raises(function()
      ensemble.fit({ x = { train = XT }, label = { train = YT }, classes = 4 }, { device = 'cuda', epochs = 1 })
    end, REASON)
  end)
end

T.test("fit with device = 'cpu' is bit-identical to fit without the option", function()
  local function run(opts)
    local m = make_model()
    local tl, vl = loaders()
    local o = { train = tl, valid = vl, optimizer = optim.Adam { lr = 1e-2 }, epochs = 2, log = quiet, progress = false }
    for k, v in pairs(opts) do o[k] = v end
    local h = train.fit(m, o)
    return m, h
  end
  local a, ha = run {}
  local b, hb = run { device = 'cpu' }
  local c, hc = run { device = 'auto' }
  T.same_weights(a, b)
  for i, r in ipairs(ha.rows) do
    T.eq(hb.rows[i].loss, r.loss, 'loss of epoch ' .. i)
    T.eq(hb.rows[i].val_acc, r.val_acc, 'val_acc of epoch ' .. i)
  end
  if not cuda.available() then
    T.same_weights(a, c)
    T.eq(hc.rows[2].loss, ha.rows[2].loss)
  end
  -- evaluate with the option gives the same numbers
  local _, vl = loaders()
  local e1 = train.evaluate(a, vl, { progress = false, collect = true })
  local e2 = train.evaluate(a, vl, { progress = false, collect = true, device = 'cpu' })
  T.eq(e1.loss, e2.loss)
  T.check(e1.probs:equal(e2.probs), 'collected outputs')
end)

T.test('batch_to_device: the host is the batch itself', function()
  local b = { x = XT, y = YT, n = 128 }
  T.check(rawequal(train.batch_to_device(b, nil), b))
end)

T.test('pin_memory falls back to plain memory with the same values', function()
  local t = flower.randn({ 3, 5 })
  local p = t:pin_memory()
  T.check(p:equal(t), 'values')
  T.eq(p:is_pinned(), cuda.available())
  T.eq(t:is_pinned(), false)
  T.check(rawequal(p:pin_memory(), p) or not p:is_pinned(), 'a pinned tensor pins to itself')
  -- a strided view pins as a contiguous copy
  local v = t:t()
  local pv = v:pin_memory()
  T.check(pv:is_contiguous() and pv:equal(v), 'strided view')
  -- integer dtypes, empty tensors
  local u = flower.tensor({ 1, 2, 255 }, 'uint8')
  T.check(u:pin_memory():equal(u))
  T.eq(flower.empty({ 0, 3 }):pin_memory():numel(), 0)
  if not cuda.available() then
    T.raises(function() return cuda.to_device_async(t) end, 'cuda.to_device_async')
    T.raises(function() return t:cuda { non_blocking = true } end, 'cuda')
  end
end)

-- a small image set for the loader
local ROOT = tmp('flowers')
assert(T.sh(string.format('%s scripts/make_flowers.lua --classes 3 --train-per-class 6 --test 0 --seed 3 '
  .. '--min-size 64x48 --max-size 80x60 --quiet --out %s', FLOWERLUA, ROOT)), 'make_flowers failed')

T.test('a pin_memory loader gives the same batches as a plain one', function()
  local ds = data.kaggle(ROOT)
  local function batches(pin, workers, dtype)
    local l = data.Loader { ds, batch_size = 5, shuffle = true, seed = 3, workers = workers, transform = 'train',
                            size = 24, pin_memory = pin, dtype = dtype }
    T.eq(l:pinned(), pin and cuda.available() or false)
    local out = {}
    for e = 1, 2 do
      for b in l:epoch(e) do
        T.eq(b.x:is_pinned(), l:pinned(), 'batch memory')
        out[#out + 1] = { b.x:clone(), b.y:clone() }
        collectgarbage()   -- batch buffers are collected and refilled (the pool's reuse path)
      end
    end
    l:close()
    return out
  end
  for _, dt in ipairs { 'uint8', 'float32' } do
    local a = batches(false, 2, dt)
    local b = batches(true, 2, dt)
    local c = batches(true, 0, dt)
    T.eq(#b, #a)
    for i = 1, #a do
      T.check(b[i][1]:equal(a[i][1]) and b[i][2]:equal(a[i][2]), dt .. ' batch ' .. i .. ' (workers 2)')
      T.check(c[i][1]:equal(a[i][1]) and c[i][2]:equal(a[i][2]), dt .. ' batch ' .. i .. ' (workers 0)')
    end
  end
  T.raises(function() data.Loader { ds, size = 24, pin_memory = 'yes' } end, 'pin_memory')
end)

T.test('recipes: --device is an option; a missing device fails before the run directory', function()
  local recipe = require 'flower.recipe'
  local ran = false
  local R = recipe.new { name = 'devtest', options = {}, run = function() ran = true; return 'done' end }
  local cfg = R:config {}
  T.eq(cfg.device, 'cpu')
  local help = select(2, R:config { '--help' })
  T.check(help and help:find('--device', 1, true), 'help lists --device')
  local runs = tmp('runs')
  T.eq(R:call { '--runs', runs, '--run-name', 'a', '--device', 'cpu' }, 'done')
  T.check(ran)
  ran = false
  T.raises(function() R:call { '--runs', runs, '--run-name', 'b', '--device', 'tpu' } end, "devtest: --device: device must be")
  if not cuda.available() then
    local err = T.raises(function() R:call { '--runs', runs, '--run-name', 'c', '--device', 'cuda' } end, REASON)
    T.check(err:find("devtest: --device: device 'cuda'", 1, true), err)
    -- a resumed GPU run on this machine fails the same way, unless --device is given again
    files.json_write(files.join(runs, 'a', 'config.json'), { device = 'cuda', runs = runs })
    T.raises(function() R:call { '--resume', files.join(runs, 'a') } end, REASON)
    T.eq(R:call { '--resume', files.join(runs, 'a'), '--device', 'cpu' }, 'done')
  end
  T.check(not files.exists(files.join(runs, 'b')) and not files.exists(files.join(runs, 'c')), 'no run directory')
end)

T.test('the recipes in experiments/ take --device', function()
  for _, r in ipairs { 'quickstart', 'fgvcx_flowers', 'dropout_variant', 'freeze_schedule_variant' } do
    local p = io.popen(FLOWERLUA .. ' experiments/' .. r .. '.lua --help 2>&1')
    local out = p:read('a')
    p:close()
    T.check(out:find('--device', 1, true), r .. ' --help lists --device')
  end
  if not cuda.available() then
    local out = T.capture(FLOWERLUA .. ' experiments/quickstart.lua --tiny --device cuda --runs ' .. tmp('qs'))
    -- (the subprocess may be another build than this one: its reason may differ)
    T.check(out:find("quickstart: --device: device 'cuda': ", 1, true), out)
    T.check(out:find('rc=2', 1, true), 'exit status 2: ' .. out)
    T.check(not out:find('traceback', 1, true), 'one clear line, no traceback: ' .. out)
    T.check(not files.exists(tmp('qs')), 'no run directory: ' .. out)
  end
end)

os.execute('rm -rf ' .. TMP)
T.done()
