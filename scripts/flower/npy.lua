-- flower.npy: numpy's .npy files and the idx files MNIST-style data sets ship.
--
--   flower.save_npy('x.npy', t)          -- numpy.load('x.npy') gives the same array
--   local t = flower.load_npy('x.npy')   -- what numpy.save wrote: C or Fortran order
--   local images = flower.data.idx('train-images-idx3-ubyte.gz')   -- uint8 (60000, 28, 28)
--
-- dtypes: float32 '<f4', float64 '<f8', int32 '<i4', int64 '<i8', uint8 '|u1' (numpy's bool '|b1'
-- loads as uint8); big-endian arrays are byte-swapped on load. Other numpy dtypes (float16, int8,
-- int16, uint16, ...) and object arrays are refused with a message saying which conversion to make
-- in numpy. bfloat16 has no numpy dtype: save_npy refuses it (convert with :float()).
--
-- save_npy writes format 1.0 (2.0 when the header needs it), C order, little-endian, atomically.
-- Both read and write hold the whole array as one Lua string besides the tensor (2x its size for a
-- moment): these are interchange files, not the way to stream 22 GB of features (HDF5 is).
--
-- idx: magic 0x00 0x00 <type> <ndim>, ndim big-endian uint32 sizes, big-endian data; types 0x08
-- uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64 (int8/int16 widen to
-- int32). A .gz file (by its magic bytes) is read through `gzip -dc`.
local flower = require 'flower'
local files = require 'flower.files'

local npy = {}

local function fail(fname, fmt, ...) error(fname .. ': ' .. string.format(fmt, ...), 3) end

local MAGIC = '\147NUMPY'

-- numpy descr (without byte order) -> flower dtype, element size
local from_descr = {
  f4 = { 'float32', 4 }, f8 = { 'float64', 8 }, i4 = { 'int32', 4 }, i8 = { 'int64', 8 },
  u1 = { 'uint8', 1 }, b1 = { 'uint8', 1 },
}
local to_descr = { float32 = '<f4', float64 = '<f8', int32 = '<i4', int64 = '<i8', uint8 = '|u1' }

-- reverses the bytes of each `size`-byte element of s
local function byteswap(s, size)
  if size == 1 then return s end
  local out, n = {}, 0
  for i = 1, #s, size do
    n = n + 1
    out[n] = s:sub(i, i + size - 1):reverse()
  end
  return table.concat(out)
end

local function shape_string(shape)
  local p = {}
  for i, d in ipairs(shape) do p[i] = tostring(d) end
  return '(' .. table.concat(p, ', ') .. ')'
end

