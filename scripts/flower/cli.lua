-- flower.cli: command-line options for recipes, declared as data.
--
--   local cli = require 'flower.cli'
--   local spec = {
--     name = 'finetune', description = 'Fine-tune a model on a data set.',
--     options = {
--       {name = 'model',  type = 'string', default = 'xception', help = 'backbone',
--        choices = {'resnet50', 'xception'}},
--       {name = 'epochs', type = 'int',    default = 3,    help = 'epochs of the last stage'},
--       {name = 'lr',     type = 'number', default = 1e-4, help = 'learning rate'},
--       {name = 'tiny',   type = 'bool',   default = false, help = 'a few seconds, for tests'},
--       {name = 'models', type = 'list',   default = {'a', 'b'}, help = 'comma-separated'},
--     },
--   }
--   local opts = cli.main(spec, arg)   -- prints --help / errors and exits; else a table of values
--
-- Accepted forms: `--epochs 3`, `--epochs=3`, `--flag`, `--no-flag`, `--flag=false`. Names may be
-- written with '-' or '_' (`--train-per-class` sets `train_per_class`). `--` ends the options.
-- Types: string, int, number, bool, list (comma-separated strings). An option without a default and
-- with `required = true` must be given. Unknown options and bad values are errors that name the
-- option, what was expected and what was found.
local cli = {}

local TYPES = { string = true, int = true, number = true, bool = true, list = true }

-- The canonical (Lua) name of an option: dashes become underscores.
local function canon(s) return (s:gsub('%-', '_')) end
local function dashed(s) return (s:gsub('_', '-')) end

local function fmt_value(v)
  if type(v) == 'table' then return table.concat(v, ',') end
  return tostring(v)
end

