-- The ensemble at a size that does not fit: four feature files whose features, read whole, pass the
-- address-space limit (`ulimit -v`) the training process runs under. Streamed from the files it
-- trains and predicts within the limit, and gives what the whole-file run (no limit) gives on the
-- same files; the whole-file run under the same limit fails. Under SANITIZE (AddressSanitizer
-- reserves terabytes of address space) the files are smaller and no limit is set.
local T = require 'flower.test'
local flower = require 'flower'
local h5 = require 'flower.h5'
local files = require 'flower.files'
local FF = dofile('tests/lua/features_fixture.lua')
local F = dofile('tests/lua/exp_fixture.lua')

local FLOWERLUA = os.getenv('FLOWERLUA') or './flowerlua'
local SAN = os.getenv('SANITIZE') == '1'
local TMP = F.tmpdir()
local MB = 1024 * 1024

-- 4 files x 512 columns; 180,000 rows in all: 1.4 GiB of features (22 MB under SANITIZE)
local ROWS = SAN and { train = 2000, valid = 500, test = 200 } or { train = 135000, valid = 33000, test = 12000 }
local DIM, CLASSES = 512, 10
-- the address-space limit: about 400 MB of it is the process before any data (libraries, thread
-- stacks); OpenBLAS reserves 128 MB buffers for its threads, and starves below about 1 GB
local LIMIT_KB = 1300 * 1024
local labels = FF.labels(ROWS, CLASSES, 7)
local paths = {}
for i = 1, 4 do
  paths[i] = files.join(TMP, string.format('m%d.h5', i))
  FF.write(paths[i], { model = 'm' .. i, dim = DIM, classes = CLASSES, labels = labels, seed = 100 + i, signal = 1.5 })
end
local total = 0
for _, n in pairs(ROWS) do total = total + n * DIM * 4 * 4 end

local function child(mode, out, limit_kb)
  local cmd = string.format('%s tests/lua/ensemble_scale_child.lua %s %s', FLOWERLUA, mode, files.shell_quote(out))
  for _, p in ipairs(paths) do cmd = cmd .. ' ' .. files.shell_quote(p) end
  if limit_kb then cmd = string.format('ulimit -v %d && %s', limit_kb, cmd) end
  local text, rc = T.capture('bash -c ' .. files.shell_quote(cmd))
  return rc, text
end

local function read_all(path)
  local f <close> = h5.open(path, 'r')
  local r = { probs = f:read('/test_probs'), mean = f:read('/mean'), std = f:read('/std'), val_acc = f:attr('/', 'val_acc'),
              w = {} }
  for _, g in ipairs(f:list('/w')) do
    for _, name in ipairs(f:list('/w/' .. g)) do r.w[g .. '/' .. name] = f:read('/w/' .. g .. '/' .. name) end
  end
  return r
end

T.test(string.format('the streamed ensemble trains and predicts within the limit (%d MB of features)', total // MB), function()
  if not SAN then T.check(total > LIMIT_KB * 1024, 'the features alone pass the limit') end
  local rc, text = child('stream', files.join(TMP, 'stream.h5'), not SAN and LIMIT_KB or nil)
  T.eq(rc, 0, 'the streamed run under the limit:\n' .. text)
  local rc2, text2 = child('resident', files.join(TMP, 'resident.h5'), nil)
  T.eq(rc2, 0, 'the whole-file run without a limit:\n' .. text2)
  io.write(text:match('stream:[^\n]*') or '', '\n', text2:match('resident:[^\n]*') or '', '\n')
  local s, r = read_all(files.join(TMP, 'stream.h5')), read_all(files.join(TMP, 'resident.h5'))
  -- (under SANITIZE one epoch is 8 steps: too few to learn)
  if not SAN then T.check(s.val_acc > 0.5, string.format('it learned: validation accuracy %.3f', s.val_acc)) end
  T.near(s.val_acc, r.val_acc, 1e-9, 0, 'same validation accuracy')
  T.allclose(s.mean, r.mean, 1e-6, 1e-7, 'standardisation means')
  T.allclose(s.std, r.std, 1e-6, 1e-7, 'standardisation stds')
  for k, w in pairs(r.w) do T.allclose(s.w[k], w, 1e-5, 1e-6, 'weight ' .. k) end
  T.allclose(s.probs, r.probs, 1e-5, 1e-6, 'test probabilities')
end)

if not SAN then
  T.test('reading the same files whole under the same limit fails', function()
    local rc, text = child('resident', files.join(TMP, 'resident-limited.h5'), LIMIT_KB)
    T.check(rc ~= 0, 'the whole-file run must not fit:\n' .. text)
  end)
end

F.rmdir(TMP)
T.done()
