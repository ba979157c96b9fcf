-- flower.nn: layers, models and losses — Torch7's module verbs with Keras's vocabulary.
--
-- BUILDING A MODEL (Keras's functional API; the batch dimension is implicit):
--   local nn = require 'flower.nn'
--   local x = nn.Input{32, 32, 3}                                  -- or nn.Input{shape={32,32,3}, name='img'}
--   local y = nn.Conv2D{filters=16, kernel_size=3, padding='same', use_bias=false, name='conv1'}(x)
--   y = nn.BatchNormalization{name='bn1'}(y)
--   y = nn.Activation('relu')(y)
--   local s = nn.Conv2D{filters=16, kernel_size=1}(x)
--   y = nn.Add{}{y, s}                                             -- several inputs: a list
--   y = nn.Concatenate{axis=-1}{y, s}
--   y = nn.GlobalAveragePooling2D{}(y)
--   y = nn.Dense{units=10}(y)
--   local model = nn.Model(x, y, {name='tiny'})                    -- inputs/outputs: a node or a list
--   local seq = nn.Sequential{nn.Input{8}, nn.Dense{units=4}, nn.ReLU{}}   -- or seq:add(layer)
-- Calling a layer on a node builds it (creates its weights from the input shape) and infers the
-- output shape; a misfit raises an error naming the layer: "layer 'conv1' (Conv2D): ...".
-- Layer names follow Keras (class name in snake_case, numbered per session: conv2d, conv2d_1, ...;
-- inputs input_1, input_2...); nn.reset_names() restarts the numbering like clear_session().
-- A model is itself a layer: it can be called on nodes of a bigger graph (a frozen base + new head).
--
-- RUNNING IT (Torch7's verbs):
--   local out = model:forward(input)          -- input: tensor (N,...) or a list for several inputs
--   local gin = model:backward(input, gradOutput)   -- accumulates parameter gradients; returns dL/dinput
--   model:zero_grad()                         -- (zeroGradParameters) before each accumulation
--   model:training() / model:evaluate()       -- BatchNorm batch statistics and Dropout on / off
--   layer.trainable = false                   -- frozen: no gradients, never updated; a frozen
--                                                BatchNormalization uses its moving statistics
--   model:parameters()                        -- params, grads: trainable tensors and their gradients
--   model:trainable_weights()                 -- records {path, name, layer, tensor, grad, kind}
--   model:weights()                           -- every weight record, Keras order per layer
--   model:layer('bn1'), model:layers()        -- layers in graph construction order (Keras's order)
--   model:output_of('avg_pool')               -- a model sharing these layers, ending at that layer
--   model:summary()                           -- Keras's table and Total/Trainable/Non-trainable
--   model:type('float64')                     -- converts weights (for gradient checks)
--   model:mixed_precision('bfloat16')         -- bf16 activations and kernel copies, float32 weights,
--                                                gradients and optimizer state, float32 outputs
-- Standalone layers work the same way: layer:forward(x), layer:backward(x, gy).
--
-- GRADIENT FLOW: a node needs a gradient only if some layer at or above it (towards the inputs)
-- has trainable weights. Nodes below a frozen prefix get no backward call at all, and their
-- forward keeps nothing for backward, so training a head on a frozen base costs about a forward.
-- In a no-gradient region (inference, or a frozen prefix) Conv2D -> BatchNormalization -> ReLU
-- chains run as one convolution with the normalisation and ReLU fused into its output, and
-- intermediate activations are freed as soon as their last consumer has run: the CPU allocator
-- hands their blocks to the next layers (flower.memory() reports live, cached and peak bytes).
-- Values a backward reads stay until it has run; outputs and the caller's inputs are never freed.
--
-- During training, BatchNormalization / Add / ScaledAdd followed by a ReLU run as one pass too
-- (their backward masks by the ReLU's output). nn.fusion = false turns all fusion off.
--
-- LAYERS (Keras's names, options and weight order; layer:weights() -> {name, path, tensor, trainable}),
-- one file per family in flower/nn/layers/: conv, normalization, pooling, core (with the shape
-- layers), merge, preprocessing; common.lua holds the option, window and activation helpers:
--   Conv2D{filters, kernel_size, strides, padding, dilation_rate, activation, use_bias, kernel_regularizer}
--     weights kernel (KH,KW,Cin,F), bias;  DepthwiseConv2D{kernel_size, strides, padding, depth_multiplier,
--     use_bias} depthwise_kernel (KH,KW,C,M), bias;  SeparableConv2D{filters, ...} depthwise_kernel,
--     pointwise_kernel (1,1,C*M,F), bias;  BatchNormalization{axis=-1, momentum=.99, epsilon=1e-3, center,
--     scale} gamma, beta, moving_mean, moving_variance;  Dense{units, activation, use_bias} kernel, bias;
--   Activation('relu'|'sigmoid'|'tanh'|'softmax'|'linear'), ReLU{}, Softmax{};
--   MaxPooling2D / AveragePooling2D{pool_size, strides, padding} (TF's 'same': extra pad bottom/right,
--     average excludes the padding); GlobalAveragePooling2D{keepdims}, GlobalMaxPooling2D{keepdims};
--   Dropout{rate, seed} (inverted); Flatten{}, Reshape{target_shape}; Concatenate{axis=-1}{a, b, ...};
--   Add{}{a, b, ...}; Scale{scale} (y = scale*x); ScaledAdd{scale}{x, r} (y = x + scale*r, InceptionResNetV2);
--   ZeroPadding2D{padding = n | {h, w} | {{t, b}, {l, r}}}; Preprocess{mode = 'caffe'|'tf'|'torch'}.
-- Options use Keras's names (an unknown one is an error); axis follows Keras (0 = batch); type_name
-- changes the type summary() prints (e.g. 'Lambda'). Regularizers: nn.l2(l), applied by the optimizer.
--
-- LOSSES (flower/nn/losses.lua): CategoricalCrossentropy{from_logits, label_smoothing} with :forward /
-- :backward, nn.softmax_cross_entropy (fused), nn.accuracy, nn.top_k_accuracy, nn.regularization_loss.
-- CHECKPOINTS (flower/nn/checkpoint.lua): nn.save_checkpoint / nn.load_checkpoint (HDF5, atomic).
-- OPTIMIZERS: flower.optim.
--
-- Integer class labels are 1-based (as argmax returns them). Layouts are Keras's channels_last:
-- activations (N, H, W, C), kernels (KH, KW, Cin, Cout).
--
-- MODELS (flower/nn/model/): graph.lua builds the graph (Model, Sequential, layers and weights,
-- modes, types, devices); plan.lua decides, per forward, which nodes need gradients, which values
-- backward reads and which layers run fused, asking the layers through the hooks below (never
-- their class names); executor.lua runs forward and backward in construction order and frees each
-- value after its last reader; mixed_precision.lua casts at a model's boundary; summary.lua.
--
-- THE LAYER PROTOCOL. A layer is a class made by util.layer_class(name, parent, options, init)
-- (flower/nn/layers/common.lua): registered as nn[name], its new(opts) rejects options it does not
-- list, runs Layer.init (common options: name, trainable, dtype, type_name) and then init(self,
-- opts, owner). Weights are declared in build with self:add_weight(name, tensor [, trainable]) in
-- Keras's order. Required:
--   build(input_shape)              creates the weights from the input shape (batch dim excluded;
--                                   a list of shapes for several inputs); raise plain messages --
--                                   the caller prefixes "layer 'name' (Class): "
--   output_shape(input_shape)       -> output shape (unknown sizes -1); raises if the input does not fit
--   _forward(x, keep [, flag])      -> y, a new tensor or x itself; keep: a backward follows, so save
--                                   what _backward reads (on self; it is called once per forward).
--                                   flag: a fused ReLU (fuses_relu) or an omitted bias (can_omit_bias)
--   _backward(x, y, gy, need_gin, need_params [, relu]) -> dL/dx (a list for several inputs) or nil;
--                                   accumulates weight gradients when need_params (self:grad_beta(n)
--                                   gives the gradient and 0 right after zero_grad, else 1)
--   needs(need_gin, need_params)    -> needs_x, needs_y: which of x and y _backward reads, so that
--                                   the executor keeps exactly those until backward (default: none)
-- Optional, each with a default on nn.Layer (the planner, flower/nn/model/plan.lua, asks these):
--   multi = true                    several inputs: x and dL/dx are lists
--   out_dtype                       the dtype of the output node when it is not the input's
--   converts_input = true           brings any input dtype to its compute dtype itself (Preprocess,
--                                   a nested model): mixed precision leaves such inputs alone
--   regularizers = {weight = nn.l2(l)}   applied by the optimizer
--   fuses_relu = true               _forward(x, keep, relu) and _backward(..., relu) take a following
--                                   ReLU in (backward then gets the ReLU's output as y): BN, Add
--   is_relu()                       true when the layer is exactly max(x, 0): the ReLU above
--   folds_affine()                  true when _forward_fused(x, scale, shift, relu [, pad]) can take
--                                   a per-channel y*scale + shift (shift includes self.bias) and a
--                                   ReLU into its output: convolutions without an activation
--   is_affine(), affine()           true when the layer is now a per-channel affine (inference BN);
--                                   affine() -> scale, shift, new tensors the caller frees
--   zero_padding()                  {top, bottom, left, right} for a layer that only zero-pads H, W
--   can_fold_pad(pad, h, w)         true when _forward_fused(..., pad) can take that padding into
--                                   its window (Conv2D)
--   can_omit_bias(), absorbs_bias() a bias the first drops is absorbed by the second (a training
--                                   BN, which gets shift_moving_mean(bias))
--   can_forward_into(), _forward_into(x, relu, out)   may write y into `out`, an input no one else
--                                   reads (in-place, where no backward follows)
--   uses_batch_stats()              BatchNormalization: batch statistics now (training, not frozen)
--   _kernel(name, dtype, fwd)       the weight as a convolution reads it (bfloat16 copy under mixed
--                                   precision); _on_type(dtype), _on_device(dev): after type()/cuda()
-- Standalone, a layer runs through Layer:forward / Layer:backward; in a model, through the executor.
--
-- HOW TO ADD A LAYER:
--   1. the class in its family's file in flower/nn/layers/ (a new family: a new file there and its
--      name in the list at the end of this file), made by util.layer_class with its options and
--      init, with build / output_shape / _forward / _backward / needs and the hooks above that it
--      can honour; its options, weight names and order as Keras's;
--   2. the Keras converter: an entry in `converters` in flower/keras.lua (config keys -> options),
--      so that keras.load_model and model_from_config rebuild it;
--   3. tests: a Keras reference case in tests/reference/gen_layers.py (outputs and gradients; the
--      class in the list of tests/lua/test_nn_layers.lua 'reference covers every layer type'),
--      finite differences in float64 in tests/lua/test_nn_grad.lua, and, if it fuses or writes in
--      place, fused-vs-unfused equality in tests/lua/test_nn_model.lua; a GPU kernel is compared
--      with the CPU in tests/lua/test_cuda.lua;
--   4. the LAYERS list above and, for a new family, README's Layout.
local flower = require 'flower'
local core = require 'flower.core'
local C = core._nn

local nn = {}
nn.C = C
nn.fusion = true      -- fuse Conv -> BatchNorm -> ReLU where no gradient flows (false: run layer by layer)
nn.inplace = true     -- where no backward follows, Add/BN/ReLU may write over an input no one else needs
nn.reuse = true       -- free each activation after its last reader (false: leave them to the collector)

-- Mixed precision (model:mixed_precision, flower/nn/model/mixed_precision.lua): the compute dtype of the model that
-- is running ('bfloat16', 'float32' or nil outside any model; Preprocess reads it), and a counter
-- that every top-level forward advances, after which the bfloat16 copies of kernels are remade
-- from their float32 masters (Layer:_kernel).
nn._compute = nil
nn._kernel_gen = 0

-------------------------------------------------------------------------------- classes

-- class(name [, parent]): a table of methods; calling it makes an instance through cls.new
local function class(name, parent)
  local cls = {}
  cls.__index = cls
  cls.__name = 'flower.nn.' .. name
  cls.class_name = name
  cls.__tostring = function(self) return cls.class_name .. "('" .. tostring(self.name) .. "')" end
  cls.__call = function(self, ...) return self:call(...) end
  setmetatable(cls, {
    __index = parent,
    __call = function(c, ...) return c.new(...) end,
  })
  return cls
end
nn.class = class

local function is_tensor(v) return flower.is_tensor(v) end

-------------------------------------------------------------------------------- names

local name_counts = {}

-- Keras's generic_utils.to_snake_case
local function snake(s)
  s = s:gsub('(.)(%u[%l%d]+)', '%1_%2')
  s = s:gsub('(%l)(%u)', '%1_%2')
  return s:lower()
end
nn.snake_case = snake

-- unique_name('conv2d') -> conv2d, conv2d_1, ... ; zero_based=false -> input_1, input_2, ...
local function unique_name(prefix, one_based)
  local n = name_counts[prefix]
  if one_based then
    n = (n or 0) + 1
    name_counts[prefix] = n
    return prefix .. '_' .. n
  end
  name_counts[prefix] = (n or -1) + 1
  if n == nil then return prefix end
  return prefix .. '_' .. (n + 1)
end
nn.unique_name = unique_name

function nn.reset_names() name_counts = {} end

-------------------------------------------------------------------------------- shapes

-- Shapes exclude the batch dim; an unknown size is -1 (printed None).
local function shape_str(shape, batch)
  local parts = {}
  if batch ~= false then parts[1] = 'None' end
  for i = 1, #shape do parts[#parts + 1] = (shape[i] < 0) and 'None' or tostring(shape[i]) end
  if #parts == 1 then return '(' .. parts[1] .. ',)' end
  return '(' .. table.concat(parts, ', ') .. ')'
end
nn.shape_str = shape_str

local function copy_shape(s)
  local r = {}
  for i = 1, #s do r[i] = s[i] end
  return r
end

local function tensor_shape(t)   -- (N, ...) -> shape without the batch dim
  local s = t:size()
  table.remove(s, 1)
  return s
end

-- integers may come as integral floats (JSON configs)
local function check_int(v, what, owner, min)
  local i = type(v) == 'number' and math.tointeger(v)
  if not i or i < (min or 1) then
    error(string.format('%s: %s must be an integer >= %d, got %s', owner, what, min or 1, tostring(v)), 0)
  end
  return i
end

-- a Keras int-or-pair argument (kernel_size=3 or {3, 1}) -> a, b
local function pair(v, what, owner, min)
  if type(v) == 'table' then
    if #v ~= 2 then error(string.format('%s: %s must be an integer or a pair, got %d entries', owner, what, #v), 0) end
    return check_int(v[1], what, owner, min), check_int(v[2], what, owner, min)
  end
  check_int(v, what, owner, min)
  return v, v
end
nn.pair = pair

-------------------------------------------------------------------------------- weights and RNG

local function zeros(shape, dtype) return flower.zeros(shape, dtype or 'float32') end

-- Devices. A layer's tensors live on the host (device nil) or on one CUDA device (0, 1, ...).
-- Every tensor the library makes while running (gradients, masks, padding buffers, optimizer slots,
-- one-hot targets) goes through nn.like, which allocates it on the device of a tensor that already
-- exists (t:new_zeros / t:new_empty / t:new_full). Tests replace flower.zeros & co. with functions
-- that raise, to prove that nothing else allocates without a reference tensor.
local new_tensor = core.tensor

-- nil for a host tensor, the CUDA device index otherwise (t.is_cuda is always bound; guarded anyway)
local function device_of(t)
  if t.is_cuda and t:is_cuda() then return t:get_device() end
  return nil
end
nn.device_of = device_of

-- t on device dev (nil: the host); t itself when it is there already
local function to_device(t, dev)
  if dev == nil then return t:cpu() end
  return t:cuda(dev)
end
nn.to_device = to_device

-- nn.like(ref, shape [, dtype [, fill]]): a new tensor on ref's device, of dtype (ref's by default).
-- fill: nil -> zeros, 'empty' -> uninitialised, a number -> that value, a table -> those values
-- (then shape is ignored: flower.tensor's shape; made on the host and copied over once).
local function like(ref, shape, dtype, fill)
  dtype = dtype or ref:dtype()
  if fill == nil or fill == 0 then return ref:new_zeros(shape, dtype) end
  if fill == 'empty' then return ref:new_empty(shape, dtype) end
  if type(fill) == 'number' then return ref:new_full(shape, fill, dtype) end
  local t = new_tensor(fill, dtype)
  local dev = device_of(ref)
  if dev ~= nil then t = t:cuda(dev) end
  return t
end
nn.like = like

-- Keras's initializers. fan_in/fan_out as Keras computes them: receptive field times the last two dims.
local function fans(shape)
  if #shape == 1 then return shape[1], shape[1] end
  if #shape == 2 then return shape[1], shape[2] end
  local rf = 1
  for i = 1, #shape - 2 do rf = rf * shape[i] end
  return rf * shape[#shape - 1], rf * shape[#shape]
end

local initializers = {}
function initializers.zeros(shape, dtype) return zeros(shape, dtype) end
function initializers.ones(shape, dtype) return zeros(shape, dtype):fill(1) end
function initializers.glorot_uniform(shape, dtype)
  local fi, fo = fans(shape)
  local lim = math.sqrt(6 / (fi + fo))
  return flower.empty(shape, dtype):uniform_(-lim, lim)
end
function initializers.he_normal(shape, dtype)   -- truncated normal in Keras; a plain normal here
  local fi = fans(shape)
  return flower.empty(shape, dtype):normal_(0, math.sqrt(2 / fi))
end
function initializers.he_uniform(shape, dtype)
  local fi = fans(shape)
  local lim = math.sqrt(6 / fi)
  return flower.empty(shape, dtype):uniform_(-lim, lim)
end
nn.initializers = initializers

local function get_init(v, owner)
  if v == nil then return nil end
  if type(v) == 'function' then return v end
  local f = initializers[v]
  if not f then error(string.format("%s: unknown initializer '%s'", owner, tostring(v)), 0) end
  return f
end

-- L2 regularizer as Keras's regularizers.l2(l): adds l * sum(w^2) to the loss
function nn.l2(l)
  assert(type(l) == 'number' and l >= 0, 'nn.l2: expected a non-negative number')
  return {kind = 'l2', l2 = l}
end

-------------------------------------------------------------------------------- Layer

local Layer = class('Layer')
nn.Layer = Layer

-- Common options of every layer: name, trainable, dtype, type_name (the type summary() prints)
function Layer.init(self, opts, cls)
  opts = opts or {}
  if type(opts) ~= 'table' then error(cls.class_name .. ': expected a table of options', 3) end
  self.name = opts.name or unique_name(snake(cls.class_name))
  if type(self.name) ~= 'string' or self.name == '' then error(cls.class_name .. ': name must be a non-empty string', 3) end
  self.trainable = opts.trainable ~= false
  self.train = true              -- training mode (Torch7's field); model:evaluate() clears it
  self.dtype = opts.dtype or 'float32'
  self.type_name = opts.type_name
  self._wnames = {}              -- weight names in Keras order
  self._wtrain = {}              -- name -> trainable (BatchNorm's moving stats are not)
  self.grads = {}                -- name -> gradient tensor, created on first backward
  self._fresh = {}               -- name -> true after zero_grad: the next backward overwrites
  self.built = false
  self._nodes = {}
  if opts.input_shape then self.input_shape_opt = opts.input_shape end   -- for Sequential
  return self
end

-- Declares a weight; `value` is the initial tensor. Kept as self[name].
function Layer:add_weight(name, value, trainable)
  self._wnames[#self._wnames + 1] = name
  self._wtrain[name] = trainable ~= false
  self[name] = value
  return value
end

function Layer:owner() return string.format("layer '%s' (%s)", self.name, self.class_name) end

function Layer:weights()
  local r = {}
  for _, n in ipairs(self._wnames) do
    r[#r + 1] = {name = n, path = self.name .. '/' .. n, tensor = self[n], layer = self,
                 trainable = self.trainable and self._wtrain[n]}
  end
  return r
end

function Layer:get_weights()
  local r = {}
  for i, n in ipairs(self._wnames) do r[i] = self[n] end
  return r
end

-- set_weights{t1, t2, ...}: Keras order, shapes must match; values are copied into the layer's tensors
function Layer:set_weights(list)
  if #list ~= #self._wnames then
    error(string.format('%s: set_weights expects %d tensors (%s), got %d', self:owner(), #self._wnames,
      table.concat(self._wnames, ', '), #list), 2)
  end
  for i, n in ipairs(self._wnames) do
    local want, got = table.concat(self[n]:size(), 'x'), table.concat(list[i]:size(), 'x')
    if want ~= got then
      error(string.format('%s: weight %s has shape %s, got %s', self:owner(), n, want, got), 2)
    end
  end
  for i, n in ipairs(self._wnames) do self[n]:copy(list[i]) end
end

function Layer:count_params()
  local total, trainable = 0, 0
  for _, n in ipairs(self._wnames) do
    local k = self[n]:numel()
    total = total + k
    if self._wtrain[n] then trainable = trainable + k end
  end
  if not self.trainable then trainable = 0 end
  return total, trainable
end

-- trainable parameters and their gradients (created zeroed if missing)
function Layer:parameters(out_p, out_g)
  local ps, gs = out_p or {}, out_g or {}
  if self.trainable then
    for _, n in ipairs(self._wnames) do
      if self._wtrain[n] then
        ps[#ps + 1] = self[n]
        gs[#gs + 1] = self:grad(n)
      end
    end
  end
  return ps, gs
end

-- records of trainable weights for optimizers (see Model:trainable_weights)
function Layer:trainable_weights()
  local r = {}
  if not self:has_trainable() then return r end
  for _, n in ipairs(self._wnames) do
    if self._wtrain[n] then
      r[#r + 1] = {path = self.name .. '/' .. n, name = n, layer = self, tensor = self[n], grad = self:grad(n),
                   regularizer = self.regularizers and self.regularizers[n]}
    end
  end
  return r
end

function Layer:has_trainable()
  if not self.trainable then return false end
  for _, n in ipairs(self._wnames) do if self._wtrain[n] then return true end end
  return false
end

-- the gradient tensor of weight n (zeroed when first made)
function Layer:grad(n)
  local g = self.grads[n]
  if not g then
    g = like(self[n], self[n]:size())
    self.grads[n] = g
    self._fresh[n] = true
  end
  return g
end

-- beta for accumulating into grad n: 0 right after zero_grad (overwrite, saves a pass), else 1
function Layer:grad_beta(n)
  local g = self:grad(n)
  local b = self._fresh[n] and 0 or 1
  self._fresh[n] = nil
  return g, b
end

function Layer:zero_grad()
  for _, n in ipairs(self._wnames) do
    if self.grads[n] then self._fresh[n] = true end
  end
end
Layer.zeroGradParameters = Layer.zero_grad

function Layer:training() self.train = true; return self end
function Layer:evaluate() self.train = false; return self end

-- The tensor a convolution or matrix product reads for weight `name` when the activations are of
-- dtype dt: the weight itself, or, with bfloat16 activations and a float32 weight (mixed precision),
-- a bfloat16 copy of it. The weight stays the master (gradients, optimizer, checkpoints see only it).
-- A forward (fwd = true) remakes the copy from the master at its first use after each top-level
-- forward (nn._kernel_gen), so whatever changed the master since -- an optimizer step, set_weights,
-- load_weights, a write by hand, model:cuda() -- is seen; a backward reuses its forward's copy (the
-- gradient of what the forward computed). The copy is kept between steps and refreshed in place.
function Layer:_kernel(name, dt, fwd)
  local w = self[name]
  if dt ~= 'bfloat16' or w:dtype() == dt then return w end
  local kc = self._kc
  if not kc then kc = {}; self._kc = kc end
  local e = kc[name]
  if e and rawequal(e.src, w) then
    if not fwd or e.gen == nn._kernel_gen then return e.t end
    e.t:copy(w)                          -- same master tensor: refresh in place (rounds to nearest even)
  else
    if e then e.t:free() end
    e = {t = w:type(dt), src = w}
    kc[name] = e
  end
  e.gen = nn._kernel_gen
  return e.t
end

-- frees the bfloat16 kernel copies (mixed precision turned off, weights converted or moved)
function Layer:_free_kernels()
  local kc = self._kc
  if not kc then return end
  self._kc = nil
  for _, e in pairs(kc) do e.t:free() end
end

-- converts weights (and gradients) to dtype ('float32' | 'float64')
function Layer:type(dtype)
  if dtype == nil then return self.dtype end
  if dtype ~= 'float32' and dtype ~= 'float64' then error(self:owner() .. ": type must be 'float32' or 'float64'", 2) end
  self:_free_kernels()
  for _, n in ipairs(self._wnames) do
    self[n] = self[n]:type(dtype)
    if self.grads[n] then self.grads[n] = self.grads[n]:type(dtype) end
  end
  self.dtype = dtype
  self:_on_type(dtype)
  return self
end
function Layer:_on_type() end

-- Moves weights, gradients and (BatchNorm) moving statistics to device dev (nil: the host), like
-- type(); an unbuilt layer remembers the device and moves its weights when it is built.
function Layer:_to(dev)
  self:_free_kernels()
  for _, n in ipairs(self._wnames) do
    self[n] = to_device(self[n], dev)
    if self.grads[n] then self.grads[n] = to_device(self.grads[n], dev) end
  end
  self.device = dev
  self:_on_device(dev)
  return self
end
function Layer:_on_device() end

-- layer:cuda([dev = 0]) / layer:cpu(). On a build without CUDA, cuda() raises flower.cuda's error and
-- leaves the layer as it was.
-- raises (at level 3) unless tensors can go to CUDA device dev; on a CPU-only build the message is
-- the binding's own "built without CUDA", and it comes before anything has moved
function nn._check_cuda(owner, dev)
  if math.type(dev) ~= 'integer' or dev < 0 then
    error(string.format('%s: cuda: device must be an integer >= 0, got %s', owner, tostring(dev)), 3)
  end
  local ok, err = pcall(function() return new_tensor({0}):cuda(dev) end)
  if not ok then error(owner .. ': ' .. (tostring(err):gsub('^[^%s:]+%.lua:%d+: ', '')), 3) end
end

function Layer:cuda(dev)
  dev = dev or 0
  nn._check_cuda(self:owner(), dev)
  return self:_to(dev)
end
function Layer:cpu() return self:_to(nil) end
function Layer:get_device() return self.device == nil and -1 or self.device end
function Layer:float() return self:type('float32') end
function Layer:double() return self:type('float64') end

-- The protocol's defaults (see THE LAYER PROTOCOL at the top of this file): a layer that declares
-- nothing keeps nothing for backward, fuses with nothing and never writes over its input.
function Layer:build() end
function Layer:output_shape(s) return copy_shape(s) end
function Layer:needs() return false, false end
Layer.converts_input = false
Layer.fuses_relu = false
function Layer:is_relu() return false end
function Layer:folds_affine() return false end
function Layer:is_affine() return false end
function Layer:can_fold_pad() return false end
function Layer:zero_padding() return nil end
function Layer:can_omit_bias() return false end
function Layer:absorbs_bias() return false end
function Layer:can_forward_into() return false end

local function wrap_err(layer, err)
  -- drop the "file.lua:123: " position that luaL_error puts in front: the layer name says where
  err = tostring(err):gsub('^[^%s:]+%.lua:%d+: ', '')
  local prefix = layer:owner() .. ': '
  if err:sub(1, #prefix) == prefix then return err end
  return prefix .. err
end
nn._wrap_err = wrap_err

-- Builds the layer from input shapes if needed and returns the output shape.
function Layer:_infer(shapes)
  local ok, res = pcall(function()
    if not self.built then
      self:build(shapes)
      self.built = true
      if self.dtype ~= 'float32' then self:type(self.dtype) end
      if self.device ~= nil then self:_to(self.device) end
    end
    return self:output_shape(shapes)
  end)
  if not ok then error(wrap_err(self, res), 0) end
  return res
end

-- tensor input(s) -> shape(s) for lazy building
local function shapes_of(x)
  if is_tensor(x) then return tensor_shape(x) end
  local r = {}
  for i = 1, #x do r[i] = tensor_shape(x[i]) end
  return r
end

local function what_is(v)
  if is_tensor(v) then return string.format('a %s tensor of shape %s', v:dtype(), table.concat(v:size(), 'x')) end
  return type(v)
end

-- raises unless x is a batch: a tensor (N, ...) with a batch dim, or (multi) a non-empty list of them
function nn._check_batch(x, verb, multi)
  local function batch(t) return is_tensor(t) and t:dim() >= 2 end
  if is_tensor(x) or not multi then
    if multi then error(string.format('%s expects a list of tensors (N, ...), got %s', verb, what_is(x)), 0) end
    if not batch(x) then
      error(string.format('%s expects a tensor (N, ...) with a batch dim, got %s', verb, what_is(x)), 0)
    end
    return
  end
  if type(x) ~= 'table' or #x == 0 then
    local got = type(x) == 'table' and 'an empty list' or type(x)
    error(string.format('%s expects a list of tensors (N, ...), got %s', verb, got), 0)
  end
  for i = 1, #x do
    if not batch(x[i]) then
      error(string.format('%s: input %d must be a tensor (N, ...) with a batch dim, got %s', verb, i, what_is(x[i])), 0)
    end
  end
end

-- Torch7-style standalone use: forward keeps what backward needs. The input is checked against the
-- layer (its shape and channels through output_shape) before anything runs.
-- fn(layer, ...) with its errors prefixed by the layer's name; the result is kept as layer[field]
-- (output, gradInput) and returned
function nn._run_as(layer, field, fn, ...)
  local ok, r = pcall(fn, layer, ...)
  if not ok then error(wrap_err(layer, r), 0) end
  layer[field] = r
  return r
end

local function checked_forward(self, x)
  nn._check_batch(x, 'forward', self.multi)
  self:_infer(shapes_of(x))
  nn._kernel_gen = nn._kernel_gen + 1
  return self:_forward(x, true)
end
function Layer:forward(x) return nn._run_as(self, 'output', checked_forward, x) end

local function checked_backward(self, x, gy)
  local y = self.output
  if y == nil then error('backward needs a forward first', 0) end
  if not is_tensor(gy) or table.concat(gy:size(), 'x') ~= table.concat(y:size(), 'x') then
    error(string.format("backward: gradOutput must be a tensor of the output's shape %s, got %s",
      table.concat(y:size(), 'x'), what_is(gy)), 0)
  end
  return self:_backward(x, y, gy, true, self:has_trainable())
end
function Layer:backward(x, gy) return nn._run_as(self, 'gradInput', checked_backward, x, gy) end
Layer.updateOutput = Layer.forward

-------------------------------------------------------------------------------- graph nodes

local Node = {}
Node.__index = Node
Node.__name = 'flower.nn.Node'
local node_counter = 0

local function new_node(layer, inputs, shape, dtype)
  node_counter = node_counter + 1
  local n = setmetatable({layer = layer, inputs = inputs, shape = shape, id = node_counter, dtype = dtype}, Node)
  layer._nodes[#layer._nodes + 1] = n
  return n
end

function Node:__tostring()
  return string.format("<node %s %s from '%s'>", shape_str(self.shape), self.dtype or '', self.layer.name)
end
function Node:size() return copy_shape(self.shape) end

local function is_node(v) return getmetatable(v) == Node end
nn.is_node = is_node

-- Calling a layer on node(s): builds it and records a node.
function Layer:call(x)
  if is_tensor(x) or (type(x) == 'table' and is_tensor(x[1])) then
    return self:forward(x)   -- calling on tensors runs it (like Keras eager calls)
  end
  local inputs, shapes
  if is_node(x) then
    if self.multi then error(self:owner() .. ': expects a list of inputs, got one', 2) end
    inputs, shapes = {x}, x.shape
  elseif type(x) == 'table' and #x > 0 then
    if not self.multi then error(self:owner() .. ': expects one input, got a list of ' .. #x, 2) end
    inputs, shapes = {}, {}
    for i, v in ipairs(x) do
      if not is_node(v) then error(string.format('%s: input %d is not a graph node (from nn.Input or a layer call)', self:owner(), i), 2) end
      inputs[i], shapes[i] = v, v.shape
    end
  else
    error(self:owner() .. ': expected a node (from nn.Input or another layer) or a list of nodes, got ' .. type(x), 2)
  end
  if #self._nodes > 0 then
    error(self:owner() .. ' is already used in a graph; sharing a layer between two calls is not supported', 2)
  end
  local shape = self:_infer(shapes)
  return new_node(self, inputs, shape, self.out_dtype or inputs[1].dtype)
end

-------------------------------------------------------------------------------- Input

local InputLayer = class('InputLayer', Layer)
nn.InputLayer = InputLayer

function InputLayer.new(opts)
  local self = setmetatable({}, InputLayer)
  opts = opts or {}
  local shape = opts.shape or opts
  if type(shape) ~= 'table' then error('Input: expected a shape such as {224, 224, 3}', 3) end
  local s = {}
  for i = 1, #shape do
    local v = shape[i]
    v = type(v) == 'number' and math.tointeger(v) or v
    if v == false or v == -1 then v = -1
    elseif math.type(v) ~= 'integer' or v < 1 then
      error(string.format('Input: shape entry %d must be a positive integer or -1 (unknown), got %s', i, tostring(v)), 3)
    end
    s[i] = v
  end
  if #s == 0 then error('Input: shape must have at least one dim (the batch dim is implicit)', 3) end
  Layer.init(self, {name = opts.name or unique_name('input', true), dtype = 'float32'}, InputLayer)
  self.input_dtype = opts.dtype or 'float32'
  self.shape = s
  self.built = true
  return self
end

function InputLayer:_forward(x) return x end

-- nn.Input{224,224,3} or nn.Input{shape={224,224,3}, name='img', dtype='uint8'} -> a node
function nn.Input(opts)
  local layer = InputLayer.new(opts)
  return new_node(layer, {}, copy_shape(layer.shape), layer.input_dtype)
end

-------------------------------------------------------------------------------- load the layers

nn.Node = Node
nn._new_node = new_node
nn._copy_shape = copy_shape
nn._tensor_shape = tensor_shape
nn._get_init = get_init
nn._check_int = check_int
local util = require('flower.nn.layers.common')(nn)
for _, family in ipairs {'conv', 'normalization', 'pooling', 'core', 'merge', 'preprocessing'} do
  require('flower.nn.layers.' .. family)(nn, util)
end
for _, part in ipairs {'graph', 'plan', 'executor', 'mixed_precision', 'summary'} do
  require('flower.nn.model.' .. part)(nn)
end
require('flower.nn.losses')(nn)
require('flower.nn.checkpoint')(nn)

return nn
