-- flower.export: features in the seed's HDF5 layout, in a fixed order (row i = image i, labels
-- aligned), unreadable images as zero rows, interrupted exports resumed to the same file.
local T = require 'flower.test'
local flower = require 'flower'
local data = require 'flower.data'
local nets = require 'flower.smallnets'
local export = require 'flower.export'
local train = require 'flower.train'
local h5 = require 'flower.h5'
local files = require 'flower.files'
local F = dofile('tests/lua/exp_fixture.lua')

local root = F.flowers('export', 3, 8, 5)
local TMP = F.tmpdir()
local all = data.kaggle(root)
local tr, va = all:split { test_size = 0.25, seed = 42, stratify = true }
local te = data.kaggle_test(root)
local model = nets.build('vgg_tiny', { classes = all.num_classes, input_size = 32, width = 4, seed = 1 })

local function loader(ds) return data.Loader { ds, batch_size = 5, transform = 'eval', size = 32, workers = 2, warn = false } end
local function splits() return { { 'train', tr }, { 'valid', va }, { 'test', te } } end

-- the feature vector of image i alone (its own loader: no batching, no order to get wrong)
local fmodel = model:output_of('avg_pool')
fmodel:evaluate()
local function feature_of(ds, i)
  fmodel:evaluate() -- (the layers are shared with `model`, which export leaves in training mode)
  local l = loader(ds:subset({ i }))
  for b in l:epoch(1) do return fmodel:forward(b.x) end
end

