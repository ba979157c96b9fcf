-- flower.progress (terminal bar and plain lines) and flower.files (atomic writes, CSV, JSON).
local T = require 'flower.test'
local progress = require 'flower.progress'
local files = require 'flower.files'

-- A file-like sink that records writes.
local function sink()
  local s = { parts = {} }
  function s:write(...) for i = 1, select('#', ...) do self.parts[#self.parts + 1] = select(i, ...) end return self end
  function s:flush() end
  function s:text() return table.concat(self.parts) end
  return s
end

local function fake_clock()
  local c = { t = 100 }
  return c, function() return c.t end
end

T.test('time formatting', function()
  T.eq(progress.fmt_time(0), '0:00'); T.eq(progress.fmt_time(192), '3:12')
  T.eq(progress.fmt_time(3725), '1:02:05'); T.eq(progress.fmt_time(math.huge), '?')
  T.eq(progress.fmt_num(2.31), '2.3100'); T.eq(progress.fmt_num(12), '12'); T.eq(progress.fmt_num(1e-5), '1e-05')
  T.eq(progress.fmt_num(0 / 0), 'nan')
end)

T.test('terminal bar: Keras-style line redrawn in place', function()
  local out = sink()
  local c, clk = fake_clock()
  local bar = progress.new { total = 2000, tty = true, out = out, clock = clk, label = 'epoch 1/3' }
  c.t = 100 + 120
  bar:update(312, { loss = 2.31, acc = 0.45 })
  local text = out:text()
  T.check(text:sub(1, 1) == '\r', 'starts with carriage return')
  T.check(text:find('epoch 1/3   312/2000 [===>.', 1, true), text)
  T.check(text:find('] - ETA 10:49 - loss 2.3100 - acc 0.4500', 1, true), text)
  local bar_part = text:match('%[(.-)%]')
  T.eq(#bar_part, 30)
  T.check(not text:find('\n'), 'no newline while running')
  -- throttled: a second update within `redraw` seconds draws nothing
  bar:update(313, { loss = 2.3 })
  T.eq(out:text(), text)
  c.t = c.t + 1
  bar:update(2000, { loss = 1.5, acc = 0.6 })
  T.check(out:text():find('2000/2000 [' .. string.rep('=', 30) .. ']', 1, true), 'full bar')
  bar:finish({ val_loss = 1.7, val_acc = 0.55 })
  local last = out:text():match('\r([^\r]*)$')
  T.check(last:find('loss 1.5000 - acc 0.6000 - val_loss 1.7000 - val_acc 0.5500\n', 1, true), last)
  T.check(last:find(' - 2:01 ', 1, true), 'elapsed shown: ' .. last)
end)

T.test('terminal bar pads over a longer previous line', function()
  local out = sink()
  local c, clk = fake_clock()
  local bar = progress.new { total = 10, tty = true, out = out, clock = clk, redraw = 0 }
  c.t = c.t + 1; bar:update(1, { loss = 123456.0, extra = 1.25 })
  local first = out:text()
  c.t = c.t + 1; bar:update(2, { loss = 1 })
  local second = out:text():sub(#first + 1)
  T.eq(#second, #first, 'same length after padding')
end)

T.test('plain mode: periodic lines, no carriage returns', function()
  local out = sink()
  local c, clk = fake_clock()
  local bar = progress.new { total = 100, tty = false, out = out, clock = clk, interval = 10, label = 'train' }
  for step = 1, 100 do
    c.t = c.t + 1
    bar:update(step, { loss = 1 / step })
  end
  bar:finish({ val_acc = 0.5 })
  local text = out:text()
  T.check(not text:find('\r'), 'no carriage return in plain mode')
  local lines = {}
  for l in text:gmatch('[^\n]+') do lines[#lines + 1] = l end
  T.eq(#lines, 11, 'one line per 10 s plus the final line')
  T.check(lines[1]:find('^train   10/100 %(10%%%) %- 0:10 %- ETA 1:30 %- loss 0%.1000$'), lines[1])
  T.check(lines[11]:find('100/100 - 1:40 1.00s/step - loss 0.0100 - val_acc 0.5000', 1, true), lines[11])
end)

T.test('FLOWER_PROGRESS / silent: nothing written', function()
  local out = sink()
  local bar = progress.new { total = 3, tty = false, out = out, silent = true }
  bar:update(3, { loss = 1 }); bar:finish()
  T.eq(out:text(), '')
end)

T.test('stdout_is_tty answers a boolean', function()
  T.eq(type(files.stdout_is_tty()), 'boolean')
end)

local dir = os.tmpname()
os.remove(dir)
files.mkdir(dir)

T.test('atomic write replaces the file and leaves no temporaries', function()
  local p = files.join(dir, 'a.txt')
  files.write_atomic(p, 'one')
  files.write_atomic(p, function(f) f:write('two', '\n') end)
  T.eq(files.read(p), 'two\n')
  local ls = io.popen('ls -a ' .. files.shell_quote(dir)):read('a')
  T.check(not ls:find('tmp'), 'temporary left: ' .. ls)
end)

T.test('a failing writer keeps the old file', function()
  local p = files.join(dir, 'b.txt')
  files.write_atomic(p, 'old')
  T.raises(function() files.write_atomic(p, function(f) f:write('partial'); error('boom') end) end, 'boom')
  T.eq(files.read(p), 'old')
  local ls = io.popen('ls -a ' .. files.shell_quote(dir)):read('a')
  T.check(not ls:find('tmp'), 'temporary left: ' .. ls)
  T.raises(function() files.write_atomic('/nonexistent-dir/x', 'a') end, 'cannot write /nonexistent-dir/x')
end)

T.test('csv round trip with quoting', function()
  local p = files.join(dir, 'c.csv')
  files.csv_write(p, { 'id', 'text', 'x' }, { { 1, 'a,b', 0.5 }, { 2, 'say "hi"\nthere', 1e-7 }, { 3, '', 3 } })
  local rows = files.csv_read(p)
  T.eq(#rows, 4); T.eq(rows[1][2], 'text'); T.eq(rows[2][2], 'a,b'); T.eq(rows[3][2], 'say "hi"\nthere')
  T.eq(rows[3][3], '1e-07'); T.eq(rows[4][2], ''); T.eq(#rows[4], 3)
  T.eq(#files.csv_parse('a,b\r\n1,2\r\n'), 2)
  T.eq(files.csv_parse('\239\187\191id\n')[1][1], 'id')
  T.raises(function() files.csv_parse('a,"b\n') end, 'unterminated quoted field')
  T.raises(function() files.csv_parse('a,b"c"\n', 'x.csv') end, 'x.csv line 1: quote inside')
end)

T.test('json: sorted keys, arrays, round trip through cjson', function()
  local v = { b = 1, a = { 1, 2, 3 }, c = { z = 'x"y', y = { { k = true } } }, lr = 1e-4, e = {} }
  local s = files.json_encode(v, true)
  T.check(s:find('"a"') < s:find('"b"') and s:find('"b"') < s:find('"c"'), 'sorted: ' .. s)
  local back = files.json_decode(s)
  T.eq(back.b, 1); T.eq(back.a[3], 3); T.eq(back.c.z, 'x"y'); T.eq(back.c.y[1].k, true); T.eq(back.lr, 1e-4)
  T.eq(files.json_encode({ 0.1 }), '[0.1]')
  T.eq(files.json_encode({ x = 0 / 0 }), '{"x":null}')
  T.raises(function() files.json_decode('{"a":', 'f.json') end, 'json: f.json')
end)

T.test('path helpers', function()
  T.eq(files.join('a/', 'b', 'c.txt'), 'a/b/c.txt'); T.eq(files.join('a', '/abs'), '/abs')
  T.eq(files.dirname('a/b/c'), 'a/b'); T.eq(files.dirname('c'), '.'); T.eq(files.basename('a/b/c'), 'c')
  T.eq(files.isdir(dir), true); T.eq(files.isdir(files.join(dir, 'a.txt')), false); T.eq(files.exists(dir .. '/nope'), false)
end)

os.execute('rm -rf ' .. files.shell_quote(dir))
T.done()
