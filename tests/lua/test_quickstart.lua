-- experiments/quickstart.lua end to end at --tiny size (seconds): every file of the run directory,
-- predict.csv against the sample submission, the report, and --resume of a finished run.
-- Also the recipe machinery (flower.recipe): variants as files, --help, bad options.
local T = require 'flower.test'
local recipe = require 'flower.recipe'
local files = require 'flower.files'
local h5 = require 'flower.h5'
local F = dofile('tests/lua/exp_fixture.lua')

local TMP = F.tmpdir()
local FL = os.getenv('FLOWERLUA') or './flowerlua'

local sh = T.capture

local quickstart = recipe.load('experiments/quickstart.lua')
local DATA = files.join(TMP, 'data')
local summary, dir

T.test('quickstart --tiny runs the whole pipeline', function()
  summary = quickstart:call { '--tiny', '--runs', files.join(TMP, 'runs'), '--data', DATA, '--run-name', 'tiny' }
  dir = files.join(TMP, 'runs', 'tiny')
  for _, f in ipairs({ 'config.json', 'log.txt', 'history.csv', 'predict.csv', 'predict-averaged.csv',
    'predict-vgg_tiny.csv', 'predict-inception_tiny.csv', 'report.html', 'results.json', 'predict-top3.csv',
    'predict-averaged-top3.csv', 'predict-vgg_tiny-top3.csv',
    'features/vgg_tiny.h5', 'features/inception_tiny.h5', 'models/vgg_tiny/model.h5', 'models/vgg_tiny/finished.json',
    'models/vgg_tiny/history.csv', 'ensemble/history.csv' }) do
    T.check(files.exists(files.join(dir, f)), 'missing ' .. f)
  end
  -- a finished model keeps no stage checkpoints (weights and Adam state): model.h5 and finished.json
  -- are what --resume needs
  T.check(not files.exists(files.join(dir, 'models/inception_tiny/checkpoints')), 'checkpoints of a finished model kept')
  T.eq(#summary.results, 4)
  for _, r in ipairs(summary.results) do
    T.check(type(r.val_acc) == 'number' and r.val_acc >= 0 and r.val_acc <= 1, r.name .. ' has an accuracy')
  end
end)

T.test('the data set was generated, and the config records the tiny settings', function()
  T.check(files.exists(files.join(DATA, 'train.json')), 'data generated')
  local cfg = files.json_read(files.join(dir, 'config.json'))
  T.eq(cfg.size, 32); T.eq(cfg.classes, 4); T.eq(cfg.data, DATA); T.eq(cfg.stages[2].train, 'all')
  T.eq(cfg.models[1], 'vgg_tiny'); T.eq(cfg.stages[2].schedule, 'cosine')
end)

T.test('predict.csv has exactly the sample submission\'s columns and rows; top-k is beside it', function()
  local got = files.csv_read(files.join(dir, 'predict.csv'))
  local want = files.csv_read(files.join(DATA, 'sample_submission.csv'))
  T.eq(#got, #want)
  T.eq(table.concat(got[1], ','), table.concat(want[1], ','), 'the header is the sample\'s')
  local topk = files.csv_read(files.join(dir, 'predict-top3.csv'))
  T.eq(table.concat(topk[1], ','), want[1][1] .. ',top3')
  local cats = {}
  for _, c in ipairs(files.json_read(files.join(DATA, 'train.json')).categories) do cats[tostring(c.id)] = true end
  for i = 2, #want do
    T.eq(#got[i], 2, 'row ' .. i .. ': two columns')
    T.eq(got[i][1], want[i][1], 'row ' .. i .. ' id')
    T.check(cats[got[i][2]], 'row ' .. i .. ': ' .. tostring(got[i][2]) .. ' is a category id')
    T.eq(topk[i][1], want[i][1], 'top-k row ' .. i .. ' id')
    local top = {}
    for c in topk[i][2]:gmatch('%S+') do top[#top + 1] = c end
    T.eq(#top, 3); T.eq(top[1], got[i][2], 'top-1 of the top-k column is the prediction')
  end
end)

T.test('feature files hold the seed datasets, aligned with the split', function()
  local f <close> = h5.open(files.join(dir, 'features', 'vgg_tiny.h5'), 'r')
  for _, n in ipairs({ 'train_x', 'train_label', 'valid_x', 'valid_label', 'test' }) do
    T.check(f:exists('/' .. n), 'dataset ' .. n)
  end
  T.eq(f:shape('/train_x')[1], f:shape('/train_label')[1])
  T.eq(f:attr('/', 'model'), 'vgg_tiny'); T.eq(f:attr('/', 'image_size'), 32)
end)

T.test('history.csv has every epoch of every model; the report has its sections', function()
  local rows = files.csv_read(files.join(dir, 'history.csv'))
  T.eq(rows[1][1], 'model'); T.eq(#rows, 1 + 2 * 2)
  local html = files.read(files.join(dir, 'report.html'))
  for _, s in ipairs({ 'Results', 'Training curves', 'Per-class accuracy', 'Most confused class pairs', 'Timing',
    'ensemble: concatenated features', 'ensemble: averaged probabilities', 'vgg_tiny: feature export' }) do
    T.check(html:find(s, 1, true), 'report lacks ' .. s)
  end
end)

T.test('--resume of a finished run trains nothing again and gives the same results', function()
  local again = quickstart:call { '--resume', dir }
  for i, r in ipairs(summary.results) do
    T.eq(again.results[i].name, r.name)
    T.eq(again.results[i].val_acc, r.val_acc, r.name)
  end
  T.eq(files.json_read(files.join(dir, 'config.json')).data, DATA, 'the saved config is used')
  local log = files.read(files.join(dir, 'log.txt'))
  T.check(log:find('(resuming)', 1, true), 'resume logged')
  T.check(log:find('already finished', 1, true) or log:find('resumed from', 1, true), 'checkpoints reused')
end)

T.test('killed after its first model, `--resume RUNDIR` alone finishes the run with the same predict.csv', function()
  local runs = files.join(TMP, 'runs')
  local args = ' --tiny --data ' .. DATA .. ' --runs ' .. runs .. ' --workers 1'
  local out, rc = sh(FL .. ' experiments/quickstart.lua' .. args .. ' --run-name whole')
  T.eq(rc, 0, out)
  out, rc = sh('FLOWER_KILLPOINT=pipeline.model_finished:1 ' .. FL .. ' experiments/quickstart.lua' .. args .. ' --run-name cut')
  T.check(rc ~= 0, 'the run should have been killed: ' .. out)
  local cut = files.join(runs, 'cut')
  T.check(files.exists(files.join(cut, 'models/vgg_tiny/finished.json')) and not files.exists(files.join(cut, 'predict.csv')),
    'killed between the models')
  -- the live report, rewritten after every epoch, shows the run so far
  local live = files.read(files.join(cut, 'report.html'))
  T.check(live:find('(running)', 1, true) and live:find('vgg_tiny: loss', 1, true), 'no live report')
  out, rc = sh(FL .. ' experiments/quickstart.lua --resume ' .. cut)
  T.eq(rc, 0, out)
  T.eq(files.read(files.join(cut, 'predict.csv')), files.read(files.join(runs, 'whole', 'predict.csv')), 'predict.csv')
  T.eq(files.read(files.join(cut, 'predict-averaged.csv')), files.read(files.join(runs, 'whole', 'predict-averaged.csv')))
  -- options given again override the saved ones, and the log says which
  out, rc = sh(FL .. ' experiments/quickstart.lua --resume ' .. cut .. ' --ensemble-epochs 2 --topk 3')
  T.eq(rc, 0, out)
  T.check(out:find('options given again override the saved ones: --ensemble-epochs 2 (was 5)', 1, true), out)
  T.eq(files.json_read(files.join(cut, 'config.json')).ensemble_epochs, 2, 'the resolved options record the override')
end)

T.test('--tta and --tensorboard: accuracy with and without TTA, TensorBoard runs, models predict from the run', function()
  local runs = files.join(TMP, 'runs')
  local tb = files.join(TMP, 'tb')
  local out, rc = sh(FL .. ' experiments/quickstart.lua --tiny --data ' .. DATA .. ' --runs ' .. runs
    .. ' --run-name tta --tta crops+flip --tensorboard ' .. tb)
  T.eq(rc, 0, out)
  local d = files.join(runs, 'tta')
  T.check(out:find('with crops+flip test-time augmentation', 1, true), out)
  T.check(files.read(files.join(d, 'report.html')):find('<th>with test-time augmentation</th>', 1, true), 'report column')
  local results = files.json_read(files.join(d, 'results.json'))
  for _, m in ipairs({ 'vgg_tiny', 'inception_tiny' }) do
    local f <close> = require('flower.h5').open(files.join(d, 'features', m .. '.h5'), 'r')
    T.eq(f:attr('/', 'tta'), 'crops+flip', 'the exported valid/test features are augmented too')
    T.check(files.isdir(files.join(tb, m, 'train')) and files.isdir(files.join(tb, m, 'validation')), 'tensorboard ' .. m)
    local model = require('flower.keras').load_model(files.join(d, 'models', m, 'model.h5'))
    T.eq(#model.metadata.classes, 4, 'class ids in the model file')
  end
  T.check(results, 'results.json')
  out, rc = sh(FL .. ' experiments/predict.lua --run ' .. d .. ' --images ' .. files.join(DATA, 'test.json') .. ' --csv '
    .. files.join(d, 'top5.csv'))
  T.eq(rc, 0, out)
  T.eq(#files.csv_read(files.join(d, 'top5.csv')), #files.csv_read(files.join(DATA, 'sample_submission.csv')))
end)

T.test('--keep-checkpoints all keeps every stage\'s checkpoint; --help lists the ensemble options', function()
  quickstart:call { '--tiny', '--runs', files.join(TMP, 'runs'), '--data', DATA, '--run-name', 'keep', '--keep-checkpoints',
    'all', '--models', 'vgg_tiny', '--ensemble-patience', '0', '--no-ensemble-restore-best' }
  local d = files.join(TMP, 'runs', 'keep')
  T.check(files.exists(files.join(d, 'models/vgg_tiny/checkpoints/stage1/last.h5')), 'stage 1 checkpoint')
  T.check(files.exists(files.join(d, 'models/vgg_tiny/checkpoints/stage2/last.h5')), 'stage 2 checkpoint')
  local cfg = files.json_read(files.join(d, 'config.json'))
  T.eq(cfg.ensemble_patience, 0); T.eq(cfg.ensemble_restore_best, false)
  T.eq(#files.csv_read(files.join(d, 'ensemble/history.csv')) - 1, 5, 'no early stopping: every ensemble epoch ran')
  local out = sh(FL .. ' experiments/quickstart.lua --help')
  for _, o in ipairs({ '--keep-checkpoints resume|all', '--ensemble-patience N', '--ensemble-restore-best',
    '--topk N' }) do
    T.check(out:find(o, 1, true), 'help lacks ' .. o)
  end
end)

T.test('variants are files that load the quickstart and change it', function()
  local d = recipe.load('experiments/dropout_variant.lua')
  T.eq(d.name, 'dropout_variant')
  local cfg = d:config({})
  T.eq(cfg.dropout, 0.5); T.eq(cfg.epochs, quickstart:config({}).epochs)
  local fz = recipe.load('experiments/freeze_schedule_variant.lua')
  local c2 = fz:config({ '--epochs', '2' })
  T.eq(#c2.stages, 3); T.eq(c2.stages[2].train.resnet_tiny, 'from:block3_1_conv'); T.eq(c2.epochs, 2)
  local pipeline = require 'flower.pipeline'
  local st = pipeline.stages(c2, 'inception_tiny')
  T.eq(st[2].train, 'from:mixed2_b1_conv'); T.eq(st[3].epochs, 2)
  -- the layers the variant names exist in the models
  local nets = require 'flower.smallnets'
  for _, name in ipairs({ 'resnet_tiny', 'inception_tiny', 'vgg_tiny' }) do
    local m = nets.build(name, { classes = 3, input_size = 32, width = 4 })
    m:layer(c2.stages[2].train[name]:sub(6))
  end
  T.raises(function() quickstart:derive { defaults = { nope = 1 } } end, "quickstart has no option 'nope'")
end)

T.test('command line: --help exits 0, a bad option exits 2 naming it', function()
  local out, rc = sh(FL .. ' experiments/quickstart.lua --help')
  T.eq(rc, 0); T.check(out:find('--train-per-class N', 1, true) and out:find('--resume STR', 1, true), out)
  out, rc = sh(FL .. ' experiments/quickstart.lua --epoch 3')
  T.eq(rc, 2); T.check(out:find('unknown option --epoch (did you mean --epochs?)', 1, true), out)
  out, rc = sh(FL .. ' experiments/fgvcx_flowers.lua')
  T.eq(rc, 2); T.check(out:find('option --data is required', 1, true), out)
  out, rc = sh(FL .. ' experiments/quickstart.lua --resume ' .. files.join(TMP, 'nowhere'))
  T.check(rc ~= 0 and out:find('no config.json there', 1, true), out)
end)

F.rmdir(TMP)
T.done()
