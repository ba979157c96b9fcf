-- Prediction throughput with and without test-time augmentation, beside Keras's model.predict on
-- the same model file and images: experiments/predict.lua's path (threaded JPEG decoding, TTA views,
-- inference) against tf_keras loading our whole-model .h5 (tests/bench/predict_keras.py, Pillow
-- decoding). Prints images/s per TTA mode, the ratio, and how often the two agree on the top class.
--   ./flowerlua tests/bench/predict.lua [model=resnet50] [images=64] [threads=2] [batch=16]
-- model: resnet50 (Keras's ResNet50 at 224, random weights, 1000 classes) or a .h5 file.
-- tests/bench/recipe.lua runs it on the quickstart's fine-tuned models (dofile gives `bench`).
local flower = require 'flower'
local files = require 'flower.files'
local T = require 'flower.test'
local tta = require 'flower.tta'

local MODES = { 'none', 'flip', 'crops+flip' }

-- bench(model_path, image_paths, threads, batch) -> {mode = {ours, keras, agree}}, lines to print
local function bench(model_path, paths, threads, batch)
  flower.setnumthreads(threads)
  local dir = T.tmpdir()
  local model = flower.keras.load_model(model_path)
  local size = model.inputs[1].shape[1]
  local ds = flower.data.new_dataset { paths = paths, ids = paths }
  files.write_atomic(files.join(dir, 'list.txt'), table.concat(paths, '\n') .. '\n')
  local ours = {}
  for _, mode in ipairs(MODES) do
    local spec = tta.parse(mode)
    local loader = flower.data.Loader { ds, batch_size = batch, workers = threads, size = tta.load_size(size, spec) }
    local t0, top1 = files.now(), {}
    for b in loader:epoch(1) do
      for _, v in ipairs(tta.predict(model, b.x, size, spec):argmax(2):totable()) do top1[#top1 + 1] = v end
    end
    ours[mode] = { images_per_s = #paths / (files.now() - t0), top1 = top1 }
  end
  local json = files.join(dir, 'keras.json')
  assert(T.sh(string.format('%s tests/bench/predict_keras.py %s %s %d %d %d %s > %s', T.python, model_path,
    files.join(dir, 'list.txt'), size, threads, batch, table.concat(MODES, ','), json)), 'the Keras peer failed')
  local peer = files.json_read(json)
  local out, lines = {}, {}
  for _, mode in ipairs(MODES) do
    local o, k = ours[mode], peer[mode]
    local agree = 0
    for i, v in ipairs(o.top1) do if v == k.top1[i] then agree = agree + 1 end end
    out[mode] = { ours = o.images_per_s, keras = k.images_per_s, agree = agree }
    lines[#lines + 1] = string.format('%-12s %12.1f %12.1f %7.2fx %9d/%d', mode, o.images_per_s, k.images_per_s,
      o.images_per_s / k.images_per_s, agree, #paths)
  end
  return out, lines, size
end

if PREDICT_BENCH_LIB then return bench end

local which, nimg = arg[1] or 'resnet50', tonumber(arg[2] or '64')
local threads, batch = tonumber(arg[3] or '2'), tonumber(arg[4] or '16')
local dir = T.tmpdir()
local model_path = which
if not which:match('%.h5$') then
  model_path = files.join(dir, which .. '.h5')
  flower.models[which] { include_top = true }:save(model_path)
end
-- the images: smooth random fields (a coarse random image resized up), 8 sizes around 0.12 MP
flower.manual_seed(1)
local list = {}
for i = 1, 8 do
  local h, w = 300 + 7 * i, 400 - 5 * i
  local coarse = flower.rand(h // 16, w // 16, 3):mul(255):byte()
  flower.data.save_image(flower.data.resize_image(coarse, h, w), files.join(dir, i .. '.jpg'), 90)
end
for i = 1, nimg do list[i] = files.join(dir, ((i - 1) % 8 + 1) .. '.jpg') end
local _, lines, size = bench(model_path, list, threads, batch)
print(string.format('\npredict %s, %d images at %d, batch %d, %d threads', which, nimg, size, batch, threads))
print(string.format('%-12s %12s %12s %8s %10s', 'tta', 'ours img/s', 'keras img/s', 'ratio', 'top-1 agree'))
print(table.concat(lines, '\n'))
