-- Synthetic feature files in flower.export's layout, written in blocks (any size: the scale test and
-- tests/bench/scale.lua use it). Labels are drawn once per split from `seed` and shared by every
-- file; a file's features are noise (one block of it, repeated) plus a signal in column label + 1 of strength `signal` (classes <= dim).
--   local FF = dofile('tests/lua/features_fixture.lua')
--   local labels = FF.labels({train = 1000, valid = 200, test = 100}, 10, 1)   -- 0-based int64
--   FF.write(path, {model = 'a', dim = 64, classes = 10, labels = labels, seed = 2, probs = true})
local flower = require 'flower'
local h5 = require 'flower.h5'

local FF = {}
FF.SPLITS = { 'train', 'valid', 'test' }

function FF.labels(rows, classes, seed)
  flower.manual_seed(seed)
  local out = {}
  for _, s in ipairs(FF.SPLITS) do
    if rows[s] then out[s] = flower.randint(0, classes - 1, { rows[s] }, 'int64') end
  end
  return out
end

-- ids of a split: '<split>-<row>' for train/valid and the row number for test (as test.json's)
function FF.ids(split, n)
  local ids = {}
  for i = 1, n do ids[i] = split == 'test' and tostring(i) or string.format('%s-%d', split, i) end
  return ids
end

-- o: model, dim, classes, labels (FF.labels), seed, signal (3), probs (false), block (rows per
-- write, 8192), ids = {split = list} (default FF.ids), rows = {split = n} (default: the labels')
function FF.write(path, o)
  local f <close> = h5.open(path, 'w')
  f:set_attr('/', 'model', o.model)
  f:set_attr('/', 'classes', o.classes)
  f:set_attr('/', 'label_base', 0)
  f:set_attr('/', 'feature_dim', o.dim)
  local splits = {}
  for _, s in ipairs(FF.SPLITS) do if o.labels[s] then splits[#splits + 1] = s end end
  f:set_attr('/', 'splits', splits)
  flower.manual_seed(o.seed)
  local block = o.block or 8192
  assert(o.classes <= o.dim, 'features_fixture: classes must not exceed dim')
  local cols = flower.arange(0, o.dim):view(1, o.dim)
  -- one block of noise, drawn once and reused (writing, not drawing, should take the time)
  local noise = flower.randn({ block, o.dim })
  for _, s in ipairs(splits) do
    local lab = o.labels[s]
    local n = lab:size(1)
    local xn = s == 'test' and 'test' or (s .. '_x')
    for first = 1, n, block do
      local count = math.min(block, n - first + 1)
      local x = noise:narrow(1, 1, count):clone()
      local hot = cols:eq(lab:narrow(1, first, count):type('float32'):view(count, 1))
      local signal = hot:float():mul_(o.signal or 3)
      x:add_(signal)
      f:append_rows('/' .. xn, x)
      x:free(); hot:free(); signal:free()
      if o.probs and s ~= 'train' then
        local p = flower.rand({ count, o.classes }):softmax(2)
        f:append_rows('/' .. s .. '_probs', p)
        p:free()
      end
    end
    if s ~= 'test' then f:write('/' .. s .. '_label', lab) end
    local ids = o.ids and o.ids[s] or FF.ids(s, n)
    local imgs = {}
    for i = 1, n do imgs[i] = string.format('%s/%d.jpg', s, i) end
    f:write('/' .. s .. '_images', imgs)
    f:write('/' .. s .. '_ids', ids)
    f:set_attr('/', s .. '_rows', o.rows and o.rows[s] or n)
    f:set_attr('/', s .. '_complete', 1)
  end
end

return FF