-- Checks a spec once and indexes its options by canonical name. Accepts each option either with
-- named fields or positionally: {'epochs', 'int', 3, 'help text'}.
local function prepare(spec)
  if type(spec) ~= 'table' then error('cli: spec must be a table, got ' .. type(spec), 3) end
  local name = spec.name or 'recipe'
  local byname, list = {}, {}
  for i, o in ipairs(spec.options or {}) do
    local opt = {
      name = o.name or o[1], type = o.type or o[2], help = o.help or o[4] or '',
      choices = o.choices, required = o.required, min = o.min, max = o.max,
    }
    if o.default ~= nil then opt.default = o.default else opt.default = o[3] end
    if type(opt.name) ~= 'string' or opt.name == '' then
      error(string.format('cli: %s: option %d has no name', name, i), 3)
    end
    opt.name = canon(opt.name)
    if not TYPES[opt.type] then
      error(string.format("cli: %s: option '%s' has type %s, expected one of string, int, number, bool, list",
        name, opt.name, tostring(opt.type)), 3)
    end
    if opt.name == 'help' then error(string.format("cli: %s: 'help' is reserved", name), 3) end
    if byname[opt.name] then error(string.format("cli: %s: option '%s' declared twice", name, opt.name), 3) end
    if opt.type == 'bool' and opt.default == nil then opt.default = false end
    byname[opt.name] = opt
    list[#list + 1] = opt
  end
  return name, byname, list
end

-- Edit distance, for "did you mean" hints.
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = { [0] = i }
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

local function suggestion(list, name)
  local best, bestd
  for _, o in ipairs(list) do
    local d = distance(name, o.name)
    if d <= math.max(2, #name // 3) and (not bestd or d < bestd) then best, bestd = o, d end
  end
  return best and string.format(' (did you mean --%s?)', dashed(best.name)) or ''
end

-- Converts a command-line string to the option's type; returns value or nil, reason.
local function convert(opt, s)
  local t = opt.type
  if t == 'string' then
    if opt.choices then
      for _, c in ipairs(opt.choices) do if c == s then return s end end
      return nil, string.format('one of %s', table.concat(opt.choices, ', '))
    end
    return s
  elseif t == 'int' then
    local v = math.tointeger(tonumber(s))
    if not v or s:find('^%s') then return nil, 'an integer' end
    if opt.min and v < opt.min then return nil, 'an integer >= ' .. opt.min end
    if opt.max and v > opt.max then return nil, 'an integer <= ' .. opt.max end
    return v
  elseif t == 'number' then
    local v = tonumber(s)
    if not v or v ~= v or s:find('^%s') then return nil, 'a number' end
    if opt.min and v < opt.min then return nil, 'a number >= ' .. opt.min end
    if opt.max and v > opt.max then return nil, 'a number <= ' .. opt.max end
    return v
  elseif t == 'bool' then
    local l = s:lower()
    if l == 'true' or l == 'yes' or l == '1' or l == 'on' then return true end
    if l == 'false' or l == 'no' or l == '0' or l == 'off' then return false end
    return nil, 'true or false'
  elseif t == 'list' then
    local out = {}
    if s == '' then return out end
    for item in (s .. ','):gmatch('([^,]*),') do
      if item == '' then return nil, 'a comma-separated list without empty items' end
      if opt.choices then
        local ok = false
        for _, c in ipairs(opt.choices) do if c == item then ok = true end end
        if not ok then return nil, 'a comma-separated list of ' .. table.concat(opt.choices, ', ') end
      end
      out[#out + 1] = item
    end
    return out
  end
end

-- What an option's value must be, in words (for "got nothing" errors).
local function expects(opt)
  if opt.choices and opt.type == 'string' then return 'one of ' .. table.concat(opt.choices, ', ') end
  return ({ string = 'a value', int = 'an integer', number = 'a number', bool = 'true or false',
            list = 'a comma-separated list' })[opt.type]
end

local function copy_default(v)
  if type(v) ~= 'table' then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = x end
  return c
end

-- The help text generated from the declarations.
function cli.help(spec)
  local name, _, list = prepare(spec)
  local lines = {}
  lines[#lines + 1] = string.format('usage: flowerlua %s [options]', spec.usage or (spec.script or name))
  if spec.description then lines[#lines + 1] = '' ; lines[#lines + 1] = spec.description end
  lines[#lines + 1] = ''
  lines[#lines + 1] = 'options:'
  local rows = {}
  local width = 0
  for _, o in ipairs(list) do
    local left
    if o.type == 'bool' then
      left = string.format('--%s, --no-%s', dashed(o.name), dashed(o.name))
    else
      local meta = ({ string = 'STR', int = 'N', number = 'X', list = 'A,B,..' })[o.type]
      if o.choices and o.type == 'string' then meta = table.concat(o.choices, '|') end
      left = string.format('--%s %s', dashed(o.name), meta)
    end
    local right = o.help
    if o.default ~= nil and not (type(o.default) == 'table' and #o.default == 0) then
      right = right .. string.format(' (default: %s)', fmt_value(o.default))
    elseif o.required then
      right = right .. ' (required)'
    end
    if o.choices and o.type == 'list' then right = right .. ' [' .. table.concat(o.choices, ', ') .. ']' end
    rows[#rows + 1] = { left, right }
    if #left > width then width = #left end
  end
  rows[#rows + 1] = { '-h, --help', 'show this help and exit' }
  width = math.max(width, 10)
  for _, r in ipairs(rows) do
    lines[#lines + 1] = string.format('  %-' .. width .. 's  %s', r[1], r[2])
  end
  if spec.epilog then lines[#lines + 1] = '' ; lines[#lines + 1] = spec.epilog end
  return table.concat(lines, '\n') .. '\n'
end

-- Parses argv (a list of strings, e.g. the host's `arg`) against spec.
-- Returns the options table (every declared option present, defaults filled in), or
-- nil, help_text when --help/-h was given. Raises an error string on a bad command line.
-- Positional arguments are an error unless spec.positional is set; then they are in opts._args.
function cli.parse(spec, argv)
  local name, byname, list = prepare(spec)
  argv = argv or {}
  local opts, given = {}, {}
  local args = {}
  local function fail(fmtstr, ...) error(name .. ': ' .. string.format(fmtstr, ...), 0) end
  local i, n = 1, #argv
  local only_args = false
  while i <= n do
    local a = argv[i]
    if type(a) ~= 'string' then fail('argument %d is a %s, expected a string', i, type(a)) end
    if only_args or a == '-' or a:sub(1, 1) ~= '-' then
      if not spec.positional then
        fail("unexpected argument '%s' (options start with --; see --help)", a)
      end
      args[#args + 1] = a
    elseif a == '--' then
      only_args = true
    elseif a == '-h' or a == '--help' then
      return nil, cli.help(spec)
    elseif a:sub(1, 2) ~= '--' then
      fail("unknown option '%s' (options are written --name; see --help)", a)
    else
      local key, value = a:match('^%-%-([^=]+)=(.*)$')
      if not key then key = a:sub(3) end
      local k = canon(key)
      local opt = byname[k]
      local negated = false
      if not opt and k:sub(1, 3) == 'no_' and byname[k:sub(4)] and byname[k:sub(4)].type == 'bool' then
        opt, negated = byname[k:sub(4)], true
        if value then fail("option --%s takes no value, got '%s'", key, value) end
      end
      if not opt then fail('unknown option --%s%s', key, suggestion(list, k)) end
      if opt.type == 'bool' and value == nil then
        value = not negated
      else
        if value == nil then
          if i == n then fail('option --%s expects %s, got nothing', dashed(opt.name), expects(opt)) end
          i = i + 1
          value = argv[i]
        end
        local v, why = convert(opt, value)
        if v == nil then fail("option --%s expects %s, got '%s'", dashed(opt.name), why, value) end
        value = v
      end
      opts[opt.name] = value
      given[opt.name] = true
    end
    i = i + 1
  end
  for _, o in ipairs(list) do
    if opts[o.name] == nil then
      if o.required and o.default == nil then fail('option --%s is required (see --help)', dashed(o.name)) end
      opts[o.name] = copy_default(o.default)
    end
  end
  if spec.positional then opts._args = args end
  -- which options came from the command line (for the resolved config)
  return setmetatable(opts, { __index = { _given = given } })
end

-- For recipes: parse, print help (exit 0) or the error (exit 2); returns the options table.
function cli.main(spec, argv)
  local ok, opts, help = pcall(cli.parse, spec, argv)
  if not ok then
    io.stderr:write(tostring(opts), '\n', 'try --help\n')
    os.exit(2)
  end
  if opts == nil then
    io.stdout:write(help)
    os.exit(0)
  end
  return opts
end

-- The options table with only declared values (no metatable), for writing the resolved config.
function cli.values(spec, opts)
  local _, _, list = prepare(spec)
  local out = {}
  for _, o in ipairs(list) do out[o.name] = copy_default(opts[o.name]) end
  return out
end

return cli
