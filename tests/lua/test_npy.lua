-- flower.load_npy / flower.save_npy against numpy (every dtype we have, C and Fortran order,
-- big-endian, 0-d, empty) and flower.data.idx against idx files numpy wrote (gzipped or not).
local T = require 'flower.test'
local flower = require 'flower'
local files = require 'flower.files'

local TMP = T.tmpdir()
local function tmp(...) return files.join(TMP, ...) end
assert(T.sh(string.format('%s tests/reference/npy_cases.py write %s', T.python, TMP)), 'numpy writer failed (run make deps)')
local cases = files.json_read(tmp('cases.json'))
local names = {}
for k in pairs(cases) do names[#names + 1] = k end
table.sort(names)

local function same_shape(t, shape)
  local s = t:size()
  if #s ~= #shape then return false end
  for i = 1, #s do if s[i] ~= shape[i] then return false end end
  return true
end

for _, name in ipairs(names) do
  local c = cases[name]
  T.test('numpy wrote ' .. name .. ': we read the same values', function()
    local t = c.idx and flower.data.idx(tmp(name)) or flower.load_npy(tmp(name .. '.npy'))
    T.eq(t:dtype(), c.dtype)
    T.check(same_shape(t, c.shape), 'shape ' .. table.concat(t:size(), 'x'))
    T.check(t:is_contiguous())
    T.check(t:tostring_raw() == T.slurp(tmp(name .. (c.idx and '' or '') .. '.bin')), 'bytes differ')
  end)
end

T.test('we write every case; numpy reads the same values', function()
  for _, name in ipairs(names) do
    local c = cases[name]
    local t = c.idx and flower.data.idx(tmp(name)) or flower.load_npy(tmp(name .. '.npy'))
    flower.save_npy(tmp('ours_' .. name .. '.npy'), t)
    local f = assert(io.open(tmp('ours_' .. name .. '.bin'), 'wb'))
    f:write(t:tostring_raw()); f:close()
  end
  local out = tmp('check.txt')
  assert(T.sh(string.format('%s tests/reference/npy_cases.py check %s > %s', T.python, TMP, out)))
  local n = 0
  for line in io.lines(out) do
    n = n + 1
    T.check(line:match(' ok$'), line)
  end
  T.eq(n, #names)
end)

T.test('a non-contiguous view saves as its values', function()
  local t = flower.arange(0, 12):float():view(3, 4):t()
  flower.save_npy(tmp('view.npy'), t)
  T.check(flower.load_npy(tmp('view.npy')):equal(t:contiguous()))
end)

T.test('bad files and calls get messages naming the file and the fix', function()
  local function err_of(f, ...) local ok, e = pcall(f, ...); T.check(not ok, 'no error'); return e end
  local e = err_of(flower.load_npy, tmp('bad_float16.npy'))
  T.check(e:find("dtype '<f2' is not supported", 1, true) and e:find("astype('float32')", 1, true), e)
  e = err_of(flower.load_npy, tmp('bad_nine_dims.npy'))
  T.check(e:find('bad_nine_dims.npy: ', 1, true) and e:find('dims', 1, true), e)
  e = err_of(flower.load_npy, tmp('nope.npy'))
  T.check(e:find('load_npy: ', 1, true) and e:find('nope.npy', 1, true), e)
  local f = assert(io.open(tmp('notnpy.npy'), 'wb')); f:write('hello'); f:close()
  e = err_of(flower.load_npy, tmp('notnpy.npy'))
  T.check(e:find('not a .npy file', 1, true), e)
  -- a file cut short: the message says how many bytes it needed
  local whole = T.slurp(tmp('c_float32.npy'))
  f = assert(io.open(tmp('short.npy'), 'wb')); f:write(whole:sub(1, #whole - 4)); f:close()
  e = err_of(flower.load_npy, tmp('short.npy'))
  T.check(e:find('needs 240 data bytes, the file has 236', 1, true), e)
  e = err_of(flower.save_npy, tmp('x.npy'), flower.zeros(2):bfloat16())
  T.check(e:find('bfloat16 tensors have no numpy dtype', 1, true), e)
  e = err_of(flower.save_npy, tmp('x.npy'), 'abc')
  T.check(e:find('expected a tensor', 1, true), e)
  e = err_of(flower.data.idx, tmp('c_float32.npy'))
  T.check(e:find('not an idx file', 1, true), e)
  f = assert(io.open(tmp('trunc.gz'), 'wb')); f:write(T.slurp(tmp('images-idx3-ubyte.gz')):sub(1, 30)); f:close()
  e = err_of(flower.data.idx, tmp('trunc.gz'))
  T.check(e:find('gzip could not decompress', 1, true), e)
end)

T.done()