local full
T.test('export writes the seed datasets with row i = image i and aligned labels', function()
  local r = export.features(model, { path = files.join(TMP, 'full.h5'), splits = splits(), loader = loader,
    attrs = { model = 'vgg_tiny', image_size = 32, preprocessing = 'tf' }, progress = false })
  T.eq(r.rows.train, #tr); T.eq(r.rows.valid, #va); T.eq(r.rows.test, #te)
  local f <close> = h5.open(r.path, 'r')
  for _, name in ipairs({ 'train_x', 'train_label', 'valid_x', 'valid_label', 'test', 'valid_probs', 'test_probs',
    'train_images', 'test_ids' }) do
    T.check(f:exists('/' .. name), 'missing dataset ' .. name)
  end
  local D = feature_of(tr, 1):size(2)
  T.eq(table.concat(f:shape('/train_x'), 'x'), #tr .. 'x' .. D)
  T.eq(table.concat(f:shape('/test'), 'x'), #te .. 'x' .. D)
  T.eq(f:attr('/', 'model'), 'vgg_tiny'); T.eq(f:attr('/', 'feature_dim'), D); T.eq(f:attr('/', 'label_base'), 0)
  T.eq(f:attr('/', 'train_complete'), 1); T.eq(f:attr('/', 'preprocessing'), 'tf')
  local tx, tl, timg = f:read('/train_x'), f:read('/train_label'):totable(), f:read('/train_images')
  for i = 1, #tr do
    T.allclose(tx:narrow(1, i, 1), feature_of(tr, i), 1e-5, 1e-6, 'train row ' .. i)
    T.eq(tl[i], tr.labels[i] - 1, 'label of row ' .. i)
    T.eq(files.join(root, timg[i]), tr.paths[i], 'image of row ' .. i)
  end
  local tst = f:read('/test')
  for i = 1, #te do T.allclose(tst:narrow(1, i, 1), feature_of(te, i), 1e-5, 1e-6, 'test row ' .. i) end
  -- probabilities are the model's softmax outputs for the same rows
  local vp = f:read('/valid_probs')
  model:evaluate()
  local l = loader(va)
  local outs = {}
  for b in l:epoch(1) do outs[#outs + 1] = model:forward(b.x):softmax(2) end
  T.allclose(vp, flower.cat(outs, 1), 1e-5, 1e-6)
  full = r.path
end)

T.test('export.read gives 1-based labels and everything in row order', function()
  local r = export.read(full)
  T.eq(r.label.train:size(1), #tr)
  T.eq(r.label.train[1], tr.labels[1]); T.eq(r.attrs.model, 'vgg_tiny')
  T.eq(#r.ids.test, #te); T.eq(r.ids.test[2], tostring(te.ids[2]))
end)

T.test('an interrupted export resumes to the same file contents', function()
  local path = files.join(TMP, 'resumed.h5')
  local batches = 0
  local function stopping_loader(ds)
    local l = loader(ds)
    return setmetatable({}, { __len = function() return #l end, __index = { epoch = function(_, e)
      local it = l:epoch(e)
      return function()
        local b = it()
        batches = batches + 1
        if batches == 2 then train.request_interrupt('test') end
        return b
      end
    end } })
  end
  local r1 = export.features(model, { path = path, splits = splits(), loader = stopping_loader, progress = false,
    attrs = { model = 'vgg_tiny' } })
  T.eq(r1.interrupted, 'test')
  do
    local f <close> = h5.open(path, 'r')
    T.eq(f:shape('/train_x')[1], 10, 'two batches of 5 written')
    T.eq(f:attr('/', 'train_complete'), 0)
  end
  T.raises(function() export.read(path) end, "split 'train' is incomplete (10 of 18 rows)")
  local r2 = export.features(model, { path = path, splits = splits(), loader = loader, progress = false, resume = true,
    attrs = { model = 'vgg_tiny' } })
  T.eq(r2.rows.train, #tr - 10)
  local a, b = export.read(full), export.read(path)
  for _, s in ipairs({ 'train', 'valid', 'test' }) do
    T.eq((a.x[s] - b.x[s]):abs():max():item(), 0, s .. ' features identical')
  end
  -- resuming a finished export writes nothing
  local r3 = export.features(model, { path = path, splits = splits(), loader = loader, progress = false, resume = true,
    attrs = { model = 'vgg_tiny' } })
  T.eq(r3.rows.train, 0)
  -- another image list is refused
  T.raises(function()
    export.features(model, { path = path, splits = { { 'train', va } }, loader = loader, progress = false, resume = true,
      attrs = { model = 'vgg_tiny' } })
  end, "lists other images for 'train'")
end)

T.test('an unreadable image becomes a zero row and the others stay aligned', function()
  local dir = files.join(TMP, 'bad')
  os.execute(string.format('cp -r %s %s', files.shell_quote(root), files.shell_quote(dir)))
  local ds = data.kaggle(dir)
  local sub = ds:subset({ 1, 2, 3, 4, 5, 6, 7 })
  files.write_atomic(sub.paths[3], 'not a jpeg')
  local r = export.features(model, { path = files.join(TMP, 'bad.h5'), splits = { { 'train', sub } }, loader = loader,
    progress = false, attrs = { model = 'vgg_tiny' } })
  T.eq(r.rows.train, 7)
  local e = export.read(r.path)
  T.eq(e.x.train:size(1), 7)
  T.eq(table.concat(e.missing.train, ','), '2')
  T.eq(e.x.train:narrow(1, 3, 1):abs():sum():item(), 0)
  for _, i in ipairs({ 1, 2, 4, 7 }) do T.allclose(e.x.train:narrow(1, i, 1), feature_of(sub, i), 1e-5, 1e-6, 'row ' .. i) end
end)

T.test('bad options are errors', function()
  T.raises(function() export.features(model, { splits = splits(), loader = loader }) end, 'expected options with path')
  T.raises(function() export.features(model, { path = 'x.h5', splits = {}, loader = loader }) end, 'expected splits')
  T.raises(function() export.features(model, { path = files.join(TMP, 'z.h5'), splits = { { 'extra', tr } }, loader = loader,
    progress = false }) end, "split names are train, valid and test, got 'extra'")
end)

T.test('valid_probs/test_probs hold the model\'s probabilities, whether it ends in logits or in a softmax', function()
  local nn = require 'flower.nn'
  local function probs_of(m, path)
    export.features(m, { path = path, splits = { { 'valid', va }, { 'test', te } }, loader = loader, layer = 'avg_pool',
      attrs = { model = 'p' }, progress = false })
    m:evaluate()
    local outs = {}
    for b in loader(te):epoch(1) do outs[#outs + 1] = m:forward(b.x) end
    return h5.read(path, '/test_probs'), flower.cat(outs, 1)
  end
  -- logits: the file holds softmax(logits)
  local logits = nets.build('vgg_tiny', { classes = all.num_classes, input_size = 32, width = 4, seed = 3 })
  T.check(not export.ends_in_softmax(logits), 'vgg_tiny ends in logits')
  local got, out = probs_of(logits, files.join(TMP, 'logits.h5'))
  T.allclose(got, out:softmax(2), 1e-5, 1e-7, 'softmax of the logits')
  -- the same network ending in Dense(softmax) (the recipe's Keras models) and in an Activation / Softmax layer:
  -- the file holds the model's output itself, not softmax(softmax(x))
  local feats = logits:output_of('avg_pool')
  for _, ending in ipairs({ 'dense', 'activation', 'softmax_layer' }) do
    local y = feats.outputs[1]
    if ending == 'dense' then
      y = nn.Dense { units = all.num_classes, activation = 'softmax', name = 'pred_' .. ending }(y)
    else
      y = nn.Dense { units = all.num_classes, name = 'pred_' .. ending }(y)
      y = ending == 'activation' and nn.Activation('softmax')(y) or nn.Softmax {}(y)
    end
    local m = nn.Model(feats.inputs[1], y)
    T.check(export.ends_in_softmax(m), ending .. ' ends in a softmax')
    local p, o = probs_of(m, files.join(TMP, ending .. '.h5'))
    T.allclose(p, o, 1e-6, 1e-7, ending .. ': the model\'s probabilities')
    T.allclose(p:sum(2), flower.ones(p:size(1)), 1e-5, 0, ending .. ': rows sum to 1')
    T.check((p - o:softmax(2)):abs():max():item() > 1e-3, ending .. ': differs from a second softmax')
  end
end)

F.rmdir(TMP)
T.done()
