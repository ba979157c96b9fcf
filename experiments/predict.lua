-- Predicts images with one or more saved models: the top-k classes of each image, as a table or CSV.
--
--   ./flowerlua experiments/predict.lua --model runs/x/models/resnet_tiny.h5 --images photo.jpg
--   ./flowerlua experiments/predict.lua --run runs/x --images data/flowers/test.json --tta crops+flip --csv top5.csv
--   ./flowerlua experiments/predict.lua --model a.h5,b.h5 --images some/folder --topk 3
--
-- --model takes whole-model .h5 files (model:save / flower.keras.save_model, or Keras's own
-- model.save('x.h5')); --run takes every models/*/model.h5 of a run directory (the pipeline's
-- fine-tuned models). Several models are an
-- ensemble: their probabilities are averaged. --images is a JPEG, a folder (its *.jpg/*.jpeg files,
-- subfolders included, sorted by path) or a Kaggle test.json (its `images`, ids from the file).
-- Models always run in inference mode. Class ids and names come from the model file's metadata
-- (written by the pipeline); a Keras file without it gives output indices 1..K.
local flower = require 'flower'
local cli = require 'flower.cli'
local files = require 'flower.files'
local tta = require 'flower.tta'
local data, keras = flower.data, flower.keras

local spec = {
  name = 'predict',
  description = 'Top-k classes of images from saved models (whole-model .h5 files), with optional test-time augmentation.',
  options = {
    { name = 'model', type = 'list', default = {}, help = 'whole-model .h5 file(s), comma-separated (an ensemble)' },
    { name = 'run', type = 'string', default = '', help = 'a run directory: use every models/*/model.h5 in it' },
    { name = 'images', type = 'string', required = true, help = 'a .jpg, a folder of them, or a Kaggle test.json' },
    { name = 'topk', type = 'int', default = 5, min = 1, help = 'classes per image' },
    { name = 'tta', type = 'string', default = 'none', choices = { 'none', 'flip', 'crops', 'crops+flip' },
      help = 'test-time augmentation (probabilities averaged over the views)' },
    { name = 'crop_scale', type = 'number', default = 0.875, help = 'crops: crop side / decoded side' },
    { name = 'size', type = 'int', default = 0, help = 'input size (0: the model\'s own input size)' },
    { name = 'batch_size', type = 'int', default = 32, min = 1, help = 'images per batch' },
    { name = 'workers', type = 'int', default = 2, min = 1, help = 'decoding threads' },
    { name = 'device', type = 'string', default = 'cpu', help = "'cpu', 'cuda', 'cuda:<n>' or 'auto'" },
    { name = 'csv', type = 'string', default = '', help = 'write the predictions to this CSV file instead of a table' },
  },
}

local predict = {}

local function user_error(fmt, ...)
  io.stderr:write('predict: ', string.format(fmt, ...), '\n')
  os.exit(2)
end

