-- Image decoding and resampling against independent references (tests/reference/data_pil.py):
-- Pillow's decode of Pillow-written JPEGs (baseline, 4:4:4, progressive, gray, CMYK, EXIF 1..8),
-- PyTurboJPEG's DCT-scaled decodes, Pillow's Image.resize(size, filter, box), and the eval pipeline.
-- Documented bounds (asserted here):
--   decode at full size:      max |ours - Pillow| <= 1 (0 with Debian's Pillow on libjpeg-turbo 2.1)
--   DCT-scaled decode:        max |ours - TurboJPEG| = 0
--   resize, every filter:     max |ours - Pillow| <= 1, mean < 0.01 (same fixed-point arithmetic)
--   eval pipeline (shorter side size/0.875, center crop): without DCT scaling max <= 1; with it
--   (the default; at 224 a 613x459 photo decodes whole, at 96 it decodes at 2/8 then resamples)
--   mean < 2.5 and max < 128 -- the scaled IDCT's low-pass differs from the bilinear filter's at
--   sharp edges (a JPEG at quality 90 is itself about 2 off its source on average).
local T = require 'flower.test'
local flower = require 'flower'
local cjson = require 'cjson'
local D = flower._data

local PY = T.python
local REF = (os.getenv('BUILD') or 'build') .. '/ref/data'
local GEN = 'tests/reference/data_pil.py'

local sh = T.sh

local slurp = T.slurp

local function reference()
  local m = T.reference(GEN, REF, 'manifest.json')
  return cjson.decode(slurp(m))
end

local man = reference()

local function raw_tensor(entry)
  return D.image_from_raw(slurp(REF .. '/' .. entry.pixels), entry.h, entry.w)
end

-- max and mean |a - b| of two uint8 images of one shape
local function diff(a, b, what)
  local sa, sb = table.concat(a:size(), 'x'), table.concat(b:size(), 'x')
  if sa ~= sb then error(string.format('%s: shape %s, expected %s', what, sa, sb), 2) end
  local d = (a:double() - b:double()):abs()
  return d:max():item(), d:mean():item()
end

T.test('decode: every Pillow-written variant matches Pillow at full size (max <= 1)', function()
  local worst, report = 0, {}
  for _, e in ipairs(man.decode) do
    local ours = D.image_load(REF .. '/' .. e.file)
    local mx, mean = diff(ours, raw_tensor(e), e.file)
    report[#report + 1] = string.format('%s %d/%.4f', e.file, mx, mean)
    worst = math.max(worst, mx)
    T.check(mx <= 1, string.format('%s: max diff %d, mean %.4f', e.file, mx, mean))
  end
  print('# decode max/mean vs Pillow: ' .. table.concat(report, ', '))
end)

T.test('decode: EXIF orientations give the displayed size', function()
  for o = 1, 8 do
    local bytes = slurp(REF .. '/orient' .. o .. '.jpg')
    local info = D.image_info(bytes)
    T.eq(info.orientation, o)
    if o >= 5 then T.eq(info.width, 459) T.eq(info.height, 613) else T.eq(info.width, 613) T.eq(info.height, 459) end
  end
end)

T.test('decode: gray and CMYK are RGB; progressive flag read', function()
  T.eq(D.image_info(slurp(REF .. '/gray.jpg')).components, 1)
  T.eq(D.image_info(slurp(REF .. '/cmyk.jpg')).components, 4)
  T.eq(D.image_info(slurp(REF .. '/progressive.jpg')).progressive, true)
  local g = D.image_load(REF .. '/gray.jpg')
  T.eq(g:size()[3], 3)
end)

T.test('decode: DCT scaling 1/8..7/8 equals TurboJPEG exactly', function()
  for _, e in ipairs(man.scaled) do
    local ours = D.image_load(REF .. '/' .. e.file, { eighths = e.eighths })
    local mx, mean = diff(ours, raw_tensor(e), e.file .. ' at ' .. e.eighths .. '/8')
    T.check(mx == 0, string.format('%s at %d/8: max diff %d, mean %.4f', e.file, e.eighths, mx, mean))
  end
end)

T.test('resize: Pillow Image.resize(size, filter, box) on the same pixels, max <= 1', function()
  local src = raw_tensor(man.resize_source)
  local worst, sum, n = 0, 0, 0
  for _, e in ipairs(man.resize) do
    local ours = D.image_resize(src, e.h, e.w, e.filter, e.box ~= cjson.null and e.box or nil)
    local mx, mean = diff(ours, raw_tensor(e), 'resize')
    worst = math.max(worst, mx)
    sum, n = sum + mean, n + 1
    T.check(mx <= 1 and mean < 0.01, string.format('%s %dx%d box %s: max %d mean %.4f', e.filter, e.w, e.h,
      e.box ~= cjson.null and table.concat(e.box, ',') or 'none', mx, mean))
  end
  print(string.format('# resize vs Pillow over %d cases: max %d, mean of means %.5f', n, worst, sum / n))
end)

T.test('pipeline: eval transform vs Pillow (full decode + bilinear box resize)', function()
  for _, e in ipairs(man.pipeline) do
    local ref = raw_tensor(e)
    local opts = { mode = 'center', size = e.h, dct_scaling = false }
    local exact = D.image_load(REF .. '/' .. e.file, opts)
    local mx0, mean0 = diff(exact, ref, e.file)
    T.check(mx0 <= 1, string.format('%s without DCT scaling: max %d mean %.4f', e.file, mx0, mean0))
    opts.dct_scaling = true
    local scaled = D.image_load(REF .. '/' .. e.file, opts)
    local mx, mean = diff(scaled, ref, e.file)
    print(string.format('# %s eval %d: without DCT scaling max %d mean %.4f; with DCT scaling max %d mean %.3f',
      e.file, e.h, mx0, mean0, mx, mean))
    T.check(mx < 128 and mean < 2.5, string.format('%s with DCT scaling: max %d mean %.3f', e.file, mx, mean))
  end
end)

T.test('resize: bad arguments are Lua errors naming the function', function()
  local src = raw_tensor(man.resize_source)
  T.raises(function() D.image_resize(src, 10, 10, 'cubic') end, "image_resize: filter must be")
  T.raises(function() D.image_resize(src, 0, 10) end, 'image_resize: size must be')
  T.raises(function() D.image_resize(src, 10, 10, 'box', { 0, 0, 700, 10 }) end, 'must lie inside')
  T.raises(function() D.image_resize(src:double(), 10, 10) end, 'expected a contiguous uint8')
end)

T.test('encode: round trip through our encoder and Pillow-compatible decoder', function()
  local src = raw_tensor(man.resize_source)
  local bytes = D.image_encode(src, 95, { subsample = false })
  local back = D.image_decode(bytes)
  local mx, mean = diff(back, src, 'round trip')
  T.check(mean < 3, 'mean diff ' .. mean)
  T.raises(function() D.image_encode(src, 101) end, 'quality must be 1..100')
  local prog = D.image_encode(src, 80, { progressive = true })
  T.eq(D.image_info(prog).progressive, true)
end)

T.done()
