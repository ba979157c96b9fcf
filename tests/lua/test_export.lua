-- flower.export: features in the seed's HDF5 layout, in a fixed order (row i = image i, labels
-- aligned), unreadable images left out (no row) and named, interrupted exports resumed to the same file.
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

T.test('an unreadable image has no row: rows, ids and labels are the decoded images, the skipped one is named', function()
  local dir = files.join(TMP, 'bad')
  os.execute(string.format('cp -r %s %s', files.shell_quote(root), files.shell_quote(dir)))
  local ds = data.kaggle(dir)
  local sub = ds:subset({ 1, 2, 3, 4, 5, 6, 7 })
  files.write_atomic(sub.paths[3], 'not a jpeg')
  os.remove(sub.paths[7])
  local r = export.features(model, { path = files.join(TMP, 'bad.h5'), splits = { { 'train', sub } }, loader = loader,
    progress = false, attrs = { model = 'vgg_tiny' } })
  T.eq(r.rows.train, 5)
  T.eq(#r.skipped.train, 2)
  T.eq(r.skipped.train[1].path, sub.paths[3])
  T.check(r.skipped.train[1].reason:find('not a JPEG', 1, true), r.skipped.train[1].reason)
  T.eq(r.skipped.train[2].path, sub.paths[7])
  local e = export.read(r.path)
  T.eq(e.x.train:size(1), 5)
  T.eq(#e.ids.train, 5)
  T.eq(e.label.train:size(1), 5)
  T.eq(table.concat(e.skipped.train, ','), files.join('train', sub.paths[3]:match('(category_%d+/[^/]+)$')) .. ','
    .. files.join('train', sub.paths[7]:match('(category_%d+/[^/]+)$')))
  -- every row is its image: join by id
  for j, i in ipairs({ 1, 2, 4, 5, 6 }) do
    T.eq(e.ids.train[j], tostring(sub.ids[i]))
    T.eq(e.label.train[j], sub.labels[i])
    T.allclose(e.x.train:narrow(1, j, 1), feature_of(sub, i), 1e-5, 1e-6, 'row ' .. j)
  end
  -- interrupted right after the batch that met the bad file, resumed: the same file contents
  local path2 = files.join(TMP, 'bad_resumed.h5')
  local function stop_after_first(ds2)
    local l = loader(ds2)
    return setmetatable({}, { __len = function() return #l end, __index = {
      skipped = function() return l:skipped() end,
      epoch = function(_, ep)
        local it, k = l:epoch(ep), 0
        return function()
          k = k + 1
          if k == 1 then train.request_interrupt('test') end
          return it()
        end
      end } })
  end
  T.eq(export.features(model, { path = path2, splits = { { 'train', sub } }, loader = stop_after_first, progress = false,
    attrs = { model = 'vgg_tiny' } }).interrupted, 'test')
  local r2 = export.features(model, { path = path2, splits = { { 'train', sub } }, loader = loader, progress = false,
    resume = true, attrs = { model = 'vgg_tiny' } })
  T.eq(r2.rows.train, 1)
  T.eq(#r2.skipped.train, 1)
  local e2 = export.read(path2)
  T.eq((e2.x.train - e.x.train):abs():max():item(), 0)
  T.eq(table.concat(e2.ids.train, ','), table.concat(e.ids.train, ','))
  T.eq(table.concat(e2.skipped.train, ','), table.concat(e.skipped.train, ','))
end)

T.test('a recipe run on a set with unreadable images leaves them out everywhere and names them (log, results.json, report)', function()
  local dir = files.join(TMP, 'badrun')
  os.execute(string.format('cp -r %s %s', files.shell_quote(root), files.shell_quote(dir)))
  os.remove(files.join(dir, 'sample_submission.csv'))   -- with a sample, a missing prediction is an error
  local ds = require('flower.pipeline').datasets{ data = dir }
  local bad = { ds.train.paths[2], ds.valid.paths[1], ds.test.paths[3] }
  files.write_atomic(bad[1], 'not a jpeg')
  files.write_atomic(bad[2], '\255\216')
  os.remove(bad[3])
  local quickstart = require('flower.recipe').load('experiments/quickstart.lua')
  local s = quickstart:call { '--tiny', '--data', dir, '--models', 'vgg_tiny', '--runs', files.join(TMP, 'runs'),
    '--run-name', 'bad' }
  local rd = files.join(TMP, 'runs', 'bad')
  local log = files.read(files.join(rd, 'log.txt'))
  local res = files.json_read(files.join(rd, 'results.json'))
  local html = files.read(files.join(rd, 'report.html'))
  T.eq(#res.skipped, 3)
  for _, p in ipairs(bad) do
    T.check(log:find('skipped unreadable image ' .. p, 1, true), 'log does not name ' .. p)
    T.check(html:find(p, 1, true), 'report does not name ' .. p)
  end
  T.check(html:find('Skipped images (3)', 1, true), 'report has no skipped section')
  -- the feature files hold no row for them, and predict.csv predicts only the readable test images
  local e = export.read(files.join(rd, 'features', 'vgg_tiny.h5'))
  T.eq(e.x.train:size(1), #ds.train - 1); T.eq(e.x.valid:size(1), #ds.valid - 1); T.eq(e.x.test:size(1), #ds.test - 1)
  T.eq(#e.skipped.test, 1)
  local pred = files.csv_read(files.join(rd, 'predict.csv'))
  T.eq(#pred, #ds.test)   -- header + the readable ones
  local listed = {}
  for i = 2, #pred do listed[pred[i][1]] = true end
  T.check(not listed[tostring(ds.test.ids[3])], 'the unreadable test image has a prediction')
  T.check(s.results ~= nil)
end)

T.test('an unreadable test image with a sample submission: a clear error, or the fallback the user chose', function()
  local dir = files.join(TMP, 'badtest')
  os.execute(string.format('cp -r %s %s', files.shell_quote(root), files.shell_quote(dir)))
  local ds = require('flower.pipeline').datasets{ data = dir }
  os.remove(ds.test.paths[2])
  local FL = os.getenv('FLOWERLUA') or './flowerlua'
  local args = ' experiments/quickstart.lua --tiny --models vgg_tiny --data ' .. dir .. ' --runs ' .. files.join(TMP, 'runs')
  local p = io.popen(FL .. args .. ' --run-name badtest 2>&1; echo "rc=$?"')
  local out = p:read('a'); p:close()
  T.check(out:find('1 test image(s) could not be read (first: id ' .. tostring(ds.test.ids[2]), 1, true)
    and out:find('--unreadable-test most-frequent', 1, true) and not out:find('traceback'), out)
  T.check(not out:find('rc=0', 1, true), 'exit status 0')
  p = io.popen(FL .. ' experiments/quickstart.lua --resume ' .. files.join(TMP, 'runs', 'badtest')
    .. ' --unreadable-test most-frequent 2>&1; echo "rc=$?"')
  out = p:read('a'); p:close()
  T.check(out:find('rc=0', 1, true), out)
  local rd = files.join(TMP, 'runs', 'badtest')
  local pred = files.csv_read(files.join(rd, 'predict.csv'))
  T.eq(#pred - 1, #ds.test, 'every test id has a row')
  local count = {}
  for _, l in ipairs(ds.train.labels) do count[l] = (count[l] or 0) + 1 end
  local best = 1
  for l = 2, ds.classes do if (count[l] or 0) > (count[best] or 0) then best = l end end
  for i = 2, #pred do
    if pred[i][1] == tostring(ds.test.ids[2]) then T.eq(pred[i][2], tostring(ds.all.categories[best])) end
  end
  T.eq(files.json_read(files.join(rd, 'results.json')).unreadable_test_predicted, 1)
  T.check(files.read(files.join(rd, 'report.html')):find('predicted as the most frequent training category', 1, true))
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

T.test('--tta: valid and test rows are the mean over the views (features and probabilities), train rows one view', function()
  local tta = require 'flower.tta'
  local spec = tta.parse('crops+flip')
  local L = tta.load_size(32, spec)
  local function tta_loader(ds, split)
    return data.Loader { ds, batch_size = 5, transform = 'eval', size = split == 'train' and 32 or L, workers = 2, warn = false }
  end
  local path = files.join(TMP, 'tta.h5')
  local r = export.features(model, { path = path, splits = splits(), loader = tta_loader, tta = 'crops+flip',
    attrs = { model = 'vgg_tiny', image_size = 32 }, progress = false })
  T.eq(r.rows.valid, #va)
  local f <close> = h5.open(path, 'r')
  T.eq(f:attr('/', 'tta'), 'crops+flip')
  local plain <close> = h5.open(full, 'r')
  T.allclose(f:read('/train_x'), plain:read('/train_x'), 1e-5, 1e-6, 'train: one view')
  -- by hand: the ten views of each image, one image at a time
  model:evaluate()
  fmodel:evaluate()
  for _, sp in ipairs({ { 'valid', va, '/valid_x' }, { 'test', te, '/test' } }) do
    local x, p = f:read(sp[3]), f:read('/' .. sp[1] .. '_probs')
    for i = 1, #sp[2] do
      local b = tta_loader(sp[2]:subset({ i }), sp[1]):epoch(1)()
      local fs = flower.zeros(1, x:size(2))
      for _, v in ipairs(tta.views(b.x, 32, spec)) do fs:add_(fmodel:forward(v)) end
      T.allclose(x:narrow(1, i, 1), fs:div_(spec.views), 1e-5, 1e-6, sp[1] .. ' features of row ' .. i)
      T.allclose(p:narrow(1, i, 1), tta.predict(model, b.x, 32, spec), 1e-5, 1e-6, sp[1] .. ' probabilities of row ' .. i)
    end
    local plain <close> = h5.open(full, 'r')
    T.check((x - plain:read(sp[3])):abs():max():item() > 1e-3, sp[1] .. ': the augmented rows differ from the plain ones')
  end
end)

T.test('--tta: a file written with another augmentation is exported again on resume, never mixed', function()
  local path = files.join(TMP, 'tta-resume.h5')
  T.sh('cp ' .. files.shell_quote(full) .. ' ' .. files.shell_quote(path))
  local tta = require 'flower.tta'
  local function tta_loader(ds, split)
    return data.Loader { ds, batch_size = 5, transform = 'eval', size = 32, workers = 2, warn = false }
  end
  local said, stderr = {}, io.stderr
  io.stderr = { write = function(_, ...) for _, v in ipairs({ ... }) do said[#said + 1] = v end end }
  local ok, err = pcall(export.features, model, { path = path, splits = splits(), loader = tta_loader, tta = tta.parse('flip'),
    resume = true, attrs = { model = 'vgg_tiny', image_size = 32 }, progress = false })
  io.stderr = stderr
  T.check(ok, err)
  T.check(table.concat(said):find("written with test-time augmentation 'none', this export asks for 'flip'", 1, true),
    table.concat(said))
  local f <close> = h5.open(path, 'r')
  T.eq(f:attr('/', 'tta'), 'flip')
  T.eq(f:shape('/valid_x')[1], #va)
  T.raises(function() export.features(model, { path = path, splits = splits(), loader = loader, tta = 'rotate' }) end,
    "unknown mode 'rotate'")
  T.raises(function() export.features(model, { path = path, splits = splits(), loader = loader, tta = 'flip' }) end,
    'tta needs the model input size')
end)

F.rmdir(TMP)
T.done()
