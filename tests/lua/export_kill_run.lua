-- Run by test_export_kill.lua in a child process: exports the tiny flowers set's features to
-- arg[1] with resume = true (a FLOWER_KILLPOINT in the environment may SIGKILL it on the way).
local data = require 'flower.data'
local nets = require 'flower.smallnets'
local export = require 'flower.export'
local F = dofile('tests/lua/exp_fixture.lua')

local root = F.flowers('export', 3, 8, 5)
local all = data.kaggle(root)
local tr, va = all:split { test_size = 0.25, seed = 42, stratify = true }
local te = data.kaggle_test(root)
local model = nets.build('vgg_tiny', { classes = all.num_classes, input_size = 32, width = 4, seed = 1 })
local function loader(ds) return data.Loader { ds, batch_size = 3, transform = 'eval', size = 32, workers = 1, warn = false } end
export.features(model, { path = arg[1], splits = { { 'train', tr }, { 'valid', va }, { 'test', te } }, loader = loader,
  attrs = { model = 'vgg_tiny', image_size = 32, preprocessing = 'tf' }, progress = false, resume = true })
