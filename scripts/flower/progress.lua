-- flower.progress: a Keras-style progress bar on a terminal, plain periodic lines elsewhere.
--
--   local bar = progress.new{total = #loader, label = 'epoch 1/5'}
--   for step, batch in ... do ...; bar:update(step, {loss = l, acc = a}) end
--   bar:finish({val_loss = vl, val_acc = va})
--
-- On a terminal one line is redrawn in place (at most every `redraw` seconds):
--   epoch 1/5  312/2000 [====>.........................] - ETA 3:12 - loss 2.3100 - acc 0.4500
-- When stdout is not a terminal (CI, `> log`), a line is printed every `interval` seconds (and
-- when the bar finishes), so logs stay readable:
--   epoch 1/5  312/2000 (15%) - 12s - ETA 3:12 - loss 2.3100 - acc 0.4500
-- Options: total, label, out (a file, default io.stdout), tty (default: detected; FLOWER_PROGRESS=
-- tty|plain|off overrides), width (bar characters, 30), interval (plain mode, seconds, 10),
-- redraw (tty mode, seconds, 0.1), clock (function returning seconds; for tests), order (metric
-- names in display order; others follow sorted).
local files = require 'flower.files'

local progress = {}
local Bar = {}
Bar.__index = Bar

local function fmt_time(s)
  if s ~= s or s == math.huge then return '?' end
  s = math.floor(s + 0.5)
  if s >= 3600 then return string.format('%d:%02d:%02d', s // 3600, (s % 3600) // 60, s % 60) end
  return string.format('%d:%02d', s // 60, s % 60)
end
progress.fmt_time = fmt_time

local function fmt_num(v)
  if type(v) ~= 'number' then return tostring(v) end
  if v ~= v then return 'nan' end
  if math.type(v) == 'integer' then return tostring(v) end
  local a = math.abs(v)
  if a ~= 0 and (a >= 1e4 or a < 1e-3) then return string.format('%.4g', v) end
  return string.format('%.4f', v)
end
progress.fmt_num = fmt_num

-- " - loss 2.3100 - acc 0.4500" in a stable order: `order` first, the rest sorted.
local function fmt_metrics(metrics, order)
  if not metrics then return '' end
  local keys, seen = {}, {}
  for _, k in ipairs(order or {}) do
    if metrics[k] ~= nil then keys[#keys + 1] = k; seen[k] = true end
  end
  local rest = {}
  for k in pairs(metrics) do if not seen[k] then rest[#rest + 1] = k end end
  table.sort(rest)
  for _, k in ipairs(rest) do keys[#keys + 1] = k end
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = ' - ' .. k .. ' ' .. fmt_num(metrics[k]) end
  return table.concat(parts)
end
progress.fmt_metrics = fmt_metrics

function progress.new(opts)
  opts = opts or {}
  local mode = os.getenv('FLOWER_PROGRESS')
  local self = setmetatable({
    total = opts.total, label = opts.label, out = opts.out or io.stdout,
    width = opts.width or 30, interval = opts.interval or 10, redraw = opts.redraw or 0.1,
    clock = opts.clock or files.now, order = opts.order or { 'loss', 'acc', 'val_loss', 'val_acc' },
    silent = opts.silent or mode == 'off',
    current = 0, last_len = 0,
  }, Bar)
  if opts.tty ~= nil then self.tty = opts.tty else self.tty = files.stdout_is_tty() end
  self.start = self.clock()
  self.last_print = self.start
  return self
end

function Bar:_prefix()
  local total = self.total
  local digits = total and #tostring(total) or 1
  local s = self.label and (self.label .. '  ') or ''
  if total then return s .. string.format('%' .. digits .. 'd/%d', self.current, total) end
  return s .. tostring(self.current)
end

function Bar:_eta(now)
  local done, total = self.current, self.total
  if not total or done <= 0 then return math.huge end
  return (now - self.start) / done * (total - done)
end

function Bar:_bar()
  local w, total = self.width, self.total
  if not total or total <= 0 then return '' end
  local filled = math.min(w, math.floor(w * self.current / total))
  local s
  if self.current >= total then s = string.rep('=', w)
  elseif filled > 0 then s = string.rep('=', filled - 1) .. '>' .. string.rep('.', w - filled)
  else s = string.rep('.', w) end
  return ' [' .. s .. ']'
end

function Bar:_write_tty(line, final)
  local pad = self.last_len > #line and string.rep(' ', self.last_len - #line) or ''
  self.out:write('\r', line, pad, final and '\n' or '')
  self.out:flush()
  self.last_len = final and 0 or #line
end

-- Reports that `current` steps are done, with the running metrics.
function Bar:update(current, metrics)
  self.current = current
  self.metrics = metrics
  if self.silent then return end
  local now = self.clock()
  if self.tty then
    if now - self.last_print < self.redraw and current ~= self.total then return end
    self.last_print = now
    self:_write_tty(self:_prefix() .. self:_bar() .. ' - ETA ' .. fmt_time(self:_eta(now))
      .. fmt_metrics(metrics, self.order))
  else
    if now - self.last_print < self.interval then return end
    self.last_print = now
    local pct = self.total and self.total > 0 and string.format(' (%d%%)', math.floor(100 * current / self.total)) or ''
    self.out:write(self:_prefix(), pct, ' - ', fmt_time(now - self.start), ' - ETA ', fmt_time(self:_eta(now)),
      fmt_metrics(metrics, self.order), '\n')
    self.out:flush()
  end
end

-- Ends the bar with the final metrics (e.g. adding validation ones); returns the elapsed seconds.
function Bar:finish(metrics)
  local now = self.clock()
  local elapsed = now - self.start
  if self.total then self.current = math.max(self.current, 0) end
  if self.silent then return elapsed end
  local all = {}
  for k, v in pairs(self.metrics or {}) do all[k] = v end
  for k, v in pairs(metrics or {}) do all[k] = v end
  local per = self.current > 0 and elapsed / self.current or 0
  local per_s = per >= 1 and string.format('%.2fs/step', per) or string.format('%.0fms/step', per * 1000)
  local line = self:_prefix() .. (self.tty and self:_bar() or '') .. ' - ' .. fmt_time(elapsed) .. ' ' .. per_s
    .. fmt_metrics(all, self.order)
  if self.tty then self:_write_tty(line, true) else self.out:write(line, '\n'); self.out:flush() end
  return elapsed
end

return progress
