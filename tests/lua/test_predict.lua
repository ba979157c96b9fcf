-- flower.predict: predict.csv in the competition's format, checked against a sample submission.
local T = require 'flower.test'
local flower = require 'flower'
local predict = require 'flower.predict'
local files = require 'flower.files'

local dir = os.tmpname()
os.remove(dir)
files.mkdir(dir)
local function path(n) return files.join(dir, n) end

-- A sample submission with its own header and an order different from ours.
files.write_atomic(path('sample.csv'), 'Id,Predicted\n3,0\n1,0\n2,0\n10,0\n')
files.write_atomic(path('test.json'), [[{"images": [
  {"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"},
  {"id": 3, "file_name": "c.jpg"}, {"id": 10, "file_name": "d.jpg"}]}]])

T.test('ids from test.json in file order', function()
  local ids = predict.test_ids(path('test.json'))
  T.eq(table.concat(ids, ','), '1,2,3,10')
  files.write_atomic(path('t2.json'), '{"images": [{"file_name": "x/abc.jpg"}]}')
  T.eq(predict.test_ids(path('t2.json'))[1], 'abc')
  files.write_atomic(path('t3.json'), '{"annotations": []}')
  T.raises(function() predict.test_ids(path('t3.json')) end, "expected an object with an 'images' list")
  files.write_atomic(path('t4.json'), '{"images": [{"height": 3}]}')
  T.raises(function() predict.test_ids(path('t4.json')) end, "images[1] has neither 'id' nor 'file_name'")
end)

T.test('sample submission: header and row order copied', function()
  local out = path('predict.csv')
  predict.write_csv(out, { ids = { '1', '2', '3', '10' }, predicted = { 11, 22, 33, 100 }, sample = path('sample.csv') })
  T.eq(files.read(out), 'Id,Predicted\n3,33\n1,11\n2,22\n10,100\n')
  -- the written file agrees with the sample row by row
  local got, want = files.csv_read(out), files.csv_read(path('sample.csv'))
  T.eq(#got, #want)
  for i = 1, #want do T.eq(got[i][1], want[i][1], 'row ' .. i) end
end)

T.test('default format id,predicted; top-k goes to its own file, never into the submission', function()
  local out = path('p2.csv')
  predict.write_csv(out, { ids = { 5, 6 }, predicted = { 1, 2 }, topk = { { 1, 4, 3 }, { 2, 1, 0 } } })
  T.eq(files.read(out), 'id,predicted\n5,1\n6,2\n')
  T.eq(predict.topk_path(out, 3), path('p2-top3.csv'))
  predict.write_topk(predict.topk_path(out, 3), { ids = { 5, 6 }, topk = { { 1, 4, 3 }, { 2, 1, 0 } } })
  T.eq(files.read(path('p2-top3.csv')), 'id,top3\n5,1 4 3\n6,2 1 0\n')
  -- with a sample: its id column name and its row order
  predict.write_topk(path('t.csv'), { ids = { '1', '2', '3', '10' }, topk = { { 1 }, { 2 }, { 3 }, { 4 } },
    sample = path('sample.csv') })
  T.eq(files.read(path('t.csv')), 'Id,top1\n3,3\n1,1\n2,2\n10,4\n')
  -- a sample with more columns than a submission can fill is refused, not half-followed
  files.write_atomic(path('wide.csv'), 'id,predicted,extra\n1,0,0\n')
  T.raises(function() predict.rows { ids = { '1' }, predicted = { 1 }, sample = path('wide.csv') } end,
    'has 3 columns (id,predicted,extra)')
end)

T.test('mismatched id sets are errors naming an example', function()
  T.raises(function()
    predict.rows { ids = { '1', '2', '3' }, predicted = { 1, 2, 3 }, sample = path('sample.csv') }
  end, "lists 1 id(s) without a prediction (first: '10')")
  T.raises(function()
    predict.rows { ids = { '1', '2', '3', '10', '11' }, predicted = { 1, 2, 3, 4, 5 }, sample = path('sample.csv') }
  end, "1 predicted id(s) are not in")
  T.raises(function() predict.rows { ids = { '1', '1' }, predicted = { 1, 2 } } end, "id '1' appears twice")
  T.raises(function() predict.rows { ids = { '1' }, predicted = { 1, 2 } } end, '1 ids but 2 predictions')
  files.write_atomic(path('bad.csv'), 'only\n1\n')
  T.raises(function() predict.rows { ids = { '1' }, predicted = { 1 }, sample = path('bad.csv') } end,
    'expected a header with at least two columns')
end)

T.test('top-k indices, ties in index order', function()
  local t = predict.topk_rows({ { 0.1, 0.7, 0.2 }, { 0.5, 0.5, 0.0 } }, 2)
  T.eq(table.concat(t[1], ','), '2,3'); T.eq(table.concat(t[2], ','), '1,2')
  T.eq(table.concat(predict.topk_rows({ { 3, 1, 3, 2, 3 } }, 4)[1], ','), '1,3,5,4')
  T.eq(#predict.topk_rows({ { 0.2, 0.8 } }, 5)[1], 2)
end)

T.test('top-k of a tensor equals a full sort of each row (ties included), across chunks', function()
  flower.manual_seed(3)
  local p = flower.randint(0, 20, { 2500, 97 }):float()   -- many ties
  local got = predict.topk_rows(p, 5)
  T.eq(#got, 2500)
  for i, row in ipairs(p:totable()) do
    local idx = {}
    for j = 1, #row do idx[j] = j end
    table.sort(idx, function(a, b) if row[a] ~= row[b] then return row[a] > row[b] end return a < b end)
    T.eq(table.concat(got[i], ','), table.concat(idx, ',', 1, 5), 'row ' .. i)
  end
end)

os.execute('rm -rf ' .. files.shell_quote(dir))
T.done()
