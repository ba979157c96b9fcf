-- make_flowers.lua: writes the synthetic flowers data set in the Kaggle FGVCx Flowers layout.
--
--   ./flowerlua scripts/make_flowers.lua --classes 20 --train-per-class 60 --test 200 \
--       --out data/flowers --seed 1
--
-- Writes, under --out:
--   train/category_<category_id + 1>/<image_id>.jpg   the training photos
--   test/<image_id>.jpg                               the test photos
--   train.json   {"images": [{id, file_name, width, height}], "annotations": [{id, image_id,
--                category_id}], "categories": [{id, name, petals, shape, palette}]}
--   test.json    {"images": [{id, file_name, width, height}]}
--   sample_submission.csv   id,predicted (one row per test image, predicted = 0)
--   test_labels.csv         id,category_id -- the answer key (Kaggle keeps it secret; here it lets
--                           a newcomer score a submission)
-- A class (category) is a petal count, a petal shape and a colour palette (core/data/flowers.h); each
-- photo varies position, size, rotation, tilt, background, lighting, blur and noise. The set is a
-- pure function of the options: the same command writes the same files.
local flower = require 'flower'
local files = require 'flower.files'
local C = flower._data

local usage = [[
usage: flowerlua scripts/make_flowers.lua [options]
  --out DIR              output directory (data/flowers)
  --classes K            number of categories (20)
  --train-per-class N    training photos per category (60)
  --test N               test photos, categories drawn evenly (200)
  --seed S               seed of the whole set (1)
  --min-size WxH         smallest photo (500x375)
  --max-size WxH         largest photo (800x600)
  --quality Q            JPEG quality (90)
  --workers N            drawing threads (2)
  --quiet                no progress lines]]

local function parse(argv)
  local o = { out = 'data/flowers', classes = 20, train_per_class = 60, test = 200, seed = 1,
              min_size = '500x375', max_size = '800x600', quality = 90, workers = 2, quiet = false }
  local ints = { classes = true, train_per_class = true, test = true, seed = true, quality = true, workers = true }
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == '-h' or a == '--help' then print(usage) os.exit(0) end
    local key = a:match('^%-%-([%w-]+)$')
    if not key then io.stderr:write('make_flowers: unexpected argument ' .. a .. '\n' .. usage .. '\n') os.exit(2) end
    key = key:gsub('-', '_')
    if key == 'quiet' then o.quiet = true; i = i + 1
    else
      if o[key] == nil then io.stderr:write('make_flowers: unknown option --' .. key:gsub('_', '-') .. '\n' .. usage .. '\n') os.exit(2) end
      local v = argv[i + 1]
      if v == nil then io.stderr:write('make_flowers: --' .. key:gsub('_', '-') .. ' needs a value\n') os.exit(2) end
      if ints[key] then
        local n = math.tointeger(tonumber(v))
        if not n then io.stderr:write('make_flowers: --' .. key:gsub('_', '-') .. ' needs an integer, got ' .. v .. '\n') os.exit(2) end
        o[key] = n
      else
        o[key] = v
      end
      i = i + 2
    end
  end
  local function size(s, name)
    local w, h = s:match('^(%d+)x(%d+)$')
    if not w then io.stderr:write('make_flowers: --' .. name .. ' must be WxH, got ' .. s .. '\n') os.exit(2) end
    return tonumber(w), tonumber(h)
  end
  o.min_w, o.min_h = size(o.min_size, 'min-size')
  o.max_w, o.max_h = size(o.max_size, 'max-size')
  local function check(cond, msg) if not cond then io.stderr:write('make_flowers: ' .. msg .. '\n') os.exit(2) end end
  check(o.classes >= 1 and o.classes <= 4096, '--classes must be 1..4096')
  check(o.train_per_class >= 0 and o.test >= 0, '--train-per-class and --test must be >= 0')
  check(o.min_w >= 16 and o.min_h >= 16 and o.max_w >= o.min_w and o.max_h >= o.min_h and o.max_w <= 8192 and o.max_h <= 8192,
        'sizes must satisfy 16 <= min <= max <= 8192')
  check(o.quality >= 1 and o.quality <= 100, '--quality must be 1..100')
  check(o.seed >= 0, '--seed must be >= 0')
  return o
end

