-- The seed's job at its real size (not in CI): a Kaggle-layout tree of 669,304 train+val and
-- 12,961 test images (hard links to 24 JPEGs, as ext4 allows 65,000 links to a file; 997 classes)
-- and four feature files of 535,443 / 133,861 / 12,961 rows x 2048 float32 (about 22 GB), then
-- timings with rows/s and peak resident
-- memory per stage: data.kaggle, the split, opening and checking the feature files (ids against the
-- split), one epoch of the streamed ensemble (statistics pass, training, validation), prediction;
-- the Keras peer (model.fit on an h5py-backed keras.utils.PyDataset) on the same files in the same
-- run; and `dd` read bandwidth (O_DIRECT) on one of the files.
--
--   nice ./flowerlua tests/bench/scale.lua [--dir /work/scale-bench] [--files 1] [--rows 0.05] [--keep]
--     --files F   size of the tree and the feature files as a fraction of the seed's (disk: 22 GB at 1)
--     --rows R    fraction of the train/valid rows the timed epoch uses (the rest of the files is
--                 there, read by nothing); rows/s and memory do not depend on it, the epoch's time
--                 is extrapolated from it
--     --keep      keep the generated files (default: delete them at the end)
--     --pipeline  then the pipeline's own ensemble stage (pipeline.ensemble: every join checked, one
--                 epoch over all the rows, streamed) to predict.csv in <dir>/run, its rows checked
local flower = require 'flower'
local files = require 'flower.files'
local memory = require 'flower.memory'
local data = require 'flower.data'
local ensemble = require 'flower.ensemble'
local FF = dofile('tests/lua/features_fixture.lua')

local opt = { dir = '/work/scale-bench', files = 1, rows = 0.05, keep = false, pipeline = false }
do
  local i = 1
  while i <= #arg do
    local k = arg[i]:match('^%-%-(.+)$')
    if k == 'keep' or k == 'pipeline' then opt[k] = true
    elseif k and opt[k] ~= nil then opt[k] = tonumber(arg[i + 1]) or arg[i + 1]; i = i + 1
    else error('scale.lua: unknown argument ' .. arg[i]) end
    i = i + 1
  end
end

