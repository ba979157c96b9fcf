-- flower.pipeline: the seed's whole pipeline as one function, shared by the recipes in experiments/:
--   data (Kaggle layout, seeded 80/20 split) -> for each model: freeze/unfreeze stages, final weights,
--   validation numbers, a submission straight from the model -> feature export -> ensemble
--   (concatenated features + Dropout/Dense, and averaged probabilities) -> predict.csv -> report.html
--
--   pipeline.run(cfg, run, {
--     build = function(name, classes, cfg) -> model        -- with model.feature_layer, model.head
--     size = function(name, cfg) -> input size (pixels)
--     loss = function(name) -> 'logits' | 'categorical_crossentropy'
--     describe = function(name, cfg) -> {weights = path or nil, preprocessing = 'tf'}
--   })
-- cfg (resolved recipe config): data, models (list), stages (list of {epochs, train, lr}, where a
-- string value names a config key, e.g. epochs = 'epochs'), batch_size, workers, seed, augment, crop_scale,
-- ensemble_epochs, ensemble_lr, ensemble_dropout, ensemble_patience (0: no early stopping),
-- ensemble_restore_best, topk (k > 1: predict-top<k>.csv files beside the submissions),
-- keep_checkpoints ('resume': a model's stage checkpoints go once its model.h5 and finished.json
-- are written, which is all --resume needs of a finished model; 'all': kept), split_seed,
-- valid_fraction, resume, device
-- ('cpu', 'cuda', 'cuda:<n>' or 'auto': where fine-tuning, export, evaluation and the ensemble run;
-- with a GPU the loaders hand out page-locked batches, uploaded while the next ones decode),
-- mixed_precision ('float32' or 'bfloat16': how the fine-tuned models train, evaluate and export;
-- their weights stay float32; the ensemble's small classifier stays float32), memory_budget (bytes or
-- '8G': the ensemble reads the feature files whole when they fit, else streams them; default half
-- of RAM). Each stage logs its peak resident memory ('memory: <stage>: peak resident ...'), and
-- report.html lists them.
-- Returns a summary {results = {{name, val_acc}...}, best = name, predict = path}. An interrupt
-- (Ctrl-C, SIGTERM) during training or export writes checkpoints and returns {interrupted = why}.
local flower = require 'flower'
local files = require 'flower.files'
local train = require 'flower.train'

local pipeline = {}

-- dist: under several ranks (flower.dist) every rank runs the pipeline's collectives (training,
-- evaluation and export split across ranks); only rank 0 writes files
local function writes() return flower.dist.is_main() end
-- --no-distributed turns it off; otherwise it is on exactly when launched as several ranks
local function dist_opt(cfg) if cfg.distributed == false then return false end return nil end

local function recipe_copy(t)
  if type(t) ~= 'table' then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = recipe_copy(v) end
  return c
end

local function resolve(v, cfg)
  if type(v) == 'string' and cfg[v] ~= nil then return cfg[v] end
  return v
end

-- stages from the config with option references resolved; a stage's `train` may be a table
-- {<model name> = spec, default = spec} when layer names differ between models ('from:<layer>')
function pipeline.stages(cfg, model)
  local out = {}
  for i, st in ipairs(cfg.stages or {}) do
    local s = {}
    for k, v in pairs(st) do s[k] = resolve(v, cfg) end
    if type(s.train) == 'table' then s.train = s.train[model] or s.train.default or 'all' end
    if math.type(s.epochs) ~= 'integer' then
      error(string.format('pipeline: stage %d: epochs must be an integer, got %s', i, tostring(s.epochs)), 2)
    end
    out[i] = s
  end
  return out
end

-- Data sets: train/valid from train.json by the seed's split (scikit-learn's train_test_split(
-- test_size=0.2, random_state=42), unstratified; cfg.stratify = true: its stratified split), test
-- from test.json if present.
function pipeline.datasets(cfg)
  local data = require 'flower.data'
  local all = data.kaggle(cfg.data)
  local tr, va = all:split { test_size = cfg.valid_fraction or 0.2, seed = cfg.split_seed or 42,
                            stratify = cfg.stratify == true }
  local te
  if files.exists(files.join(cfg.data, 'test.json')) then te = data.kaggle_test(cfg.data) end
  -- class names: "<category id> (<name>)" where train.json's categories name them
  local names = {}
  for i, c in ipairs(all.categories or {}) do
    local name = all.category_info and all.category_info[i].name
    names[i] = name and string.format('%s (%s)', tostring(c), name) or tostring(c)
  end
  return { all = all, train = tr, valid = va, test = te, classes = all.num_classes, names = names }
