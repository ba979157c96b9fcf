-- flower.data: the generator CLI, the Kaggle and folder layouts, every JSON and image failure,
-- seeded splits (checked against numpy), the threaded loader (determinism across worker counts,
-- epochs, dtypes, preprocessing, bad files, bounded memory), the feature loader and statistics.
local T = require 'flower.test'
local flower = require 'flower'
local data = require 'flower.data'
local files = require 'flower.files'
local D = flower._data

local FLOWERLUA = os.getenv('FLOWERLUA') or './flowerlua'
local PY = T.python
local TMP = os.tmpname()
os.remove(TMP)
files.mkdir(TMP)

local sh = T.sh

local slurp = T.slurp

local function write(path, s)
  local f = assert(io.open(path, 'wb'))
  f:write(s)
  f:close()
end

local function maxdiff(a, b) return (a:double() - b:double()):abs():max():item() end

-- a small set in the Kaggle layout: 4 categories x 6 photos, 5 test photos, small sizes
local ROOT = TMP .. '/flowers'
local GEN = string.format('%s scripts/make_flowers.lua --classes 4 --train-per-class 6 --test 5 --seed 3 '
  .. '--min-size 120x90 --max-size 160x120 --quiet --out ', FLOWERLUA)
assert(sh(GEN .. ROOT), 'make_flowers failed')

