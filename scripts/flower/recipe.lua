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
--     check = function(cfg) ... end,          -- optional: recipe.fail on bad input, before any run directory
--     run = function(cfg, run) ... end,       -- cfg: options + settings; run: the Run below
--   }
--   return R:main(arg)
-- Recipes that run flower.pipeline declare `options = recipe.pipeline_options{...}`: the shared
-- declarations (data, models, size, stages' epochs and rates, ensemble, top-k, checkpoints, ...)
-- with this recipe's defaults laid over them, plus its own options.
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
-- model:mixed_precision; bfloat16 activations with float32 master weights, for GPUs) and
-- --memory-budget 8G (cfg.memory_budget: see flower.pipeline) and
-- --distributed / --no-distributed (cfg.distributed: under `mpirun -np N` or `srun`, training,
-- evaluation and export are split across the ranks and only rank 0 writes the run directory, whose
-- name rank 0 chooses; on by default, and a no-op for a single process).
-- `--resume RUNDIR` alone continues a run: the run directory's config.json (the resolved options,
-- written atomically when the run starts) supplies every option; options given again override
-- theirs, and the log says which.
--
-- User errors (a bad --data, a missing weights file, a size a model cannot take) are raised with
-- recipe.fail: the error is a table whose __tostring is the message, so the host prints it without
-- a Lua traceback and exits with status 1. A recipe's `check(cfg)` runs before the run directory is
-- made, so these errors leave no run directory behind; a fresh run directory that a user error
-- leaves holding nothing but config.json and log.txt is removed.
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
  { name = 'memory_budget', type = 'string',
    help = 'memory the ensemble may fill with feature files read whole, e.g. 8G (default: half of RAM; above it they are streamed)' },
  { name = 'distributed', type = 'bool', default = true,
    help = 'data parallel over the ranks of an mpirun/srun job (flower.dist); a no-op for one process' },
}

-- The options of the seed's pipeline (flower.pipeline), shared by the recipes that run it
-- (quickstart.lua, fgvcx_flowers.lua): recipe.pipeline_options{<name> = {field = value}, ...,
-- extra = {options of this recipe only}} gives this list with the recipe's fields (default, help,
-- choices, min, required, ...) laid over each declaration; `<name> = false` leaves one out.
local PIPELINE = {
  { name = 'data', type = 'string', help = 'data set directory (Kaggle FGVCx layout)' },
  { name = 'models', type = 'list', help = 'models to fine-tune and ensemble' },
  { name = 'size', type = 'int', help = 'input size in pixels' },
  { name = 'weights', type = 'string', help = 'directory of weight files to start from' },
  { name = 'head_epochs', type = 'int', default = 1, min = 0, help = 'epochs of the head-only stage' },
  { name = 'head_lr', type = 'number', min = 0, help = 'learning rate of the head-only stage (Adam)' },
  { name = 'epochs', type = 'int', min = 0, help = 'epochs of the all-layers stage' },
  { name = 'lr', type = 'number', min = 0, help = 'learning rate of the all-layers stage (Adam)' },
  { name = 'batch_size', type = 'int', min = 1, help = 'batch size' },
  { name = 'augment', type = 'bool', default = true, help = 'random flips (and crops, see --crop-scale) while training' },
  { name = 'crop_scale', type = 'number', min = 0, max = 1,
    help = 'random crops covering this fraction of the image or more (0: no crops)' },
  { name = 'keep_checkpoints', type = 'string', default = 'resume', choices = { 'resume', 'all' },
    help = 'resume: delete a model\'s stage checkpoints (weights and optimizer state) once its model.h5 is '
      .. 'written, keeping what --resume needs; all: keep every stage\'s last checkpoint' },
  { name = 'ensemble_epochs', type = 'int', min = 1, help = 'epochs of the ensemble classifier' },
  { name = 'ensemble_lr', type = 'number', default = 1e-3, min = 0, help = 'learning rate of the ensemble classifier' },
  { name = 'ensemble_dropout', type = 'number', default = 0.5, min = 0, max = 0.95, help = 'dropout of the ensemble classifier' },
  { name = 'ensemble_patience', type = 'int', default = 8, min = 0,
    help = 'stop the ensemble after this many epochs without a lower validation loss (0: never stop early)' },
  { name = 'ensemble_restore_best', type = 'bool', default = true,
    help = 'end the ensemble with the weights of its epoch of lowest validation loss (else the last epoch\'s)' },
  { name = 'topk', type = 'int', default = 0, min = 0,
    help = 'also write predict-top<k>.csv (id, the k best categories) beside each submission (0 or 1: none)' },
  { name = 'workers', type = 'int', default = 2, min = 1, help = 'image decoding threads' },
  { name = 'seed', type = 'int', default = 1, min = 0, help = 'seed of the weights, shuffling, augmentation and dropout' },
  { name = 'unreadable_test', type = 'string', default = 'omit', choices = { 'omit', 'most-frequent' },
    help = 'test images that cannot be read: omit (no row; an error when sample_submission.csv asks for every id) '
      .. 'or most-frequent (predict the most frequent training category; the log and report say how many)' },
  { name = 'tta', type = 'string', default = 'none', choices = { 'none', 'flip', 'crops', 'crops+flip' },
    help = 'test-time augmentation of each fine-tuned model\'s validation and test predictions (the report shows '
      .. 'validation accuracy with and without it) and of the exported valid and test features the ensembles use' },
  { name = 'tensorboard', type = 'string', default = '',
    help = 'write TensorBoard event files under this directory (one run per model), as training goes' },
}

