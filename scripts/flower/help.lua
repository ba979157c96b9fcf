-- flower.help: documentation in the REPL, read from the comments the sources already have.
--
--   help(flower.train)          -- a module: the comment block at the top of its file
--   help(flower.train.fit)      -- a Lua function: its definition line and the comments above it
--   help(flower.nn.Conv2D)      -- a layer: nn.lua's lines about it and the comments above its class
--   help(flower.zeros)          -- a C function: the comment above it in bindings/*.c (in a checkout)
--   help('flower.data.Loader')  -- the same, by name
--   help(model), help(t)        -- a layer or model instance (its class), a tensor (its methods)
--
-- `help` is a global in the REPL; elsewhere flower.help(x). flower.help(x, {print = false}) returns
-- the text instead of printing it.
local flower = require 'flower'

local help = {}

local function read_lines(path)
  local f = io.open(path, 'r')
  if not f then return nil end
  local lines = {}
  for l in f:lines() do lines[#lines + 1] = l end
  f:close()
  return lines
end

local function source_of(fn)
  local info = debug.getinfo(fn, 'S')
  if info.what == 'C' or not info.source:match('^@') then return nil end
  return info.source:sub(2), info.linedefined
end

-- the run of comment lines ending just above line n (`--` in Lua, `/* ... */` or `//` in C)
local function comments_above(lines, n)
  local out = {}
  local i = n - 1
  while i >= 1 do
    local l = lines[i]
    if l:match('^%s*%-%-') or l:match('^%s*/?%*') or l:match('^%s*//') then
      table.insert(out, 1, l)
      i = i - 1
    else
      break
    end
  end
  return out
end

-- the comment block a file opens with
local function header(lines)
  local out = {}
  for _, l in ipairs(lines) do
    if not l:match('^%-%-') then break end
    out[#out + 1] = l
  end
  return out
end

local function tensor_methods() return debug.getregistry()['flower.Tensor'] or {} end

-- the dotted name under which flower's modules hold v ('flower.train.fit', 't:matmul'), or nil
local function name_of(v)
  if v == flower then return 'flower' end
  for k, m in pairs(tensor_methods()) do
    if m == v and type(k) == 'string' and not k:match('^__') then return 't:' .. k end
  end
  for k, m in pairs(package.loaded) do
    if type(k) == 'string' and k:match('^flower') and type(m) == 'table' then
      if m == v then return k end
      for fk, fv in pairs(m) do
        if fv == v and type(fk) == 'string' then return k .. '.' .. fk end
      end
    end
  end
  return nil
end

local function resolve(s)
  local v = _G
  for part in s:gmatch('[^%.]+') do
    if type(v) ~= 'table' then return nil end
    if v == _G and part == 'flower' then v = flower else v = v[part] end
  end
  return v
end

-- the repository root, when flowerlua runs from a checkout (bindings/ beside scripts/)
local function repo_root()
  local path = package.searchpath('flower.files', package.path)
  local root = path and path:match('^(.*)/scripts/flower/files%.lua$')
  if root and io.open(root .. '/bindings/l_tensor.c', 'r') then return root end
  return nil
end

local function c_function_doc(name)
  local short = name:match('([%w_]+)$')
  local root = repo_root()
  if not root then return nil end
  local p = io.popen('ls ' .. root .. '/bindings/*.c 2>/dev/null')
  for file in p:lines() do
    local lines = read_lines(file) or {}
    for i, l in ipairs(lines) do
      -- a comment naming the function as a call: /* zeros(size...): ... */ or /* t:matmul(u) ... */
      if l:match('^/%*') and (' ' .. l):find('[^%w_]' .. short .. '[/(]') then
        local out = { l }
        local j = i
        while not lines[j]:match('%*/') and j < #lines do j = j + 1; out[#out + 1] = lines[j] end
        p:close()
        return out
      end
    end
  end
  p:close()
  return nil
end

local function layer_doc(cls)
  local out = {}
  local name = rawget(cls, 'class_name') or cls.class_name
  local nnfile = package.searchpath('flower.nn', package.path)
  for _, l in ipairs(read_lines(nnfile) or {}) do
    if not l:match('^%-%-') then break end
    if l:find(name, 1, true) then out[#out + 1] = l end
  end
  -- the comments above `class('<name>', ...)` in the file defining its methods
  for _, fn in pairs(cls) do
    if type(fn) == 'function' then
      local path = source_of(fn)
      local lines = path and read_lines(path)
      for i, l in ipairs(lines or {}) do
        if l:find("class('" .. name .. "'", 1, true) then
          local above = comments_above(lines, i)
          if #above > 0 then out[#out + 1] = ''; for _, a in ipairs(above) do out[#out + 1] = a end end
          return out
        end
      end
    end
  end
  return out
end

local function text_for(x)
  local label = type(x) == 'string' and x or name_of(x)
  if type(x) == 'string' then
    x = resolve(x)
    if x == nil then return 'help: nothing is called ' .. label end
  end
  if flower.is_tensor(x) then
    local names = {}
    for k, m in pairs(tensor_methods()) do
      if type(m) == 'function' and type(k) == 'string' and not k:match('^__') then names[#names + 1] = k end
    end
    table.sort(names)
    return string.format('a %s tensor of size %s on %s.\nMethods: %s\nhelp(t.<method>) shows one.', x:dtype(),
      table.concat(x:size(), 'x'), x:device(), table.concat(names, ', '))
  end
  local t = type(x)
  if t == 'function' then
    local path, line = source_of(x)
    if not path then
      local names = { label }
      for k, m in pairs(tensor_methods()) do if m == x then names[#names + 1] = k end end
      for _, n in ipairs(names) do
        local doc = c_function_doc(n)
        if doc then return table.concat(doc, '\n') end
      end
      return (label or 'this function') .. ': a C function; README.md\'s tour describes it.'
    end
    local lines = read_lines(path) or {}
    local out = comments_above(lines, line)
    local short = label and label:match('([%w_]+)$')
    if #out == 0 and short then   -- documented in the module's header instead
      for _, l in ipairs(header(lines)) do
        if (' ' .. l):find('[%.:%s]' .. short .. '[%s({]') then out[#out + 1] = l end
      end
    end
    out[#out + 1] = lines[line] or ''
    return table.concat(out, '\n') .. string.format('\n(%s:%d)', path, line)
  end
  if t == 'table' then
    if x.class_name then return table.concat(layer_doc(rawget(x, 'class_name') and x or getmetatable(x)), '\n') end
    local mname = label and label:match('^(flower[%w_.]*)$')
    local path = mname and package.searchpath(mname, package.path)
    if path then return table.concat(header(read_lines(path) or {}), '\n') end
    local keys = {}
    for k in pairs(x) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    return 'a table with fields: ' .. table.concat(keys, ', ')
  end
  return string.format('a %s: %s', t, tostring(x))
end

-- prints the text (and returns nothing, so the REPL shows it once), or returns it with print = false
function help.help(x, opts)
  local s = text_for(x)
  if opts and opts.print == false then return s end
  print(s)
end

return help
