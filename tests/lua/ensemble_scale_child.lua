-- Run by test_ensemble_scale.lua in a process of its own (under `ulimit -v`): fits the ensemble on
-- feature files and writes what it learned to an HDF5 file.
--   flowerlua tests/lua/ensemble_scale_child.lua stream|resident OUT.h5 FILE.h5...
local flower = require 'flower'
local h5 = require 'flower.h5'
local ensemble = require 'flower.ensemble'
local memory = require 'flower.memory'
local mode, out = arg[1], arg[2]
local paths = table.move(arg, 3, #arg, 1, {})
local feats <close> = ensemble.load(paths, { resident = mode == 'resident' })
local clf = ensemble.fit(feats, { epochs = 1, batch_size = 256, lr = 1e-2, seed = 3, progress = false })
local probs = clf:predict(feats, 'test')
local f <close> = h5.open(out, 'w')
f:write('/test_probs', probs)
for _, w in ipairs(clf.model:weights()) do f:write('/w/' .. w.path, w.tensor) end
f:write('/mean', clf.mean); f:write('/std', clf.std)
f:set_attr('/', 'val_acc', clf.val_acc)
f:set_attr('/', 'peak_rss', memory.peak())
print(string.format('%s: validation accuracy %.4f, peak resident %s', mode, clf.val_acc, memory.format(memory.peak())))
