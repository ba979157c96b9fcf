-- Helpers for the nn tests: Keras reference data (tests/reference/gen_layers.py) and finite
-- differences. The reference is generated when missing or older than its generator.
local flower = require 'flower'
local cjson = require 'cjson'

local R = {}

local function mtime(path)
  local f = io.popen("stat -c %Y '" .. path .. "' 2>/dev/null")
  local s = f:read('*l')
  f:close()
  return tonumber(s)
end

local function read_all(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('a')
  f:close()
  return s
end

-- Runs a reference generator (tests/reference/<gen>.py) into build/ref/<dir> unless it is up to date;
-- returns the decoded manifest.
function R.load(gen, dir)
  local out = 'build/ref/' .. dir
  local man = out .. '/manifest.json'
  local tg, tm = mtime('tests/reference/' .. gen .. '.py'), mtime(man)
  if not tm or (tg and tm < tg) then
    os.execute('mkdir -p build/ref')
    local log = 'build/ref/' .. gen .. '.log'
    local ok = os.execute('.venv/bin/python tests/reference/' .. gen .. '.py ' .. out .. ' > ' .. log .. ' 2>&1')
    if not ok then
      error('reference generator tests/reference/' .. gen .. '.py failed (it needs the .venv from `make deps`); see ' .. log)
    end
  end
  local m = cjson.decode(read_all(man))
  m.dir = out
  return m
end

local cache = {}
-- the tensor an array reference {offset, shape, dtype} of case file `case` points at
function R.array(m, case, ref)
  if ref == nil or ref == cjson.null then return nil end
  local path = m.dir .. '/' .. case .. '.bin'
  local data = cache[path]
  if not data then data = read_all(path); cache = {[path] = data} end
  local esz = ({float32 = 4, float64 = 8, int64 = 8, int32 = 4})[ref.dtype]
  local n = 1
  for _, d in ipairs(ref.shape) do n = n * d end
  local bytes = data:sub(ref.offset + 1, ref.offset + n * esz)
  local shape = ref.shape
  if #shape == 0 then shape = {1} end
  return flower.fromstring(bytes, ref.dtype, shape)
end

-- Central finite differences of f (returns a number) with respect to every element of t (float64),
-- compared with the analytic gradient g: max |num - ana| <= tol * max(1, max |ana|).
function R.fd_check(T, name, f, t, g, tol, h)
  h = h or 1e-6
  local flat = t:view(-1)
  local gf = g:contiguous():view(-1)
  local n = flat:numel()
  local worst, scale = 0, 1
  local step = math.max(1, n // 40)       -- at most ~40 probes per tensor
  for i = 1, n, step do
    local e = flat:narrow(1, i, 1)
    local v = e:item()
    e:fill(v + h); local lp = f()
    e:fill(v - h); local lm = f()
    e:fill(v)
    local num = (lp - lm) / (2 * h)
    local ana = gf[i]
    worst = math.max(worst, math.abs(num - ana))
    scale = math.max(scale, math.abs(ana))
  end
  if not (worst <= (tol or 1e-5) * scale) then
    error(string.format('%s: finite differences differ by %.3g (scale %.3g)', name, worst, scale), 2)
  end
end

return R
