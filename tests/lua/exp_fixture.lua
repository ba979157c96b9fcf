-- Shared by the experiment tests (test_export, test_ensemble, test_quickstart): a tiny synthetic
-- flowers set made by scripts/make_flowers.lua, cached under build/ (regenerated when the
-- generator is newer), and a scratch directory.
local files = require 'flower.files'

local F = {}

local BUILD = os.getenv('BUILD') or 'build'

-- Runs scripts/make_flowers.lua in this process with the given arguments.
function F.make_flowers(args)
  local script = 'scripts/make_flowers.lua'
  local chunk = assert(loadfile(script))
  local saved = arg
  arg = args
  local ok, err = pcall(chunk)
  arg = saved
  if not ok then error('make_flowers failed: ' .. tostring(err), 0) end
end

-- A data set of `classes` x `per_class` small photos (+ `test` test photos) in the Kaggle layout.
function F.flowers(name, classes, per_class, test)
  local dir = files.join(BUILD, 'test-data', name)
  local stamp = files.join(dir, 'train.json')
  local fresh = files.exists(stamp) and os.execute(string.format('[ %s -nt scripts/make_flowers.lua ]', files.shell_quote(stamp)))
  if not fresh then
    os.execute('rm -rf ' .. files.shell_quote(dir))
    F.make_flowers { '--classes', tostring(classes), '--train-per-class', tostring(per_class), '--test', tostring(test),
      '--out', dir, '--min-size', '96x72', '--max-size', '128x96', '--seed', '3', '--quiet' }
  end
  return dir
end

function F.tmpdir()
  local d = os.tmpname()
  os.remove(d)
  files.mkdir(d)
  return d
end

function F.rmdir(d) os.execute('rm -rf ' .. files.shell_quote(d)) end

return F
