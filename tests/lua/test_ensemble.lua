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

F.rmdir(TMP)
T.done()
