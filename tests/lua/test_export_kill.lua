-- Issue 14 point 2: a SIGKILL anywhere in a feature export leaves a run that resumes. Each case
-- kills a child export at a named write point (files.killpoint / the C side in core/io/h5.c),
-- runs the export again with resume = true, and compares every dataset and attribute with an
-- uninterrupted export's, bit for bit. A killed write's temporaries are gone afterwards.
local T = require 'flower.test'
local h5 = require 'flower.h5'
local files = require 'flower.files'
local F = dofile('tests/lua/exp_fixture.lua')

F.flowers('export', 3, 8, 5)           -- made here once, not raced by the children
local TMP = F.tmpdir()
local FL = os.getenv('FLOWERLUA') or './flowerlua'

local function run(path, killpoint)
  local env = killpoint and ('FLOWER_KILLPOINT=' .. files.shell_quote(killpoint) .. ' ') or 'FLOWER_KILLPOINT= '
  local ok, how, code = os.execute(string.format('%s%s tests/lua/export_kill_run.lua %s >%s/log 2>&1', env, FL,
    files.shell_quote(path), TMP))
  return ok == true, how, code
end

-- every dataset's contents and every attribute but the creation time
local function contents(path)
  local f <close> = h5.open(path, 'r')
  local c = {}
  for _, name in ipairs(f:list('/')) do
    local v = f:read('/' .. name)
    c[name] = type(v) == 'table' and table.concat(v, '\n') or v
  end
  for _, a in ipairs(f:attrs('/')) do
    if a ~= 'created' then
      local v = f:attr('/', a)
      c['@' .. a] = type(v) == 'table' and table.concat(v, '\n') or v
    end
  end
  return c
end

local function same(got, want, what)
  for k, w in pairs(want) do
    local g = got[k]
    T.check(g ~= nil, what .. ': ' .. k .. ' is missing')
    if type(w) == 'userdata' then
      T.check(g:dtype() == w:dtype() and g:equal(w), what .. ': ' .. k .. ' differs')
    else
      T.eq(g, w, what .. ': ' .. k)
    end
  end
  for k in pairs(got) do T.check(want[k] ~= nil, what .. ': extra ' .. k) end
end

local want
T.test('an uninterrupted export (the reference)', function()
  local p = files.join(TMP, 'ref.h5')
  T.check(run(p), 'the reference export failed: ' .. T.slurp(TMP .. '/log'))
  want = contents(p)
  T.eq(want['@train_complete'], 1)
end)

-- where to kill: every write point on the export path, early and late arrivals
local points = {
  'h5.write.done:1', 'h5.write.done:2', 'h5.attr.set:3', 'h5.attr.set:14', 'h5.attr.set:28', 'h5.attr.set:34',
  'h5.write_atomic.before_rename', 'h5.append.extended:1', 'h5.append.extended:4', 'h5.append.written:2',
  'h5.append.written:7', 'h5.flushed:1', 'h5.flushed:4', 'h5.flushed:11', 'export.batch_flushed:1',
  'export.batch_flushed:5', 'export.batch_committed:2', 'export.split_listed:1', 'export.split_listed:3', 'h5.write.done:5', 'h5.write.done:9',
}
for i, kp in ipairs(points) do
  T.test('killed at ' .. kp .. ', resumed: the same file', function()
    local p = files.join(TMP, 'k' .. i .. '.h5')
    local ok, how, code = run(p, kp)
    T.check(not ok and (code == 137 or code == 9), string.format('the run was not killed at %s (%s %s): %s', kp,
      tostring(how), tostring(code), T.slurp(TMP .. '/log')))
    T.check(run(p), 'the resumed export failed after a kill at ' .. kp .. ': ' .. T.slurp(TMP .. '/log'))
    same(contents(p), want, kp)
    local left = io.popen('ls ' .. files.shell_quote(p) .. '.tmp-* 2>/dev/null'):read('a')
    T.eq(left, '', 'temporaries left after the resume')
  end)
end

T.test('a damaged file is exported again, and a dead writer\'s temporary is removed', function()
  local p = files.join(TMP, 'damaged.h5')
  T.check(run(p, 'export.batch_committed:3') == false, 'not killed')
  local f = assert(io.open(p, 'r+b'))            -- a kill in an HDF5 flush: torn metadata
  f:seek('set', 0); f:write(string.rep('\0', 4096)); f:close()
  local stale = p .. '.tmp-999999999'
  assert(io.open(stale, 'wb')):close()
  T.check(run(p), 'the resumed export failed on a damaged file: ' .. T.slurp(TMP .. '/log'))
  T.check(T.slurp(TMP .. '/log'):find('cannot be resumed', 1, true), 'no word of the redo in the log')
  same(contents(p), want, 'damaged')
  T.check(not files.exists(stale), 'the stale temporary is still there')
end)

F.rmdir(TMP)
T.done()
