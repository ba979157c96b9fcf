-- flower.cli: option parsing for recipes.
local T = require 'flower.test'
local cli = require 'flower.cli'

local spec = {
  name = 'finetune', description = 'Fine-tune a model.',
  options = {
    { name = 'model', type = 'string', default = 'xception', help = 'backbone',
      choices = { 'resnet50', 'xception', 'inception_v3' } },
    { name = 'epochs', type = 'int', default = 3, help = 'epochs', min = 0 },
    { name = 'lr', type = 'number', default = 1e-3, help = 'learning rate' },
    { name = 'augment', type = 'bool', default = true, help = 'random crops and flips' },
    { name = 'tiny', type = 'bool', help = 'tiny run' },
    { name = 'models', type = 'list', default = { 'a', 'b' }, help = 'models to ensemble' },
    { 'train_per_class', 'int', 60, 'images per class' },
    { name = 'out', type = 'string', help = 'output directory' },
  },
}

T.test('defaults when nothing is given', function()
  local o = cli.parse(spec, {})
  T.eq(o.model, 'xception'); T.eq(o.epochs, 3); T.eq(o.lr, 1e-3)
  T.eq(o.augment, true); T.eq(o.tiny, false); T.eq(o.train_per_class, 60)
  T.eq(#o.models, 2); T.eq(o.out, nil)
end)

T.test('defaults are copied, not shared', function()
  local o = cli.parse(spec, {})
  o.models[1] = 'changed'
  T.eq(cli.parse(spec, {}).models[1], 'a')
end)

T.test('--key value, --key=value, flags, negated flags, dashes', function()
  local o = cli.parse(spec, { '--model', 'resnet50', '--epochs=5', '--lr', '1e-4', '--tiny', '--no-augment',
    '--models=x,y,z', '--train-per-class', '7', '--out=/tmp/a=b' })
  T.eq(o.model, 'resnet50'); T.eq(o.epochs, 5); T.eq(o.lr, 1e-4); T.eq(o.tiny, true)
  T.eq(o.augment, false); T.eq(table.concat(o.models, '|'), 'x|y|z'); T.eq(o.train_per_class, 7)
  T.eq(o.out, '/tmp/a=b')
  T.eq(math.type(o.epochs), 'integer')
  T.eq(o._given.model, true); T.eq(o._given.tiny, true); T.eq(o._given.lr, true)
  T.eq(cli.parse(spec, {})._given.model, nil)
end)

T.test('--flag=false and underscores accepted', function()
  local o = cli.parse(spec, { '--augment=false', '--train_per_class=2', '--tiny=yes' })
  T.eq(o.augment, false); T.eq(o.train_per_class, 2); T.eq(o.tiny, true)
end)

T.test('the last occurrence wins', function()
  T.eq(cli.parse(spec, { '--epochs', '1', '--epochs', '2' }).epochs, 2)
end)

T.test('unknown option is an error with a hint', function()
  T.raises(function() cli.parse(spec, { '--epoch', '3' }) end, 'finetune: unknown option --epoch (did you mean --epochs?)')
  T.raises(function() cli.parse(spec, { '--zzzzzz' }) end, 'unknown option --zzzzzz')
  T.raises(function() cli.parse(spec, { '-x' }) end, "unknown option '-x'")
  T.raises(function() cli.parse(spec, { 'stray' }) end, "unexpected argument 'stray'")
end)

T.test('bad values name the option, the expectation and the value', function()
  T.raises(function() cli.parse(spec, { '--epochs', 'three' }) end, "option --epochs expects an integer, got 'three'")
  T.raises(function() cli.parse(spec, { '--epochs', '2.5' }) end, "expects an integer, got '2.5'")
  T.raises(function() cli.parse(spec, { '--epochs=-1' }) end, "expects an integer >= 0, got '-1'")
  T.raises(function() cli.parse(spec, { '--lr', 'fast' }) end, "option --lr expects a number, got 'fast'")
  T.raises(function() cli.parse(spec, { '--lr', 'nan' }) end, "expects a number")
  T.raises(function() cli.parse(spec, { '--model', 'vgg' }) end,
    "option --model expects one of resnet50, xception, inception_v3, got 'vgg'")
  T.raises(function() cli.parse(spec, { '--augment=maybe' }) end, "expects true or false, got 'maybe'")
  T.raises(function() cli.parse(spec, { '--no-augment=1' }) end, 'takes no value')
  T.raises(function() cli.parse(spec, { '--epochs' }) end, 'option --epochs expects an integer, got nothing')
  T.raises(function() cli.parse(spec, { '--models', 'a,,b' }) end, 'without empty items')
  T.raises(function() cli.parse(spec, { '--no-model' }) end, 'unknown option --no-model')
end)

T.test('required options', function()
  local s = { name = 'r', options = { { name = 'data', type = 'string', required = true, help = 'dir' } } }
  T.raises(function() cli.parse(s, {}) end, 'r: option --data is required')
  T.eq(cli.parse(s, { '--data', 'x' }).data, 'x')
end)

T.test('--help is generated from the declarations', function()
  local o, help = cli.parse(spec, { '--epochs', '2', '--help' })
  T.eq(o, nil)
  T.check(help:find('usage: flowerlua finetune', 1, true), help)
  T.check(help:find('Fine-tune a model.', 1, true), 'description')
  T.check(help:find('--model resnet50|xception|inception_v3', 1, true), 'choices shown')
  T.check(help:find('--epochs N', 1, true) and help:find('(default: 3)', 1, true), 'default shown')
  T.check(help:find('--augment, --no-augment', 1, true), 'bool shown with negation')
  T.check(help:find('--train-per-class N', 1, true), 'dashed names')
  T.check(help:find('(default: a,b)', 1, true), 'list default')
  T.check(select(2, cli.parse(spec, { '-h' })) == help, '-h same as --help')
end)

T.test('positional arguments when declared, and --', function()
  local s = { name = 'p', positional = true, options = { { 'n', 'int', 1, 'n' } } }
  local o = cli.parse(s, { 'a', '--n', '2', '--', '--n' })
  T.eq(o.n, 2); T.eq(#o._args, 2); T.eq(o._args[2], '--n')
end)

T.test('bad specs are errors', function()
  T.raises(function() cli.parse({ name = 'x', options = { { name = 'a', type = 'float' } } }, {}) end,
    "option 'a' has type float")
  T.raises(function() cli.parse({ name = 'x', options = { { 'a', 'int' }, { 'a', 'int' } } }, {}) end,
    "declared twice")
  T.raises(function() cli.parse({ name = 'x', options = { { 'help', 'bool' } } }, {}) end, 'reserved')
end)

T.test('values() gives a plain table of declared options', function()
  local v = cli.values(spec, cli.parse(spec, { '--tiny' }))
  T.eq(getmetatable(v), nil); T.eq(v.tiny, true); T.eq(v._given, nil)
end)

T.test('the two pipeline recipes extend one shared option declaration', function()
  local recipe = require 'flower.recipe'
  local shared = recipe.pipeline_options {}
  local qs, fg = recipe.load('experiments/quickstart.lua'), recipe.load('experiments/fgvcx_flowers.lua')
  for _, r in ipairs({ qs, fg }) do
    local by = {}
    for _, o in ipairs(r.options) do by[o.name] = o end
    for _, o in ipairs(shared) do
      T.check(by[o.name], r.name .. ' lacks the shared option ' .. o.name)
      T.eq(by[o.name].type, o.type, r.name .. ' ' .. o.name .. ' type')
    end
  end
  -- each recipe's own values laid over the shared declaration
  T.eq(qs:config({}).ensemble_epochs, 60); T.eq(fg:config({ '--data', 'x' }).ensemble_epochs, 50)
  T.eq(qs:config({}).ensemble_patience, 8); T.eq(fg:config({ '--data', 'x' }).keep_checkpoints, 'resume')
  T.raises(function() recipe.pipeline_options { nope = {} } end, "no shared option 'nope'")
  -- --data is required by fgvcx_flowers, except with --resume (the run directory has it)
  T.raises(function() fg:config({}) end, 'option --data is required')
  T.eq(fg:config({ '--resume', 'runs/x' }).resume, 'runs/x')
end)

T.done()
