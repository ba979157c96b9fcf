-- The quickstart recipe beside the same recipe in real Keras (tf-keras on TensorFlow CPU), on the
-- same synthetic data, split, models, schedule and ensemble: seconds per epoch of each stage,
-- feature-export throughput, validation accuracies, and prediction throughput with and without
-- test-time augmentation from the first model's saved model.h5 (tests/bench/predict.lua, beside
-- Keras's model.predict on the same file), printed as tables with ratios.
--
--   ./flowerlua tests/bench/recipe.lua [any quickstart option, e.g. --epochs 4 --models vgg_tiny]
--
-- Ours runs experiments/quickstart.lua itself (its run directory lands in build/bench-runs/). The
-- Keras side (tests/bench/recipe_keras.py) decodes every image once into memory and trains from
-- there; ours decodes in the loader's threads every epoch, inside the timed epoch. Times are
-- training only (validation excluded) on both sides, the fastest epoch of each stage (the machine
-- is shared; the fastest epoch is the least disturbed). PYTHON overrides .venv/bin/python.
local recipe = require 'flower.recipe'
local files = require 'flower.files'
local pipeline = require 'flower.pipeline'

local PY = os.getenv('PYTHON') or '.venv/bin/python'
local BUILD = os.getenv('BUILD') or 'build'

local argv = { '--runs', files.join(BUILD, 'bench-runs'), '--data', files.join(BUILD, 'bench-recipe-data') }
for _, a in ipairs(arg) do argv[#argv + 1] = a end

local quickstart = recipe.load('experiments/quickstart.lua')
local summary = quickstart:call(argv)
local cfg = quickstart:config(argv)
local run_dir = summary.dir
local results = files.json_read(files.join(run_dir, 'results.json'))

-- the same split for Keras
local ds = pipeline.datasets(cfg)
local function items(d)
  local t = {}
  for i, p in ipairs(d.paths) do t[i] = { p, d.labels[i] - 1 } end
  return t
end
local stages = pipeline.stages(cfg, cfg.models[1])
local spec = { train = items(ds.train), valid = items(ds.valid), classes = ds.classes, size = cfg.size, width = cfg.width,
  models = cfg.models, stages = stages, batch_size = cfg.batch_size, ensemble_epochs = cfg.ensemble_epochs,
  ensemble_lr = cfg.ensemble_lr, ensemble_dropout = cfg.ensemble_dropout, threads = 2, seed = cfg.seed }
local spec_path, out_path = files.join(run_dir, 'keras_spec.json'), files.join(run_dir, 'keras_results.json')
files.json_write(spec_path, spec)
io.stdout:write('running the Keras peer ...\n')
io.stdout:flush()
local ok = os.execute(string.format('%s tests/bench/recipe_keras.py %s %s 2>%s', PY, files.shell_quote(spec_path),
  files.shell_quote(out_path), files.shell_quote(files.join(run_dir, 'keras.log'))))
if not ok then error('recipe bench: the Keras peer failed; see ' .. files.join(run_dir, 'keras.log'), 0) end
local keras = files.json_read(out_path)

-- ours: training seconds per epoch of each model's stage, from the history
local ours = {}
for _, m in ipairs(summary.finetuned) do
  local per = {}
  for _, r in ipairs(m.history.rows) do
    local s = per[r.stage] or { best = math.huge, n = 0 }
    if r.images_per_s and r.images_per_s > 0 then s.best, s.n = math.min(s.best, #ds.train / r.images_per_s), s.n + 1 end
    per[r.stage] = s
  end
  ours[m.name] = { per = per, val_acc = m.val_acc }
end
local export_rate = {}
for _, t in ipairs(results.timing) do
  local name = t.stage:match('^(.-): feature export$')
  if name and t.seconds > 0 then export_rate[name] = t.images / t.seconds end
end

local function ratio(a, b) return (a and b and a > 0) and string.format('%.2fx', b / a) or '-' end
local lines = {}
local function row(...) lines[#lines + 1] = string.format('%-40s %12s %12s %10s', ...) end
row('', 'flowerlua', 'Keras', 'speed (Keras = 1)')
for _, name in ipairs(cfg.models) do
  local o, k = ours[name], keras.models[name]
  for i, st in ipairs(stages) do
    local os_ = o.per[i] and o.per[i].n > 0 and o.per[i].best or nil
    local ks = k and k.stages[i] and k.stages[i].seconds_per_epoch
    row(string.format('%s stage %d (%s), s/epoch', name, i, st.train), os_ and string.format('%.2f', os_) or '-',
      ks and string.format('%.2f', ks) or '-', ratio(os_, ks))
  end
  local oe, ke = export_rate[name], k and k.export_images_per_s
  row(name .. ' feature export, images/s', oe and string.format('%.1f', oe) or '-', ke and string.format('%.1f', ke) or '-',
    (oe and ke) and string.format('%.2fx', oe / ke) or '-')
  row(name .. ' validation accuracy', string.format('%.4f', o.val_acc), k and string.format('%.4f', k.val_acc) or '-', '')
end
local ens
for _, r in ipairs(summary.results) do if r.name == 'ensemble: concatenated features' then ens = r end end
row('ensemble validation accuracy', string.format('%.4f', ens.val_acc), string.format('%.4f', keras.ensemble.val_acc), '')
print()
print(string.format('recipe benchmark: %d classes, %d train / %d valid images at %dx%d, batch %d; Keras %s, TensorFlow %s',
  ds.classes, #ds.train, #ds.valid, cfg.size, cfg.size, cfg.batch_size, keras.keras, keras.tensorflow))
print(table.concat(lines, '\n'))
print(string.format('(Keras decoded every image once in %.1f s before training; flowerlua decodes inside each epoch)', keras.load_seconds))

-- prediction from the first fine-tuned model's whole-model file, on the test images
PREDICT_BENCH_LIB = true
local predict_bench = dofile('tests/bench/predict.lua')
local first = cfg.models[1]
local _, plines, psize = predict_bench(files.join(run_dir, 'models', first, 'model.h5'), ds.test.paths, 2, cfg.batch_size)
print(string.format('\npredict with %s (models/%s/model.h5), %d test images at %d', first, first, #ds.test.paths, psize))
print(string.format('%-12s %12s %12s %8s %10s', 'tta', 'ours img/s', 'keras img/s', 'ratio', 'top-1 agree'))
print(table.concat(plines, '\n'))
