-- flower.predict: submissions in the competition's format.
--
--   predict.write_csv('runs/x/predict.csv', {
--     ids = {'0', '1', ...},            -- test image ids, in the order of `predicted`
--     predicted = {12, 7, ...},         -- predicted labels (category ids, not indices)
--     topk = {{12, 3, 9}, ...},         -- optional: the k best labels per image, best first
--     sample = 'data/sample_submission.csv',  -- optional: copy its header and row order
--   })
--
-- With a sample submission: its header is kept, its first column names the ids and its second the
-- prediction, and the rows come out in the sample's order. Every id of the sample must have a
-- prediction and every prediction an id in the sample; otherwise it is an error naming how many are
-- missing and an example (a submission for another test set must not be written silently).
-- Without one: header `id,predicted`, rows in the given order. A top-k column, when asked for,
-- is appended as `top<k>` with the labels separated by spaces.
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

-- Returns the header and rows that write_csv writes (for tests and callers that want them).
function predict.rows(opts)
  local ids, pred = opts.ids, opts.predicted
  if type(ids) ~= 'table' or type(pred) ~= 'table' then fail('expected ids and predicted lists') end
  if #ids ~= #pred then fail('%d ids but %d predictions', #ids, #pred) end
  if opts.topk and #opts.topk ~= #ids then fail('%d ids but %d top-k rows', #ids, #opts.topk) end
  local index = {}
  for i, id in ipairs(ids) do
    id = tostring(id)
    if index[id] then fail("id '%s' appears twice (positions %d and %d)", id, index[id], i) end
    index[id] = i
  end
  local header, order
  if opts.sample then
    local sids
    header, sids = predict.read_sample(opts.sample)
    header = { header[1], header[2] }
    local missing, first = 0, nil
    for _, id in ipairs(sids) do
      if not index[id] then missing = missing + 1; first = first or id end
    end
    if missing > 0 then
      fail("%s lists %d id(s) without a prediction (first: '%s'); predicted %d images",
        opts.sample, missing, first, #ids)
    end
    if #sids ~= #ids then
      local inset = {}
      for _, id in ipairs(sids) do inset[id] = true end
      local extra, ex = 0, nil
      for _, id in ipairs(ids) do if not inset[tostring(id)] then extra = extra + 1; ex = ex or id end end
      fail("%d predicted id(s) are not in %s (first: '%s')", extra, opts.sample, tostring(ex))
    end
    order = {}
    for i, id in ipairs(sids) do order[i] = index[id] end
  else
    header = { opts.id_column or 'id', opts.column or 'predicted' }
    order = {}
    for i = 1, #ids do order[i] = i end
  end
  local k
  if opts.topk then
    k = 0
    for _, t in ipairs(opts.topk) do k = math.max(k, #t) end
    header[#header + 1] = 'top' .. k
  end
  local rows = {}
  for r, i in ipairs(order) do
    local row = { tostring(ids[i]), pred[i] }
    if k then
      local t = {}
      for j, v in ipairs(opts.topk[i]) do t[j] = tostring(v) end
      row[3] = table.concat(t, ' ')
    end
    rows[r] = row
  end
  return header, rows
end

-- Writes predict.csv atomically; returns the path.
function predict.write_csv(path, opts)
  local header, rows = predict.rows(opts)
  return files.csv_write(path, header, rows)
end

-- Top-k class indices (1-based) of each row of a probability (or logit) matrix given as a Lua list
-- of rows; ties keep the lower index first (a stable, deterministic order).
function predict.topk_rows(probs, k)
  local out = {}
  for i, row in ipairs(probs) do
    local idx = {}
    for j = 1, #row do idx[j] = j end
    table.sort(idx, function(a, b)
      if row[a] ~= row[b] then return row[a] > row[b] end
      return a < b
    end)
    local t = {}
    for j = 1, math.min(k, #idx) do t[j] = idx[j] end
    out[i] = t
  end
  return out
end

return predict
