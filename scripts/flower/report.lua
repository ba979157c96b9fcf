-- flower.report: a self-contained report.html for a run (no scripts, no external files; the
-- charts are inline SVG so the file opens anywhere, offline).
--
--   report.write('runs/x/report.html', {
--     title = 'quickstart', config = opts,
--     results = {{name = 'cnn_a', val_acc = 0.81}, {name = 'ensemble', val_acc = 0.9}},
--     models = {{name = 'cnn_a', history = {{epoch = 1, stage = 1, loss = .., acc = .., val_loss = ..,
--                                            val_acc = ..}, ...}}},
--     classes = {'daisy', ...},          -- class names, index order
--     confusion = {{..}, ..},            -- K x K counts: confusion[true][predicted] (1-based)
--     confusion_of = 'ensemble',         -- which classifier the confusion matrix describes
--     timing = {{stage = 'cnn_a: head', images = 1200, seconds = 3.1}, ...},
--     memory = {{stage = 'data', peak = bytes}, ...},   -- peak resident memory per stage (flower.memory)
--     seconds = 42.5,                    -- the run's wall time: the timing table's total
--     notes = {'vgg_tiny started from random weights ...'},   -- shown under the title
--     files = {{'predict.csv', 'the submission'}, ...},
--   })
local files = require 'flower.files'

local report = {}

local function esc(s)
  return (tostring(s):gsub('[&<>"\']', { ['&'] = '&amp;', ['<'] = '&lt;', ['>'] = '&gt;', ['"'] = '&quot;', ["'"] = '&#39;' }))
end
report.escape = esc

local COLORS = { '#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf' }

