-- flower.ensemble: feature files checked for agreement, concatenated, a Dropout + Dense classifier
-- trained on them; each model alone weak, together strong; probability averaging.
local T = require 'flower.test'
local flower = require 'flower'
local h5 = require 'flower.h5'
local files = require 'flower.files'
local ensemble = require 'flower.ensemble'
local F = dofile('tests/lua/exp_fixture.lua')

local TMP = F.tmpdir()

-- 4 classes, label = 2a + b + 1 (a, b in {0, 1}). Model 'A' sees only a, model 'B' only b: alone each
-- can tell 2 of the 4 classes apart (about 50%), together all 4.
local N = { train = 400, valid = 200, test = 100 }
local truth = {}
flower.manual_seed(11)
for split, n in pairs(N) do
  local a = flower.randint(0, 1, { n }):type('int64')
  local b = flower.randint(0, 1, { n }):type('int64')
  truth[split] = { a = a, b = b, label = a * 2 + b + 1 }
end

local function feats_for(bits)
  local n = bits:size(1)
  local x = flower.randn({ n, 6 }) * 0.5
  x:narrow(2, 1, 1):add_(bits:type('float32'):view(n, 1) * 3 - 1.5)
  return x
end

-- probabilities a model that knows only `which` bit would give: 0.5 on each compatible class
local function probs_for(split, which)
  local t = truth[split]
  local n = t.label:size(1)
  local p = flower.zeros({ n, 4 })
  local a, b = t.a:totable(), t.b:totable()
  for i = 1, n do
    for c = 0, 3 do
      local ca, cb = c // 2, c % 2
      if (which == 'a' and ca == a[i]) or (which == 'b' and cb == b[i]) then p[i][c + 1] = 0.5 end
    end
  end
  return p
end

local function write_file(path, name, which, opts)
  opts = opts or {}
  local f <close> = h5.open(path, 'w')
  f:set_attr('/', 'model', name); f:set_attr('/', 'classes', 4); f:set_attr('/', 'label_base', 0)
  f:set_attr('/', 'splits', { 'train', 'valid', 'test' })
  for split, t in pairs(truth) do
    local xname = split == 'test' and 'test' or (split .. '_x')
    f:write('/' .. xname, feats_for(t[which]))
    if split ~= 'test' then f:write('/' .. split .. '_label', t.label - 1) end
    if split ~= 'train' then f:write('/' .. split .. '_probs', probs_for(split, which)) end
    local imgs, ids = {}, {}
    for i = 1, N[split] do imgs[i] = string.format('%s/%d.jpg', split, i); ids[i] = tostring(i) end
    if opts.swap and split == 'valid' then imgs[3], imgs[4] = imgs[4], imgs[3] end
    f:write('/' .. split .. '_images', imgs)
    f:write('/' .. split .. '_ids', ids)
    f:set_attr('/', split .. '_complete', 1)
    f:set_attr('/', split .. '_rows', N[split])
  end
end

local A, B, C = files.join(TMP, 'a.h5'), files.join(TMP, 'b.h5'), files.join(TMP, 'c.h5')
write_file(A, 'A', 'a')
write_file(B, 'B', 'b')
write_file(C, 'C', 'b', { swap = true })

T.test('load concatenates features and keeps labels', function()
  local f = ensemble.load { A, B }
  T.eq(table.concat(f:x('train'):size(), 'x'), '400x12')
  T.eq(table.concat(f.dims, ','), '6,6'); T.eq(table.concat(f.names, ','), 'A,B')
  T.check(f.label.valid:equal(truth.valid.label), 'labels 1-based and aligned')
  local cols = ensemble.columns(f)
  T.eq(cols[2][1], 7); T.eq(cols[2][2], 6)
end)

T.test('files that disagree on the images are refused, naming the row', function()
  T.raises(function() ensemble.load { A, C } end, "disagree on the 'valid' images at row 3 (valid/3.jpg vs valid/4.jpg)")
end)

