-- A variant of the quickstart as its own file: Dropout(0.5) before each model's classifier.
-- The seed's author found that dropout before the head slowed convergence; this recipe lets anyone
-- check that claim on the same data and schedule, and compare report.html with the quickstart's.
--
--   ./flowerlua experiments/dropout_variant.lua [--dropout 0.3] [any quickstart option]
--
-- Sharing a recipe is sharing a file: this one loads quickstart.lua (without running it), changes
-- defaults, and runs. Everything else -- options, schedule, pipeline -- is the quickstart's.
local recipe = require 'flower.recipe'

local quickstart = recipe.load('quickstart.lua')

return quickstart:derive {
  name = 'dropout_variant',
  description = 'The quickstart with Dropout(0.5) before each fine-tuned model\'s classifier.',
  defaults = { dropout = 0.5 },
}:main(arg)