-- "Nice" tick positions covering [lo, hi].
local function ticks(lo, hi, n)
  if hi <= lo then hi = lo + 1 end
  local raw = (hi - lo) / (n or 5)
  local mag = 10 ^ math.floor(math.log(raw, 10))
  local step = mag
  for _, m in ipairs({ 1, 2, 2.5, 5, 10 }) do
    if m * mag >= raw then step = m * mag break end
  end
  local t = {}
  local k0, k1 = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
  for k = k0, k1 do t[#t + 1] = k * step end
  return t, step
end
report.ticks = ticks

-- A tick label with as many decimals as the tick step needs, so that distinct ticks never print
-- alike (0.6931 and 0.6932 both read '0.693' with 3 significant digits).
local function tick_label(v, step)
  local decimals = 0
  while decimals < 12 and math.abs(step * 10 ^ decimals - math.floor(step * 10 ^ decimals + 0.5)) > 1e-9 * 10 ^ decimals do
    decimals = decimals + 1
  end
  local s = string.format('%.' .. decimals .. 'f', v)
  if s:match('^%-0%.?0*$') then s = s:sub(2) end   -- no '-0'
  return s
end
report.tick_label = tick_label

-- An SVG line chart. spec: {title, xlabel, ylabel, width, height, ymin, ymax,
--   series = {{name, points = {{x, y}, ...}, dashed}}, vlines = {{x, label}}}
-- Non-finite y values are skipped (a NaN loss does not break the chart).
function report.svg_lines(spec)
  local W, H = spec.width or 460, spec.height or 280
  local ml, mr, mt, mb = 52, 12, 28, 40
  local pw, ph = W - ml - mr, H - mt - mb
  local xmin, xmax, ymin, ymax = math.huge, -math.huge, math.huge, -math.huge
  for _, s in ipairs(spec.series) do
    for _, p in ipairs(s.points) do
      local x, y = p[1], p[2]
      if y == y and y ~= math.huge and y ~= -math.huge then
        xmin, xmax = math.min(xmin, x), math.max(xmax, x)
        ymin, ymax = math.min(ymin, y), math.max(ymax, y)
      end
    end
  end
  if xmin == math.huge then xmin, xmax, ymin, ymax = 0, 1, 0, 1 end
  if spec.ymin then ymin = math.min(ymin, spec.ymin) end
  if spec.ymax then ymax = math.max(ymax, spec.ymax) end
  if xmax == xmin then xmin, xmax = xmin - 0.5, xmax + 0.5 end
  local yt, ystep = ticks(ymin, ymax, 5)
  ymin, ymax = math.min(ymin, yt[1]), math.max(ymax, yt[#yt])
  if ymax == ymin then ymax = ymin + 1 end
  local function X(x) return ml + (x - xmin) / (xmax - xmin) * pw end
  local function Y(y) return mt + ph - (y - ymin) / (ymax - ymin) * ph end
  local o = {}
  o[#o + 1] = string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" role="img">', W, H, W, H)
  if spec.title then
    o[#o + 1] = string.format('<text x="%d" y="16" font-size="13" font-weight="bold">%s</text>', ml, esc(spec.title))
  end
  -- grid and y ticks
  for _, v in ipairs(yt) do
    if v >= ymin - 1e-12 and v <= ymax + 1e-12 then
      o[#o + 1] = string.format('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#e5e5e5"/>', ml, ml + pw, Y(v), Y(v))
      o[#o + 1] = string.format('<text x="%d" y="%.1f" font-size="10" text-anchor="end">%s</text>', ml - 4, Y(v) + 3, tick_label(v, ystep))
    end
  end
  -- x ticks: integers (epochs) when the range is small
  local xt, xstep = ticks(xmin, xmax, math.min(8, math.max(1, math.floor(xmax - xmin))))
  for _, v in ipairs(xt) do
    if v >= xmin - 1e-9 and v <= xmax + 1e-9 then
      o[#o + 1] = string.format('<text x="%.1f" y="%d" font-size="10" text-anchor="middle">%s</text>', X(v), mt + ph + 14, tick_label(v, xstep))
    end
  end
  o[#o + 1] = string.format('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#888"/>', ml, mt, pw, ph)
  for _, vl in ipairs(spec.vlines or {}) do
    o[#o + 1] = string.format('<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="#999" stroke-dasharray="3,3"/>', X(vl[1]), X(vl[1]), mt, mt + ph)
    if vl[2] then
      o[#o + 1] = string.format('<text x="%.1f" y="%d" font-size="9" fill="#666">%s</text>', X(vl[1]) + 2, mt + ph - 4, esc(vl[2]))
    end
  end
  if spec.xlabel then
    o[#o + 1] = string.format('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%s</text>', ml + pw / 2, H - 8, esc(spec.xlabel))
  end
  if spec.ylabel then
    o[#o + 1] = string.format('<text transform="translate(12,%.1f) rotate(-90)" font-size="11" text-anchor="middle">%s</text>', mt + ph / 2, esc(spec.ylabel))
  end
  -- series, and the legend on the title row (right-aligned) where it never hides a curve
  local lx = ml + pw
  for i = #spec.series, 1, -1 do lx = lx - (#spec.series[i].name * 6 + 30) end
  for i, s in ipairs(spec.series) do
    local color = s.color or COLORS[(i - 1) % #COLORS + 1]
    local pts = {}
    for _, p in ipairs(s.points) do
      local y = p[2]
      if y == y and y ~= math.huge and y ~= -math.huge then pts[#pts + 1] = string.format('%.1f,%.1f', X(p[1]), Y(y)) end
    end
    local dash = s.dashed and ' stroke-dasharray="5,3"' or ''
    if #pts > 1 then
      o[#o + 1] = string.format('<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>', color, dash, table.concat(pts, ' '))
    end
    for _, p in ipairs(pts) do
      local x, y = p:match('([^,]+),(.+)')
      o[#o + 1] = string.format('<circle cx="%s" cy="%s" r="2.5" fill="%s"/>', x, y, color)
    end
    local ly = 16
    o[#o + 1] = string.format('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="2"%s/>', lx, lx + 16, ly - 4, ly - 4, color, dash)
    o[#o + 1] = string.format('<text x="%d" y="%d" font-size="10">%s</text>', lx + 20, ly, esc(s.name))
    lx = lx + #s.name * 6 + 30
  end
  o[#o + 1] = '</svg>'
  return table.concat(o, '\n')
end

-- A horizontal bar chart: items = {{label, value in [0,1]}, ...}.
function report.svg_bars(items, spec)
  spec = spec or {}
  local W = spec.width or 460
  local bh, gap, ml = 14, 3, spec.label_width or 120
  local H = #items * (bh + gap) + 24
  local pw = W - ml - 50
  local o = {}
  o[#o + 1] = string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" role="img">', W, H, W, H)
  for i, it in ipairs(items) do
    local y = (i - 1) * (bh + gap) + 4
    local v = math.max(0, math.min(1, it[2]))
    local color = v >= 0.9 and '#2ca02c' or (v >= 0.6 and '#ff7f0e' or '#d62728')
    o[#o + 1] = string.format('<text x="%d" y="%d" font-size="10" text-anchor="end">%s</text>', ml - 4, y + bh - 3, esc(it[1]))
    o[#o + 1] = string.format('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>', ml, y, pw * v, bh, color)
    o[#o + 1] = string.format('<text x="%.1f" y="%d" font-size="10">%.0f%%</text>', ml + pw * v + 3, y + bh - 3, 100 * it[2])
  end
  local y = #items * (bh + gap) + 6
  o[#o + 1] = string.format('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#888"/>', ml, ml + pw, y, y)
  for _, v in ipairs({ 0, 0.5, 1 }) do
    o[#o + 1] = string.format('<text x="%.1f" y="%d" font-size="9" text-anchor="middle">%d%%</text>', ml + pw * v, y + 12, v * 100)
  end
  o[#o + 1] = '</svg>'
  return table.concat(o, '\n')
end

---------------------------------------------------------------------------------------------------
-- Confusion statistics (pure Lua over a K x K count table).

-- confusion[t][p] from lists of true and predicted class indices (1-based).
function report.confusion(labels, preds, K)
  if #labels ~= #preds then error(string.format('report.confusion: %d labels but %d predictions', #labels, #preds), 2) end
  local c = {}
  for i = 1, K do
    local row = {}
    for j = 1, K do row[j] = 0 end
    c[i] = row
  end
  for i, t in ipairs(labels) do
    local p = preds[i]
    if not (c[t] and c[t][p]) then
      error(string.format('report.confusion: sample %d has class %s/%s outside 1..%d', i, tostring(t), tostring(p), K), 2)
    end
    c[t][p] = c[t][p] + 1
  end
  return c
end

-- Per-class accuracy: list of {class = i, correct, total, acc} (acc nil for classes with no samples).
function report.per_class(conf)
  local out = {}
  for i, row in ipairs(conf) do
    local total = 0
    for _, v in ipairs(row) do total = total + v end
    out[i] = { class = i, correct = row[i], total = total, acc = total > 0 and row[i] / total or nil }
  end
  return out
end

-- The n most confused ordered pairs (true ~= predicted), by count, then by true/predicted index.
function report.confused_pairs(conf, n)
  local pairs_ = {}
  for t, row in ipairs(conf) do
    local total = 0
    for _, v in ipairs(row) do total = total + v end
    for p, v in ipairs(row) do
      if p ~= t and v > 0 then pairs_[#pairs_ + 1] = { true_class = t, predicted = p, count = v, frac = v / total } end
    end
  end
  table.sort(pairs_, function(a, b)
    if a.count ~= b.count then return a.count > b.count end
    if a.true_class ~= b.true_class then return a.true_class < b.true_class end
    return a.predicted < b.predicted
  end)
  local out = {}
  for i = 1, math.min(n or 10, #pairs_) do out[i] = pairs_[i] end
  return out
end

---------------------------------------------------------------------------------------------------
-- The page.

local CSS = [[
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.sub{color:#666;font-size:13px} .note{background:#fff4e0;border-left:3px solid #f0a030;padding:4px 8px;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left} th{background:#f5f5f5}
td.n{text-align:right;font-variant-numeric:tabular-nums} .charts{display:flex;flex-wrap:wrap;gap:12px}
tr.best td{font-weight:bold;background:#f0f8f0} pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:320px}
]]

local function pct(v) if v == nil then return '–' end return string.format('%.1f%%', 100 * v) end

local function history_charts(model)
  local h = model.history or {}
  if #h == 0 then return '<p>No training history.</p>' end
  local series = { loss = {}, val_loss = {}, acc = {}, val_acc = {} }
  local vlines, last_stage = {}, nil
  for i, row in ipairs(h) do
    local x = row.epoch or i
    for k, pts in pairs(series) do
      if type(row[k]) == 'number' then pts[#pts + 1] = { x, row[k] } end
    end
    if row.stage and row.stage ~= last_stage then
      if last_stage ~= nil then vlines[#vlines + 1] = { x - 0.5, 'stage ' .. tostring(row.stage) } end
      last_stage = row.stage
    end
  end
  local function chart(title, a, b, ylabel, bounds)
    local s = {}
    if #series[a] > 0 then s[#s + 1] = { name = 'train', points = series[a] } end
    if #series[b] > 0 then s[#s + 1] = { name = 'validation', points = series[b], dashed = true } end
    return report.svg_lines { title = title, series = s, xlabel = 'epoch', ylabel = ylabel, vlines = vlines,
      ymin = bounds and 0, ymax = bounds and 1 }
  end
  return '<div class="charts">' .. chart(model.name .. ': loss', 'loss', 'val_loss', 'loss')
    .. chart(model.name .. ': accuracy', 'acc', 'val_acc', 'accuracy', true) .. '</div>'
end

local function results_table(results)
  local best
  for i, r in ipairs(results) do
    if r.val_acc and (not best or r.val_acc > results[best].val_acc) then best = i end
  end
  local has_topk, has_note, has_test, has_tta = false, false, false, false
  for _, r in ipairs(results) do
    if r.val_topk then has_topk = true end
    if r.val_acc_tta then has_tta = true end
    if r.note then has_note = true end
    if r.test_acc then has_test = true end
  end
  local o = { '<table><tr><th>classifier</th><th>validation accuracy</th>'
    .. (has_tta and '<th>with test-time augmentation</th>' or '') .. (has_topk and '<th>top-5</th>' or '')
    .. (has_test and '<th>test accuracy</th>' or '') .. (has_note and '<th>notes</th>' or '') .. '</tr>' }
  for i, r in ipairs(results) do
    o[#o + 1] = string.format('<tr%s><td>%s</td><td class="n">%s</td>%s%s%s%s</tr>',
      i == best and ' class="best"' or '', esc(r.name), pct(r.val_acc),
      has_tta and ('<td class="n">' .. pct(r.val_acc_tta) .. '</td>') or '',
      has_topk and ('<td class="n">' .. pct(r.val_topk) .. '</td>') or '',
      has_test and ('<td class="n">' .. pct(r.test_acc) .. '</td>') or '',
      has_note and ('<td>' .. esc(r.note or '') .. '</td>') or '')
  end
  o[#o + 1] = '</table>'
  if has_test then
    o[#o + 1] = '<p class="sub">Test accuracy is scored against the data set\'s answer key (test_labels.csv), '
      .. 'which only the synthetic set has.</p>'
  end
  return table.concat(o, '\n')
end

-- The stages' times, and with the run's wall time `seconds` a row for the rest (validation, data
-- loading, writing files), so that the total is the run's time, as the header says.
local function timing_table(timing, seconds)
  local o = { '<table><tr><th>stage</th><th>images</th><th>seconds</th><th>images/s</th></tr>' }
  local total = 0
  local rows = {}
  for i, t in ipairs(timing) do rows[i] = t; total = total + (t.seconds or 0) end
  if seconds and seconds > total then
    rows[#rows + 1] = { stage = 'everything else (validation, data loading, writing files)', seconds = seconds - total }
    total = seconds
  end
  for _, t in ipairs(rows) do
    local rate = (t.images and t.seconds and t.seconds > 0) and string.format('%.1f', t.images / t.seconds) or '–'
    o[#o + 1] = string.format('<tr><td>%s</td><td class="n">%s</td><td class="n">%.1f</td><td class="n">%s</td></tr>',
      esc(t.stage), t.images and tostring(t.images) or '–', t.seconds or 0, rate)
  end
  o[#o + 1] = string.format('<tr><th>total</th><th></th><th class="n">%.1f</th><th></th></tr></table>', total)
  return table.concat(o, '\n')
end

local function class_name(classes, i) return classes and classes[i] or tostring(i - 1) end

local function per_class_section(data)
  local conf, classes = data.confusion, data.classes
  local pc = report.per_class(conf)
  local o = {}
  local items = {}
  for _, c in ipairs(pc) do
    if c.acc then items[#items + 1] = { class_name(classes, c.class), c.acc, c.total } end
  end
  table.sort(items, function(a, b) if a[2] ~= b[2] then return a[2] < b[2] end return a[1] < b[1] end)
  if #items > 40 then
    o[#o + 1] = string.format('<p>%d classes; the 30 with the lowest accuracy:</p>', #items)
    local worst = {}
    for i = 1, 30 do worst[i] = items[i] end
    items = worst
  end
  o[#o + 1] = report.svg_bars(items, { label_width = 140 })
  local pairs_ = report.confused_pairs(conf, data.top_pairs or 12)
  o[#o + 1] = '<h3 style="font-size:15px">Most confused class pairs</h3>'
  if #pairs_ == 0 then
    o[#o + 1] = '<p>No confusions on the validation set.</p>'
  else
    o[#o + 1] = '<table><tr><th>true class</th><th>predicted as</th><th>images</th><th>share of the true class</th></tr>'
    for _, p in ipairs(pairs_) do
      o[#o + 1] = string.format('<tr><td>%s</td><td>%s</td><td class="n">%d</td><td class="n">%s</td></tr>',
        esc(class_name(classes, p.true_class)), esc(class_name(classes, p.predicted)), p.count, pct(p.frac))
    end
    o[#o + 1] = '</table>'
  end
  return table.concat(o, '\n')
end

function report.html(data)
  local o = {}
  local title = data.title or 'flowerlua run'
  o[#o + 1] = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
  o[#o + 1] = '<title>' .. esc(title) .. '</title><style>' .. CSS .. '</style></head><body>'
  o[#o + 1] = '<h1>' .. esc(title) .. '</h1>'
  o[#o + 1] = '<div class="sub">' .. esc(data.subtitle or ('written ' .. os.date('%Y-%m-%d %H:%M:%S'))) .. '</div>'
  for _, n in ipairs(data.notes or {}) do o[#o + 1] = '<p class="note">' .. esc(n) .. '</p>' end
  if data.results and #data.results > 0 then
    o[#o + 1] = '<h2>Results</h2>' .. results_table(data.results)
  end
  if data.skipped and #data.skipped > 0 then
    -- images no stage could read: left out of training, evaluation, export and predictions
    o[#o + 1] = string.format('<h2>Skipped images (%d)</h2><p>These files could not be read; they are in no '
      .. 'training batch, evaluation, feature file or prediction.</p><table><tr><th>file</th><th>reason</th>'
      .. '<th>first met in</th></tr>', #data.skipped)
    for _, sk in ipairs(data.skipped) do
      o[#o + 1] = string.format('<tr><td>%s</td><td>%s</td><td>%s</td></tr>', esc(sk.path), esc(sk.reason), esc(sk.stage or ''))
    end
    o[#o + 1] = '</table>'
  end
  if data.models and #data.models > 0 then
    o[#o + 1] = '<h2>Training curves</h2>'
    for _, m in ipairs(data.models) do o[#o + 1] = history_charts(m) end
  end
  if data.confusion then
    o[#o + 1] = '<h2>Per-class accuracy' .. (data.confusion_of and (' (' .. esc(data.confusion_of) .. ')') or '') .. '</h2>'
    o[#o + 1] = per_class_section(data)
  end
  if data.timing and #data.timing > 0 then
    o[#o + 1] = '<h2>Timing</h2>' .. timing_table(data.timing, data.seconds)
  end
  if data.memory and #data.memory > 0 then
    local rows = { '<h2>Memory</h2><table><tr><th>stage</th><th>peak resident</th></tr>' }
    for _, m in ipairs(data.memory) do
      rows[#rows + 1] = string.format('<tr><td>%s</td><td class="n">%s</td></tr>', esc(m.stage),
        require('flower.memory').format(m.peak))
    end
    o[#o + 1] = table.concat(rows, '\n') .. '</table>'
  end
  if data.files and #data.files > 0 then
    o[#o + 1] = '<h2>Files</h2><table>'
    for _, f in ipairs(data.files) do
      o[#o + 1] = string.format('<tr><td><a href="%s">%s</a></td><td>%s</td></tr>', esc(f[1]), esc(f[1]), esc(f[2] or ''))
    end
    o[#o + 1] = '</table>'
  end
  if data.config then
    o[#o + 1] = '<h2>Configuration</h2><pre>' .. esc(files.json_encode(data.config, true)) .. '</pre>'
  end
  o[#o + 1] = '</body></html>\n'
  return table.concat(o, '\n')
end

function report.write(path, data)
  return files.write_atomic(path, report.html(data))
end

return report