-- Photo size for one image: a width in [min_w, max_w] and an aspect ratio (mostly landscape 4:3,
-- some 3:2, square and portrait), the height clamped into [min_h, max_h] (portrait: swapped range).
local function photo_size(o, s)
  local u1 = (C.sample_seed(s, 1, 0) >> 11) / 2.0^53
  local u2 = (C.sample_seed(s, 2, 0) >> 11) / 2.0^53
  local w = o.min_w + math.floor(u1 * (o.max_w - o.min_w + 1))
  local aspect = u2 < 0.6 and 4 / 3 or (u2 < 0.75 and 3 / 2 or (u2 < 0.85 and 1 or 3 / 4))
  local h = math.floor(w / aspect + 0.5)
  if aspect < 1 then
    -- portrait: height in the width range, width in the height range
    h = math.max(o.min_w, math.min(o.max_w, h))
    w = math.max(o.min_h, math.min(o.max_h, math.floor(h * aspect + 0.5)))
  else
    h = math.max(o.min_h, math.min(o.max_h, h))
  end
  return w, h
end

local function main(argv)
  local o = parse(argv)
  local t0 = files.now()
  local K = o.classes
  local out = o.out
  files.mkdir(files.join(out, 'train'))
  files.mkdir(files.join(out, 'test'))
  local categories = {}
  for c = 0, K - 1 do
    files.mkdir(files.join(out, 'train', string.format('category_%d', c + 1)))
    local petals, shape, palette = C.flowers_class(c, K)
    categories[#categories + 1] = { id = c, name = string.format('%d-petal %s %s', petals, shape, palette),
                                    petals = petals, shape = shape, palette = palette }
  end

  -- training photos: image ids are a seeded permutation, so an id says nothing about its class
  local ntrain = K * o.train_per_class
  local ids = C.permutation(ntrain, C.sample_seed(o.seed, 0, 0) & 0xFFFFFFFF)
  local jobs, images, annotations = {}, {}, {}
  for j = 0, ntrain - 1 do
    local c = j % K
    local id = ids[j + 1] - 1
    local s = C.sample_seed(o.seed, 1, j)
    local w, h = photo_size(o, s)
    local rel = string.format('train/category_%d/%d.jpg', c + 1, id)
    jobs[#jobs + 1] = { path = files.join(out, rel), category = c, w = w, h = h, quality = o.quality, seed = s }
    images[#images + 1] = { id = id, file_name = rel, width = w, height = h }
    annotations[#annotations + 1] = { id = id, image_id = id, category_id = c }
  end
  table.sort(images, function(a, b) return a.id < b.id end)
  table.sort(annotations, function(a, b) return a.id < b.id end)

  -- test photos: categories evenly (round robin), in a seeded order
  local order = C.permutation(o.test, C.sample_seed(o.seed, 2, 0) & 0xFFFFFFFF)
  local test_images, answers = {}, {}
  for j = 0, o.test - 1 do
    local c = (order[j + 1] - 1) % K
    local s = C.sample_seed(o.seed, 3, j)
    local w, h = photo_size(o, s)
    local name = string.format('%d.jpg', j)
    jobs[#jobs + 1] = { path = files.join(out, 'test', name), category = c, w = w, h = h, quality = o.quality, seed = s }
    test_images[#test_images + 1] = { id = j, file_name = name, width = w, height = h }
    answers[#answers + 1] = { j, c }
  end

  -- draw in chunks so that progress shows on big sets (redrawn in place on a terminal only)
  local tty = not o.quiet and files.stdout_is_tty()
  local chunk = 256
  for first = 1, #jobs, chunk do
    local part = table.move(jobs, first, math.min(#jobs, first + chunk - 1), 1, {})
    C.flowers_write(part, K, o.workers)
    if tty then
      io.stdout:write(string.format('\rmake_flowers: %d/%d photos', math.min(#jobs, first + chunk - 1), #jobs))
      io.stdout:flush()
    end
  end
  if tty then io.stdout:write('\n') end

  files.write_atomic(files.join(out, 'train.json'),
    files.json_encode({ images = images, annotations = annotations, categories = categories }) .. '\n')
  files.write_atomic(files.join(out, 'test.json'), files.json_encode({ images = test_images }) .. '\n')
  local sub, key = { 'id,predicted' }, { 'id,category_id' }
  for _, a in ipairs(answers) do
    sub[#sub + 1] = string.format('%d,0', a[1])
    key[#key + 1] = string.format('%d,%d', a[1], a[2])
  end
  files.write_atomic(files.join(out, 'sample_submission.csv'), table.concat(sub, '\n') .. '\n')
  files.write_atomic(files.join(out, 'test_labels.csv'), table.concat(key, '\n') .. '\n')
  if not o.quiet then
    print(string.format('make_flowers: %d categories, %d training and %d test photos in %s (%.1f s)',
      K, ntrain, o.test, out, files.now() - t0))
  end
end

main(arg or {})
