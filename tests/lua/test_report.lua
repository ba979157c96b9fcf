-- flower.report: confusion statistics and the self-contained report.html.
local T = require 'flower.test'
local report = require 'flower.report'
local files = require 'flower.files'

T.test('confusion matrix, per-class accuracy, most confused pairs', function()
  local labels = { 1, 1, 1, 2, 2, 3, 3, 3, 3 }
  local preds = { 1, 2, 2, 2, 1, 3, 3, 1, 2 }
  local c = report.confusion(labels, preds, 3)
  T.eq(c[1][2], 2); T.eq(c[2][1], 1); T.eq(c[3][3], 2)
  local pc = report.per_class(c)
  T.near(pc[1].acc, 1 / 3); T.near(pc[2].acc, 0.5); T.near(pc[3].acc, 0.5); T.eq(pc[3].total, 4)
  local p = report.confused_pairs(c, 2)
  T.eq(#p, 2)
  T.eq(p[1].true_class, 1); T.eq(p[1].predicted, 2); T.eq(p[1].count, 2); T.near(p[1].frac, 2 / 3)
  T.eq(p[2].true_class, 2); T.eq(p[2].predicted, 1) -- ties broken by class index
  T.raises(function() report.confusion({ 1, 4 }, { 1, 1 }, 3) end, 'sample 2 has class 4/1 outside 1..3')
  T.raises(function() report.confusion({ 1 }, { 1, 1 }, 3) end, '1 labels but 2 predictions')
end)

T.test('nice ticks', function()
  local t = report.ticks(0, 1, 5)
  T.eq(#t, 6); T.near(t[2], 0.2, 1e-12)
  t = report.ticks(0.37, 2.31, 5)
  T.check(t[1] <= 0.37 and t[#t] >= 2.31 - 1e-9, 'covers the range')
end)

T.test('svg chart: polylines per series, NaN skipped, text escaped', function()
  local svg = report.svg_lines { title = 'a<b', series = {
    { name = 'train', points = { { 1, 2.0 }, { 2, 1.0 }, { 3, 0 / 0 }, { 4, 0.5 } } },
    { name = 'val', points = { { 1, 2.5 }, { 2, 1.5 } }, dashed = true } } }
  local _, npoly = svg:gsub('<polyline', '')
  T.eq(npoly, 2)
  local _, ncirc = svg:gsub('<circle', '')
  T.eq(ncirc, 5)
  T.check(svg:find('a&lt;b', 1, true), 'title escaped')
  T.check(not svg:find('nan'), 'no NaN coordinates')
end)

T.test('report.html has every section and is well formed', function()
  local hist = {}
  for e = 1, 4 do
    hist[e] = { epoch = e, stage = e == 1 and 1 or 2, loss = 2 / e, acc = 0.2 * e, val_loss = 2.2 / e, val_acc = 0.19 * e }
  end
  local conf = report.confusion({ 1, 1, 2, 2, 3 }, { 1, 2, 2, 2, 1 }, 3)
  local html = report.html {
    title = 'test <run>', config = { lr = 1e-3, models = { 'a', 'b' } },
    results = { { name = 'a', val_acc = 0.5 }, { name = 'ensemble', val_acc = 0.75, note = 'concat' } },
    models = { { name = 'a', history = hist } },
    classes = { 'rose', 'tulip', 'daisy' }, confusion = conf, confusion_of = 'ensemble',
    timing = { { stage = 'a: head', images = 100, seconds = 2 }, { stage = 'ensemble', seconds = 0.5 } },
    files = { { 'predict.csv', 'submission' } },
  }
  T.check(html:find('<title>test &lt;run&gt;</title>', 1, true), 'title')
  for _, want in ipairs({ 'Results', 'Training curves', 'Per-class accuracy (ensemble)', 'Most confused class pairs',
    'Timing', '50.0', 'predict.csv', '&quot;lr&quot;: 0.001', 'tr class="best"', 'stage 2' }) do
    T.check(html:find(want, 1, true), 'missing ' .. want)
  end
  -- rose predicted as tulip is the most confused pair
  T.check(html:find('<td>rose</td><td>tulip</td>', 1, true), 'confused pair row')
  local _, opens = html:gsub('<svg', ''); local _, closes = html:gsub('</svg>', '')
  T.eq(opens, closes); T.eq(opens, 3)
  local dir = os.tmpname()
  report.write(dir, { title = 'x' })
  T.check(files.read(dir):find('</html>', 1, true), 'written')
  os.remove(dir)
end)

T.test('tick labels never repeat, whatever the range', function()
  for _, r in ipairs({ { 0.69310, 0.69316 }, { 0, 1 }, { 1, 2 }, { 0.37, 2.31 }, { 1e-4, 3e-4 }, { -0.05, 0.05 }, { 1, 40 } }) do
    local svg = report.svg_lines { series = { { name = 's', points = { { 1, r[1] }, { 2, r[2] } } } } }
    local seen = {}
    for y, label in svg:gmatch('<text x="%d+" y="([%d.]+)" font%-size="10" text%-anchor="end">([^<]*)</text>') do
      T.check(not seen[label], string.format('y tick label %s repeats over [%g, %g]', label, r[1], r[2]))
      seen[label] = y
    end
    T.check(next(seen), 'y ticks drawn')
  end
  T.eq(report.tick_label(0.6932, 0.0001), '0.6932'); T.eq(report.tick_label(2, 0.5), '2.0'); T.eq(report.tick_label(3, 1), '3')
end)

T.test('the timing total is the run\'s wall time; notes are shown', function()
  local html = report.html { timing = { { stage = 'a: head', images = 100, seconds = 2 }, { stage = 'ensemble', seconds = 0.5 } },
    seconds = 10, notes = { 'a started from random weights' } }
  T.check(html:find('<th>total</th><th></th><th class="n">10.0</th>', 1, true), 'total = wall time')
  T.check(html:find('everything else (validation, data loading, writing files)</td><td class="n">–</td><td class="n">7.5<', 1, true),
    'the rest has its row')
  T.check(html:find('<p class="note">a started from random weights</p>', 1, true), 'note')
end)

T.test('many classes: only the worst 30 are charted', function()
  local labels, preds = {}, {}
  for i = 1, 50 do labels[#labels + 1] = i; preds[#preds + 1] = i end
  labels[#labels + 1] = 7; preds[#preds + 1] = 8
  local html = report.html { confusion = report.confusion(labels, preds, 50) }
  T.check(html:find('50 classes; the 30 with the lowest accuracy', 1, true), 'summary line')
  local _, nbars = html:gsub('<rect x=', '')
  T.eq(nbars, 30)
end)

T.done()