local SEED = { images = 669304, test = 12961, classes = 997, dim = 2048 }
local n_images = math.floor(SEED.images * opt.files)
local n_test = math.floor(SEED.test * opt.files)
local PY = os.getenv('PYTHON') or '.venv/bin/python'
local rows = {}
local function row(stage, n, secs, peak, note)
  rows[#rows + 1] = { stage, n, secs, peak, note }
  print(string.format('%-40s %10s rows %8.1f s %12s rows/s   peak RSS %-10s %s', stage, n and tostring(n) or '-', secs,
    n and secs > 0 and string.format('%.0f', n / secs) or '-', peak and memory.format(peak) or '-', note or ''))
end
local function timed(stage, n, fn, note)
  collectgarbage('collect')
  flower.memory('release')
  memory.reset_peak()
  local t0 = files.now()
  local r = table.pack(fn())
  row(stage, n, files.now() - t0, memory.peak(), note)
  return table.unpack(r, 1, r.n)
end
local function sh(cmd)
  local p = io.popen(cmd .. ' 2>&1')
  local out = p:read('a')
  local ok = p:close()
  if not ok then error('scale.lua: ' .. cmd .. ' failed:\n' .. out) end
  return out
end

print(sh('df -h ' .. files.shell_quote(files.dirname(opt.dir))))
local need = (n_images + n_test) * SEED.dim * 4 * 4
print(string.format('feature files: %s; tree: %d + %d images, %d classes', memory.format(need), n_images, n_test, SEED.classes))
files.mkdir(opt.dir)
local root, fdir = files.join(opt.dir, 'data'), files.join(opt.dir, 'features')

-- the tree
if not files.exists(files.join(root, 'test.json')) then
  local src = files.join(opt.dir, 'jpegs')
  local t0 = files.now()
  sh(string.format('./flowerlua scripts/make_flowers.lua --classes 4 --train-per-class 6 --test 0 --min-size 64x48 '
    .. '--max-size 64x48 --quiet --out %s', files.shell_quote(src)))
  sh(string.format('mkdir -p %s/all && find %s/train -name "*.jpg" -exec cp {} %s/all/ \\;', src, src, src))
  sh(string.format('%s tests/bench/scale_peers.py tree %s %s/all %d %d %d', PY, files.shell_quote(root), src, n_images,
    n_test, SEED.classes))
  print(string.format('tree written in %.0f s', files.now() - t0))
end

local all = timed('data.kaggle (train.json)', n_images, function() return data.kaggle(root) end)
local tr, va = timed('split 80/20 (seed 42)', n_images, function() return all:split { test_size = 0.2, seed = 42 } end)
local te = timed('data.kaggle_test (test.json)', n_test, function() return data.kaggle_test(root) end)

-- the feature files: the split's ids and labels, 2048 columns each
local paths = {}
for i = 1, 4 do paths[i] = files.join(fdir, string.format('model%d.h5', i)) end
if not files.exists(paths[4]) then
  files.mkdir(fdir)
  local labels, ids = {}, {}
  for name, d in pairs({ train = tr, valid = va, test = te }) do
    ids[name] = {}
    for j = 1, #d do ids[name][j] = tostring(d.ids[j]) end
    if d.labels then
      local t = flower.empty({ #d }, 'int64')
      for j = 1, #d do t[j] = d.labels[j] - 1 end
      labels[name] = t
    end
  end
  labels.test = flower.zeros({ #te }, 'int64')
  local t0 = files.now()
  for i = 1, 4 do
    FF.write(paths[i], { model = 'model' .. i, dim = SEED.dim, classes = SEED.classes, labels = labels, ids = ids,
      seed = i, signal = 2, probs = true, block = 4096 })
    io.write(string.format('feature file %d of 4 written (%.0f s)\n', i, files.now() - t0)); io.flush()
  end
end
print(sh('du -sh ' .. files.shell_quote(fdir)))

local dd = sh(string.format('dd if=%s of=/dev/null bs=16M iflag=direct 2>&1 | tail -1', files.shell_quote(paths[1])))
print('dd (O_DIRECT) on ' .. paths[1] .. ': ' .. dd)

local feats = timed('open + check 4 feature files', #tr + #va + #te, function()
  local f = ensemble.load(paths)
  require('flower.pipeline').check_features(f, { train = tr, valid = va, test = te })
  return f
end)
print(string.format('features %s, budget %s: %s', memory.format(feats.bytes), memory.format(feats.budget),
  feats.resident and 'read whole' or 'streamed'))
-- the timed epoch: the first --rows of train and valid (a view of the feature set)
local n_tr, n_va = math.floor(#tr * opt.rows), math.floor(#va * opt.rows)
local view = setmetatable({ n = { train = n_tr, valid = n_va, test = feats.n.test } }, { __index = feats })
local mean, std = timed('statistics pass (train)', n_tr, function() return ensemble.statistics(view, 'train') end)
mean:free(); std:free()
-- the same pass from the disk (the files' pages dropped first, after an fsync: the pages of files
-- just written are dirty and would stay): without and with read-ahead advice
local function drop_pages()
  sh(string.format([[%s -c "import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)" %s]], PY,
    table.concat((function() local q = {} for i, p in ipairs(paths) do q[i] = files.shell_quote(p) end return q end)(), ' ')))
end
-- (2 GiB of rows or the split, streamed even where the files fit the budget, twice each
-- alternating: one short pass is mostly noise)
do
  local streamed <close> = ensemble.load(paths, { resident = false })
  local disk_rows = math.min(65536, #tr)
  local disk_view = setmetatable({ n = { train = disk_rows } }, { __index = streamed })
  for rep = 1, 2 do
    for _, pf in ipairs({ false, true }) do
      drop_pages()
      streamed.prefetching = pf
      mean, std = timed(string.format('statistics pass, from disk, %s (%d)', pf and 'prefetch' or 'no prefetch', rep),
        disk_rows, function() return ensemble.statistics(disk_view, 'train') end)
      mean:free(); std:free()
    end
  end
end
local clf
timed('ensemble.fit: 1 epoch + validation', n_tr, function()
  clf = ensemble.fit(view, { epochs = 1, batch_size = 64, seed = 1, progress = false })
end, '(statistics pass included)')
local h = clf.history.rows[1]
row('  of which training (train.fit)', n_tr, n_tr / h.images_per_s, nil, string.format('val acc %.4f', clf.val_acc))
local t_pred = files.now()
timed('predict test (streamed)', feats.n.test, function() return clf:predict(feats, 'test') end)
t_pred = files.now() - t_pred
timed('averaged probabilities (test)', feats.n.test, function() return ensemble.average(feats, 'test') end)
local train_rate = h.images_per_s
print(string.format('full-size epoch extrapolated: %.0f s of training (%d rows at %.0f rows/s)', #tr / train_rate, #tr, train_rate))
feats:close()

-- the Keras peer, same files, same rows
local out = sh(string.format('%s tests/bench/scale_peers.py keras %d %d 64 4096 1 %s', PY, n_tr, n_va,
  table.concat((function() local q = {} for i, p in ipairs(paths) do q[i] = files.shell_quote(p) end return q end)(), ' ')))
local k = files.json_decode(out:match('{.*}'), 'scale_peers.py keras')
row('keras: statistics pass', n_tr, k.stats_s, nil)
row('keras: model.fit 1 epoch', n_tr, k.epoch_s, k.peak_rss, string.format('val acc %.4f (peak of the whole process)', k.val_acc))
row('keras: predict test', feats.n.test, k.predict_s, nil)
print(string.format('ratios (ours / keras): training rows/s %.2f, predict rows/s %.2f',
  train_rate / k.epoch_rows_per_s, (feats.n.test / t_pred) / k.predict_rows_per_s))

-- the seed's job end to end: the pipeline's ensemble stage on the whole files, to predict.csv
if opt.pipeline then
  local pipeline = require 'flower.pipeline'
  local run_dir = files.join(opt.dir, 'run')
  sh('rm -rf ' .. files.shell_quote(run_dir))
  local run = require('flower.recipe').open_run { dir = run_dir }
  local cfg = { data = root, ensemble_epochs = 1, ensemble_lr = 1e-3, ensemble_dropout = 0.5, seed = 1 }
  local ds = timed('pipeline.datasets (train.json, test.json)', n_images + n_test,
    function() return pipeline.datasets(cfg) end)
  local ens = timed('pipeline.ensemble: 1 epoch to predict.csv', #ds.train, function()
    return pipeline.ensemble(cfg, run, ds, paths, {})
  end, '(check, statistics, training, validation, prediction)')
  local lines = 0
  for _ in io.lines(ens.predict) do lines = lines + 1 end
  if lines ~= #ds.test + 1 then error(string.format('scale.lua: %s has %d rows, expected %d', ens.predict, lines - 1, #ds.test)) end
  print(string.format('%s: %d rows; features %s (%d columns); validation accuracy %.4f', ens.predict, lines - 1,
    ens.resident and 'read whole' or 'streamed', ens.D, ens.classifier.val_acc))
  for _, t in ipairs(run.timing) do
    row('  ' .. t.stage, t.images, t.seconds, nil)
  end
  for _, m in ipairs(run.memory or {}) do print(string.format('  peak RSS %-30s %s', m.stage, memory.format(m.peak))) end
end

if not opt.keep then
  sh('rm -rf ' .. files.shell_quote(opt.dir))
  print('removed ' .. opt.dir)
end
