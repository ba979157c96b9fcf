-- flower.files: small file helpers shared by the experiment modules — atomic writes, directories,
-- CSV (RFC 4180) and JSON with a stable key order.
--
-- Atomic writes: the content goes to `<path>.tmp-<random>` in the same directory, is flushed and
-- closed, then renamed over `path` (rename(2) is atomic on POSIX). A reader sees the old file or the
-- new one, never half of one; a crash leaves at most a stray .tmp file.
local files = {}

local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
files.shell_quote = shell_quote

local tmp_counter = 0
-- A fresh temporary name beside `path` (same file system, so rename is atomic).
function files.tmpname(path)
  tmp_counter = tmp_counter + 1
  return string.format('%s.tmp-%x-%d', path, math.random(0, 0x7fffffff), tmp_counter)
end

-- Test hook for crash-safety tests: with FLOWER_KILLPOINT='<name>', '<name>:<n>' or
-- '<name>:<n>:<signal>' in the environment, the n-th arrival (default 1) at the write point `name`
-- sends SIGKILL (or INT or TERM, to test the graceful paths at an exact place) to this process, so a
-- test can stop a run at an exact place and check that a resume loses nothing. Write paths call
-- files.killpoint('checkpoint.before_rename') and the like; without the variable it does nothing.
local killpoint_name, killpoint_n, killpoint_sig =
  (os.getenv('FLOWER_KILLPOINT') or ''):match('^([^:]+):?(%d*):?(%u*)$')
local killpoint_hits = 0
function files.killpoint(name)
  if name ~= killpoint_name then return end
  killpoint_hits = killpoint_hits + 1
  if killpoint_hits ~= (tonumber(killpoint_n) or 1) then return end
  local sig = killpoint_sig ~= '' and killpoint_sig or 'KILL'
  if sig ~= 'KILL' and sig ~= 'INT' and sig ~= 'TERM' then
    error("FLOWER_KILLPOINT: the signal must be KILL, INT or TERM, got '" .. sig .. "'", 2)
  end
  io.stdout:flush(); io.stderr:flush()
  local stat = io.open('/proc/self/stat', 'r')
  local pid = stat:read('n'); stat:close()
  -- through popen: os.execute's system() ignores SIGINT while it waits, and would drop it; a
  -- signal has arrived when close returns
  local p = io.popen('kill -' .. sig .. ' ' .. math.tointeger(pid))
  p:close()
end

function files.exists(path)
  local f = io.open(path, 'rb')
  if f then f:close() return true end
  return false
end

function files.isdir(path)
  -- opening a directory for reading succeeds on Linux but reading it fails with EISDIR
  local f = io.open(path, 'rb')
  if not f then return false end
  local ok, err, code = f:read(1)
  f:close()
  return ok == nil and code == 21
end

function files.mkdir(path)
  if files.isdir(path) then return path end
  local ok = os.execute('mkdir -p ' .. shell_quote(path))
  if not ok or not files.isdir(path) then error('files.mkdir: cannot create directory ' .. path, 2) end
  return path
end

function files.dirname(path)
  local d = path:match('^(.*)/[^/]*$')
  if d == nil then return '.' end
  if d == '' then return '/' end
  return d
end

function files.basename(path) return (path:match('([^/]*)$')) end

