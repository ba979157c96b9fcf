-- flower.recipe: experiments as files. A recipe declares its options (flower.cli) and settings
-- (plain data such as a freeze/unfreeze schedule) and a run function; running it makes a run
-- directory `runs/<name>-<timestamp>/` holding the resolved config, the log, histories,
-- checkpoints, predictions and report.html.
--
--   local recipe = require 'flower.recipe'
--   local R = recipe.new {
--     name = 'finetune', description = '...',
--     options = {{name = 'epochs', type = 'int', default = 3, help = '...'}, ...},
--     settings = {stages = {{epochs = 1, train = 'head', lr = 1e-3}, {epochs = 4, train = 'all', lr = 1e-4}}},
--     run = function(cfg, run) ... end,       -- cfg: options + settings; run: the Run below
--   }
--   return R:main(arg)
--
-- A variant is another file that loads a recipe and changes defaults or settings:
--   local base = recipe.load('quickstart.lua')            -- relative to the calling file
--   return base:derive{name = 'dropout_variant', defaults = {dropout = 0.5}}:main(arg)
--
-- Every recipe also accepts --runs DIR (where run directories go), --run-name NAME,
-- --resume RUNDIR (continue an interrupted run in its own directory, with its saved config) and
-- --device cpu|cuda|cuda:<n>|auto (where the run computes, cfg.device; checked before the run
-- directory is made, so a missing GPU fails at once with flower.cuda's reason) and
-- --mixed-precision float32|bfloat16 (cfg.mixed_precision: train.fit's mixed_precision, i.e.
-- model:mixed_precision; bfloat16 activations with float32 master weights, for GPUs).
local cli = require 'flower.cli'
local files = require 'flower.files'

local recipe = {}
local Recipe = {}
Recipe.__index = Recipe

local loading = 0   -- > 0 while recipe.load runs a recipe file: main() then returns the recipe

local COMMON = {
  { name = 'runs', type = 'string', default = 'runs', help = 'directory that receives run directories' },
  { name = 'run_name', type = 'string', help = 'run directory name (default: <recipe>-<timestamp>)' },
  { name = 'resume', type = 'string', help = 'continue the run in this run directory with its saved config' },
  { name = 'device', type = 'string', default = 'cpu',
    help = "where to compute: cpu, cuda (GPU 0), cuda:<n>, or auto (cuda when a GPU is available)" },
  { name = 'mixed_precision', type = 'string', default = 'float32', choices = { 'float32', 'bfloat16' },
    help = 'bfloat16: bf16 activations and kernel copies, float32 master weights and optimizer state (for GPUs)' },
}

local function deep_copy(v)
  if type(v) ~= 'table' then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = deep_copy(x) end
  return c
end
recipe.deep_copy = deep_copy

function recipe.new(def)
  if type(def) ~= 'table' or type(def.name) ~= 'string' or type(def.run) ~= 'function' then
    error('recipe.new: expected a table with name (string) and run (function)', 2)
  end
  local self = setmetatable({
    name = def.name, description = def.description, epilog = def.epilog,
    options = deep_copy(def.options or {}), settings = deep_copy(def.settings or {}), run = def.run,
    source = def.source or debug.getinfo(2, 'S').short_src,
  }, Recipe)
  return self
end

-- The cli spec: the recipe's options then the common ones.
function Recipe:spec()
  local opts = {}
  for _, o in ipairs(self.options) do opts[#opts + 1] = o end
  for _, o in ipairs(COMMON) do opts[#opts + 1] = o end
  return { name = self.name, script = self.source, description = self.description, epilog = self.epilog, options = opts }
end

-- A new recipe with changed option defaults, settings, name or description; the run is shared.
function Recipe:derive(d)
  local r = recipe.new {
    name = d.name or self.name, description = d.description or self.description, epilog = d.epilog or self.epilog,
    options = self.options, settings = self.settings, run = d.run or self.run,
    source = d.source or debug.getinfo(2, 'S').short_src,
  }
  for k, v in pairs(d.defaults or {}) do
    local found = false
    for _, o in ipairs(r.options) do
      if (o.name or o[1]) == k then
        if o.name then o.default = deep_copy(v) else o[3] = deep_copy(v) end
        found = true
      end
    end
    if not found then error(string.format("recipe.derive: %s has no option '%s'", self.name, k), 2) end
  end
  for _, o in ipairs(d.options or {}) do r.options[#r.options + 1] = deep_copy(o) end
  for k, v in pairs(d.settings or {}) do r.settings[k] = deep_copy(v) end
  return r
end

-- Loads a recipe file without running it; a relative path is taken from the calling file's directory.
function recipe.load(path)
  if path:sub(1, 1) ~= '/' and not files.exists(path) then
    local caller = debug.getinfo(2, 'S').source
    if caller:sub(1, 1) == '@' then path = files.join(files.dirname(caller:sub(2)), path) end
  end
  local chunk, err = loadfile(path)
  if not chunk then error('recipe.load: ' .. tostring(err), 2) end
  loading = loading + 1
  local ok, r = pcall(chunk)
  loading = loading - 1
  if not ok then error(r, 0) end
  if getmetatable(r) ~= Recipe then error('recipe.load: ' .. path .. ' did not return a recipe (end it with `return R:main(arg)`)', 2) end
  return r
end

-- Options (parsed from argv) merged with settings into one config table.
function Recipe:config(argv)
  local opts, help = cli.parse(self:spec(), argv)
  if opts == nil then return nil, help end
  local cfg = deep_copy(self.settings)
  for k, v in pairs(cli.values(self:spec(), opts)) do cfg[k] = v end
  cfg.recipe = self.name
  return cfg, nil, opts._given
end

---------------------------------------------------------------------------------------------------
-- Run directories

local Run = {}
Run.__index = Run
recipe.Run = Run

local function unique_dir(root, base)
  local dir = files.join(root, base)
  local n = 1
  while files.exists(dir) do
    n = n + 1
    dir = files.join(root, base .. '-' .. n)
  end
  return dir
end

-- Opens a run directory (created if needed). opts: {dir, config, name, quiet, out}
function recipe.open_run(opts)
  local dir = opts.dir
  files.mkdir(dir)
  local self = setmetatable({
    dir = dir, name = opts.name or files.basename(dir), config = opts.config or {},
    quiet = opts.quiet, out = opts.out or io.stdout, started = files.now(), timing = {},
    results = {}, models = {}, notes = {},
  }, Run)
  return self
end

function Run:path(...) return files.join(self.dir, ...) end

function Run:mkdir(...) return files.mkdir(self:path(...)) end

-- Prints a message and appends it to log.txt with a timestamp.
function Run:log(fmt, ...)
  local msg = select('#', ...) > 0 and string.format(fmt, ...) or tostring(fmt)
  if not self.quiet then self.out:write(msg, '\n'); self.out:flush() end
  files.append(self:path('log.txt'), os.date('%Y-%m-%d %H:%M:%S ') .. msg .. '\n')
end

-- Records the duration and image count of a stage (for report.html's timing table).
function Run:time(stage, images, seconds)
  self.timing[#self.timing + 1] = { stage = stage, images = images, seconds = seconds }
end

-- Runs fn() and records its time under `stage`; returns fn's results.
function Run:timed(stage, images, fn)
  local t0 = files.now()
  local res = table.pack(fn())
  self:time(stage, type(images) == 'function' and images(table.unpack(res, 1, res.n)) or images, files.now() - t0)
  return table.unpack(res, 1, res.n)
end

function Run:result(name, val_acc, extra)
  local r = { name = name, val_acc = val_acc }
  for k, v in pairs(extra or {}) do r[k] = v end
  self.results[#self.results + 1] = r
  return r
end

function Run:write_config()
  files.json_write(self:path('config.json'), self.config)
end

-- Writes results.json (machine-readable summary: results and timing).
function Run:write_results()
  files.json_write(self:path('results.json'), { results = self.results, timing = self.timing,
    seconds = files.now() - self.started })
end

-- Makes (or resumes) the run directory for a resolved config and calls the run function.
-- Returns the run function's results. Errors in the run propagate.
-- Raises unless the run's device is there (a resumed run's saved device counts, unless --device is
-- given again): "<recipe>: --device: device 'cuda': <flower.cuda's reason>".
function Recipe:check_device(cfg, given)
  local device = cfg.device
  if cfg.resume and not (given and given.device) then
    local saved = files.join(cfg.resume, 'config.json')
    if files.exists(saved) then device = files.json_read(saved).device or device end
  end
  if device ~= nil then require('flower.device').resolve(device, self.name .. ': --device') end
end

function Recipe:start(cfg, given)
  self:check_device(cfg, given)   -- before the run directory: a missing GPU fails at once
  local dir
  if cfg.resume then
    dir = cfg.resume
    local saved_path = files.join(dir, 'config.json')
    if not files.exists(saved_path) then
      error(self.name .. ': --resume ' .. dir .. ': no config.json there (not a run directory)', 0)
    end
    -- the saved config wins, except for options given again on this command line
    local saved = files.json_read(saved_path)
    for k, v in pairs(saved) do
      if not (given and given[k]) then cfg[k] = v end
    end
    cfg.resume = dir
  else
    local base = cfg.run_name or (self.name .. '-' .. os.date('%Y%m%d-%H%M%S'))
    files.mkdir(cfg.runs)
    dir = unique_dir(cfg.runs, base)
  end
  local run = recipe.open_run { dir = dir, config = cfg, name = self.name, quiet = cfg.quiet }
  run.resuming = cfg.resume ~= nil
  run.given = given or {}
  run.source = self.source
  run:write_config()
  run:log('%s: run directory %s%s', self.name, dir, run.resuming and ' (resuming)' or '')
  return self.run(cfg, run)
end

-- The command-line entry: parses argv (printing --help or a bad option and exiting), then start.
-- When the file is being loaded by recipe.load, returns the recipe instead of running it.
function Recipe:main(argv)
  if loading > 0 then return self end
  local ok, cfg, help, given = pcall(self.config, self, argv)
  if not ok then
    io.stderr:write(tostring(cfg), '\ntry --help\n')
    os.exit(2)
  end
  if cfg == nil then
    io.stdout:write(help)
    os.exit(0)
  end
  local dok, derr = pcall(self.check_device, self, cfg, given)
  if not dok then
    io.stderr:write(tostring(derr), '\n')
    os.exit(2)
  end
  return self:start(cfg, given)
end

-- Runs scripts/<name> (next to the flower library) in this process with `arg` = args.
function recipe.run_script(name, args)
  local init = package.searchpath('flower', package.path)
  if not init then error('recipe.run_script: cannot find the flower library on package.path', 2) end
  local path = files.join(files.dirname(files.dirname(init)), name)
  local chunk, err = loadfile(path)
  if not chunk then error('recipe.run_script: ' .. tostring(err), 2) end
  local saved = arg
  arg = args
  arg[0] = path
  local ok, res = pcall(chunk, table.unpack(args))
  arg = saved
  if not ok then error(res, 0) end
  return res
end

-- Ends a recipe's run function: an interrupted pipeline logs how to resume and exits with the
-- signal's conventional status (130 SIGINT, 143 SIGTERM); otherwise returns the summary.
function recipe.finish(run, summary)
  if summary and summary.interrupted then
    run:log('%s: interrupted (%s); checkpoints are saved. Continue with:\n  flowerlua %s --resume %s',
      run.name, tostring(summary.interrupted), run.source or ('experiments/' .. run.name .. '.lua'), run.dir)
    io.stdout:flush()
    os.exit(summary.interrupted == 'SIGTERM' and 143 or 130)
  end
  return summary
end

-- Runs a recipe from Lua (tests, other recipes) with argv as a list; a bad option is an error.
function Recipe:call(argv)
  local cfg, help, given = self:config(argv)
  if cfg == nil then return nil, help end
  return self:start(cfg, given)
end

return recipe
