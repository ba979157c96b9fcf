-- A variant of the quickstart as its own file: a three-stage freeze/unfreeze schedule.
--   1. the head alone (1 epoch),
--   2. the last block and the head (`from:<layer>`, the seed's `for layer in model.layers[:N]:
--      layer.trainable = False`; layer names differ per model, so the stage names one per model),
--   3. every layer, at a lower learning rate.
--
--   ./flowerlua experiments/freeze_schedule_variant.lua [any quickstart option]
local recipe = require 'flower.recipe'

local quickstart = recipe.load('quickstart.lua')

return quickstart:derive {
  name = 'freeze_schedule_variant',
  description = 'The quickstart with a three-stage schedule: head, then the last block, then everything.',
  defaults = { epochs = 6, lr = 1e-3 },
  settings = {
    stages = {
      { epochs = 'head_epochs', train = 'head', lr = 'head_lr' },
      { epochs = 3, lr = 'head_lr',
        train = { resnet_tiny = 'from:block3_1_conv', inception_tiny = 'from:mixed2_b1_conv',
                  vgg_tiny = 'from:block3_conv' } },
      { epochs = 'epochs', train = 'all', lr = 'lr' },
    },
  },
}:main(arg)