local function deep_copy(v)
  if type(v) ~= 'table' then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = deep_copy(x) end
  return c
end
recipe.deep_copy = deep_copy

function recipe.pipeline_options(over)
  over = over or {}
  local out, known = {}, {}
  for _, o in ipairs(PIPELINE) do
    known[o.name] = true
    local mine = over[o.name]
    if mine ~= false then
      local d = deep_copy(o)
      for k, v in pairs(mine or {}) do d[k] = deep_copy(v) end
      out[#out + 1] = d
    end
  end
  for k in pairs(over) do
    if k ~= 'extra' and not known[k] then error(string.format("recipe.pipeline_options: no shared option '%s'", k), 2) end
  end
  for _, o in ipairs(over.extra or {}) do out[#out + 1] = deep_copy(o) end
  return out
end

---------------------------------------------------------------------------------------------------
-- User errors: printed as the message alone (no traceback), exit status 1

local UserError = { __tostring = function(e) return e.msg end }

local last_user_error   -- the message of the last one raised

-- Raises a user error: recipe.fail('fgvcx_flowers: --data %s: no train.json there', dir)
function recipe.fail(fmt, ...)
  local msg = select('#', ...) > 0 and string.format(fmt, ...) or tostring(fmt)
  last_user_error = msg
  error(setmetatable({ msg = msg, user = true }, UserError), 0)
end

function recipe.is_user_error(e) return getmetatable(e) == UserError end

-- Whether an error seen while unwinding is a user error. Under the host the message handler has
-- already turned the table into its message (Lua closes to-be-closed variables with the handler's
-- result), so the message itself counts too.
local function user_error_seen(e)
  return recipe.is_user_error(e) or (last_user_error ~= nil and e == last_user_error)
end

-- Runs fn(...) and turns any error it raises into a user error (for library calls whose failure is
-- the user's input, such as loading a given weights file); the message loses a `file:line:` prefix.
function recipe.as_user_error(fn, ...)
  local res = table.pack(pcall(fn, ...))
  if res[1] then return table.unpack(res, 2, res.n) end
  if recipe.is_user_error(res[2]) then error(res[2], 0) end
  recipe.fail((tostring(res[2]):gsub('^[^:\n]+%.lua:%d+: ', '')))
end

function recipe.new(def)
  if type(def) ~= 'table' or type(def.name) ~= 'string' or type(def.run) ~= 'function' then
    error('recipe.new: expected a table with name (string) and run (function)', 2)
  end
  local self = setmetatable({
    name = def.name, description = def.description, epilog = def.epilog,
    options = deep_copy(def.options or {}), settings = deep_copy(def.settings or {}), run = def.run,
    check = def.check, source = def.source or debug.getinfo(2, 'S').short_src,
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
    options = self.options, settings = self.settings, run = d.run or self.run, check = d.check or self.check,
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

-- A required option still missing from cfg is an error, worded as flower.cli words it.
local function check_required(spec, cfg)
  for _, o in ipairs(spec.options) do
    if o.required and cfg[o.name] == nil then
      error(string.format('%s: option --%s is required (see --help)', spec.name, (o.name:gsub('_', '-'))), 0)
    end
  end
end

-- Options (parsed from argv) merged with settings into one config table. With --resume the
-- required options may come from the run directory's config.json instead (checked in start).
function Recipe:config(argv)
  local spec = self:spec()
  local loose = deep_copy(spec)
  for _, o in ipairs(loose.options) do o.required = nil end
  local opts, help = cli.parse(loose, argv)
  if opts == nil then return nil, help end
  local cfg = deep_copy(self.settings)
  for k, v in pairs(cli.values(spec, opts)) do cfg[k] = v end
  cfg.recipe = self.name
  if cfg.resume == nil then check_required(spec, cfg) end
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
  local main = opts.main ~= false      -- dist: false on ranks other than 0, which write nothing
  if main then files.mkdir(dir) end
  local self = setmetatable({
    dir = dir, name = opts.name or files.basename(dir), config = opts.config or {}, main = main,
    quiet = opts.quiet or not main, out = opts.out or io.stdout, started = files.now(), timing = {},
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
  if not self.main then return end
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
  if not self.main then return end
  files.json_write(self:path('config.json'), self.config)
end

-- Writes results.json (machine-readable summary: results and timing).
function Run:write_results()
  if not self.main then return end
  files.json_write(self:path('results.json'), { results = self.results, timing = self.timing,
    skipped = self.skipped or {}, unreadable_test_predicted = self.fallback_rows, seconds = files.now() - self.started })
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

-- The options given again on a resumed run's command line that change a saved value, as
-- "--epochs 5 (was 3)".
local function overrides(saved, cfg, given)
  local out = {}
  for k in pairs(given or {}) do
    if k ~= 'resume' and saved[k] ~= nil and files.json_encode(saved[k]) ~= files.json_encode(cfg[k]) then
      out[#out + 1] = string.format('--%s %s (was %s)', (k:gsub('_', '-')), files.json_encode(cfg[k]),
        files.json_encode(saved[k]))
    end
  end
  table.sort(out)
  return out
end

-- Removes a run directory this run made if it holds nothing but config.json, log.txt and empty
-- folders (what a run that failed on the user's input leaves).
local function remove_if_empty(dir)
  local p = io.popen('find ' .. files.shell_quote(dir) .. ' -type f 2>/dev/null')
  local list = p:read('a')
  p:close()
  for f in list:gmatch('[^\n]+') do
    local rel = f:sub(#dir + 2)
    if rel ~= 'config.json' and rel ~= 'log.txt' then return false end
  end
  os.execute('rm -rf ' .. files.shell_quote(dir))
  return true
end

function Recipe:start(cfg, given)
  self:check_device(cfg, given)   -- before the run directory: a missing GPU fails at once
  local dir, changed
  if cfg.resume then
    dir = cfg.resume
    local saved_path = files.join(dir, 'config.json')
    if not files.exists(saved_path) then
      recipe.fail('%s: --resume %s: no config.json there (not a run directory)', self.name, dir)
    end
    -- the saved config wins, except for options given again on this command line
    local saved = files.json_read(saved_path)
    for k, v in pairs(saved) do
      if not (given and given[k]) then cfg[k] = v end
    end
    cfg.resume = dir
    changed = overrides(saved, cfg, given)
    local ok, err = pcall(check_required, self:spec(), cfg)
    if not ok then recipe.fail('%s (%s holds no value for it)', err, saved_path) end
  end
  if self.check then self.check(cfg) end   -- user errors before any directory is made
  local fresh = not cfg.resume
  if fresh then
    local base = cfg.run_name or (self.name .. '-' .. os.date('%Y%m%d-%H%M%S'))
    files.mkdir(cfg.runs)
    dir = unique_dir(cfg.runs, base)
  end
  -- dist: one run directory for the job, named by rank 0; the other ranks write nothing there
  local dist = require('flower').dist
  local main = true
  if cfg.distributed ~= false and dist.size() > 1 then dir, main = dist.broadcast_string(dir), dist.is_main() end
  local run = recipe.open_run { dir = dir, config = cfg, name = self.name, quiet = cfg.quiet, main = main }
  run.resuming = cfg.resume ~= nil
  run.given = given or {}
  run.source = self.source
  -- a user error in a fresh run that wrote nothing yet takes its run directory with it
  local guard <close> = setmetatable({}, { __close = function(_, err)
    if fresh and main and err ~= nil and user_error_seen(err) then remove_if_empty(dir) end
  end })
  run:write_config()
  run:log('%s: run directory %s%s', self.name, dir, run.resuming and ' (resuming)' or '')
  if changed and #changed > 0 then
    run:log('%s: options given again override the saved ones: %s', self.name, table.concat(changed, ', '))
  end
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
