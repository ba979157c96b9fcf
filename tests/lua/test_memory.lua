-- flower.memory (sizes, budget, peaks) and the host arena's release: after flower.memory('release')
-- the free pages the arena keeps follow the new stage's peak, not the largest stage's before it.
local T = require 'flower.test'
local flower = require 'flower'
local memory = require 'flower.memory'
local MB = 1024 * 1024

T.test('sizes parse with binary units; a bad one is an error naming it', function()
  T.eq(memory.parse('8G'), 8 * 1024 * MB)
  T.eq(memory.parse('512M'), 512 * MB)
  T.eq(memory.parse('1.5GiB'), 1536 * MB)
  T.eq(memory.parse('4096'), 4096)
  T.eq(memory.parse(1000), 1000)
  T.raises(function() memory.parse('8 bananas', '--memory-budget') end, "--memory-budget: expected a size such as 8G")
  T.raises(function() memory.parse(-1) end, 'expected a size')
  T.check(memory.budget() > 0 and memory.budget() <= memory.total(), 'default budget: a fraction of RAM')
end)

T.test('peak resident memory restarts from now', function()
  memory.reset_peak()
  local before = memory.peak()
  local t = flower.ones({ 64, MB // 4 })        -- 64 MB, touched
  T.check(memory.peak() >= before + 60 * MB, 'the peak saw the 64 MB')
  t:free()
  flower.memory('release')
  memory.reset_peak()
  -- the 64 MB went back (not under ASan, which quarantines freed memory): the peak is what is resident now
  T.check(memory.peak() <= memory.rss() + 8 * MB,
    string.format('restarted: peak %s, resident %s', memory.format(memory.peak()), memory.format(memory.rss())))
end)

-- a stage that dirties more free pages than it ever uses at once: blocks freed into holes that the
-- next, larger block cannot reuse
local function fragmenting_stage()   -- 20 + 20 + 30 + 45 MB freed, at most 75 MB in use
  local a = flower.ones({ 20 * MB // 4 })
  local b = flower.ones({ 20 * MB // 4 })
  a:free()
  local c = flower.ones({ 30 * MB // 4 })
  b:free()
  local d = flower.ones({ 45 * MB // 4 })
  c:free(); d:free()
end

local ARENA_TEST = "after 'release' the arena keeps free pages by the new stage's peak, not the old one's"
if os.getenv('SANITIZE') == '1' then print('ok - ' .. ARENA_TEST .. ' # SKIP no arena under AddressSanitizer') else
T.test(ARENA_TEST, function()
  local big = flower.ones({ 400 * MB // 4 })    -- an earlier stage's peak: 400 MB
  big:free()
  flower.memory('release')
  T.eq(flower.memory().cached, 0, 'release gives every free page back')
  fragmenting_stage()
  local cached = flower.memory().cached
  -- at most 75 MB in use at once, 115 MB freed: with the earlier stage's 400 MB peak as the
  -- headroom's reference every freed page would stay (115 MB); with this stage's, some go back
  T.check(cached < 105 * MB, string.format('cached %s', memory.format(cached)))
end)
end

T.done()
