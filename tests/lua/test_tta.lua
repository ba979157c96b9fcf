-- flower.tta (test-time augmentation) and experiments/predict.lua (top-k from saved models).
local T = require 'flower.test'
local flower = require 'flower'
local files = require 'flower.files'
local tta = require 'flower.tta'
local nn, data, keras = flower.nn, flower.data, flower.keras

local TMP = T.tmpdir()
local function tmp(...) return files.join(TMP, ...) end

local function max_diff(a, b) return (a - b):abs():max():item() end

T.test('views: centre and corner crops are the right windows; mirrors reverse the columns', function()
  flower.manual_seed(1)
  local x = flower.randn(2, 10, 10, 3)
  local v = tta.views(x, 6, tta.parse('crops+flip', 0.6))
  T.eq(#v, 10)
  local function win(r, c) return x:narrow(2, r, 6):narrow(3, c, 6) end
  local want = { win(3, 3), win(1, 1), win(1, 5), win(5, 1), win(5, 5) }
  for i, w in ipairs(want) do
    T.eq(max_diff(v[2 * i - 1], w), 0, 'crop ' .. i)
    local f = v[2 * i]
    for j = 1, 6 do T.eq(max_diff(f:narrow(3, j, 1), w:narrow(3, 7 - j, 1)), 0, 'mirror column ' .. j) end
  end
  T.eq(tta.load_size(224, tta.parse('crops')), 256)
  T.eq(tta.load_size(224, tta.parse('flip')), 224)
  T.eq(#tta.views(flower.zeros(1, 4, 4, 3), 4, tta.parse('none')), 1)
end)

T.test('wrong modes and sizes are refused naming them', function()
  local ok, err = pcall(tta.parse, 'rotate')
  T.check(not ok and err:find("unknown mode 'rotate'", 1, true), err)
  ok, err = pcall(tta.views, flower.zeros(1, 4, 4, 3), 6, tta.parse('crops'))
  T.check(not ok and err:find('smaller than the crop 6', 1, true), err)
end)

local function small_model(ending)
  nn.reset_names()
  flower.manual_seed(5)
  local x = nn.Input { 8, 8, 3 }
  local y = nn.Conv2D { filters = 4, kernel_size = 3, activation = 'relu' }(nn.Preprocess { mode = 'tf' }(x))
  y = nn.Dense { units = 3, activation = ending == 'softmax' and 'softmax' or nil }(nn.GlobalAveragePooling2D {}(y))
  return nn.Model(x, y)
end

T.test('probabilities: softmax once, whether the model ends in logits or in a softmax', function()
  flower.manual_seed(2)
  local x = flower.rand(4, 8, 8, 3):mul(255)
  local logits_model = small_model('logits')
  local softmax_model = small_model('softmax')
  local p1 = tta.probabilities(logits_model:evaluate(), x)
  local p2 = tta.probabilities(softmax_model:evaluate(), x)
  T.check(max_diff(p1, p2) < 1e-6, 'the two endings disagree')
  T.check(max_diff(p1:sum(2), flower.ones(4)) < 1e-5)
  T.check(max_diff(p2, softmax_model:forward(x)) == 0, 'softmax applied twice')
end)

T.test('predict averages the views\' probabilities, in inference mode, leaving the mode as it was', function()
  local m = small_model('logits')
  flower.manual_seed(3)
  local x = flower.rand(2, 10, 10, 3):mul(255)
  local spec = tta.parse('crops+flip', 0.8)
  m:training()
  local p = tta.predict(m, x, 8, spec)
  T.eq(m.train, true)
  m:evaluate()
  local sum = flower.zeros(2, 3)
  for _, v in ipairs(tta.views(x, 8, spec)) do sum:add_(m:forward(v):softmax(2)) end
  T.check(max_diff(p, sum:div(10)) < 1e-6)
end)

-- a folder of JPEGs and a model file with metadata, for the recipe
local function fixture()
  files.mkdir(tmp('imgs', 'sub'))
  flower.manual_seed(4)
  for i = 1, 5 do
    local img = flower.rand(12, 14, 3):mul(255):byte()
    data.save_image(img, tmp('imgs', (i > 3 and 'sub/' or '') .. 'img' .. i .. '.jpg'), 95)
  end
  local m = small_model('softmax')
  keras.save_model(m, tmp('m.h5'), { metadata = { classes = { 10, 20, 30 }, class_names = { 'rose', 'tulip', 'daisy' } } })
  return m
end

local function run(args)
  local out = tmp('out.txt')
  local ok = T.sh(string.format('%s experiments/predict.lua %s > %s 2>&1', os.getenv('FLOWERLUA') or './flowerlua', args, out))
  return ok, T.slurp(out)
end

T.test('predict recipe: a folder to CSV, top-k with the metadata\'s class ids, probabilities as computed directly', function()
  local m = fixture()
  local ok, out = run(string.format('--model %s --images %s --topk 2 --csv %s', tmp('m.h5'), tmp('imgs'), tmp('p.csv')))
  T.check(ok, out)
  local rows = files.csv_read(tmp('p.csv'))
  T.eq(#rows, 6)
  T.eq(table.concat(rows[1], ','), 'id,label1,prob1,label2,prob2')
  T.eq(rows[2][1], 'img1'); T.eq(rows[6][1], 'sub/img5')
  local ds = data.new_dataset { paths = { tmp('imgs', 'img1.jpg') }, ids = { 'img1' } }
  local b = data.Loader { ds, batch_size = 1, size = 8 }:epoch(1)()
  local p = m:evaluate():forward(b.x):totable()[1]
  local best, second = 1, nil
  for c = 2, 3 do if p[c] > p[best] then best = c end end
  for c = 1, 3 do if c ~= best and (not second or p[c] > p[second]) then second = c end end
  T.eq(rows[2][2], tostring(({ 10, 20, 30 })[best]))
  T.near(tonumber(rows[2][3]), p[best], 1e-5, 1e-6)
  T.eq(rows[2][4], tostring(({ 10, 20, 30 })[second]))
end)

T.test('predict recipe: one image as a table with names; an ensemble of a run directory; TTA', function()
  fixture()
  local ok, out = run(string.format('--model %s --images %s --topk 3', tmp('m.h5'), tmp('imgs', 'img2.jpg')))
  T.check(ok and out:find('^img2 ') and out:find('(rose)', 1, true) and out:find('(daisy)', 1, true), out)
  files.mkdir(tmp('run', 'models', 'a')); files.mkdir(tmp('run', 'models', 'b'))
  os.execute(string.format('cp %s %s; cp %s %s', tmp('m.h5'), tmp('run', 'models', 'a', 'model.h5'), tmp('m.h5'), tmp('run', 'models', 'b', 'model.h5')))
  ok, out = run(string.format('--run %s --images %s --tta crops+flip --csv %s', tmp('run'), tmp('imgs'), tmp('e.csv')))
  T.check(ok, out)
  ok, out = run(string.format('--model %s --images %s --tta crops+flip --csv %s', tmp('m.h5'), tmp('imgs'), tmp('s.csv')))
  T.check(ok, out)
  T.eq(T.slurp(tmp('e.csv')), T.slurp(tmp('s.csv')), 'an ensemble of one model twice is that model')
end)

T.test('predict recipe: user errors are one line, no traceback, non-zero exit', function()
  fixture()
  local ok, out = run('--images ' .. tmp('imgs'))
  T.check(not ok and out:find('give --model FILE.h5 or --run RUNDIR', 1, true) and not out:find('traceback'), out)
  ok, out = run(string.format('--model %s --images %s', tmp('m.h5'), tmp('nothing.jpg')))
  T.check(not ok and out:find('nothing.jpg: no such file', 1, true), out)
  ok, out = run(string.format('--model %s --images %s', tmp('imgs', 'img1.jpg'), tmp('imgs')))
  T.check(not ok and out:find('not an HDF5 file', 1, true) and not out:find('traceback'), out)
end)

T.done()