T.test('make_flowers: Kaggle layout, JSON, submission template and answer key', function()
  local tr = files.json_read(ROOT .. '/train.json')
  T.eq(#tr.annotations, 24)
  T.eq(#tr.images, 24)
  T.eq(#tr.categories, 4)
  local per = {}
  for _, a in ipairs(tr.annotations) do
    local p = string.format('%s/train/category_%d/%d.jpg', ROOT, a.category_id + 1, a.image_id)
    T.check(files.exists(p), 'missing ' .. p)
    per[a.category_id] = (per[a.category_id] or 0) + 1
  end
  for c = 0, 3 do T.eq(per[c], 6) end
  local te = files.json_read(ROOT .. '/test.json')
  T.eq(#te.images, 5)
  for _, im in ipairs(te.images) do T.check(files.exists(ROOT .. '/test/' .. im.file_name)) end
  local sub = files.csv_read(ROOT .. '/sample_submission.csv')
  T.eq(table.concat(sub[1], ','), 'id,predicted')
  T.eq(#sub, 6)
  local key = files.csv_read(ROOT .. '/test_labels.csv')
  T.eq(table.concat(key[1], ','), 'id,category_id')
  -- photo sizes inside the requested range, and a real JPEG
  local info = D.image_info(slurp(ROOT .. '/test/0.jpg'))
  T.check(info.width >= 90 and info.width <= 160 and info.height >= 90 and info.height <= 160)
end)

T.test('make_flowers: the same seed writes the same bytes, another seed other photos', function()
  assert(sh(GEN .. TMP .. '/again'))
  T.check(sh(string.format('cmp -s %s/train.json %s/again/train.json', ROOT, TMP)))
  T.check(sh(string.format('diff -r -q %s %s/again >/dev/null', ROOT, TMP)), 'files differ')
  assert(sh((GEN:gsub('%-%-seed 3', '--seed 4')) .. TMP .. '/other'))
  T.check(not sh(string.format('cmp -s %s/test/0.jpg %s/other/test/0.jpg', ROOT, TMP)))
  sh('rm -rf ' .. TMP .. '/again ' .. TMP .. '/other')
end)

T.test('make_flowers: bad options exit with a message', function()
  local out = T.capture(FLOWERLUA .. ' scripts/make_flowers.lua --classes x')
  T.check(out:find('--classes needs an integer', 1, true) and out:find('rc=2', 1, true), out)
end)

T.test('kaggle: paths, 1-based labels, categories, class count from the data', function()
  local ds = data.kaggle(ROOT)
  T.eq(#ds, 24)
  T.eq(ds.num_classes, 4)
  T.eq(table.concat(ds.categories, ','), '0,1,2,3')
  for i = 1, #ds do
    local cat = tonumber(ds.paths[i]:match('category_(%d+)/')) - 1
    T.eq(ds.categories[ds.labels[i]], cat)
    T.eq(ds.labels[i], cat + 1)
    T.check(ds.paths[i]:find(string.format('/%d.jpg$', ds.ids[i])))
  end
  local te = data.kaggle_test(ROOT)
  T.eq(#te, 5)
  T.eq(te.labels, nil)
  T.eq(te.paths[1], ROOT .. '/test/0.jpg')
  T.eq(te.ids[1], 0)
end)

T.test('kaggle: sparse category ids become labels 1..K in increasing id order', function()
  local dir = TMP .. '/sparse'
  files.mkdir(dir)
  write(dir .. '/train.json', '{"annotations": [{"image_id": 7, "category_id": 40}, {"image_id": 8, "category_id": 3},'
    .. ' {"image_id": "x9", "category_id": 40}]}')
  local ds = data.kaggle(dir)
  T.eq(ds.num_classes, 2)
  T.eq(table.concat(ds.categories, ','), '3,40')
  T.eq(table.concat(ds.labels, ','), '2,1,2')
  T.eq(ds.paths[1], dir .. '/train/category_41/7.jpg')
  T.eq(ds.paths[3], dir .. '/train/category_41/x9.jpg')
end)

T.test('kaggle: malformed, incomplete and empty JSON, missing files and keys are errors naming the file', function()
  local dir = TMP .. '/badjson'
  files.mkdir(dir)
  local j = dir .. '/train.json'
  local cases = {
    { '{"annotations": [{"image_id": 1, "category_id": 2}', 'is not valid JSON' },   -- incomplete
    { 'annotations: yes', 'is not valid JSON' },                                       -- malformed
    { '', 'is empty, expected JSON' },
    { '[1, 2]', "expected a list 'annotations'" },
    { '{"images": []}', "expected a list 'annotations' of {image_id, category_id}, got no such key" },
    { '{"annotations": "x"}', "expected a list 'annotations'" },
    { '{"annotations": []}', "'annotations' is empty" },
    { '{"annotations": [{"image_id": 1}]}', "annotations[1] has no 'category_id'" },
    { '{"annotations": [{"category_id": 1}]}', "annotations[1] has no 'image_id'" },
    { '{"annotations": [{"image_id": 1, "category_id": 1.5}]}', "category_id', expected an integer" },
    { '{"annotations": [{"image_id": 1, "category_id": -1}]}', 'category_id -1, expected >= 0' },
    { '{"annotations": [3]}', 'annotations[1] is a number, expected an object' },
  }
  for _, c in ipairs(cases) do
    write(j, c[1])
    local err = T.raises(function() data.kaggle(dir) end, c[2], c[1])
    T.check(tostring(err):find(j, 1, true), 'message does not name the file: ' .. tostring(err))
    T.check(tostring(err):find('data.kaggle', 1, true))
  end
  os.remove(j)
  T.raises(function() data.kaggle(dir) end, 'data.kaggle: cannot read ' .. j)
  local t = dir .. '/test.json'
  write(t, '{"images": [{"id": 1}]}')
  T.raises(function() data.kaggle_test(dir) end, "images[1] has no 'file_name' string")
  write(t, '{"images": [{"file_name": "a.jpg"}]}')
  T.raises(function() data.kaggle_test(dir) end, "images[1] has no 'id'")
  write(t, '{"imgs": []}')
  T.raises(function() data.kaggle_test(dir) end, "expected a list 'images'")
  write(t, '{"images": [')
  T.raises(function() data.kaggle_test(dir) end, 'test.json is not valid JSON')
end)

T.test("kaggle: COCO images[].file_name joined by id, category names kept; the seed's layout as fallback", function()
  local dir = TMP .. '/coco'
  files.mkdir(dir)
  write(dir .. '/train.json', [[{"images": [{"id": 5, "file_name": "photos/b.jpg"}, {"id": "k1", "file_name": "train/x/a.jpg"}],
    "annotations": [{"image_id": "k1", "category_id": 2}, {"image_id": 5, "category_id": 0}],
    "categories": [{"id": 0, "name": "rose", "genus": "Rosa", "family": "Rosaceae"}, {"id": 2, "name": "tulip"}]}]])
  local ds = data.kaggle(dir)
  T.eq(ds.paths[1], dir .. '/train/x/a.jpg')
  T.eq(ds.paths[2], dir .. '/train/photos/b.jpg')
  T.eq(table.concat(ds.category_names, ','), 'rose,tulip')
  T.eq(ds.category_info[1].genus, 'Rosa')
  T.eq(ds.category_info[1].family, 'Rosaceae')
  -- names travel with subsets and splits
  T.eq(ds:subset({ 2 }).category_names[2], 'tulip')
  -- no images: the seed's convention; no categories: the ids stand for names
  write(dir .. '/train.json', '{"annotations": [{"image_id": 4, "category_id": 6}]}')
  ds = data.kaggle(dir)
  T.eq(ds.paths[1], dir .. '/train/category_7/4.jpg')
  T.eq(ds.category_names[1], '6')
  local names = require('flower.pipeline').datasets{ data = ROOT }.names
  T.check(names[1]:find('^0 %(.*petal'), names[1])
end)

T.test('kaggle: paths from JSON (NUL, absolute, ..), unlisted images and repeated ids are errors naming the record', function()
  local dir = TMP .. '/hostile'
  files.mkdir(dir)
  local j = dir .. '/train.json'
  local cases = {
    { '{"annotations": [{"image_id": "a\\u0000b", "category_id": 1}]}', "annotations[1] has string 'image_id' \"a\\0b\": it holds a NUL byte" },
    { '{"annotations": [{"image_id": "../../etc/passwd", "category_id": 1}]}', "annotations[1] has string 'image_id'" },
    { '{"annotations": [{"image_id": "..", "category_id": 1}]}', "'..' segment would reach outside the data root" },
    { '{"images": [{"id": 1, "file_name": "/etc/passwd"}], "annotations": [{"image_id": 1, "category_id": 1}]}',
      "images[1] has string 'file_name' \"/etc/passwd\": an absolute path" },
    { '{"images": [{"id": 1, "file_name": "train/../../x.jpg"}], "annotations": [{"image_id": 1, "category_id": 1}]}',
      "images[1] has string 'file_name' \"train/../../x.jpg\": a '..' segment" },
    { '{"images": [{"id": 1, "file_name": "a.jpg\\u0000.png"}], "annotations": [{"image_id": 1, "category_id": 1}]}',
      'it holds a NUL byte' },
    { '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "category_id": 1}]}',
      "annotations[1] has image_id 2, which 'images' does not list" },
    { '{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}',
      'images[2] repeats image id 1' },
    { '{"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 1}]}', "images[1] has no 'file_name' string" },
    { '{"annotations": [{"image_id": 1, "category_id": 1}], "categories": [{"id": 1, "name": 7}]}',
      "categories[1] has a number 'name', expected a string" },
  }
  for _, c in ipairs(cases) do
    write(j, c[1])
    local err = T.raises(function() data.kaggle(dir) end, c[2], c[1])
    T.check(tostring(err):find(j, 1, true), 'message does not name the file: ' .. tostring(err))
  end
  local t = dir .. '/test.json'
  write(t, '{"images": [{"id": 1, "file_name": "/etc/passwd"}]}')
  T.raises(function() data.kaggle_test(dir) end, "images[1] has string 'file_name' \"/etc/passwd\": an absolute path")
  write(t, '{"images": [{"id": 1, "file_name": "../train.json"}]}')
  T.raises(function() data.kaggle_test(dir) end, "'..' segment")
  write(t, '{"images": [{"id": 1, "file_name": "x\\u0000.jpg"}]}')
  T.raises(function() data.kaggle_test(dir) end, 'NUL byte')
  write(t, '{"images": [{"id": 1, "file_name": "test/a.jpg"}, {"id": 2, "file_name": "b.jpg"}]}')
  local te = data.kaggle_test(dir)
  T.eq(te.paths[1], dir .. '/test/a.jpg')
  T.eq(te.paths[2], dir .. '/test/b.jpg')
end)

T.test('folder: one directory per class, sorted; other files and hidden folders ignored', function()
  local dir = TMP .. '/folders'
  files.mkdir(dir .. '/tulip')
  files.mkdir(dir .. '/rose')
  files.mkdir(dir .. '/.cache')
  files.mkdir(dir .. '/empty')
  local src = ROOT .. '/test/'
  sh(string.format('cp %s0.jpg %s/tulip/a.jpg && cp %s1.jpg %s/tulip/b.JPEG && cp %s2.jpg %s/rose/c.jpg'
    .. ' && cp %s3.jpg %s/.cache/d.jpg && echo x > %s/rose/notes.txt', src, dir, src, dir, src, dir, src, dir, dir))
  local ds = data.folder(dir)
  T.eq(ds.num_classes, 2)
  T.eq(table.concat(ds.categories, ','), 'rose,tulip')
  T.eq(#ds, 3)
  T.eq(ds.paths[1], dir .. '/rose/c.jpg')
  T.eq(table.concat(ds.labels, ','), '1,2,2')
  T.eq(ds.ids[2], 'a')
  T.raises(function() data.folder(TMP .. '/nope') end, 'data.folder: cannot open directory')
  T.raises(function() data.folder(dir .. '/empty') end, 'no images')
end)

T.test('split: identical to scikit-learn train_test_split(test_size=0.2, random_state=42)', function()
  local ds = data.kaggle(ROOT)
  local tr, va = ds:split{ test_size = 0.2, seed = 42 }
  -- numpy's RandomState(42).permutation and sklearn's n_test = ceil(test_size * n)
  local p = io.popen(PY .. [[ -c "
import math, numpy as np
n = 24; p = np.random.RandomState(42).permutation(n); k = math.ceil(0.2 * n)
print(' '.join(str(i + 1) for i in p[:k])); print(' '.join(str(i + 1) for i in p[k:]))"]])
  local want_va, want_tr = p:read('l'), p:read('l')
  p:close()
  T.check(want_va and want_tr, 'numpy did not answer (run make deps)')
  local function idx(sub)
    local r, pos = {}, {}
    for i, path in ipairs(ds.paths) do pos[path] = i end
    for i, path in ipairs(sub.paths) do r[i] = pos[path] end
    return table.concat(r, ' ')
  end
  T.eq(idx(va), want_va)
  T.eq(idx(tr), want_tr)
  T.eq(#va, 5)
  -- labels travel with their paths
  for i = 1, #tr do T.eq(tr.labels[i], tonumber(tr.paths[i]:match('category_(%d+)/'))) end
  -- permutation of a bigger n against numpy as well
  local perm = D.permutation(1000, 7)
  p = io.popen(PY .. [[ -c "import numpy as np; print(' '.join(str(i + 1) for i in np.random.RandomState(7).permutation(1000)))"]])
  local want = p:read('l')
  p:close()
  T.eq(table.concat(perm, ' '), want)
end)

-- scikit-learn's own answer: train_test_split(arange(n), test_size=, random_state=, stratify=labels)
-- for each case {labels, test_size, seed, stratify}; returns per case {train = 'i j ...', valid = ...}
-- (1-based) or {error = message}
local function sklearn_splits(cases)
  local inp, out = TMP .. '/split_cases.txt', TMP .. '/split_answers.txt'
  local f = assert(io.open(inp, 'wb'))
  for _, c in ipairs(cases) do
    f:write(string.format('%s %s %d %d\n', math.type(c.test_size) == 'integer' and 'int' or 'float',
      string.format('%.17g', c.test_size), c.seed, c.stratify and 1 or 0))
    f:write(table.concat(c.labels, ' '), '\n')
  end
  f:close()
  T.check(sh(PY .. [[ -c "
import sys, numpy as np
from sklearn.model_selection import train_test_split
lines = open(sys.argv[1]).read().split('\n')
out = open(sys.argv[2], 'w')
for k in range(0, len(lines) - 1, 2):
    kind, ts, seed, strat = lines[k].split()
    y = np.array([int(v) for v in lines[k + 1].split()])
    ts = int(ts) if kind == 'int' else float(ts)
    try:
        tr, va = train_test_split(np.arange(len(y)), test_size=ts, random_state=int(seed), stratify=y if strat == '1' else None)
        out.write(' '.join(str(i + 1) for i in tr) + '\n' + ' '.join(str(i + 1) for i in va) + '\n')
    except ValueError as e:
        out.write('error\n' + str(e).replace('\n', ' ') + '\n')
" ]] .. inp .. ' ' .. out), 'scikit-learn did not answer (run make deps)')
  local lines = {}
  for l in io.lines(out) do lines[#lines + 1] = l end
  local r = {}
  for k = 1, #cases do
    local a, b = lines[2 * k - 1], lines[2 * k]
    r[k] = a == 'error' and { error = b } or { train = a, valid = b }
  end
  return r
end

-- our split of a label list, as 1-based index strings
local function our_split(c)
  local n = #c.labels
  local paths = {}
  for i = 1, n do paths[i] = tostring(i) end
  local ds = data.new_dataset{ paths = paths, labels = c.labels, num_classes = 0 }
  local ok, tr, va = pcall(ds.split, ds, { test_size = c.test_size, seed = c.seed, stratify = c.stratify })
  if not ok then return { error = tostring(tr) } end
  return { train = table.concat(tr.paths, ' '), valid = table.concat(va.paths, ' ') }
end

T.test('split: stratified and not, identical to scikit-learn on rare classes and on 100k ids', function()
  local cases = {}
  -- rare classes: 2 and 3 members among larger ones, ties in the shares, several sizes and seeds
  local rare = {}
  for c, k in ipairs({ 2, 3, 2, 7, 3, 12, 2, 5, 3, 9 }) do for _ = 1, k do rare[#rare + 1] = c end end
  -- members of a class scattered, not contiguous
  local scattered = {}
  for i = 1, #rare do scattered[i] = rare[(i * 17) % #rare + 1] end
  for _, labels in ipairs({ rare, scattered }) do
    for _, ts in ipairs({ 0.2, 0.25, 0.5, 12 }) do
      for _, seed in ipairs({ 42, 0, 7 }) do
        cases[#cases + 1] = { labels = labels, test_size = ts, seed = seed, stratify = true }
      end
    end
  end
  -- 100k ids over 997 classes of skewed sizes (1..~400 members, a few with 2 or 3)
  local big = {}
  local x = 12345
  for _ = 1, 100000 do
    x = (x * 1103515245 + 12345) % 2147483648
    local u = (x % 1000003) / 1000003
    big[#big + 1] = math.floor(997 * u * u * u) + 1
  end
  for c = 1, 997 do big[#big + 1] = c; big[#big + 1] = c end   -- every class has 2 or more
  cases[#cases + 1] = { labels = big, test_size = 0.2, seed = 42, stratify = true }
  cases[#cases + 1] = { labels = big, test_size = 0.2, seed = 42, stratify = false }
  local want = sklearn_splits(cases)
  for k, c in ipairs(cases) do
    local got = our_split(c)
    T.check(want[k].error == nil, 'scikit-learn refused case ' .. k .. ': ' .. tostring(want[k].error))
    T.check(got.error == nil, 'we refused case ' .. k .. ': ' .. tostring(got.error))
    T.check(got.train == want[k].train and got.valid == want[k].valid,
      string.format('case %d (n %d, test_size %s, seed %d, stratify %s) differs from scikit-learn', k, #c.labels,
        tostring(c.test_size), c.seed, tostring(c.stratify)))
  end
  T.eq(#want, #cases)
end)

T.test("split: the pipeline's default is the seed's (unstratified train_test_split, 0.2, 42)", function()
  local ds = require('flower.pipeline').datasets{ data = ROOT }
  local tr, va = data.kaggle(ROOT):split{ test_size = 0.2, seed = 42 }
  T.eq(table.concat(ds.train.paths, ','), table.concat(tr.paths, ','))
  T.eq(table.concat(ds.valid.paths, ','), table.concat(va.paths, ','))
end)

T.test('split: refusals as scikit-learn refuses (a class of 1, fewer samples than classes); bad arguments', function()
  local one = { 1, 1, 2, 3, 3, 3, 4, 4 }   -- class 2 has a single member
  local few = { 1, 1, 2, 2, 3, 3, 4, 4, 5, 5 } -- 20% = 2 valid samples for 5 classes
  local cases = { { labels = one, test_size = 0.25, seed = 42, stratify = true },
                  { labels = few, test_size = 0.2, seed = 42, stratify = true } }
  local want = sklearn_splits(cases)
  T.check(want[1].error and want[1].error:find('only 1 member'), 'scikit-learn should refuse a class of 1')
  T.check(want[2].error and want[2].error:find('greater or equal to the number of classes'), 'scikit-learn should refuse')
  local got = our_split(cases[1])
  T.check(got.error and got.error:find('class 2 has only 1 member') and got.error:find('scikit%-learn'), got.error)
  got = our_split(cases[2])
  T.check(got.error and got.error:find('2 valid samples for 5 classes'), got.error)
  local ds = data.kaggle(ROOT)
  local a, b = ds:split{ test_size = 3, seed = 5 }
  T.eq(#b, 3)
  T.eq(#a, 21)
  T.raises(function() ds:split{ test_size = 1.5 } end, 'test_size must be a fraction')
  T.raises(function() ds:split{ test_size = 24 } end, 'must be smaller than the 24 samples')
  T.raises(function() ds:split{ seed = -1 } end, 'seed must be an integer')
  T.raises(function() data.kaggle_test(ROOT):split{ stratify = true } end, 'stratify needs labels')
  -- the stream keeps going: two permutations in a row from one RandomState, as numpy draws them
  local rs = D.random_state(3)
  local p1, p2 = rs:permutation(5), rs:permutation(7)
  local f = io.popen(PY .. [[ -c "import numpy as np; r = np.random.RandomState(3); print(' '.join(str(i + 1) for i in list(r.permutation(5)) + list(r.permutation(7))))"]])
  local w = f:read('l')
  f:close()
  T.eq(table.concat(p1, ' ') .. ' ' .. table.concat(p2, ' '), w)
end)

-- collects warning lines
local function sink()
  local s = { lines = {} }
  function s:write(str) self.lines[#self.lines + 1] = str end
  return s
end

local function epoch_batches(loader, e)
  local out = {}
  for b in loader:epoch(e) do out[#out + 1] = b end
  return out
end

T.test('Loader: batch shapes, dtypes, 1-based labels, #loader', function()
  local ds = data.kaggle(ROOT)
  local loader = data.Loader{ ds, batch_size = 5, workers = 2, size = 32 }
  T.eq(#loader, 5)
  local bs = epoch_batches(loader, 1)
  T.eq(#bs, 5)
  local total = 0
  for k, b in ipairs(bs) do
    T.eq(table.concat(b.x:size(), 'x'), (k < 5 and 5 or 4) .. 'x32x32x3')
    T.eq(b.x:dtype(), 'float32')
    T.eq(b.y:dtype(), 'int64')
    for i = 1, b.n do T.eq(b.y[i], ds.labels[b.index[i]]) end
    T.check(b.x:min():item() >= 0 and b.x:max():item() <= 255)
    total = total + b.n
  end
  T.eq(total, 24)
  -- without shuffle: data set order
  T.eq(bs[1].index[1], 1)
  T.eq(bs[5].index[4], 24)
  local u8 = data.Loader{ ds, batch_size = 24, dtype = 'uint8', size = { 20, 30 }, workers = 1 }
  local b = epoch_batches(u8, 1)[1]
  T.eq(b.x:dtype(), 'uint8')
  T.eq(table.concat(b.x:size(), 'x'), '24x20x30x3')
  T.eq(maxdiff(b.x:double(), data.Loader{ ds, batch_size = 24, size = { 20, 30 }, workers = 1 }:epoch(1)().x), 0)
  local dl = data.Loader{ ds, batch_size = 5, drop_last = true, size = 16 }
  T.eq(#dl, 4)
  T.eq(#epoch_batches(dl, 1), 4)
  -- the test set has no labels
  local tb = data.Loader{ data.kaggle_test(ROOT), batch_size = 8, size = 16 }:epoch(1)()
  T.eq(tb.y, nil)
  T.eq(tb.n, 5)
end)

T.test('Loader: same batches for 0, 1 and 3 workers; epochs differ; an epoch repeats exactly', function()
  local ds = data.kaggle(ROOT)
  local function run(workers, e)
    local l = data.Loader{ ds, batch_size = 7, shuffle = true, seed = 11, workers = workers, transform = 'train',
                           size = 40, prefetch = 2 }
    return epoch_batches(l, e)
  end
  local a, b, c = run(0, 3), run(1, 3), run(3, 3)
  T.eq(#a, 4)
  for k = 1, #a do
    T.eq(table.concat(a[k].index, ','), table.concat(b[k].index, ','))
    T.eq(table.concat(a[k].index, ','), table.concat(c[k].index, ','))
    T.eq(maxdiff(a[k].x, b[k].x), 0)
    T.eq(maxdiff(a[k].x, c[k].x), 0)
  end
  local d = run(2, 4)
  T.check(table.concat(a[1].index, ',') ~= table.concat(d[1].index, ','), 'epoch 4 has the order of epoch 3')
  local again = run(2, 3)
  T.eq(maxdiff(again[2].x, a[2].x), 0)
  -- abandoning an epoch halfway and starting another is fine
  local l = data.Loader{ ds, batch_size = 3, shuffle = true, seed = 11, workers = 2, size = 24 }
  local it = l:epoch(1)
  it()
  local full = epoch_batches(l, 2)
  T.eq(#full, 8)
end)

T.test('Loader: preprocessing modes (caffe, tf, torch) against the raw pixels', function()
  local ds = data.kaggle(ROOT):subset({ 1, 2, 3 })
  local function first(pre)
    return data.Loader{ ds, batch_size = 3, size = 16, workers = 1, preprocess = pre }:epoch(1)().x
  end
  local raw = first('none')
  T.allclose(first('tf'), raw / 127.5 - 1, 1e-6, 1e-5)
  local caffe = first('caffe')
  T.allclose(caffe:narrow(4, 1, 1), raw:narrow(4, 3, 1) - 103.939, 1e-6, 1e-4)
  T.allclose(caffe:narrow(4, 3, 1), raw:narrow(4, 1, 1) - 123.68, 1e-6, 1e-4)
  T.allclose(first('torch'):narrow(4, 2, 1), (raw:narrow(4, 2, 1) / 255 - 0.456) / 0.224, 1e-5, 1e-5)
  T.raises(function() data.Loader{ ds, dtype = 'uint8', preprocess = 'tf' } end, "data.Loader: preprocessing 'tf' needs float32 output")
end)

-- a data set with every kind of bad file among good ones
local function bad_dataset()
  local dir = TMP .. '/bad'
  files.mkdir(dir)
  local good = slurp(ROOT .. '/test/0.jpg')
  write(dir .. '/good1.jpg', good)
  write(dir .. '/truncated.jpg', good:sub(1, math.floor(#good * 0.6)))
  -- corrupt: the frame header's height and width zeroed
  local sof = good:find('\255\192', 3, true)
  write(dir .. '/corrupt.jpg', good:sub(1, sof + 4) .. '\0\0\0\0' .. good:sub(sof + 9))
  write(dir .. '/empty.jpg', '')
  write(dir .. '/png.jpg', '\137PNG\r\n\26\n\0\0\0\rIHDR')
  write(dir .. '/good2.jpg', slurp(ROOT .. '/test/1.jpg'))
  local names = { 'good1', 'truncated', 'corrupt', 'empty', 'png', 'missing', 'good2' }
  local paths, labels = {}, {}
  for i, n in ipairs(names) do paths[i] = dir .. '/' .. n .. '.jpg'; labels[i] = i end
  return data.new_dataset{ paths = paths, labels = labels, num_classes = 7 }
end

T.test('Loader: bad files are skipped with one warning each and counted; strict raises', function()
  local ds = bad_dataset()
  local w = sink()
  local l = data.Loader{ ds, batch_size = 4, size = 24, workers = 2, warn = w }
  for e = 1, 2 do
    local bs = epoch_batches(l, e)
    -- batch 1 requested good1, truncated, corrupt, empty -> only good1 remains;
    -- batch 2 requested png, missing, good2 -> good2
    T.eq(#bs, 2)
    T.eq(bs[1].n, 1)
    T.eq(bs[1].index[1], 1)
    T.eq(bs[2].index[1], 7)
    T.eq(bs[2].y[1], 7)
  end
  local st = l:stats()
  T.eq(st.skipped, 10)                      -- 5 bad files x 2 epochs
  T.eq(st.samples, 4)
  T.eq(st.reasons.truncated, 2)
  T.eq(st.reasons.corrupt, 2)
  T.eq(st.reasons.empty, 2)
  T.eq(st.reasons.not_jpeg, 2)
  T.eq(st.reasons.missing, 2)
  T.eq(#w.lines, 5)                         -- one line per file, not per epoch
  local all = table.concat(w.lines)
  for _, n in ipairs({ 'truncated.jpg', 'corrupt.jpg', 'empty.jpg', 'png.jpg', 'missing.jpg' }) do
    T.check(all:find(n, 1, true), 'no warning names ' .. n)
  end
  T.check(all:find('(truncated)', 1, true) and all:find('No such file', 1, true) and all:find('it is a PNG', 1, true), all)
  for _, line in ipairs(w.lines) do T.check(line:match('^warning: data.Loader: skipping .-\n$'), line) end
  -- strict: the first bad sample raises, naming file and reason
  local s = data.Loader{ ds, batch_size = 4, size = 24, strict = true }
  T.raises(function() epoch_batches(s, 1) end, ds.paths[2] .. ': Premature end of JPEG file (truncated)')
end)

T.test('Loader: a FIFO and a directory named .jpg are skipped without hanging; loader:skipped() names each once', function()
  local ds = bad_dataset()
  local dir = TMP .. '/bad'
  T.check(sh('mkfifo ' .. dir .. '/fifo.jpg'), 'mkfifo failed')
  files.mkdir(dir .. '/dir.jpg')
  ds = data.new_dataset{ paths = { ds.paths[1], dir .. '/fifo.jpg', dir .. '/dir.jpg', ds.paths[5], ds.paths[7] },
                         labels = { 1, 2, 3, 4, 5 }, num_classes = 5 }
  local l = data.Loader{ ds, batch_size = 2, size = 16, workers = 2, warn = false }
  for e = 1, 2 do
    local n = 0
    for b in l:epoch(e) do n = n + b.n end
    T.eq(n, 2)
  end
  local sk = l:skipped()
  T.eq(#sk, 3)
  T.eq(sk[1].path, dir .. '/fifo.jpg'); T.eq(sk[1].index, 2)
  T.check(sk[1].reason:find('a FIFO, not an image file (not_file)', 1, true), sk[1].reason)
  T.check(sk[2].reason:find('a directory', 1, true), sk[2].reason)
  T.check(sk[3].reason:find('PNG', 1, true), sk[3].reason)
  T.eq(l:stats().skipped, 6)
  os.remove(dir .. '/fifo.jpg')
  -- a 2-byte file holding the JPEG start marker says it is truncated, not that it lacks the marker
  write(dir .. '/two.jpg', '\255\216')
  T.raises(function() data.load_image(dir .. '/two.jpg') end, 'truncated: 2 bytes')
end)

T.test('Loader: a batch whose every sample failed is left out', function()
  local ds = bad_dataset():subset({ 2, 3, 4, 5, 1 })
  local l = data.Loader{ ds, batch_size = 2, size = 16, warn = false }
  local bs = epoch_batches(l, 1)
  T.eq(#bs, 1)
  T.eq(bs[1].index[1], 5)
  T.eq(#l, 3)
end)

T.test('image_load: every bad file is an error naming the file and the reason', function()
  local ds = bad_dataset()
  local want = { nil, 'truncated', 'corrupt', 'empty', 'not_jpeg', 'missing' }
  for i = 2, 6 do
    T.raises(function() data.load_image(ds.paths[i]) end, 'image_load: ' .. ds.paths[i] .. ': ')
    T.raises(function() data.load_image(ds.paths[i]) end, '(' .. want[i] .. ')')
  end
end)

T.test('Loader: option errors name the loader and the option', function()
  local ds = data.kaggle(ROOT)
  T.raises(function() data.Loader{ ds, transform = 'crop' } end, "transform must be 'eval', 'train', 'resize' or a table")
  T.raises(function() data.Loader{ ds, transform = { mode = 'zoom' } } end, "option 'mode' must be one of 'none', 'resize', 'center', 'random_resized', got 'zoom'")
  T.raises(function() data.Loader{ ds, size = 0 } end, "option 'size' must be whole numbers")
  T.raises(function() data.Loader{ ds, batch_size = 0 } end, 'batch_size must be >= 1')
  T.raises(function() data.Loader{ ds, workers = -1 } end, 'workers must be 0..256')
  T.raises(function() data.Loader{ ds, dtype = 'int8' } end, "option 'dtype' must be one of 'uint8', 'float32'")
  T.raises(function() data.Loader{ ds, transform = { mode = 'none' } } end, "transform mode 'none' gives images of different sizes")
  T.raises(function() data.Loader{ ds, transform = { mode = 'center', crop_frac = 2 } } end, 'crop_frac must be in (0, 1]')
  T.raises(function() data.Loader{ data.new_dataset{ paths = { 'a', 3 } } } end, 'paths[2] must be a string')
  T.raises(function() data.Loader{ data.new_dataset{ paths = { 'a' }, labels = { 1, 2 } } } end, '2 labels for 1 paths')
  T.raises(function() data.Loader{ {} } end, 'must be a data set with `paths`')
end)

T.test('Loader: close, <close> and use after close', function()
  local ds = data.kaggle(ROOT)
  do
    local l <close> = data.Loader{ ds, batch_size = 4, size = 16, workers = 2 }
    l:epoch(1)()
  end
  local l = data.Loader{ ds, batch_size = 4, size = 16, workers = 2 }
  l:close()
  l:close()
  T.raises(function() l:epoch(1) end, 'Loader:start: the loader is closed')
end)

local function rss_mb() return require('flower.memory').rss() / 2^20 end

T.test('Loader: memory stays bounded over an epoch far larger than the prefetch ring', function()
  -- 1200 samples at 128x128 float32: 235 MB if the epoch were held; the ring holds 4 batches
  local paths = {}
  for i = 1, 1200 do paths[i] = ROOT .. '/test/' .. (i % 5) .. '.jpg' end
  local l = data.Loader{ data.new_dataset{ paths = paths }, batch_size = 40, size = 128, workers = 2, prefetch = 4 }
  collectgarbage()
  local before, peak = rss_mb(), 0
  local n = 0
  for b in l:epoch(1) do
    n = n + b.n
    b = nil
    collectgarbage()
    peak = math.max(peak, rss_mb() - before)
  end
  T.eq(n, 1200)
  print(string.format('# RSS growth over the epoch: %.1f MB (one batch is %.1f MB)', peak, 40 * 128 * 128 * 3 * 4 / 2^20))
  -- (AddressSanitizer keeps up to 256 MB of freed memory in quarantine: RSS says nothing there)
  if not os.getenv('SANITIZE') then T.check(peak < 80, string.format('RSS grew by %.1f MB', peak)) end
end)

T.test('FeatureLoader: rows and labels follow the order; shuffle is seeded per epoch', function()
  local x = flower.arange(0, 30):view(10, 3):float()
  local y = flower.arange(1, 11):long()
  local fl = data.FeatureLoader{ x = x, y = y, batch_size = 4 }
  T.eq(#fl, 3)
  local bs = epoch_batches(fl, 1)
  T.eq(#bs, 3)
  T.eq(table.concat(bs[3].x:size(), 'x'), '2x3')
  T.eq(bs[3].x[{ 2, 3 }], 29.0)
  T.eq(bs[3].y[2], 10)
  local sh1 = data.FeatureLoader{ x = x, y = y, batch_size = 4, shuffle = true, seed = 5 }
  local e1, e1b, e2 = epoch_batches(sh1, 1), epoch_batches(sh1, 1), epoch_batches(sh1, 2)
  T.eq(table.concat(e1[1].index, ','), table.concat(e1b[1].index, ','))
  T.check(table.concat(e1[1].index, ',') ~= table.concat(e2[1].index, ','))
  for i = 1, e1[1].n do
    T.eq(e1[1].y[i], e1[1].index[i])
    T.eq(e1[1].x[{ i, 1 }], (e1[1].index[i] - 1) * 3.0)
  end
  T.eq(#data.FeatureLoader{ x = x, batch_size = 4, drop_last = true }, 2)
  -- a transposed (non-contiguous) view: rows are still the view's rows
  local xt = flower.arange(0, 30):view(3, 10):float():t()
  local b1 = data.FeatureLoader{ x = xt, batch_size = 10 }:epoch(1)()
  T.eq(b1.x[{ 4, 2 }], 13.0)
  T.raises(function() data.FeatureLoader{ x = x, y = flower.arange(0, 3) } end, 'y must be a tensor with 10 rows')
end)

T.test('stats: per-channel mean and std equal a direct computation; bad files skipped', function()
  local ds = data.kaggle(ROOT):subset({ 1, 2, 3, 4 })
  local sums, sq, n = { 0, 0, 0 }, { 0, 0, 0 }, 0
  for _, p in ipairs(ds.paths) do
    local im = data.load_image(p):double()
    local h, w = im:size()[1], im:size()[2]
    n = n + h * w
    for c = 1, 3 do
      local ch = im:narrow(3, c, 1)
      sums[c] = sums[c] + ch:sum():item()
      sq[c] = sq[c] + (ch * ch):sum():item()
    end
  end
  local mean, std, info = data.stats(ds, { progress = false, workers = 2 })
  for c = 1, 3 do
    T.near(mean[c], sums[c] / n, 1e-12)
    T.near(std[c], math.sqrt(sq[c] / n - (sums[c] / n) ^ 2), 1e-9)
  end
  T.eq(info.images, 4)
  local w = sink()
  local _, _, info2 = data.stats(bad_dataset(), { progress = false, warn = w, chunk = 3 })
  T.eq(info2.images, 2)
  T.eq(info2.skipped, 5)
  T.eq(#w.lines, 5)
  T.raises(function() data.stats(bad_dataset(), { progress = false, strict = true }) end, 'truncated.jpg')
end)

sh('rm -rf ' .. TMP)
T.done()