end

-- The CUDA device of cfg.device (nil: the host); raises at once when it is not there.
function pipeline.device(cfg)
  return require('flower.device').resolve(cfg.device, 'pipeline: --device')
end

local function train_loader(cfg, ds, size)
  local data = require 'flower.data'
  -- augment: horizontal flips, and with crop_scale > 0 Inception-style random crops covering
  -- crop_scale..1 of the image; without augment the validation transform (a centre crop)
  local tf
  if cfg.augment == false then tf = { mode = 'center', size = size }
  elseif (cfg.crop_scale or 0) > 0 then tf = { mode = 'random_resized', size = size, scale = { cfg.crop_scale, 1 }, flip = true }
  else tf = { mode = 'center', size = size, flip = true } end
  return data.Loader { ds, batch_size = cfg.batch_size, shuffle = true, seed = cfg.seed, workers = cfg.workers,
                       transform = tf, size = size, drop_last = false, pin_memory = pipeline.device(cfg) ~= nil }
end

local function eval_loader(cfg, ds, size)
  local data = require 'flower.data'
  return data.Loader { ds, batch_size = cfg.eval_batch_size or cfg.batch_size * 2, shuffle = false,
                       workers = cfg.workers, transform = 'eval', size = size, pin_memory = pipeline.device(cfg) ~= nil }
end
pipeline.eval_loader = eval_loader