T.test('each model alone is weak, the concatenation is strong', function()
  local f = ensemble.load { A, B }
  local cols = ensemble.columns(f)
  local alone = {}
  for i = 1, 2 do
    alone[i] = ensemble.fit(f, { columns = cols[i], epochs = 30, lr = 0.01, seed = 1, progress = false }).val_acc
    T.check(alone[i] < 0.6, string.format('model %d alone: %.3f', i, alone[i]))
  end
  local clf = ensemble.fit(f, { epochs = 30, lr = 0.01, seed = 1, progress = false })
  T.check(clf.val_acc > 0.9, string.format('ensemble %.3f (alone %.3f, %.3f)', clf.val_acc, alone[1], alone[2]))
  T.check(#clf.history.rows >= 1, 'history kept')
  local p = clf:predict(f, 'test')
  T.eq((p - clf:predict(f:x('test'))):abs():max():item(), 0, 'streamed and tensor predictions agree')
  T.eq(table.concat(p:size(), 'x'), '100x4')
  T.near(p:sum(2):min():item(), 1, 1e-5)
  T.check(ensemble.accuracy(p, truth.test.label) > 0.9, 'test accuracy')
end)

T.test('probability averaging: weak alone, strong together', function()
  local f = ensemble.load { A, B }
  local pa = ensemble.average(f, 'valid', { true })
  -- a model that only knows `a` ties between two classes; argmax picks the lower one: about half right
  T.check(ensemble.accuracy(pa, f.label.valid) < 0.75, 'A alone')
  local avg = ensemble.average(f, 'valid')
  T.eq(ensemble.accuracy(avg, f.label.valid), 1)
  T.eq(ensemble.average_accuracy(f, 'valid'), 1)
  T.raises(function() ensemble.average(f, 'train') end, "no model has probabilities for 'train'")
end)

-- Streaming: the same batches as whole-file reads, whatever the block size
local FF = dofile('tests/lua/features_fixture.lua')
local ROWS = { train = 300, valid = 120, test = 50 }
local LAB = FF.labels(ROWS, 5, 3)
local P, Q = files.join(TMP, 'p.h5'), files.join(TMP, 'q.h5')
FF.write(P, { model = 'p', dim = 8, classes = 5, labels = LAB, seed = 1, probs = true, block = 70 })
FF.write(Q, { model = 'q', dim = 6, classes = 5, labels = LAB, seed = 2, probs = true, block = 70 })

T.test('top-5 of the classifier and of the averaged probabilities equal top_k_accuracy on the whole', function()
  local lab7 = FF.labels(ROWS, 7, 5)
  local P7, Q7 = files.join(TMP, 'p7.h5'), files.join(TMP, 'q7.h5')
  FF.write(P7, { model = 'p', dim = 8, classes = 7, labels = lab7, seed = 1, probs = true, block = 70 })
  FF.write(Q7, { model = 'q', dim = 7, classes = 7, labels = lab7, seed = 2, probs = true, block = 70 })
  local f <close> = ensemble.load({ P7, Q7 }, { block_rows = 37 })
  local clf = ensemble.fit(f, { epochs = 2, lr = 0.01, seed = 1, progress = false })
  local nn = require 'flower.nn'
  T.near(clf.val_top5, nn.top_k_accuracy(clf:predict(f, 'valid'), f.label.valid, 5), 1e-9)
  local acc, _, top5 = ensemble.average_accuracy(f, 'valid')
  local avg = ensemble.average(f, 'valid')
  T.near(acc, ensemble.accuracy(avg, f.label.valid), 1e-9)
  T.near(top5, nn.top_k_accuracy(avg, f.label.valid, 5), 1e-9)
  T.check(top5 > acc, 'top-5 above top-1')
end)

T.test('streaming statistics equal the whole columns\' mean and std', function()
  local f <close> = ensemble.load({ P, Q }, { resident = false, block_rows = 37 })
  T.check(not f.resident, 'streamed')
  local mean, std = ensemble.statistics(f, 'train')
  local x = f:x('train'):double()
  T.allclose(mean:double(), x:mean(1, true), 1e-6, 1e-6, 'mean')
  T.allclose(std:double(), x:std(1, true) + 1e-6, 1e-6, 1e-6, 'std (unbiased)')
end)

T.test('an epoch visits every row once, in an order drawn from (seed, epoch)', function()
  local f <close> = ensemble.load({ P, Q }, { resident = false, block_rows = 64 })
  local function rows(e, seed)
    local out = {}
    for b in ensemble.loader(f, 'train', { batch_size = 48, shuffle = true, seed = seed }):epoch(e) do
      for _, i in ipairs(b.index) do out[#out + 1] = i end
    end
    return out
  end
  local r1 = rows(1, 5)
  local seen = {}
  for _, i in ipairs(r1) do seen[i] = (seen[i] or 0) + 1 end
  T.eq(#r1, ROWS.train)
  for i = 1, ROWS.train do T.eq(seen[i], 1, 'row ' .. i) end
  T.eq(table.concat(rows(1, 5), ','), table.concat(r1, ','), 'same seed and epoch: same order')
  T.check(table.concat(rows(2, 5), ',') ~= table.concat(r1, ','), 'another epoch: another order')
end)

T.test('streamed and whole-file fits are bit-identical (blocks smaller than batches and not)', function()
  local function fit(resident, block)
    local f <close> = ensemble.load({ P, Q }, { resident = resident, block_rows = block })
    local clf = ensemble.fit(f, { epochs = 3, lr = 0.01, batch_size = 48, seed = 2, progress = false })
    return clf, clf:predict(f, 'test'), f.resident
  end
  -- the block size is part of the order (blocks are shuffled as units): both use the same
  for _, block in ipairs({ 37, 200 }) do
    local c1, p1, r1 = fit(true, block)
    T.check(r1, 'read whole')
    local c2, p2, r2 = fit(false, block)
    T.check(not r2, 'streamed')
    T.eq(c2.val_acc, c1.val_acc)
    T.eq((p2 - p1):abs():max():item(), 0, 'test probabilities, block ' .. block)
    T.same_weights(c1.model, c2.model)
  end
  -- the budget chooses: 14 columns x 470 rows x 4 bytes
  local f <close> = ensemble.load({ P, Q }, { memory_budget = 1000 })
  T.check(not f.resident, 'over the budget: streamed')
  local g <close> = ensemble.load({ P, Q }, { memory_budget = '1M' })
  T.check(g.resident, 'within the budget: read whole')
  T.raises(function() ensemble.load({ P, Q }, { memory_budget = 'lots' }) end, "expected a size such as 8G")
end)

T.test('an interrupted streamed fit resumes to the uninterrupted weights, bit for bit', function()
  local train = require 'flower.train'
  local function fit(dir, interrupt_at)
    local f <close> = ensemble.load({ P, Q }, { resident = false, block_rows = 37 })
    local o = { epochs = 3, lr = 0.01, batch_size = 48, seed = 4, progress = false, checkpoint_dir = dir, resume = true }
    if interrupt_at then
      -- an interrupt requested during epoch 2's first step: fit stops after it with a checkpoint
      local orig = ensemble.loader
      ensemble.loader = function(...)
        local l = orig(...)
        local epoch = l.epoch
        l.epoch = function(self, e)
          local it = epoch(self, e)
          local k = 0
          return function()
            k = k + 1
            if self.shuffle and e == interrupt_at and k == 2 then train.request_interrupt('test') end
            return it()
          end
        end
        return l
      end
      local ok, clf = pcall(ensemble.fit, f, o)
      ensemble.loader = orig
      if not ok then error(clf, 0) end
      return clf
    end
    return ensemble.fit(f, o)
  end
  local whole = fit(files.join(TMP, 'ck-whole'))
  local cut = fit(files.join(TMP, 'ck-cut'), 2)
  T.eq(cut.interrupted, 'test')
  local resumed = fit(files.join(TMP, 'ck-cut'))
  T.check(not resumed.interrupted, 'finished')
  T.same_weights(whole.model, resumed.model)
  T.eq(resumed.val_acc, whole.val_acc)
  T.eq(#resumed.history.rows, #whole.history.rows)
end)

-- Joins: rows paired from two sources must be the same rows
T.test('feature files with other ids, labels or row counts are refused, naming the first mismatch', function()
  local ids = { test = FF.ids('test', ROWS.test) }
  ids.test[7] = 'other'
  local R = files.join(TMP, 'r.h5')
  FF.write(R, { model = 'r', dim = 5, classes = 5, labels = LAB, seed = 3, ids = ids })
  T.raises(function() ensemble.load { P, R } end, "the 'test' ids: " .. P .. ' and ' .. R .. " disagree at row 7 of 50/50 ('7' vs 'other')")
  local lab2 = { train = LAB.train:clone(), valid = LAB.valid, test = LAB.test }
  lab2.train[9] = (lab2.train[9] + 1) % 5
  FF.write(R, { model = 'r', dim = 5, classes = 5, labels = lab2, seed = 3 })
  T.raises(function() ensemble.load { P, R } end, "different 'train' labels (first at row 9")
  -- a short file: fewer feature rows than the split's recorded count
  FF.write(R, { model = 'r', dim = 5, classes = 5, labels = LAB, seed = 3, rows = { train = 301 } })
  T.raises(function() ensemble.load { P, R } end, "'train_x' has 300 rows, expected 301")
  local short = { train = LAB.train:narrow(1, 1, 299), valid = LAB.valid, test = LAB.test }
  FF.write(R, { model = 'r', dim = 5, classes = 5, labels = short, seed = 3 })
  T.raises(function() ensemble.load { P, R } end, "has 299 'train' rows, " .. P .. " has 300")
end)

T.test('the pipeline checks the feature files against the data sets and test.json', function()
  local pipeline = require 'flower.pipeline'
  local f <close> = ensemble.load { P, Q }
  local function ds(n, prefix, labels)
    local d = { ids = {}, labels = labels and {} or nil }
    for i = 1, n do
      d.ids[i] = prefix and string.format('%s-%d', prefix, i) or i
      if labels then d.labels[i] = labels[i] + 1 end
    end
    return setmetatable(d, { __len = function(t) return #t.ids end })
  end
  local good = { train = ds(300, 'train', LAB.train:totable()), valid = ds(120, 'valid', LAB.valid:totable()), test = ds(50) }
  pipeline.check_features(f, good)
  -- test.json lists the images in another order: the silent wrong submission, now an error
  local other = ds(50)
  other.ids[3], other.ids[4] = 4, 3
  T.raises(function() pipeline.check_features(f, { train = good.train, valid = good.valid, test = other }) end,
    "the 'test' ids: the feature files and test.json disagree at row 3 of 50/50 ('3' vs '4')")
  -- a test.json with more images than the files: never fewer rows
  T.raises(function() pipeline.check_features(f, { train = good.train, valid = good.valid, test = ds(51) }) end,
    "disagree at row 51 of 50/51 (nothing vs '51')")
  local relabelled = ds(120, 'valid', LAB.valid:totable())
  relabelled.labels[5] = relabelled.labels[5] % 5 + 1
  T.raises(function() pipeline.check_features(f, { train = good.train, valid = relabelled }) end,
    "the 'valid' labels of the feature files and the data set disagree at row 5 (id valid-5)")
end)

F.rmdir(TMP)
T.done()
