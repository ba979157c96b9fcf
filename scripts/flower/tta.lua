-- flower.tta: test-time augmentation. Several views of each image go through the model and their
-- class probabilities are averaged (in probability space, as fine-grained competitions do);
-- deterministic: the same views every time.
--
--   local tta = require 'flower.tta'
--   local spec = tta.parse('crops+flip')        -- 'none' | 'flip' | 'crops' | 'crops+flip'
--   local loader = data.Loader{ds, transform = 'eval', size = tta.load_size(224, spec), ...}
--   for b in loader:epoch(1) do local p = tta.predict(model, b.x, 224, spec) end   -- (N, K)
--
--   none    the image as the eval transform gives it (shorter side to size / 0.875, centre crop)
--   flip    that view and its mirror image (left-right)
--   crops   the eval transform at size / crop_scale (default 0.875: 256 for 224), then five crops
--           of size x size from it: centre and the four corners
--   crops+flip  the five crops and their mirror images (ten views)
-- The views are narrow() views of one decoded batch (no copy) except the mirrors.
local flower = require 'flower'

local tta = {}

local kinds = { none = { 1, false }, flip = { 1, true }, crops = { 5, false }, ['crops+flip'] = { 5, true } }

-- tta.parse(name [, crop_scale]) -> {name, crops = 1|5, flip = bool, crop_scale}
function tta.parse(name, crop_scale)
  if name == nil or name == false then name = 'none' end
  local k = kinds[name]
  if not k then
    error(string.format("tta: unknown mode '%s' (none, flip, crops, crops+flip)", tostring(name)), 2)
  end
  crop_scale = crop_scale or 0.875
  if type(crop_scale) ~= 'number' or crop_scale <= 0 or crop_scale > 1 then
    error('tta: crop_scale must be in (0, 1], got ' .. tostring(crop_scale), 2)
  end
  return { name = name, crops = k[1], flip = k[2], crop_scale = crop_scale, views = k[1] * (k[2] and 2 or 1) }
end

-- the size to decode images at for `size` x `size` model inputs
function tta.load_size(size, spec)
  if spec.crops == 1 then return size end
  return math.floor(size / spec.crop_scale + 0.5)
end

-- x (N, H, W, C) mirrored left-right
function tta.hflip(x)
  local w = x:size(3)
  local cols = {}
  for j = w, 1, -1 do cols[#cols + 1] = x:narrow(3, j, 1) end
  return flower.cat(cols, 3)
end

-- the views of a batch x (N, L, L, C) decoded at tta.load_size(size, spec)
function tta.views(x, size, spec)
  local L = x:size(2)
  if x:size(3) ~= L then error(string.format('tta: expected square images, got %dx%d', L, x:size(3)), 2) end
  local crops
  if spec.crops == 1 then
    if L ~= size then error(string.format('tta: expected images of %d x %d, got %d x %d', size, size, L, L), 2) end
    crops = { x }
  else
    if L < size then error(string.format('tta: images of %d x %d are smaller than the crop %d', L, L, size), 2) end
    local c, e = (L - size) // 2 + 1, L - size + 1
    local function crop(r, s) return x:narrow(2, r, size):narrow(3, s, size) end
    crops = { crop(c, c), crop(1, 1), crop(1, e), crop(e, 1), crop(e, e) }
  end
  if not spec.flip then return crops end
  local out = {}
  for _, v in ipairs(crops) do out[#out + 1] = v; out[#out + 1] = tta.hflip(v) end
  return out
end

-- the model's class probabilities for x: its output when it ends in a softmax, else softmax(logits)
function tta.probabilities(model, x)
  local out = model:forward(x)
  if require('flower.export').ends_in_softmax(model) then return out end
  return out:softmax(2)
end

-- The mean over the views of x of what fn(view) returns: one tensor, or two (the second may be
-- nil). The results are new tensors: a model may reuse its output buffers in its next forward.
function tta.mean(x, size, spec, fn)
  local views = tta.views(x, size, spec)
  local a, b
  for _, v in ipairs(views) do
    local va, vb = fn(v)
    if a then a:add_(va) else a = va:clone() end
    if vb then if b then b:add_(vb) else b = vb:clone() end end
  end
  return a:div_(#views), b and b:div_(#views)
end

-- averaged probabilities (N, K) over the views of x, in inference mode whatever the model's mode
function tta.predict(model, x, size, spec)
  local was_training = model.train
  model:evaluate()
  local ok, res = pcall(tta.mean, x, size, spec, function(v) return tta.probabilities(model, v) end)
  if was_training then model:training() end
  if not ok then error(res, 0) end
  return res
end

return tta