-- The submission for predictions whose row i is image row_ids[i]: category ids from labels, the
-- sample's order if any; with k > 1 the k best categories per image go to predict-...-top<k>.csv
-- beside it. (Rows are the images that could be read: an unreadable one has no row.)
-- Test images that could not be read have no prediction. With --unreadable-test most-frequent they
-- are predicted as the training set's most frequent categories (the k most frequent for top-k),
-- and the log, results.json and the report say how many; by default (omit) they have no row, which
-- a sample submission (every id must have one) turns into an error saying what to do.
local function fallback_rows(cfg, ds, ids, k, sample)
  local have, missing = {}, {}
  for _, id in ipairs(ids) do have[id] = true end
  for _, id in ipairs(ds.test.ids) do
    if not have[tostring(id)] then missing[#missing + 1] = tostring(id) end
  end
  if #missing == 0 or (cfg.unreadable_test ~= 'most-frequent' and not sample) then return {}, {} end
  if cfg.unreadable_test ~= 'most-frequent' then
    require('flower.recipe').fail('%d test image(s) could not be read (first: id %s; the log names each file), so the '
      .. 'submission would lack rows that %s asks for. Rerun with --resume RUNDIR --unreadable-test most-frequent to '
      .. 'predict them as the most frequent training category.', #missing, missing[1], sample)
  end
  local count = {}
  for _, l in ipairs(ds.train.labels) do count[l] = (count[l] or 0) + 1 end
  local order = {}
  for l = 1, ds.classes do order[l] = l end
  table.sort(order, function(a, b)
    if (count[a] or 0) ~= (count[b] or 0) then return (count[a] or 0) > (count[b] or 0) end
    return a < b
  end)
  local top = {}
  for j = 1, math.min(k or 1, #order) do top[j] = ds.all.categories[order[j]] end
  return missing, top
end

-- The submission for predictions whose row i is image row_ids[i]: category ids from labels, the
-- sample's order if any; with k > 1 the k best categories per image go to predict-...-top<k>.csv
-- beside it. (Rows are the images that could be read; see fallback_rows for the others.) Returns
-- the path, the predictions and ids (read images only) and the number of fallback rows.
local function write_submission(cfg, ds, path, row_ids, probs, k)
  local predict = require 'flower.predict'
  local categories = ds.all.categories
  local top = probs:argmax(2):view(-1):totable()
  if #row_ids ~= #top then
    error(string.format('pipeline: %s: %d predictions for %d ids', path, #top, #row_ids), 0)
  end
  local pred, ids = {}, {}
  for i, l in ipairs(top) do pred[i] = categories[l]; ids[i] = tostring(row_ids[i]) end
  local sample = files.join(cfg.data, 'sample_submission.csv')
  sample = files.exists(sample) and sample or nil
  local missing, fallback = fallback_rows(cfg, ds, ids, k, sample)
  local all_ids, all_pred = ids, pred
  if #missing > 0 then
    all_ids, all_pred = { table.unpack(ids) }, { table.unpack(pred) }
    for _, id in ipairs(missing) do all_ids[#all_ids + 1] = id; all_pred[#all_pred + 1] = fallback[1] end
  end
  if writes() then predict.write_csv(path, { ids = all_ids, predicted = all_pred, sample = sample }) end
  if k and k > 1 then
    local topk = {}
    for i, t in ipairs(predict.topk_rows(probs, k)) do
      local r = {}
      for j, l in ipairs(t) do r[j] = categories[l] end
      topk[i] = r
    end
    for i = #ids + 1, #all_ids do topk[i] = fallback end
    if writes() then predict.write_topk(predict.topk_path(path, k), { ids = all_ids, topk = topk, sample = sample }) end
  end
  return path, pred, ids, #missing
end

-- Accuracy of a submission against the synthetic set's answer key (test_labels.csv), if present.
local function score_submission(cfg, ids, pred)
  local key = files.join(cfg.data, 'test_labels.csv')
  if not files.exists(key) then return nil end
  local want = {}
  for i, r in ipairs(files.csv_read(key)) do if i > 1 then want[r[1]] = r[2] end end
  local right, n = 0, 0
  for i, id in ipairs(ids) do
    if want[id] ~= nil then
      n = n + 1
      if tostring(pred[i]) == want[id] then right = right + 1 end
    end
  end
  return n > 0 and right / n or nil
end
pipeline.score_submission = score_submission

-- The fine-tuned model as a whole-model Keras file (flower.keras.save_model), with what prediction
-- needs in its metadata: the category id and name of each output, the input size, the model.
local function save_model(model, path, ds, name, size)
  local names
  if ds.all.category_info then
    names = {}
    for i, c in ipairs(ds.all.categories) do names[i] = ds.all.category_info[i].name or tostring(c) end
  end
  require('flower.keras').save_model(model, path, { metadata = { model = name, image_size = size,
    classes = ds.all.categories, class_names = names } })
end

-- Records the images a loader (or an export) could not read on the run, once per file: a log line
-- each, and run.skipped = {{path, reason, stage}} for results.json and the report.
local function record_skipped(run, stage, list)
  run.skipped = run.skipped or {}
  run._skipped_seen = run._skipped_seen or {}
  for _, sk in ipairs(list or {}) do
    if not run._skipped_seen[sk.path] then
      run._skipped_seen[sk.path] = true
      run.skipped[#run.skipped + 1] = { path = sk.path, reason = sk.reason, stage = stage }
      run:log('%s: skipped unreadable image %s: %s', stage, sk.path, sk.reason)
    end
  end
end
pipeline.record_skipped = record_skipped

-- Removes a finished model's stage checkpoints (stage<i>/last.h5 and best.h5, then the folders):
-- model.h5 and finished.json hold all that --resume needs of it.
local function drop_checkpoints(dir, nstages)
  for i = 1, nstages do
    local sd = files.join(dir, 'stage' .. i)
    os.remove(files.join(sd, 'last.h5'))
    os.remove(files.join(sd, 'best.h5'))
    os.remove(sd)
  end
  os.remove(dir)
end

-- Fine-tunes one model through the stages; returns its summary. A model whose finished.json is
-- there (a resumed run) is rebuilt from its model.h5 instead of walking its stages' checkpoints.
function pipeline.finetune(cfg, run, ds, spec, name)
  local dev = pipeline.device(cfg)
  local size = spec.size(name, cfg)
  local model = spec.build(name, ds.classes, cfg)
  local dir = run:path('models', name)
  files.mkdir(dir)
  local tl, vl = train_loader(cfg, ds.train, size), eval_loader(cfg, ds.valid, size)
  local loss = spec.loss and spec.loss(name) or 'logits'
  local total = model:count_params()
  run:log('%s: %d parameters, input %dx%d, %d train / %d valid images%s', name, total, size, size, #ds.train,
    #ds.valid, cfg.mixed_precision == 'bfloat16' and ', bfloat16 mixed precision' or '')
  local finished = files.join(dir, 'finished.json')
  local weights = files.join(dir, 'model.h5')
  local stages = pipeline.stages(cfg, name)
  local hist
  if cfg.resume ~= nil and files.exists(finished) and files.exists(weights) then
    require('flower.keras').load_weights(model, weights)
    train.run_device(model, dev or 'cpu', 'pipeline')
    if cfg.mixed_precision == 'bfloat16' then model:mixed_precision('bfloat16') end
    local f = files.json_read(finished)
    hist = { rows = f.history or {}, stopped = f.stopped }
    run:log('%s: already finished (%s); weights from %s', name, finished, weights)
  else
    hist = pipeline.fit(cfg, run, model, stages, tl, vl, loss, name, dev)
    record_skipped(run, name .. ' train', tl:skipped())
    if hist.stopped == 'interrupted' then return { interrupted = hist.interrupted } end
    if writes() then
      save_model(model, weights, ds, name, size)
      files.json_write(finished, { history = hist.rows, stopped = hist.stopped })
      if cfg.keep_checkpoints ~= 'all' then drop_checkpoints(files.join(dir, 'checkpoints'), #stages) end
    end
    files.killpoint('pipeline.model_finished')
  end
  return pipeline.evaluate(cfg, run, ds, name, model, size, hist, vl, loss)
end

-- The freeze/unfreeze stages of one model (train.fit_stages with the recipe's schedule).
function pipeline.fit(cfg, run, model, stages, tl, vl, loss, name, dev)
  local dir = run:path('models', name)
  return train.fit_stages(model, stages, {
    train = tl, valid = vl, loss = loss, label = name, log = function(m) run:log('%s', m) end,
    checkpoint_dir = files.join(dir, 'checkpoints'), resume = cfg.resume ~= nil, device = dev or 'cpu',
    mixed_precision = cfg.mixed_precision, distributed = dist_opt(cfg),
    history_csv = files.join(dir, 'history.csv'), save_best = false,
    metrics = pipeline.topk_metrics(model.outputs[1].shape[1]),
    -- a stage with schedule = 'cosine' decays its learning rate to 0 over its epochs; the live
    -- report follows every epoch, and TensorBoard with --tensorboard
    callbacks = function(st)
      local cbs = { { on_epoch_end = function(_, _, _, logs) pipeline.live_report(cfg, run, name, logs) end } }
      if st.schedule == 'cosine' then
        local optim = require 'flower.optim'
        cbs[#cbs + 1] = train.LearningRateScheduler(optim.cosine { lr = st.lr or cfg.lr, decay_steps = math.max(1, st.epochs) })
      end
      if (cfg.tensorboard or '') ~= '' and writes() then   -- dist: rank 0's event files
        cbs[#cbs + 1] = require('flower.tensorboard').callback { log_dir = files.join(cfg.tensorboard, name) }
      end
      return cbs
    end,
    make_optimizer = function(st)
      local optim = require 'flower.optim'
      return optim.Adam { lr = st.lr or cfg.lr }
    end,
  })
end

-- The top-k accuracy the run follows besides accuracy: top-5 when there are more than 5 classes.
function pipeline.topk_metrics(K) return K > 5 and { 'top5' } or {} end

-- report.html rewritten (atomically) after every epoch while models train: the finished models'
-- curves and the one training now, so a browser refresh shows the run's progress.
function pipeline.live_report(cfg, run, name, logs)
  if not writes() then return end   -- dist: rank 0's report
  run._live = run._live or {}
  local live = run._live
  if not live[name] then live[#live + 1] = name; live[name] = {} end
  local rows = live[name]
  rows[#rows + 1] = logs
  local models = {}
  for i, n in ipairs(live) do models[i] = { name = n, history = live[n] } end
  require('flower.report').write(run:path('report.html'), {
    title = string.format('%s — %s (running)', run.name, cfg.data),
    subtitle = string.format('%s: %s epoch %d, %.0f s so far; the final report replaces this page', os.date('%Y-%m-%d %H:%M'),
      name, logs.epoch or #rows, files.now() - run.started),
    models = models, timing = run.timing,
  })
end

-- Validation (and test) probabilities of a fine-tuned model with test-time augmentation:
-- {acc, probs, index} over the loader of ds decoded for the TTA's views.
local function evaluate_tta(cfg, model, ds, size, dev)
  local tta = require 'flower.tta'
  local spec = tta.parse(cfg.tta)
  local loader = eval_loader(cfg, ds, tta.load_size(size, spec))
  local parts, index, correct, n = {}, {}, 0, 0
  for b in loader:epoch(1) do
    local p = tta.predict(model, train.batch_to_device(b, dev).x, size, spec):cpu()
    parts[#parts + 1] = p
    for _, k in ipairs(b.index) do index[#index + 1] = k end
    if b.y then
      local pred = p:argmax(2):view(-1):totable()
      for i, y in ipairs(b.y:totable()) do if pred[i] == y then correct = correct + 1 end end
      n = n + #pred
    end
  end
  return { acc = n > 0 and correct / n or nil, probs = flower.cat(parts, 1), index = index, skipped = loader:skipped() }
end

-- Validation numbers, confusion matrix and a submission straight from a fine-tuned model.
function pipeline.evaluate(cfg, run, ds, name, model, size, hist, vl, loss)
  local report = require 'flower.report'
  local ks = {}
  for _, m in ipairs(pipeline.topk_metrics(ds.classes)) do ks[#ks + 1] = tonumber(m:match('%d+')) end
  local ev = train.evaluate(model, vl, { loss = loss, collect = true, softmax = loss == 'logits', progress = false,
                                         topk = ks, distributed = dist_opt(cfg) })
  record_skipped(run, name .. ' valid', vl:skipped())
  local dev = pipeline.device(cfg)
  local use_tta = (cfg.tta or 'none') ~= 'none'
  local vt = use_tta and evaluate_tta(cfg, model, ds.valid, size, dev) or nil
  local conf = report.confusion(ev.labels, ev.pred, ds.classes)
  local out = { name = name, model = model, size = size, history = hist, val_acc = ev.acc, val_loss = ev.loss,
                val_topk = ev.top[5], val_acc_tta = vt and vt.acc, confusion = conf, loss = loss }
  -- timing per stage from the history (training throughput; validation excluded)
  local per = {}
  for _, r in ipairs(hist.rows) do
    local s = per[r.stage] or { images = 0, seconds = 0 }
    if r.images_per_s and r.images_per_s > 0 then
      s.images = s.images + #ds.train
      s.seconds = s.seconds + #ds.train / r.images_per_s
    end
    per[r.stage] = s
  end
  for i, st in ipairs(pipeline.stages(cfg, name)) do
    if per[i] then run:time(string.format('%s: stage %d (%s), training', name, i, st.train or 'all'), per[i].images, per[i].seconds) end
  end
  if ds.test then
    local t0 = files.now()
    local et
    if use_tta then
      et = evaluate_tta(cfg, model, ds.test, size, dev)
      record_skipped(run, name .. ' test', et.skipped)
    else
      local tel = eval_loader(cfg, ds.test, size)
      et = train.evaluate(model, tel, { loss = loss, collect = true, softmax = loss == 'logits', progress = false,
                                              distributed = dist_opt(cfg) })
      record_skipped(run, name .. ' test', tel:skipped())
    end
    local row_ids = {}
    for i, k in ipairs(et.index) do row_ids[i] = ds.test.ids[k] end
    local path, pred, ids, fb = write_submission(cfg, ds, run:path('predict-' .. name .. '.csv'), row_ids, et.probs, cfg.topk)
    run.fallback_rows = fb
    out.test_acc = score_submission(cfg, ids, pred)
    out.predict = path
    run:time(name .. ': predict test', #ds.test, files.now() - t0)
  end
  run:log('%s: validation accuracy %.4f%s, loss %.4f%s', name, ev.acc,
    vt and string.format(' (%.4f with %s test-time augmentation)', vt.acc, cfg.tta) or '', ev.loss,
    out.test_acc and string.format(', test accuracy %.4f (answer key)', out.test_acc) or '')
  return out
end

-- Exports a fine-tuned model's features for train, valid and test.
function pipeline.export(cfg, run, ds, spec, m)
  local export = require 'flower.export'
  local desc = spec.describe and spec.describe(m.name, cfg) or {}
  local splits = { { 'train', ds.train }, { 'valid', ds.valid } }
  if ds.test then splits[#splits + 1] = { 'test', ds.test } end
  local path = run:path('features', m.name .. '.h5')
  -- --tta: valid and test features (and probabilities) are the mean over the views, so the
  -- ensemble's validation, averaged probabilities and predict.csv are test-time augmented too
  local tta = require 'flower.tta'
  local spec = tta.parse(cfg.tta)
  local r = export.features(m.model, { path = path, splits = splits, resume = cfg.resume ~= nil, distributed = dist_opt(cfg),
    tta = spec, size = m.size,
    loader = function(d, split) return eval_loader(cfg, d, split == 'train' and m.size or tta.load_size(m.size, spec)) end,
    attrs = { model = m.name, image_size = m.size, preprocessing = desc.preprocessing or '',
              weights = desc.weights or run:path('models', m.name, 'model.h5') } })
  for _, sp in ipairs(splits) do record_skipped(run, m.name .. ' export ' .. sp[1], r.skipped[sp[1]]) end
  if r.interrupted then return nil, r.interrupted end
  run:time(m.name .. ': feature export', r.images, r.seconds)
  run:log('%s: features exported to %s (%d images, %.1f images/s)', m.name, path, r.images or 0, r.images_per_s or 0)
  return path
end

-- Checks that the feature files describe the pipeline's data sets row for row: row j is the image
-- the files say (its position in the data set, where recorded: unreadable images have no row), with
-- the data set's id and label, for train, valid and test. A mismatch (files exported against another
-- split or another test.json, or a short file) stops with the first row that differs.
function pipeline.check_features(feats, ds)
  local ensemble = require 'flower.ensemble'
  for _, split in ipairs({ 'train', 'valid', 'test' }) do
    local d = ds[split]
    if d then
      if not feats.n[split] then
        error(string.format("pipeline: the feature files have no '%s' split but the data set has %d images", split, #d), 0)
      end
      local index = feats.index and feats.index[split] and feats.index[split]:totable()
      local requested = feats.requested and feats.requested[split]
      if index and requested ~= #d then
        error(string.format("pipeline: the feature files were exported from %s '%s' images, the data set has %d",
          tostring(requested), split, #d), 0)
      end
      local n = index and #index or #d
      local want, labels = {}, {}
      for j = 1, n do
        local k = index and index[j] or j
        want[j] = tostring(d.ids[k])
        labels[j] = d.labels and d.labels[k]
      end
      ensemble.check_join(string.format("pipeline: the '%s' ids", split), 'the feature files', feats.ids[split],
        split == 'test' and 'test.json' or 'the data set', want)
      local lab = feats.label[split]
      if d.labels and lab then
        local got = lab:totable()
        for j = 1, n do
          if got[j] ~= labels[j] then
            error(string.format("pipeline: the '%s' labels of the feature files and the data set disagree at row %d (id %s): %d vs %d",
              split, j, want[j], got[j] - 1, labels[j] - 1), 0)
          end
        end
      end
    end
  end
end

-- Trains the ensemble on the exported features; writes predict.csv. Returns its summary, or
-- {interrupted = why}.
function pipeline.ensemble(cfg, run, ds, paths, finetuned)
  local ensemble = require 'flower.ensemble'
  local report = require 'flower.report'
  local memory = require 'flower.memory'
  local feats <close> = ensemble.load(paths, { memory_budget = cfg.memory_budget })
  pipeline.check_features(feats, ds)
  run:log('ensemble: %d feature files, %s of features, memory budget %s: %s', #paths, memory.format(feats.bytes),
    memory.format(feats.budget), feats.resident and 'read whole' or string.format('streamed in blocks of %d rows', feats.block_rows))
  local t0 = files.now()
  local clf = ensemble.fit(feats, { dropout = cfg.ensemble_dropout, epochs = cfg.ensemble_epochs, lr = cfg.ensemble_lr,
    patience = cfg.ensemble_patience, restore_best = cfg.ensemble_restore_best, device = pipeline.device(cfg) or 'cpu',
    batch_size = cfg.ensemble_batch_size or 64, seed = cfg.seed, progress = false,
    checkpoint_dir = run:path('ensemble', 'checkpoints'), resume = cfg.resume ~= nil,
    log = function(m) run:log('%s', m) end, label = 'ensemble', distributed = dist_opt(cfg) })
  if clf.interrupted then return { interrupted = clf.interrupted } end
  local secs = files.now() - t0
  run:time('ensemble: train on concatenated features', (#clf.history.rows) * feats.n.train, secs)
  if writes() then train.write_history_csv(run:path('ensemble', 'history.csv'), clf.history) end
  memory.stage(run, 'ensemble: train')
  local results = {}
  for i, m in ipairs(finetuned) do
    results[#results + 1] = { name = m.name, val_acc = m.val_acc, val_topk = m.val_topk, val_acc_tta = m.val_acc_tta,
      test_acc = m.test_acc,
      note = string.format('fine-tuned from %s (%d features)',
        m.weights and files.basename(m.weights) or 'random initial weights', feats.dims[i]) }
  end
  local avg_acc, _, avg_top5 = ensemble.average_accuracy(feats, 'valid')
  local conf = report.confusion(feats.label.valid:totable(), clf.valid_pred, ds.classes)
  local out = { classifier = clf, confusion = conf, dims = feats.dims, D = feats.D, resident = feats.resident }
  local function views(what)
    if (cfg.tta or 'none') == 'none' then return '' end
    return string.format('; valid and test %s averaged over the %s views', what, cfg.tta)
  end
  local concat = { name = 'ensemble: concatenated features', val_acc = clf.val_acc, val_topk = clf.val_top5,
    note = string.format('Dropout(%g) + Dense(%d) on %d features, %d epochs', cfg.ensemble_dropout, ds.classes,
      feats.D, #clf.history.rows) .. views('features') }
  local averaged = { name = 'ensemble: averaged probabilities', val_acc = avg_acc, val_topk = avg_top5,
    note = 'mean of the models\' probabilities' .. views('probabilities') }
  if ds.test and feats.n.test then
    local t1 = files.now()
    local probs = clf:predict(feats, 'test')
    -- the ids come from the feature files, checked above against test.json
    local path, p, ids, fb = write_submission(cfg, ds, run:path('predict.csv'), feats.ids.test, probs, cfg.topk)
    run.fallback_rows = fb
    concat.test_acc = score_submission(cfg, ids, p)
    out.predict = path
    local _, pa, ida = write_submission(cfg, ds, run:path('predict-averaged.csv'), feats.ids.test,
      ensemble.average(feats, 'test'), cfg.topk)
    averaged.test_acc = score_submission(cfg, ida, pa)
    run:time('ensemble: predict test', feats.n.test, files.now() - t1)
    memory.stage(run, 'ensemble: predict')
  end
  results[#results + 1] = concat
  results[#results + 1] = averaged
  out.results = results
  for _, r in ipairs(results) do
    run:log('%-34s validation accuracy %.4f%s', r.name, r.val_acc,
      r.test_acc and string.format('   test accuracy %.4f (answer key)', r.test_acc) or '')
  end
  return out
end

-- The whole pipeline. Returns the summary, or {interrupted = why}.
function pipeline.run(cfg, run, spec)
  local dev = pipeline.device(cfg)   -- a missing GPU fails here, before any work
  if dev ~= nil then run:log('device: %s', require('flower.device').describe(dev)) end
  local memory = require 'flower.memory'
  memory.budget(cfg.memory_budget, 'pipeline: --memory-budget')   -- a bad size fails before any work
  memory.reset_peak()
  -- the data set is the user's: what is wrong with it is printed as a message, not a traceback
  local ds = require('flower.recipe').as_user_error(pipeline.datasets, cfg)
  run:log('data: %s, %d classes, %d train / %d valid / %d test images', cfg.data, ds.classes, #ds.train, #ds.valid,
    ds.test and #ds.test or 0)
  memory.stage(run, 'data')
  local finetuned, paths = {}, {}
  for _, name in ipairs(cfg.models) do
    local m = pipeline.finetune(cfg, run, ds, spec, name)
    if m.interrupted then return m end
    m.weights = (spec.describe and spec.describe(name, cfg) or {}).weights
    finetuned[#finetuned + 1] = m
    memory.stage(run, name .. ': fine-tune')
  end
  for _, m in ipairs(finetuned) do
    local p, why = pipeline.export(cfg, run, ds, spec, m)
    if not p then return { interrupted = why } end
    paths[#paths + 1] = p
    memory.stage(run, m.name .. ': export')
  end
  local ens = pipeline.ensemble(cfg, run, ds, paths, finetuned)
  if ens.interrupted then return ens end
  run.results = ens.results
  local report = require 'flower.report'
  local models = {}
  for i, m in ipairs(finetuned) do models[i] = { name = m.name, history = m.history.rows } end
  -- one history.csv for the whole run: the models' rows with a model column
  local rows = {}
  for _, m in ipairs(finetuned) do
    for _, r in ipairs(m.history.rows) do
      local row = { m.name }
      for j, c in ipairs(train.HISTORY_COLUMNS) do row[j + 1] = r[c] end
      rows[#rows + 1] = row
    end
  end
  local header = { 'model' }
  for j, c in ipairs(train.HISTORY_COLUMNS) do header[j + 1] = c end
  if writes() then files.csv_write(run:path('history.csv'), header, rows) end
  local seconds = files.now() - run.started   -- the whole run (data generation included), as the timing table
  local file_list = { { 'config.json', 'the resolved options (what --resume RUNDIR continues with)' },
    { 'log.txt', 'the log' }, { 'history.csv', 'per-epoch loss and accuracy of every model' } }
  local function submission(path, what)
    file_list[#file_list + 1] = { path, what }
    if cfg.topk and cfg.topk > 1 then
      file_list[#file_list + 1] = { require('flower.predict').topk_path(path, cfg.topk),
        string.format('the %d most likely categories per image (%s)', cfg.topk, path) }
    end
  end
  if ens.predict then
    submission('predict.csv', 'the submission (ensemble of concatenated features)')
    submission('predict-averaged.csv', 'submission from the models\' averaged probabilities')
  end
  local random = {}
  for _, m in ipairs(finetuned) do
    if m.predict then submission('predict-' .. m.name .. '.csv', 'submission straight from ' .. m.name) end
    file_list[#file_list + 1] = { 'models/' .. m.name .. '/model.h5', m.name .. ' fine-tuned, as a whole-model Keras file '
      .. '(experiments/predict.lua --run predicts with it; Keras loads it)' }
    file_list[#file_list + 1] = { 'features/' .. m.name .. '.h5', m.name .. ' exported features' }
    if not m.weights then random[#random + 1] = m.name end
  end
  local notes = {}
  if (run.fallback_rows or 0) > 0 then
    notes[#notes + 1] = string.format('%d test image(s) could not be read and were predicted as the most frequent '
      .. 'training category (--unreadable-test most-frequent); they are listed under Skipped images.', run.fallback_rows)
    run:log('%s', notes[#notes])
  end
  if #random > 0 then
    notes[#notes + 1] = string.format('%s started from random weights, not pretrained ones (no weights file was given).',
      table.concat(random, ', '))
  end
  if writes() then report.write(run:path('report.html'), {
    title = string.format('%s — %s', run.name, cfg.data),
    subtitle = string.format('%s, %d classes, %d train / %d valid images; %.0f s in all', os.date('%Y-%m-%d %H:%M'),
      ds.classes, #ds.train, #ds.valid, seconds),
    notes = notes, results = ens.results, models = models, classes = ds.names, confusion = ens.confusion,
    confusion_of = 'ensemble: concatenated features, validation set', timing = run.timing, seconds = seconds,
    memory = run.memory, files = file_list, skipped = run.skipped,
    config = (function()
      local c = recipe_copy(cfg)
      c.stages_resolved = pipeline.stages(cfg)
      return c
    end)(),
  }) end
  run:write_results()
  if run.skipped and #run.skipped > 0 then
    run:log('%d unreadable image(s) skipped everywhere (named above, in results.json and the report)', #run.skipped)
  end
  run:log('report: %s (%.0f s in all)', run:path('report.html'), seconds)
  return { results = ens.results, predict = ens.predict, seconds = seconds, finetuned = finetuned, ensemble = ens,
           dir = run.dir }
end

return pipeline
