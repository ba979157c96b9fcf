-- flower.predict: submissions in the competition's format.
--
--   predict.write_csv('runs/x/predict.csv', {
--     ids = {'0', '1', ...},            -- test image ids, in the order of `predicted`
--     predicted = {12, 7, ...},         -- predicted labels (category ids, not indices)
--     sample = 'data/sample_submission.csv',  -- optional: copy its header and row order
--   })
--   predict.write_topk('runs/x/predict-top3.csv', {ids = ..., topk = {{12, 3, 9}, ...}, sample = ...})
--
-- With a sample submission: its header is kept, its first column names the ids and its second the
-- prediction, and the rows come out in the sample's order. Every id of the sample must have a
-- prediction and every prediction an id in the sample; otherwise it is an error naming how many are
-- missing and an example (a submission for another test set must not be written silently).
-- Without one: header `id,predicted`, rows in the given order. The submission never has more
-- columns than the sample (a scorer refuses extra ones): the k best labels per image go to their
-- own file beside it, `<id column>,top<k>` with the labels separated by spaces, in the same order.
local files = require 'flower.files'

local predict = {}

local function fail(fmt, ...) error('predict: ' .. string.format(fmt, ...), 3) end

-- Ids of the test images from a test.json (`images` with `id`, else `file_name` without extension),
-- in file order.
function predict.test_ids(path)
  local doc = files.json_read(path)
  if type(doc) ~= 'table' or type(doc.images) ~= 'table' then
    fail("%s: expected an object with an 'images' list", path)
  end
  local ids = {}
  for i, im in ipairs(doc.images) do
    local id = im.id
    if id == nil and type(im.file_name) == 'string' then id = im.file_name:match('([^/]+)$'):gsub('%.[^.]*$', '') end
    if id == nil then fail("%s: images[%d] has neither 'id' nor 'file_name'", path, i) end
    if math.type(id) == 'float' and id == math.floor(id) then id = math.tointeger(id) end
    ids[i] = tostring(id)
  end
  return ids
end

-- Reads a sample submission: header (list), ids (list of strings in row order).
function predict.read_sample(path)
  local rows = files.csv_read(path)
  if #rows < 1 or #rows[1] < 2 then fail('%s: expected a header with at least two columns (id, prediction)', path) end
  local header = rows[1]
  local ids, seen = {}, {}
  for i = 2, #rows do
    local r = rows[i]
    if not (#r == 1 and r[1] == '') then
      local id = r[1]
      if seen[id] then fail("%s: id '%s' appears twice (rows %d and %d)", path, id, seen[id], i) end
      seen[id] = i
      ids[#ids + 1] = id
    end
  end
  return header, ids
end

-- The submission's header and the row order: the sample's (its two columns, its ids in its order)
-- or `id,predicted` in the given order. Checks that ids and sample ids are the same set.
local function layout(opts, n_rows, what)
  local ids = opts.ids
  if type(ids) ~= 'table' then fail('expected an ids list') end
  if n_rows ~= #ids then fail('%d ids but %d %s', #ids, n_rows, what) end
  local index = {}
  for i, id in ipairs(ids) do
    id = tostring(id)
    if index[id] then fail("id '%s' appears twice (positions %d and %d)", id, index[id], i) end
    index[id] = i
  end
  if not opts.sample then
    local order = {}
    for i = 1, #ids do order[i] = i end
    return { opts.id_column or 'id', opts.column or 'predicted' }, order
  end
  local header, sids = predict.read_sample(opts.sample)
  if #header ~= 2 then
    fail('%s has %d columns (%s); a submission here is an id and one prediction column', opts.sample, #header,
      table.concat(header, ','))
  end
  local missing, first = 0, nil
  for _, id in ipairs(sids) do
    if not index[id] then missing = missing + 1; first = first or id end
  end
  if missing > 0 then
    fail("%s lists %d id(s) without a prediction (first: '%s'); predicted %d images", opts.sample, missing, first, #ids)
  end
  if #sids ~= #ids then
    local inset = {}
    for _, id in ipairs(sids) do inset[id] = true end
    local extra, ex = 0, nil
    for _, id in ipairs(ids) do if not inset[tostring(id)] then extra = extra + 1; ex = ex or id end end
    fail("%d predicted id(s) are not in %s (first: '%s')", extra, opts.sample, tostring(ex))
  end
  local order = {}
  for i, id in ipairs(sids) do order[i] = index[id] end
  return { header[1], header[2] }, order
end

-- Returns the header and rows that write_csv writes (for tests and callers that want them): the
-- sample submission's two columns, nothing else.
function predict.rows(opts)
  if type(opts.predicted) ~= 'table' then fail('expected ids and predicted lists') end
  local header, order = layout(opts, #opts.predicted, 'predictions')
  local rows = {}
  for r, i in ipairs(order) do rows[r] = { tostring(opts.ids[i]), opts.predicted[i] } end
  return header, rows
end

-- Writes predict.csv atomically; returns the path.
function predict.write_csv(path, opts)
  local header, rows = predict.rows(opts)
  return files.csv_write(path, header, rows)
end

-- The path of a submission's top-k file: predict.csv -> predict-top3.csv.
function predict.topk_path(path, k) return (path:gsub('%.csv$', '')) .. '-top' .. k .. '.csv' end

-- Header and rows of a top-k file: `<id column>,top<k>`, the k best labels (space-separated, best
-- first) per id, in the submission's row order. opts: ids, topk = {{label, ...}, ...}, sample.
function predict.topk_table(opts)
  if type(opts.topk) ~= 'table' then fail('expected a topk list') end
  local header, order = layout(opts, #opts.topk, 'top-k rows')
  local k = 0
  for _, t in ipairs(opts.topk) do k = math.max(k, #t) end
  local rows = {}
  for r, i in ipairs(order) do
    local t = {}
    for j, v in ipairs(opts.topk[i]) do t[j] = tostring(v) end
    rows[r] = { tostring(opts.ids[i]), table.concat(t, ' ') }
  end
  return { header[1], 'top' .. k }, rows
end

-- Writes the top-k file atomically; returns the path.
function predict.write_topk(path, opts)
  local header, rows = predict.topk_table(opts)
  return files.csv_write(path, header, rows)
end

-- The k best indices of one row (a Lua list), best first, ties in index order: one pass keeping a
-- sorted list of k (O(K k), where sorting the row is O(K log K) and slow in Lua for K = 997).
local function topk_of_row(row, k)
  local top, n = {}, 0
  for j = 1, #row do
    local v = row[j]
    if n < k or v > row[top[n]] then
      local p = n < k and n + 1 or n            -- the slot freed at the end
      while p > 1 and row[top[p - 1]] < v do top[p] = top[p - 1]; p = p - 1 end
      top[p] = j
      if n < k then n = n + 1 end
    end
  end
  return top
end

-- Top-k class indices (1-based) of each row of a probability (or logit) matrix, given as a tensor
-- (N, K) (read 1024 rows at a time, so the whole matrix never becomes Lua numbers) or a Lua list of
-- rows; ties keep the lower index first (a stable, deterministic order).
function predict.topk_rows(probs, k)
  local out = {}
  if type(probs) ~= 'userdata' then
    for i, row in ipairs(probs) do out[i] = topk_of_row(row, k) end
    return out
  end
  local n = probs:size(1)
  for first = 1, n, 1024 do
    for i, row in ipairs(probs:narrow(1, first, math.min(1024, n - first + 1)):totable()) do
      out[first + i - 1] = topk_of_row(row, k)
    end
  end
  return out
end

return predict