-- the data set of --images: {paths, ids}
function predict.images(path)
  if path:match('%.json$') then
    local root = files.dirname(path)
    return data.kaggle_test(root, { json = path })
  end
  if path:match('%.[jJ][pP][eE]?[gG]$') then
    if not files.exists(path) then user_error('%s: no such file', path) end
    return data.new_dataset { paths = { path }, ids = { (files.basename(path):gsub('%.[^.]+$', '')) }, root = files.dirname(path) }
  end
  if not files.isdir(path) then user_error('%s is neither a .jpg, a folder nor a .json file', path) end
  local p = io.popen('find ' .. files.shell_quote(path) .. " -type f \\( -iname '*.jpg' -o -iname '*.jpeg' \\) | LC_ALL=C sort")
  local paths, ids = {}, {}
  for line in p:lines() do
    paths[#paths + 1] = line
    ids[#ids + 1] = line:sub(#path + 2):gsub('%.[^.]+$', '')
  end
  p:close()
  if #paths == 0 then user_error('no .jpg or .jpeg files under %s', path) end
  return data.new_dataset { paths = paths, ids = ids, root = path }
end

function predict.model_files(o)
  local list = {}
  for _, m in ipairs(o.model) do list[#list + 1] = m end
  if o.run ~= '' then
    local dir = files.join(o.run, 'models')
    local p = io.popen('ls ' .. files.shell_quote(dir) .. '/*/model.h5 2>/dev/null | LC_ALL=C sort')
    for line in p:lines() do list[#list + 1] = line end
    p:close()
    if #list == 0 then user_error('%s has no models/*/model.h5 (a run of an older flowerlua, or not finished?)', o.run) end
  end
  if #list == 0 then user_error('give --model FILE.h5 or --run RUNDIR') end
  return list
end

-- the k best classes of each row of probs (N, K) as {{label, prob, name}, ...}, with
-- flower.predict.topk_rows' order (ties: the lower index first)
local function topk_of(probs, k, meta)
  local pt = probs:totable()
  local out = {}
  for i, idx in ipairs(require('flower.predict').topk_rows(pt, k)) do
    local row = {}
    for j, c in ipairs(idx) do
      local label = meta.classes and meta.classes[c] or c
      row[j] = { label = math.tointeger(label) or label, prob = pt[i][c], name = meta.class_names and meta.class_names[c] or nil }
    end
    out[i] = row
  end
  return out
end

-- runs every model over the images; returns the top-k rows {{id = , {label, prob, name}...}, ...}.
-- Each batch is reduced to its k best classes at once: 12,961 test images x 997 classes never sit
-- in memory as Lua numbers.
function predict.run(o)
  local models = {}
  for i, path in ipairs(predict.model_files(o)) do
    local ok, m = pcall(keras.load_model, path)
    if not ok then user_error('%s', tostring(m)) end
    models[i] = m
  end
  local meta = models[1].metadata or {}
  local K = models[1].outputs[1].shape[1]
  for i, m in ipairs(models) do
    if m.outputs[1].shape[1] ~= K then
      user_error('the models disagree: %s has %d classes, the first %d', predict.model_files(o)[i], m.outputs[1].shape[1], K)
    end
  end
  local size = o.size > 0 and o.size or models[1].inputs[1].shape[1]
  if size < 1 then user_error('the model does not fix its input size: give --size') end
  local spec_tta = tta.parse(o.tta, o.crop_scale)
  local ds = predict.images(o.images)
  -- the device before any image is read: a missing GPU fails here (train.run_device's message)
  local dev
  for _, m in ipairs(models) do dev = flower.train.run_device(m, o.device, 'predict') end
  local loader = data.Loader { ds, batch_size = o.batch_size, workers = o.workers, transform = 'eval',
                               size = tta.load_size(size, spec_tta) }
  local rows = {}
  for b in loader:epoch(1) do
    local x = flower.train.batch_to_device(b, dev).x
    local p
    for _, m in ipairs(models) do
      local q = tta.predict(m, x, size, spec_tta)
      if p then p:add_(q) else p = q end
    end
    if #models > 1 then p:div_(#models) end
    for i, row in ipairs(topk_of(p:cpu(), o.topk, meta)) do
      row.id = ds.ids[b.index[i]]
      rows[#rows + 1] = row
    end
  end
  local skipped = #ds - #rows
  if skipped > 0 then io.stderr:write(string.format('predict: %d image(s) could not be read and have no prediction\n', skipped)) end
  return rows
end

function predict.write(rows, k, csv)
  if csv ~= '' then
    local header = { 'id' }
    for j = 1, k do header[#header + 1] = 'label' .. j; header[#header + 1] = 'prob' .. j end
    local out = {}
    for i, row in ipairs(rows) do
      local r = { row.id }
      for j = 1, k do
        r[#r + 1] = row[j] and tostring(row[j].label) or ''
        r[#r + 1] = row[j] and string.format('%.6f', row[j].prob) or ''
      end
      out[i] = r
    end
    files.csv_write(csv, header, out)
    print(string.format('predict: %d images -> %s', #rows, csv))
    return
  end
  for _, row in ipairs(rows) do
    local parts = {}
    for j = 1, k do
      local c = row[j]
      if c then
        parts[#parts + 1] = string.format('%s%s %.4f', tostring(c.label), c.name and (' (' .. c.name .. ')') or '', c.prob)
      end
    end
    print(string.format('%-24s %s', tostring(row.id), table.concat(parts, '   ')))
  end
end

if arg and arg[0] and arg[0]:match('predict%.lua$') and not PREDICT_NO_MAIN then
  local o = cli.main(spec, arg)
  predict.write(predict.run(o), o.topk, o.csv)
end
return predict