function files.join(...)
  local parts = {}
  for i = 1, select('#', ...) do
    local p = select(i, ...)
    if p ~= nil and p ~= '' then
      if p:sub(1, 1) == '/' then parts = {} end
      parts[#parts + 1] = (p:gsub('/+$', ''))
    end
  end
  return table.concat(parts, '/')
end

function files.read(path)
  local f, err = io.open(path, 'rb')
  if not f then error('files.read: ' .. tostring(err), 2) end
  local s = f:read('a')
  f:close()
  return s
end

-- Writes `content` (a string, or a function(f) that writes into the open file) atomically.
function files.write_atomic(path, content)
  local tmp = files.tmpname(path)
  local f, err = io.open(tmp, 'wb')
  if not f then error('files.write_atomic: cannot write ' .. path .. ': ' .. tostring(err), 2) end
  local ok, werr = pcall(function()
    if type(content) == 'function' then content(f) else assert(f:write(content)) end
    assert(f:flush())
  end)
  f:close()
  if not ok then
    os.remove(tmp)
    error('files.write_atomic: writing ' .. path .. ' failed: ' .. tostring(werr), 2)
  end
  local u = files.util()
  if u then pcall(u.fsync, tmp) end
  local rok, rerr = os.rename(tmp, path)
  if not rok then
    os.remove(tmp)
    error('files.write_atomic: cannot rename onto ' .. path .. ': ' .. tostring(rerr), 2)
  end
  return path
end

-- Appends a line to a file (creating it); used for logs, where a partial last line is harmless.
function files.append(path, s)
  local f, err = io.open(path, 'ab')
  if not f then error('files.append: ' .. tostring(err), 2) end
  f:write(s)
  f:close()
end

---------------------------------------------------------------------------------------------------
-- CSV

local function csv_field(v)
  local s
  if type(v) == 'number' then
    if math.type(v) == 'integer' then s = string.format('%d', v)
    elseif v ~= v then s = 'nan'
    elseif v == math.huge then s = 'inf'
    elseif v == -math.huge then s = '-inf'
    else s = string.format('%.9g', v) end
  elseif v == nil then s = ''
  else s = tostring(v) end
  if s:find('[,"\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end
files.csv_field = csv_field

function files.csv_line(fields, n)
  local out = {}
  for i = 1, n or #fields do out[i] = csv_field(fields[i]) end
  return table.concat(out, ',') .. '\n'
end

-- Parses CSV text into a list of rows (lists of strings). Handles quoted fields with commas,
-- doubled quotes and newlines, and CRLF line ends; a trailing newline ends the last row.
function files.csv_parse(text, name)
  local rows, row, field = {}, {}, {}
  local i, n = 1, #text
  local inq = false
  local line = 1
  if text:sub(1, 3) == '\239\187\191' then i = 4 end -- UTF-8 BOM
  while i <= n do
    local c = text:sub(i, i)
    if inq then
      if c == '"' then
        if text:sub(i + 1, i + 1) == '"' then field[#field + 1] = '"'; i = i + 1
        else inq = false end
      else
        if c == '\n' then line = line + 1 end
        field[#field + 1] = c
      end
    elseif c == '"' then
      if #field > 0 then
        error(string.format('csv: %s line %d: quote inside an unquoted field', name or 'text', line), 2)
      end
      inq = true
    elseif c == ',' then
      row[#row + 1] = table.concat(field); field = {}
    elseif c == '\n' or c == '\r' then
      if c == '\r' and text:sub(i + 1, i + 1) == '\n' then i = i + 1 end
      row[#row + 1] = table.concat(field); field = {}
      rows[#rows + 1] = row; row = {}
      line = line + 1
    else
      field[#field + 1] = c
    end
    i = i + 1
  end
  if inq then error(string.format('csv: %s: unterminated quoted field at line %d', name or 'text', line), 2) end
  if #field > 0 or #row > 0 then row[#row + 1] = table.concat(field); rows[#rows + 1] = row end
  return rows
end

function files.csv_read(path)
  return files.csv_parse(files.read(path), path)
end

-- Writes rows (lists) with a header atomically.
function files.csv_write(path, header, rows)
  return files.write_atomic(path, function(f)
    f:write(files.csv_line(header))
    for _, r in ipairs(rows) do f:write(files.csv_line(r, #header)) end
  end)
end

---------------------------------------------------------------------------------------------------
-- JSON with sorted keys and indentation (for configs people read and diff); decoding via lua-cjson.

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    local map = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
    return map[c] or string.format('\\u%04x', c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = #t
  local count = 0
  for _ in pairs(t) do count = count + 1 end
  return count == n, n
end

local function encode(v, indent, depth, seen)
  local t = type(v)
  if t == 'nil' then return 'null'
  elseif t == 'boolean' then return tostring(v)
  elseif t == 'number' then
    if math.type(v) == 'integer' then return string.format('%d', v) end
    if v ~= v or v == math.huge or v == -math.huge then return 'null' end
    local s = string.format('%.17g', v)
    if tonumber(string.format('%.15g', v)) == v then s = string.format('%.15g', v) end
    return s
  elseif t == 'string' then return json_string(v)
  elseif t == 'table' then
    if seen[v] then error('files.json: cyclic table', 0) end
    seen[v] = true
    local pad = indent and ('\n' .. string.rep(indent, depth + 1)) or ''
    local close = indent and ('\n' .. string.rep(indent, depth)) or ''
    local sep = indent and ': ' or ':'
    local arr, n = is_array(v)
    local parts = {}
    if arr then
      if n == 0 then seen[v] = nil return '[]' end
      local simple = true
      for i = 1, n do if type(v[i]) == 'table' then simple = false end end
      for i = 1, n do parts[i] = encode(v[i], indent, depth + 1, seen) end
      seen[v] = nil
      if simple then return '[' .. table.concat(parts, ', ') .. ']' end
      return '[' .. pad .. table.concat(parts, ',' .. pad) .. close .. ']'
    end
    local keys = {}
    for k in pairs(v) do
      if type(k) ~= 'string' and type(k) ~= 'number' then error('files.json: key of type ' .. type(k), 0) end
      local kt = type(v[k])
      if kt ~= 'function' and kt ~= 'userdata' and kt ~= 'thread' then keys[#keys + 1] = tostring(k) end
    end
    table.sort(keys)
    for i, k in ipairs(keys) do
      local val = v[k]
      if val == nil then val = v[tonumber(k)] end
      parts[i] = json_string(k) .. sep .. encode(val, indent, depth + 1, seen)
    end
    seen[v] = nil
    if #parts == 0 then return '{}' end
    return '{' .. pad .. table.concat(parts, ',' .. pad) .. close .. '}'
  else
    return json_string('<' .. t .. '>')
  end
end

-- JSON text of v; pretty = true indents by two spaces. Functions and userdata in tables are left out.
function files.json_encode(v, pretty)
  return encode(v, pretty and '  ' or nil, 0, {})
end

-- A small JSON reader that keeps integers integers (lua-cjson makes every number a float, which
-- loses epochs' integer type and 64-bit RNG seeds). null becomes nil (a hole in an array).
local function json_parser(text, name)
  local pos = 1
  local function fail(what)
    local line = select(2, text:sub(1, pos):gsub('\n', '')) + 1
    error(string.format('json: %s: line %d: %s', name or 'text', line, what), 0)
  end
  local function ws() pos = text:find('[^ \t\r\n]', pos) or #text + 1 end
  local value
  local escapes = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' }
  local function str()
    pos = pos + 1
    local out = {}
    while true do
      local c = text:sub(pos, pos)
      if c == '' then fail('unterminated string') end
      if c == '"' then pos = pos + 1 break end
      if c == '\\' then
        local e = text:sub(pos + 1, pos + 1)
        if e == 'u' then
          local hex = text:sub(pos + 2, pos + 5)
          if not hex:match('^%x%x%x%x$') then fail('bad \\u escape') end
          local cp = tonumber(hex, 16)
          pos = pos + 6
          if cp >= 0xD800 and cp <= 0xDBFF and text:sub(pos, pos + 1) == '\\u' then
            local lo = tonumber(text:sub(pos + 2, pos + 5), 16)
            if lo and lo >= 0xDC00 and lo <= 0xDFFF then
              cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
              pos = pos + 6
            end
          end
          out[#out + 1] = utf8.char(cp)
        else
          if not escapes[e] then fail('bad escape \\' .. e) end
          out[#out + 1] = escapes[e]
          pos = pos + 2
        end
      else
        local j = text:find('["\\]', pos) or #text + 1
        out[#out + 1] = text:sub(pos, j - 1)
        pos = j
      end
    end
    return table.concat(out)
  end
  function value()
    ws()
    local c = text:sub(pos, pos)
    if c == '{' then
      pos = pos + 1
      local t = {}
      ws()
      if text:sub(pos, pos) == '}' then pos = pos + 1 return t end
      while true do
        ws()
        if text:sub(pos, pos) ~= '"' then fail('expected a string key') end
        local k = str()
        ws()
        if text:sub(pos, pos) ~= ':' then fail("expected ':'") end
        pos = pos + 1
        t[k] = value()
        ws()
        local d = text:sub(pos, pos)
        pos = pos + 1
        if d == '}' then return t end
        if d ~= ',' then fail("expected ',' or '}'") end
      end
    elseif c == '[' then
      pos = pos + 1
      local t, n = {}, 0
      ws()
      if text:sub(pos, pos) == ']' then pos = pos + 1 return t end
      while true do
        n = n + 1
        t[n] = value()
        ws()
        local d = text:sub(pos, pos)
        pos = pos + 1
        if d == ']' then return t end
        if d ~= ',' then fail("expected ',' or ']'") end
      end
    elseif c == '"' then
      return str()
    elseif text:sub(pos, pos + 3) == 'true' then pos = pos + 4 return true
    elseif text:sub(pos, pos + 4) == 'false' then pos = pos + 5 return false
    elseif text:sub(pos, pos + 3) == 'null' then pos = pos + 4 return nil
    else
      local num = text:match('^-?%d+%.?%d*[eE]?[-+]?%d*', pos)
      if not num or num == '' or num == '-' then fail('unexpected ' .. (c == '' and 'end of text' or ("'" .. c .. "'"))) end
      pos = pos + #num
      local v = tonumber(num)
      if v == nil then fail('bad number ' .. num) end
      return v
    end
  end
  local v = value()
  ws()
  if pos <= #text then fail('text after the value') end
  return v
end

function files.json_decode(text, name)
  return json_parser(text, name)
end

function files.json_read(path) return files.json_decode(files.read(path), path) end
function files.json_write(path, v) return files.write_atomic(path, files.json_encode(v, true) .. '\n') end

---------------------------------------------------------------------------------------------------
-- Operating-system services from flower.core._util (bindings/l_util.c) when the host has them,
-- with pure-Lua fallbacks so that these modules also run under a stock lua5.4.

local util_cache
function files.util()
  if util_cache == nil then
    local ok, core = pcall(require, 'flower.core')
    util_cache = ok and type(core) == 'table' and type(core._util) == 'table' and core._util or false
  end
  return util_cache or nil
end

-- Wall-clock seconds (monotonic, sub-second) for durations; os.time() (whole seconds) without _util.
local data_now
function files.now()
  local u = files.util()
  if u then return u.now() end
  if data_now == nil then
    local ok, core = pcall(require, 'flower.core')
    data_now = ok and type(core) == 'table' and type(core._data) == 'table' and core._data.now or false
  end
  if data_now then return data_now() end
  return os.time()
end

-- Whether stdout is a terminal. FLOWER_PROGRESS=tty|plain|off overrides; without _util, asks the
-- shell once (`[ -t 1 ]` runs with our stdout, so it answers for us).
local tty
function files.stdout_is_tty()
  if tty == nil then
    local mode = os.getenv('FLOWER_PROGRESS')
    if mode == 'tty' then tty = true
    elseif mode == 'plain' or mode == 'off' then tty = false
    else
      local u = files.util()
      if u then tty = u.isatty(1) else tty = os.execute('[ -t 1 ] 2>/dev/null') == true end
    end
  end
  return tty
end

return files
