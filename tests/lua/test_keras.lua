-- flower.keras weight files: save/load round trips, Keras's order and by-name matching,
-- skip_mismatch, nested models, chunked name lists, all-or-nothing loading, every error path,
-- and real Keras (tf-keras) reading the files flowerlua writes.
local T = require 'flower.test'
local flower = require 'flower'
local nn = require 'flower.nn'
local keras = require 'flower.keras'
local h5 = require 'flower.h5'

local PY = T.python
local FILES = (os.getenv('BUILD') or 'build') .. '/ref/keras_files'
local GEN = 'tests/reference/gen_keras_files.py'
local TMP = T.tmpdir()

local sh = T.sh

-- A small network with a branch, a concatenation and every weighted layer type.
-- `tag` changes the names (for by-order loading across names); `units` the head's size.
local function net(tag, units, bn_scale)
  tag = tag or ''
  local x = nn.Input{shape = {11, 10, 3}, name = 'in' .. tag}
  local a = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same', name = 'conv' .. tag}(x)
  a = nn.BatchNormalization{scale = bn_scale ~= false, name = 'bn' .. tag}(a)
  a = nn.Activation{'relu', name = 'relu' .. tag}(a)
  local b = nn.DepthwiseConv2D{kernel_size = 3, padding = 'same', name = 'dw' .. tag}(x)
  b = nn.SeparableConv2D{filters = 5, kernel_size = 3, padding = 'same', name = 'sep' .. tag}(b)
  local c = nn.Concatenate{name = 'cat' .. tag}{a, b}
  c = nn.GlobalAveragePooling2D{name = 'gap' .. tag}(c)
  local y = nn.Dense{units = units or 3, activation = 'softmax', name = 'head' .. tag}(c)
  return nn.Model(x, y, {name = 'net' .. tag})
end

local function randomize(m, seed)
  flower.manual_seed(seed)
  for _, w in ipairs(m:weights()) do
    if w.name == 'moving_variance' then w.tensor:uniform_(0.5, 1.5) else w.tensor:normal_(0, 0.5) end
  end
end

local same_weights = T.same_weights

local function snapshot(m)
  local r = {}
  for i, w in ipairs(m:weights()) do r[i] = w.tensor:clone() end
  return r
end

local function unchanged(m, snap)
  for i, w in ipairs(m:weights()) do
    if not w.tensor:equal(snap[i]) then error('weight ' .. w.path .. ' changed by a failed load', 2) end
  end
end