-- the header dict of a .npy file: {descr = '<f4', fortran_order = false, shape = {2, 3}}
local function parse_header(h, path)
  local descr = h:match("'descr'%s*:%s*'([^']*)'")
  local fortran = h:match("'fortran_order'%s*:%s*(%a+)")
  local shape_s = h:match("'shape'%s*:%s*(%b())")
  if not descr then
    if h:find("'descr'%s*:%s*%[") then fail('load_npy', '%s: structured arrays are not supported', path) end
    fail('load_npy', "%s: header has no 'descr' (got %q)", path, h)
  end
  if fortran ~= 'True' and fortran ~= 'False' then fail('load_npy', "%s: header has no 'fortran_order' (got %q)", path, h) end
  if not shape_s then fail('load_npy', "%s: header has no 'shape' (got %q)", path, h) end
  local shape = {}
  for d in shape_s:gmatch('[^%s,()]+') do
    local v = math.tointeger(tonumber(d))
    if not v or v < 0 then fail('load_npy', '%s: bad dimension %q in shape %s', path, d, shape_s) end
    shape[#shape + 1] = v
  end
  return { descr = descr, fortran_order = fortran == 'True', shape = shape }
end

-- flower.fromstring, its refusals (too many dimensions, ...) naming the file
local function tensor_of(bytes, dtype, shape, path)
  local ok, t = pcall(flower.fromstring, bytes, dtype, shape)
  if not ok then error(string.format('%s: %s', path, t), 4) end
  return t
end

-- Reads a .npy file into a tensor (a 0-d array gives a 0-dim tensor).
function npy.load_npy(path)
  if type(path) ~= 'string' then fail('load_npy', 'expected a file name, got %s', type(path)) end
  local f, err = io.open(path, 'rb')
  if not f then fail('load_npy', '%s', tostring(err)) end
  local s = f:read('a')
  f:close()
  if s:sub(1, 6) ~= MAGIC then fail('load_npy', '%s: not a .npy file (no \\x93NUMPY magic)', path) end
  local major = s:byte(7) or 0
  local hlen, hstart
  if major == 1 and #s >= 10 then
    hlen, hstart = string.unpack('<I2', s, 9), 11
  elseif (major == 2 or major == 3) and #s >= 12 then
    hlen, hstart = string.unpack('<I4', s, 9), 13
  else
    fail('load_npy', '%s: unsupported .npy format version %d', path, major)
  end
  if #s < hstart + hlen - 1 then fail('load_npy', '%s: truncated header', path) end
  local h = parse_header(s:sub(hstart, hstart + hlen - 1), path)
  local order, code = h.descr:match('^([<>|=]?)(%a%d+)$')
  local dt = code and from_descr[code]
  if not dt then
    fail('load_npy', "%s: dtype '%s' is not supported (float32, float64, int32, int64, uint8, bool); "
      .. "convert in numpy first, e.g. a.astype('float32')", path, h.descr)
  end
  local numel = 1
  for _, d in ipairs(h.shape) do numel = numel * d end
  local data_start = hstart + hlen
  local want = numel * dt[2]
  local have = #s - data_start + 1
  if have ~= want then
    fail('load_npy', '%s: shape %s of %s needs %d data bytes, the file has %d', path, shape_string(h.shape),
      h.descr, want, have)
  end
  local bytes = s:sub(data_start)
  s = nil
  if order == '>' then bytes = byteswap(bytes, dt[2]) end
  if not h.fortran_order or #h.shape <= 1 then return tensor_of(bytes, dt[1], h.shape, path) end
  -- Fortran order is C order of the reversed shape
  local rev, perm = {}, {}
  for i = #h.shape, 1, -1 do rev[#rev + 1] = h.shape[i]; perm[#perm + 1] = i end
  return tensor_of(bytes, dt[1], rev, path):permute(table.unpack(perm)):contiguous()
end

-- Writes a tensor as a .npy file (atomically), C order.
function npy.save_npy(path, t)
  if type(path) ~= 'string' then fail('save_npy', 'expected a file name, got %s', type(path)) end
  if not flower.is_tensor(t) then fail('save_npy', 'expected a tensor to save, got %s', type(t)) end
  local descr = to_descr[t:dtype()]
  if not descr then fail('save_npy', '%s tensors have no numpy dtype; convert with :float()', t:dtype()) end
  local shape = t:size()
  local dims = {}
  for i, d in ipairs(shape) do dims[i] = tostring(d) end
  local shape_s = #dims == 1 and ('(' .. dims[1] .. ',)') or ('(' .. table.concat(dims, ', ') .. ')')
  local dict = string.format("{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shape_s)
  -- the header (magic, version, length, dict, padding, newline) is padded to a multiple of 64
  local version, lenfmt, prefix = 1, '<I2', 10
  if #dict + 1 + prefix > 65535 then version, lenfmt, prefix = 2, '<I4', 12 end
  local total = prefix + #dict + 1
  local pad = (64 - total % 64) % 64
  local header = dict .. string.rep(' ', pad) .. '\n'
  local raw = t:tostring_raw()
  files.write_atomic(path, function(f)
    assert(f:write(MAGIC, string.char(version, 0), string.pack(lenfmt, #header), header, raw))
  end)
  return path
end

-- idx type byte -> flower dtype, element size, big-endian unpack format (nil: read raw)
local idx_types = {
  [0x08] = { 'uint8', 1 }, [0x09] = { 'int32', 1, '>i1' }, [0x0B] = { 'int32', 2, '>i2' },
  [0x0C] = { 'int32', 4 }, [0x0D] = { 'float32', 4 }, [0x0E] = { 'float64', 8 },
}

local function read_maybe_gz(path)
  local f, err = io.open(path, 'rb')
  if not f then fail('data.idx', '%s', tostring(err)) end
  local head = f:read(2)
  if head ~= '\31\139' then
    local s = (head or '') .. (f:read('a') or '')
    f:close()
    return s
  end
  f:close()
  local p = io.popen('gzip -dc ' .. files.shell_quote(path) .. ' 2>/dev/null', 'r')
  local s = p:read('a')
  local ok = p:close()
  if not ok then fail('data.idx', '%s: gzip could not decompress it (corrupt or truncated .gz)', path) end
  return s
end

-- Reads an idx(.gz) file into a tensor.
function npy.load_idx(path)
  if type(path) ~= 'string' then fail('data.idx', 'expected a file name, got %s', type(path)) end
  local s = read_maybe_gz(path)
  if #s < 4 or s:byte(1) ~= 0 or s:byte(2) ~= 0 then fail('data.idx', '%s: not an idx file (bad magic)', path) end
  local ty = idx_types[s:byte(3)]
  if not ty then fail('data.idx', '%s: unknown idx data type 0x%02X', path, s:byte(3)) end
  local ndim = s:byte(4)
  if #s < 4 + 4 * ndim then fail('data.idx', '%s: truncated header', path) end
  local shape, numel = {}, 1
  for i = 1, ndim do
    shape[i] = string.unpack('>I4', s, 1 + 4 * i)
    numel = numel * shape[i]
  end
  local start = 5 + 4 * ndim
  local have = #s - start + 1
  if have ~= numel * ty[2] then
    fail('data.idx', '%s: shape %s needs %d data bytes, the file has %d', path, shape_string(shape), numel * ty[2], have)
  end
  local bytes
  if ty[3] then   -- narrow signed integers widen to int32
    local out = {}
    for i = 0, numel - 1 do out[i + 1] = string.pack('<i4', (string.unpack(ty[3], s, start + i * ty[2]))) end
    bytes = table.concat(out)
  else
    bytes = byteswap(s:sub(start), ty[2])
  end
  return tensor_of(bytes, ty[1], shape, path)
end

return npy
