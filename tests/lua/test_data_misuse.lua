-- Wrong calls on the data and tensor side get messages in the caller's terms (issue 14, point 7):
-- labels counted from 1, float labels named as such, a loss name where a loss function belongs,
-- a nil size, and a file that is only the JPEG start marker.
local T = require 'flower.test'
local flower = require 'flower'
local nn = require 'flower.nn'
local train = require 'flower.train'
local data = require 'flower.data'

local logits = flower.tensor({ { 1, 2, 3 }, { 3, 2, 1 }, { 0, 0, 0 } })

T.test('labels out of range are reported 1-based: label 4 of 3 classes says 4, and 1..3', function()
  T.raises(function() nn.softmax_cross_entropy(logits, flower.tensor({ 1, 4, 2 }, 'int64')) end,
    'label 4 of row 2 is outside 1..3')
  T.raises(function() nn.softmax_cross_entropy(logits, flower.tensor({ 1, 2, 0 }, 'int32')) end,
    'label 0 of row 3 is outside 1..3')
  local loss = nn.CategoricalCrossentropy { from_logits = true }
  T.raises(function() loss:forward(logits, flower.tensor({ 3, 3, 4 }, 'int64')) end, 'label 4 of row 3 is outside 1..3')
  -- in range still works
  T.check(nn.softmax_cross_entropy(logits, flower.tensor({ 1, 3, 2 }, 'int64')) > 0)
end)

T.test('float labels get a message saying labels must be integers', function()
  T.raises(function() nn.softmax_cross_entropy(logits, flower.tensor({ 1, 2, 3 })) end,
    "labels must be an integer tensor (int64 or int32) of classes 1..3, got float32; convert them with :type('int64')")
end)

T.test("train.step with a loss name or a non-batch says which argument is wrong", function()
  local m = {}   -- the checks come before the model is touched
  local batch = { x = logits, y = flower.tensor({ 1, 2, 3 }, 'int64') }
  T.raises(function() train.step(m, batch, 'logits', nil) end,
    "train.step: argument 3 must be a loss function(output, target) -> loss, grad, got string logits")
  T.raises(function() train.step(m, logits, train.make_loss('logits'), nil) end, 'train.step: argument 2 must be a batch')
end)

T.test('flower.zeros(nil) is an error, not a 0-dim tensor', function()
  for _, f in ipairs({ 'zeros', 'ones', 'empty' }) do
    T.raises(function() flower[f](nil) end, f .. ': expected a size (integers or a table of them), got nil')
  end
  T.raises(function() flower.full(nil, 1) end, 'full: expected a size')
  T.eq(flower.zeros(2, 3):dim(), 2)
  T.eq(flower.zeros({ 4 }, 'int64'):dtype(), 'int64')
end)

T.test('a 2-byte FF D8 file says it is truncated, with its size', function()
  T.raises(function() data.decode_image('\255\216') end, 'truncated: 2 bytes')
  T.raises(function() data.decode_image('\255') end, 'not a JPEG file: only 1 byte')
end)

T.done()