T.test('save_weights writes Keras\'s layout; load_weights reads it back bit-identically', function()
  local a = net()
  randomize(a, 1)
  local p = TMP .. '/a.h5'
  keras.save_weights(a, p)
  local f <close> = h5.open(p, 'r')
  -- Keras's order (depth from the output, ties by first visit): conv is deeper than dw
  T.eq(table.concat(f:attr('/', 'layer_names'), ','), 'in,conv,bn,dw,relu,sep,cat,gap,head')
  T.eq(f:attr('/', 'backend'), 'tensorflow')
  T.eq(f:attr('/', 'keras_version'), keras.layout_version)
  T.eq(table.concat(f:attr('/bn', 'weight_names'), ','), 'bn/gamma:0,bn/beta:0,bn/moving_mean:0,bn/moving_variance:0')
  T.eq(table.concat(f:attr('/sep', 'weight_names'), ','), 'sep/depthwise_kernel:0,sep/pointwise_kernel:0,sep/bias:0')
  T.eq(#f:attr('/cat', 'weight_names'), 0)
  T.eq(table.concat(f:shape('/conv/conv/kernel:0'), 'x'), '3x3x3x4')
  T.eq(table.concat(f:shape('/dw/dw/depthwise_kernel:0'), 'x'), '3x3x3x1')
  local b = net()
  local rep = keras.load_weights(b, p)
  T.eq(rep.loaded, 5)
  same_weights(a, b)
  a:evaluate(); b:evaluate()
  local x = flower.randn(2, 11, 10, 3)
  T.allclose(b:forward(x), a:forward(x), 0, 0)
end)

T.test('model:save_weights / model:load_weights are the same Keras files', function()
  local a = net()
  randomize(a, 3)
  local p = TMP .. '/method.h5'
  a:save_weights(p)
  local b = net()
  T.eq(b:load_weights(p).loaded, 5)
  same_weights(a, b)
  local c = net()
  T.eq(keras.load_weights(c, p, { by_name = true }).loaded, 5)
  same_weights(a, c)
end)

T.test('by order: names do not matter; by name: names do, and the rest is reported', function()
  local a = net()
  randomize(a, 2)
  local p = TMP .. '/b.h5'
  keras.save_weights(a, p)
  local b = net('_x')
  keras.load_weights(b, p)
  same_weights(a, b)
  local c = net('_y')
  local rep = keras.load_weights(c, p, {by_name = true, quiet = true})
  T.eq(rep.matched, 'name')
  T.eq(rep.loaded, 0)
  T.eq(#rep.missing_in_file, 5)
  T.eq(#rep.unused_in_file, 5)
  T.eq(rep.unused_in_file[1], 'conv')
end)

T.test('skip_mismatch loads all but a new head, and says so', function()
  local a = net()
  randomize(a, 3)
  local p = TMP .. '/c.h5'
  keras.save_weights(a, p)
  local b = net(nil, 7)
  local head = b:layer('head').kernel:clone()
  local snap = snapshot(b)
  T.raises(function() keras.load_weights(b, p, {by_name = true}) end,
    "layer 'head' (Dense) weight 'kernel' has shape 9x7, but the file's group 'head' has 'head/kernel:0' of shape 9x3")
  unchanged(b, snap)
  T.raises(function() keras.load_weights(b, p) end, "layer 'head' (Dense) weight 'kernel' has shape 9x7")
  unchanged(b, snap)
  T.raises(function() keras.load_weights(b, p, {skip_mismatch = true}) end, 'skip_mismatch=true needs by_name=true')
  local rep = keras.load_weights(b, p, {by_name = true, skip_mismatch = true, quiet = true})
  T.eq(rep.loaded, 4)
  T.eq(#rep.skipped, 1)
  T.eq(rep.skipped[1].layer, 'head')
  T.check(rep.skipped[1].reason:find('9x7', 1, true), rep.skipped[1].reason)
  T.check(b:layer('head').kernel:equal(head), 'the skipped head keeps its weights')
  T.check(b:layer('conv').kernel:equal(a:layer('conv').kernel), 'the rest is loaded')
end)

-- A chain of unnamed layers, so that flowerlua numbers them as tf.keras does (conv2d, conv2d_1,
-- conv2d_2, batch_normalization, ...); conv2d_1 and conv2d_2 have the same shapes, so a load that
-- pairs a layer with its neighbour would pass every shape check.
local function auto_net(units)
  nn.reset_names()
  local x = nn.Input{shape = {8, 8, 3}}
  local y = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same'}(x)
  y = nn.Activation('relu')(nn.BatchNormalization{}(y))
  y = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same'}(y)
  y = nn.Conv2D{filters = 4, kernel_size = 3, padding = 'same'}(y)
  y = nn.BatchNormalization{}(y)
  y = nn.Dense{units = units or 2}(nn.GlobalAveragePooling2D{}(y))
  return nn.Model(x, y)
end

T.test('automatic names: the numbering scheme of each prefix is read off the names present', function()
  local map = keras.scheme_map({'conv2d', 'conv2d_1', 'conv2d_2', 'block1_conv1', 'dense'},
                               {'conv2d_1', 'conv2d_2', 'conv2d_3', 'block1_conv1', 'dense'})
  T.eq(map.conv2d, 'conv2d_1'); T.eq(map.conv2d_1, 'conv2d_2'); T.eq(map.conv2d_2, 'conv2d_3')
  T.eq(map.block1_conv1, nil, 'explicit names stay'); T.eq(map.dense, nil, 'a prefix both sides have bare stays')
  -- the other way round: a one-based model (built from a standalone Keras config) and a tf.keras file
  local back = keras.scheme_map({'conv2d_1', 'conv2d_2'}, {'conv2d', 'conv2d_1'})
  T.eq(back.conv2d_1, 'conv2d'); T.eq(back.conv2d_2, 'conv2d_1')
  T.eq(next(keras.scheme_map({'conv2d', 'conv2d_1'}, {'conv2d', 'conv2d_1'})), nil, 'same scheme: nothing renamed')
end)

T.test('by name on a standalone Keras 2.2 file (conv2d_1 ...): every layer gets its own weights, never a neighbour\'s', function()
  local a = auto_net()
  randomize(a, 21)
  local ours, theirs = TMP .. '/auto.h5', TMP .. '/auto_keras22.h5'
  keras.save_weights(a, ours)
  assert(sh(string.format('%s tests/reference/keras22_names.py %s %s', PY, ours, theirs)), 'keras22_names.py failed')
  T.eq(keras.inspect(theirs).keras_version, '2.2.4')
  local b = auto_net()
  local rep = keras.load_weights(b, theirs, {by_name = true, quiet = true})
  T.eq(rep.loaded, 6); T.eq(#rep.missing_in_file, 0); T.eq(#rep.unused_in_file, 0); T.eq(#rep.skipped, 0)
  T.eq(#rep.renamed, 6); T.eq(rep.renamed[1].layer, 'conv2d'); T.eq(rep.renamed[1].group, 'conv2d_1')
  same_weights(a, b)
  -- with skip_mismatch (a new head): the same pairs, the head skipped and named, nothing in a neighbour
  local c = auto_net(5)
  rep = keras.load_weights(c, theirs, {by_name = true, skip_mismatch = true, quiet = true})
  T.eq(rep.loaded, 5); T.eq(#rep.skipped, 1); T.eq(rep.skipped[1].layer, 'dense')
  for _, n in ipairs({'conv2d', 'conv2d_1', 'conv2d_2', 'batch_normalization', 'batch_normalization_1'}) do
    T.check(c:layer(n).kernel == nil or c:layer(n).kernel:equal(a:layer(n).kernel), n .. ': its own weights')
  end
  T.check(c:layer('batch_normalization_1').moving_mean:equal(a:layer('batch_normalization_1').moving_mean), 'bn_1')
  -- the report names every skipped layer with its reason (stderr unless quiet)
  local out = TMP .. '/report.txt'
  local f = io.open(out, 'w')
  keras.print_report(rep, theirs, f)
  f:close()
  local text = io.open(out):read('a')
  T.check(text:find("  skipped dense: layer 'dense' (Dense) weight 'kernel' has shape 4x5", 1, true), text)
  T.check(text:find('6 automatic names matched across numbering schemes (conv2d -> conv2d_1', 1, true), text)
end)

T.test('a file without one layer\'s weights says which layer; load_model errors start with keras.load_model', function()
  local a = auto_net()
  local p = TMP .. '/missing.h5'
  keras.save_weights(a, p)
  do   -- drop conv2d_1 from the file, as a truncated export would
    local f <close> = h5.open(p, 'a')
    local names = f:attr('/', 'layer_names')
    local keep = {}
    for _, n in ipairs(names) do if n ~= 'conv2d_1' then keep[#keep + 1] = n end end
    f:set_attr('/', 'layer_names', keep)
  end
  T.raises(function() keras.load_weights(auto_net(), p) end,
    "the model model has 6 layers with weights, the file 5 (the file has no weights for the model's layer(s) 'conv2d_1')")
  local junk = TMP .. '/junk.h5'
  local g = io.open(junk, 'w'); g:write('not an HDF5 file\n'); g:close()
  for _, fn in ipairs({function() keras.load_model(junk) end, function() keras.load_weights(a, junk) end}) do
    local err = T.raises(fn, 'junk.h5')
    T.check(not tostring(err):find('flower/keras.lua:', 1, true), 'an internal location: ' .. tostring(err))
    T.check(tostring(err):find('^[^ ]*test_keras.lua:%d+: keras%.load_') or tostring(err):find('^keras%.load_'),
      'starts with the function: ' .. tostring(err))
  end
end)

T.test('loading is all or nothing: a bad last layer leaves every weight untouched', function()
  local a = net()
  randomize(a, 4)
  local p = TMP .. '/d.h5'
  keras.save_weights(a, p)
  -- corrupt the last group's kernel shape in the file
  do
    local f <close> = h5.open(p, 'a')
    f:write('/head/head/kernel:0', flower.zeros(9, 4))
  end
  local b = net()
  randomize(b, 5)
  local snap = snapshot(b)
  local err = T.raises(function() keras.load_weights(b, p) end,
    "keras.load_weights: " .. p .. ": layer 'head' (Dense) weight 'kernel' has shape 9x3, but the file's group 'head' " ..
    "has 'head/kernel:0' of shape 9x4 (matched by order: layer 5 of 5); nothing was loaded")
  T.check(err)
  unchanged(b, snap)
end)

T.test('errors: counts, missing attributes and groups, truncated files, not a model', function()
  local a = net()
  local p = TMP .. '/e.h5'
  keras.save_weights(a, p)
  local b = net(nil, nil, false)               -- BatchNormalization without gamma: 3 weights
  local snap = snapshot(b)
  T.raises(function() keras.load_weights(b, p) end,
    "layer 'bn' (BatchNormalization) has 3 weights (beta, moving_mean, moving_variance) but the file's group 'bn' has 4")
  unchanged(b, snap)
  -- a model with one more weighted layer
  local x = nn.Input{shape = {4}}
  local y = nn.Dense{units = 2, name = 'd1'}(nn.Dense{units = 3, name = 'd0'}(x))
  local two = nn.Model(x, y)
  T.raises(function() keras.load_weights(two, p) end, 'the model model')
  T.raises(function() keras.load_weights(two, p) end, 'has 2 layers with weights, the file 5')
  -- missing layer_names
  local q = TMP .. '/f.h5'
  h5.write_atomic(q, function(f) f:write('/x', flower.ones(2)) end)
  T.raises(function() keras.load_weights(a, q) end, "is not a Keras weight file: there is no 'layer_names' attribute")
  -- a layer_names entry without its group; a group without weight_names; a listed dataset missing
  h5.write_atomic(q, function(f) f:set_attr('/', 'layer_names', {'conv', 'ghost'}); f:create_group('/conv')
    f:set_attr('/conv', 'weight_names', {}) end)
  T.raises(function() keras.load_weights(a, q) end, "layer_names[2] is 'ghost', but the file has no group '/ghost'")
  h5.write_atomic(q, function(f) f:set_attr('/', 'layer_names', {'conv'}); f:create_group('/conv') end)
  T.raises(function() keras.load_weights(a, q) end, "group '/conv' has no 'weight_names' attribute")
  local one = nn.Model(x, nn.Dense{units = 2, name = 'only'}(x))
  h5.write_atomic(q, function(f)
    f:set_attr('/', 'layer_names', {'only'}); f:create_group('/only')
    f:set_attr('/only', 'weight_names', {'only/kernel:0', 'only/bias:0'})
    f:write('/only/only/kernel:0', flower.ones(4, 2))
  end)
  T.raises(function() keras.load_weights(one, q) end, "lists weight 'only/bias:0' but /only/only/bias:0 holds nothing")
  -- truncated
  local src = io.open(p, 'rb'):read('a')
  local cut = TMP .. '/cut.h5'
  local g = io.open(cut, 'wb'); g:write(src:sub(1, #src - 100)); g:close()
  T.raises(function() keras.load_weights(a, cut) end, 'cut.h5')
  unchanged(b, snap)
  T.raises(function() keras.load_weights({}, p) end, 'expected a flower.nn model')
  T.raises(function() keras.load_weights(a, 42) end, 'path must be a string')
  T.raises(function() keras.save_weights(a, TMP .. '/no/dir/w.h5') end, 'keras.save_weights')
  local lazy = nn.Sequential{nn.Dense{units = 2}}
  T.raises(function() keras.save_weights(lazy, TMP .. '/lazy.h5') end, 'is not built yet')
end)

T.test('a nested model is one layer: trainable weights first, then the rest (Keras\'s order)', function()
  local bx = nn.Input{shape = {6, 6, 2}, name = 'b_in'}
  local b = nn.Conv2D{filters = 3, kernel_size = 3, name = 'b_conv'}(bx)
  b = nn.BatchNormalization{name = 'b_bn'}(b)
  b = nn.Conv2D{filters = 2, kernel_size = 1, name = 'b_conv2'}(b)
  b = nn.GlobalAveragePooling2D{name = 'b_gap'}(b)
  local base = nn.Model(bx, b, {name = 'base'})
  local x = nn.Input{shape = {6, 6, 2}, name = 'img'}
  local m = nn.Model(x, nn.Dense{units = 2, name = 'head'}(base(x)), {name = 'outer'})
  randomize(m, 6)
  local p = TMP .. '/nested.h5'
  keras.save_weights(m, p)
  local f <close> = h5.open(p, 'r')
  T.eq(table.concat(f:attr('/', 'layer_names'), ','), 'img,base,head')
  T.eq(table.concat(f:attr('/base', 'weight_names'), ','), 'b_conv/kernel:0,b_conv/bias:0,b_bn/gamma:0,b_bn/beta:0,' ..
    'b_conv2/kernel:0,b_conv2/bias:0,b_bn/moving_mean:0,b_bn/moving_variance:0')
  local bx2 = nn.Input{shape = {6, 6, 2}}
  local b2 = nn.GlobalAveragePooling2D{}(nn.Conv2D{filters = 2, kernel_size = 1}(nn.BatchNormalization{}(
    nn.Conv2D{filters = 3, kernel_size = 3}(bx2))))
  local x2 = nn.Input{shape = {6, 6, 2}}
  local m2 = nn.Model(x2, nn.Dense{units = 2}(nn.Model(bx2, b2)(x2)))
  keras.load_weights(m2, p)
  same_weights(m, m2)
end)

T.test('name lists over 64 KiB are chunked as Keras does (layer_names0, layer_names1, ...)', function()
  local x = nn.Input{shape = {3}, name = 'in'}
  local y = x
  local long = string.rep('very_long_layer_name_', 5)
  for i = 1, 700 do y = nn.Activation{'linear', name = string.format('%s%04d', long, i)}(y) end
  y = nn.Dense{units = 2, name = 'out'}(y)
  local m = nn.Model(x, y)
  randomize(m, 7)
  local p = TMP .. '/chunked.h5'
  keras.save_weights(m, p)
  local f <close> = h5.open(p, 'r')
  T.eq(f:attr('/', 'layer_names'), nil)
  local a0, a1 = f:attr('/', 'layer_names0'), f:attr('/', 'layer_names1')
  T.check(a0 and a1, 'chunks layer_names0 and layer_names1')
  T.eq(#a0 + #a1 + #(f:attr('/', 'layer_names2') or {}), 702)
  T.eq(a0[1], 'in')
  local x2 = nn.Input{shape = {3}}
  local m2 = nn.Model(x2, nn.Dense{units = 2}(x2))
  keras.load_weights(m2, p)
  T.check(m2:weights()[1].tensor:equal(m:layer('out').kernel))
  T.eq(#keras.weighted_groups(p), 1)
end)

T.test('float64 models save float64 and load into float32 models', function()
  local a = net()
  randomize(a, 8)
  a:type('float64')
  local p = TMP .. '/f64.h5'
  keras.save_weights(a, p)
  T.eq(h5.open(p, 'r'):dtype('/conv/conv/kernel:0'), 'float64')
  local b = net()
  keras.load_weights(b, p)
  T.allclose(b:layer('conv').kernel:double(), a:layer('conv').kernel, 1e-7)
end)

T.test('keras.inspect lists a file\'s groups, weights and shapes', function()
  local a = net()
  local p = TMP .. '/i.h5'
  keras.save_weights(a, p)
  local info = keras.inspect(p)
  T.eq(#info.layers, 9)
  T.eq(info.layers[2].name, 'conv')
  T.eq(info.layers[2].weights[1].name, 'conv/kernel:0')
  T.eq(table.concat(info.layers[2].weights[1].shape, 'x'), '3x3x3x4')
  T.eq(info.keras_version, keras.layout_version)
end)

T.test('real Keras loads our files (by order and by name) and predicts what we predict', function()
  if not sh(string.format('[ %s/files.stamp -nt %s ]', FILES, GEN)) then
    assert(sh(string.format('%s %s %s >&2', PY, GEN, FILES)), 'test_keras: the Keras file generator failed')
  end
  local jobs, checks = {}, {}
  for _, name in ipairs({'tf2_func', 'tf2_nested', 'tf2_seq'}) do
    local m = keras.load_model(FILES .. '/' .. name .. '.h5')
    randomize(m, 9)                             -- our own weights, not Keras's
    local io_ <close> = h5.open(FILES .. '/' .. name .. '_io.h5', 'r')
    local x = io_:read('/x')
    local mine = m:forward(x)
    local w, xin = TMP .. '/' .. name .. '_ours.h5', TMP .. '/' .. name .. '_x.h5'
    keras.save_weights(m, w)
    h5.write_atomic(xin, function(f) f:write('/x', x) end)
    for _, mode in ipairs({'', 'by_name'}) do
      local out = TMP .. '/' .. name .. '_y' .. mode .. '.h5'
      jobs[#jobs + 1] = string.format('%s/%s.h5 %s %s %s %s', FILES, name, w, xin, out, mode)
      checks[#checks + 1] = {out = out, mine = mine, what = name .. ' ' .. mode}
    end
  end
  assert(sh(string.format('%s tests/reference/keras_load_check.py %s >&2', PY, table.concat(jobs, ' -- '))),
    'tf-keras could not load our files')
  for _, c in ipairs(checks) do T.allclose(h5.read(c.out, '/y'), c.mine, 1e-5, 0, c.what) end
end)

os.execute('rm -rf ' .. TMP)
T.done()
