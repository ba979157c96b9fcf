-- flower.nn models (loaded by flower.nn): Model (a graph of nodes) and Sequential, the graph
-- executor (gradient flow, freeing, inference fusion), bfloat16 mixed precision (the casts at a
-- model's boundary) and Keras's summary table.
local flower = require 'flower'

return function(nn)
local C = nn.C
local Layer, class, is_node = nn.Layer, nn.class, nn.is_node
local wrap_err = nn._wrap_err

local Model = class('Model', Layer)
nn.Model = Model

-------------------------------------------------------------------------------- building

local function as_list(v, what)
  if is_node(v) then return {v}, true end
  if type(v) ~= 'table' or #v == 0 then error('Model: ' .. what .. ' must be a node or a non-empty list of nodes', 4) end
  for i, n in ipairs(v) do
    if not is_node(n) then error(string.format('Model: %s[%d] is not a graph node', what, i), 4) end
  end
  return v, false
end

-- nn.Model(inputs, outputs [, {name=, trainable=}])
function Model.new(inputs, outputs, opts)
  opts = opts or {}
  local self = setmetatable({}, Model)
  Layer.init(self, {name = opts.name or nn.unique_name('model'), trainable = opts.trainable}, Model)
  self:_set_graph(inputs, outputs)
  return self
end

function Model:_set_graph(inputs, outputs)
  self.inputs, self._single_input = as_list(inputs, 'inputs')
  self.outputs, self._single_output = as_list(outputs, 'outputs')
  for i, n in ipairs(self.inputs) do
    if getmetatable(n.layer) ~= nn.InputLayer then
      error(string.format("Model: inputs[%d] comes from layer '%s', not from nn.Input", i, n.layer.name), 4)
    end
  end
  -- every node that the outputs depend on; stop at the model's inputs
  local is_input, seen, nodes = {}, {}, {}
  for _, n in ipairs(self.inputs) do is_input[n] = true end
  local function visit(n)
    if seen[n] then return end
    seen[n] = true
    if not is_input[n] then
      if #n.inputs == 0 then
        error(string.format("Model: the outputs depend on input '%s', which is not among the model's inputs",
          n.layer.name), 5)
      end
      for _, p in ipairs(n.inputs) do visit(p) end
    end
    nodes[#nodes + 1] = n
  end
  for _, o in ipairs(self.outputs) do visit(o) end
  for _, n in ipairs(self.inputs) do if not seen[n] then seen[n] = true; nodes[#nodes + 1] = n end end
  -- construction order is a topological order: a node's inputs were made before it
  table.sort(nodes, function(a, b) return a.id < b.id end)
  self.nodes = nodes
  self._is_input = is_input
  self._is_output = {}
  for _, o in ipairs(self.outputs) do self._is_output[o] = true end
  self._consumers = {}
  local names = {}
  for _, n in ipairs(nodes) do
    self._consumers[n] = {}
    local nm = n.layer.name
    if names[nm] then
      error(string.format('Model: the name "%s" is used twice in the model; all layer names must be unique', nm), 4)
    end
    names[nm] = n.layer
  end
  for _, n in ipairs(nodes) do
    if not is_input[n] then
      for _, p in ipairs(n.inputs) do local c = self._consumers[p]; c[#c + 1] = n end
    end
  end
  self._by_name = names
  self.multi = #self.inputs > 1
  -- model inputs that only layers converting their input themselves read (Preprocess, a nested
  -- model): mixed precision leaves those as they come
  self._own_cast = {}
  for _, n in ipairs(self.inputs) do
    local all = true
    for _, c in ipairs(self._consumers[n]) do if not c.layer.converts_input then all = false end end
    self._own_cast[n] = all
  end
  self.built = true
  if self._mp then self:_set_mp(self._mp) end   -- layers added to a Sequential later
end

-- As a layer inside a bigger graph: the input shapes must fit the model's inputs.
function Model:output_shape(ss)
  if #self.outputs ~= 1 then error('a model with several outputs cannot be used as a layer', 0) end
  if not self.multi then ss = {ss} end
  if #ss ~= #self.inputs then error(string.format('expects %d inputs, got %d', #self.inputs, #ss), 0) end
  for i, s in ipairs(ss) do
    local want = self.inputs[i].shape
    local ok = #s == #want
    for k = 1, #want do if ok and want[k] >= 0 and s[k] >= 0 and s[k] ~= want[k] then ok = false end end
    if not ok then
      error(string.format('input %d has shape %s, the model expects %s', i, nn.shape_str(s), nn.shape_str(want)), 0)
    end
  end
  return nn._copy_shape(self.outputs[1].shape)
end

-------------------------------------------------------------------------------- layers and weights

-- layers in graph construction order (InputLayers included)
function Model:layers()
  local r = {}
  for i, n in ipairs(self.nodes) do r[i] = n.layer end
  return r
end
Model.named_layers = Model.layers

-- model:save(path): a whole-model Keras .h5 file (flower.keras.save_model)
function Model:save(path) return require('flower.keras').save_model(self, path) end

-- Keras's model.layers order (_map_graph_network): depth-first from the outputs, visiting inputs in
-- order; depth = longest path to an output; sorted by depth descending, ties by first visit.
-- Order-based weight loading of Keras files needs exactly this order.
function Model:keras_layers()
  local index, post, seen = {}, {}, {}
  local count = 0
  local function visit(n)
    if seen[n] then return end
    seen[n] = true
    if index[n] == nil then index[n] = count; count = count + 1 end
    if not self._is_input[n] then for _, p in ipairs(n.inputs) do visit(p) end end
    post[#post + 1] = n
  end
  for _, o in ipairs(self.outputs) do visit(o) end
  local depth = {}
  for i = #post, 1, -1 do
    local n = post[i]
    local d = depth[n] or 0
    depth[n] = d
    if not self._is_input[n] then
      for _, p in ipairs(n.inputs) do depth[p] = math.max(depth[p] or 0, d + 1) end
    end
  end
  for _, n in ipairs(self.inputs) do
    if depth[n] == nil then depth[n] = 0; index[n] = -1; post[#post + 1] = n end
  end
  local r = {}
  for _, n in ipairs(post) do r[#r + 1] = n end
  table.sort(r, function(a, b)
    if depth[a] ~= depth[b] then return depth[a] > depth[b] end
    return index[a] < index[b]
  end)
  for i, n in ipairs(r) do r[i] = n.layer end
  return r
end

function Model:layer(name)
  local l = self._by_name[name]
  if not l then error(string.format("%s: no layer named '%s'", self:owner(), tostring(name)), 2) end
  return l
end

-- a model with the same inputs ending at layer `name` (Keras: Model(m.input, m.get_layer(n).output))
function Model:output_of(name, opts)
  local l = self:layer(name)
  local m = Model.new(self._single_input and self.inputs[1] or self.inputs, l._nodes[1],
    {name = (opts and opts.name) or (self.name .. '_' .. name)})
  m.dtype = self.dtype
  if self._mp then m:_set_mp(self._mp) end   -- it shares the layers: it computes as this model does
  return m
end

local function for_layers(self, fn, frozen)
  for _, n in ipairs(self.nodes) do
    local l = n.layer
    if getmetatable(l) == Model or l._is_model then fn(l, frozen); for_layers(l, fn, frozen or not l.trainable)
    else fn(l, frozen) end
  end
end

-- marks layers inside frozen models (their own `trainable` flags are left alone)
function Model:_refresh()
  for_layers(self, function(l, frozen) l._frozen_by = (frozen or nil) and true end, not self.trainable)
end

function Model:has_trainable()
  if not self.trainable or self._frozen_by then return false end
  local any = false
  for_layers(self, function(l) if not l._is_model and l:has_trainable() then any = true end end, false)
  return any
end

-- The one walker over a model's leaf layers (nested models expanded): the layers and each one's
-- path prefix, '' at the top level, 'inner_model/' inside a nested model (so two backbones with
-- equal layer names stay apart). order: nil (graph construction order) or 'keras' (Keras's
-- model.layers order at every level, as model:keras_layers(); freeze specs like 'from:<name>').
local function leaves(self, order)
  local r, prefixes = {}, {}
  local function walk(m, prefix)
    for _, l in ipairs(order == 'keras' and m:keras_layers() or m:layers()) do
      if l._is_model then walk(l, prefix .. l.name .. '/')
      else r[#r + 1] = l; prefixes[#r] = prefix end
    end
  end
  walk(self, '')
  return r, prefixes
end
Model._leaves = leaves

function Layer:_eff_trainable() return self.trainable and not self._frozen_by end
-- a layer inside a frozen model contributes nothing
local base_has_trainable = Layer.has_trainable
function Layer:has_trainable() return not self._frozen_by and base_has_trainable(self) end

function Model:weights()
  local r = {}
  local ls, prefixes = leaves(self)
  for i, l in ipairs(ls) do
    for _, w in ipairs(l:weights()) do
      w.trainable = w.trainable and not l._frozen_by
      w.path = prefixes[i] .. w.path
      r[#r + 1] = w
    end
  end
  return r
end

-- records of trainable weights for optimizers: {path, name, layer, tensor, grad, regularizer}
function Model:trainable_weights()
  self:_refresh()
  local r = {}
  local ls, prefixes = leaves(self)
  for i, l in ipairs(ls) do
    if l:has_trainable() then
      for _, n in ipairs(l._wnames) do
        if l._wtrain[n] then
          r[#r + 1] = {path = prefixes[i] .. l.name .. '/' .. n, name = n, layer = l, tensor = l[n], grad = l:grad(n),
                       regularizer = l.regularizers and l.regularizers[n]}
        end
      end
    end
  end
  return r
end

function Model:parameters()
  local ps, gs = {}, {}
  for _, w in ipairs(self:trainable_weights()) do ps[#ps + 1] = w.tensor; gs[#gs + 1] = w.grad end
  return ps, gs
end

function Model:count_params()
  self:_refresh()
  local total, trainable = 0, 0
  for _, l in ipairs(leaves(self)) do
    local t, tr = l:count_params()
    total = total + t
    if not l._frozen_by then trainable = trainable + tr end
  end
  return total, trainable
end

-- Keras-layout HDF5 weight files (see flower.keras): Keras itself can load what save_weights
-- writes, and load_weights reads the standard Keras files (by order, or {by_name=true}).
function Model:save_weights(path) return require('flower.keras').save_weights(self, path) end
function Model:load_weights(path, opts) return require('flower.keras').load_weights(self, path, opts) end

function Model:zero_grad() for _, l in ipairs(leaves(self)) do l:zero_grad() end end
Model.zeroGradParameters = Model.zero_grad

function Model:training()
  self.train = true
  for_layers(self, function(l) l.train = true end, false)
  return self
end

function Model:evaluate()
  self.train = false
  for_layers(self, function(l) l.train = false end, false)
  return self
end

function Model:type(dtype)
  if dtype == nil then return self.dtype end
  if self._mp and dtype ~= 'float32' then
    error(string.format("%s: type('%s'): mixed precision keeps float32 master weights; turn it off first "
      .. '(model:mixed_precision(false))', self:owner(), tostring(dtype)), 2)
  end
  for _, l in ipairs(leaves(self)) do l:type(dtype) end
  for_layers(self, function(l) if l._is_model then l.dtype = dtype end end, false)
  self.dtype = dtype
  return self
end

-- model:cuda([dev = 0]) / model:cpu(): every layer's weights, gradients and moving statistics, like
-- type(). cuda() checks the device first (a one-element copy), so that a CPU-only build or a missing
-- device raises before anything moves.
function Model:cuda(dev)
  dev = dev or 0
  nn._check_cuda('model:cuda', dev)
  return self:_to(dev)
end
function Model:cpu() return self:_to(nil) end
function Model:_to(dev)
  for _, l in ipairs(leaves(self)) do l:_to(dev) end
  for_layers(self, function(l) if l._is_model then l.device = dev end end, false)
  self.device = dev
  return self
end
function Model:get_device() return self.device == nil and -1 or self.device end

Model._is_model = true
Model.converts_input = true   -- a nested model casts its inputs to its own compute dtype

-------------------------------------------------------------------------------- mixed precision

-- model:mixed_precision('bfloat16') turns on bfloat16 mixed precision (Keras's 'mixed_bfloat16'
-- policy, PyTorch's autocast): the weights stay float32 -- the master weights, which the optimizer
-- updates and checkpoints, exports and everything else see -- and so do the optimizer's state,
-- BatchNormalization's parameters and statistics, biases and parameter gradients (the C kernels
-- take those as float32 and accumulate gradients in float32). Activations flow in bfloat16:
--   * at entry, model:forward casts float32 inputs to bfloat16 (an input that only a Preprocess
--     layer or a nested model reads is left to it: Preprocess computes in float32 and rounds once);
--   * Conv2D, DepthwiseConv2D, SeparableConv2D and Dense read bfloat16 copies of their kernels,
--     remade from the masters at each top-level forward (Layer:_kernel), so that any change to the
--     weights -- an optimizer step, set_weights, a write by hand -- is seen by the next forward;
--   * at exit the outputs are cast to float32 (losses, metrics, probabilities and predictions are
--     float32), and model:backward casts the output gradient to bfloat16 and the input gradient
--     (when asked for) back to the input's dtype.
-- Models nested in this one (a zoo base inside a classifier) get the same setting; one set apart
-- afterwards casts at its own boundary (its outputs leave in the enclosing model's compute dtype).
-- model:mixed_precision(false) (or 'float32') turns it off: the float32 path is then exactly the
-- one a model that never had it on runs. model:mixed_precision() -> 'bfloat16' or nil.
local MP_VALUES = "'bfloat16', or false / 'float32' to turn it off"

-- 'bfloat16' -> 'bfloat16'; false / 'float32' -> false; anything else raises (at `level`) naming `who`
function nn.check_mixed_precision(policy, who, level)
  if policy == 'bfloat16' then return 'bfloat16' end
  if policy == false or policy == 'float32' then return false end
  local got = type(policy) == 'string' and ("'" .. policy .. "'") or tostring(policy)
  error(string.format('%s: expected %s, got %s', who, MP_VALUES, got), (level or 1) + 1)
end

function Model:mixed_precision(...)
  if select('#', ...) == 0 then return self._mp end
  local cd = nn.check_mixed_precision((...), 'model:mixed_precision', 2)
  if cd and self.dtype ~= 'float32' then
    error(string.format("model:mixed_precision: %s has %s weights; mixed precision keeps float32 master weights "
      .. "(model:type('float32') first)", self:owner(), tostring(self.dtype)), 2)
  end
  self:_set_mp(cd or nil)
  if not cd and self.built then
    for _, l in ipairs(leaves(self)) do l:_free_kernels() end
  end
  return self
end

-- sets the policy on this model and the models nested in it
function Model:_set_mp(cd)
  self._mp = cd
  if self.nodes then for_layers(self, function(l) if l._is_model then l._mp = cd end end, false) end
end

-- frees the casts a mixed-precision forward kept for its backward
function Model:_mp_release()
  local st = self._mp_st
  if not st then return end
  self._mp_st = nil
  for _, t in pairs(st.casts) do t:free() end
  for _, t in pairs(st.raw) do t:free() end
end

-- the dtypes mixed precision casts between (float64 models, for gradient checks, are left alone)
local function is_float(dt) return dt == 'float32' or dt == 'bfloat16' end

-- The executor (_run) wrapped in the casts of mixed precision. x: a tensor or a list, as _run.
-- top: called by model:forward (outputs leave as float32, the weights' dtype), else as a layer of
-- an enclosing model (outputs leave in that model's compute dtype, nn._compute).
-- A model without mixed precision whose inputs come in its dtype casts nothing: _run as before.
function Model:_forward(x, keep, top)
  self:_mp_release()
  local cd = self._mp or self.dtype
  local out_dt = (not top and nn._compute) or self.dtype
  local single = flower.is_tensor(x)
  local xs = single and {x} or x
  local casts
  if type(xs) == 'table' and not is_node(xs) and self._own_cast then
    for i, n in ipairs(self.inputs) do
      local t = xs[i]
      if flower.is_tensor(t) then
        local dt = t:dtype()
        if is_float(dt) and is_float(cd) and dt ~= cd and not self._own_cast[n] then
          casts = casts or {}
          casts[i] = t:type(cd)
        end
      end
    end
  end
  local xin = x
  if casts then
    xin = {}
    for i = 1, #self.inputs do xin[i] = casts[i] or xs[i] end
    if single then xin = xin[1] end
  end
  local prev = nn._compute
  nn._compute = cd
  if top then nn._kernel_gen = nn._kernel_gen + 1 end
  local ok, y = pcall(self._run, self, xin, keep)
  nn._compute = prev
  if not ok then
    if casts then for _, t in pairs(casts) do t:free() end end
    error(y, 0)
  end
  -- outputs to out_dt
  local ys = self._single_output and {y} or y
  local raw, outs
  for i, t in ipairs(ys) do
    local dt = t:dtype()
    if is_float(dt) and is_float(out_dt) and dt ~= out_dt then
      raw, outs = raw or {}, outs or table.move(ys, 1, #ys, 1, {})
      raw[i], outs[i] = t, t:type(out_dt)
    end
  end
  if not casts and not raw then return y end
  -- the casts are ours: freed now, or after the backward they serve (or at the next forward);
  -- a raw output that is the caller's own tensor (an output node that is an input) is never freed
  local mine = {}
  for i, t in pairs(raw or {}) do
    local callers = false
    for _, c in ipairs(xs) do if rawequal(c, t) then callers = true end end
    if not callers then mine[i] = t end
  end
  if keep then
    local gin_dt = {}
    for i = 1, #self.inputs do
      local t = xs[i]
      local dt = flower.is_tensor(t) and t:dtype()
      -- the input gradient comes back in the input's dtype; for an integer input (images into a
      -- Preprocess layer) in the dtype the outputs leave in
      gin_dt[i] = (dt == 'float32' or dt == 'float64' or dt == 'bfloat16') and dt or out_dt
    end
    local out_raw_dt = {}
    for i, t in ipairs(ys) do out_raw_dt[i] = t:dtype() end
    self._mp_st = {casts = casts or {}, raw = mine, xin = xin, gin_dt = gin_dt, out_dt = out_raw_dt}
  else
    if casts then for _, t in pairs(casts) do t:free() end end
    for _, t in pairs(mine) do t:free() end
  end
  if not raw then return y end
  if self._single_output then return outs[1] end
  return outs
end

-- The executor's backward (_run_backward) wrapped in the casts of mixed precision: the output
-- gradients to the dtype the outputs had inside, the input gradients to the inputs' dtype.
function Model:_backward(x, y, gy, need_gin)
  local st = self._mp_st
  if not st then return self:_run_backward(x, y, gy, need_gin) end
  self._mp_st = nil
  local single = flower.is_tensor(gy)
  local gys = single and {gy} or gy
  local g2, made = {}, {}
  for i = 1, #self.outputs do
    local g = gys[i]
    local want = st.out_dt[i]
    if g and is_float(g:dtype()) and g:dtype() ~= want then
      g = g:type(want)
      made[#made + 1] = g
    end
    g2[i] = g
  end
  local ok, gx = pcall(self._run_backward, self, st.xin, nil, single and g2[1] or g2, need_gin)
  for _, t in ipairs(made) do t:free() end
  for _, t in pairs(st.casts) do t:free() end
  for _, t in pairs(st.raw) do t:free() end
  if not ok then error(gx, 0) end
  if gx == nil then return nil end
  local one = flower.is_tensor(gx)
  local r = one and {gx} or gx
  -- cast every gradient first, then free the originals (two inputs may share one gradient tensor)
  local spent = {}
  for k = 1, #self.inputs do
    local g, want = r[k], st.gin_dt[k]
    if g and want and is_float(g:dtype()) and g:dtype() ~= want then
      r[k] = g:type(want)
      spent[g] = true
    end
  end
  for g in pairs(spent) do
    local callers = false
    for _, c in ipairs(gys) do if rawequal(c, g) then callers = true end end
    if not callers then g:free() end
  end
  if one then return r[1] end
  return r
end

-------------------------------------------------------------------------------- the executor

-- Tensors are freed as soon as nothing needs them (Lua's collector does not see their size), and the
-- CPU allocator hands a freed block to the next layer asking for that size (core/cpu/cpu.c), so an
-- inference holds about the weights plus the few activations that are live at once, not one buffer
-- per layer. `live` counts, per tensor object, the node values and gradients that hold it; `keep`
-- protects tensors that belong to the caller (inputs, gradOutputs) or are returned (outputs): those
-- are never freed, and a view of one only drops its own reference. nn.reuse = false leaves every
-- value to the collector and writes nothing in place (to compare, or to rule reuse out of a bug).
local Tracker = {}
Tracker.__index = Tracker

local function tracker() return setmetatable({live = {}, keep = {}, reuse = nn.reuse}, Tracker) end
function Tracker:hold(t) if t then self.live[t] = (self.live[t] or 0) + 1 end end
function Tracker:drop(t)
  if not t then return end
  local c = (self.live[t] or 1) - 1
  if c > 0 then self.live[t] = c; return end
  self.live[t] = nil
  if not self.keep[t] and self.reuse then t:free() end
end
function Tracker:protect(t) if t then self.keep[t] = true end end

-- layers whose output a following inference BatchNormalization can fold into
local fusable = {Conv2D = true, DepthwiseConv2D = true, SeparableConv2D = true}

local function is_relu(l) return (l.class_name == 'ReLU' or l.class_name == 'Activation') and l.act == 'relu' end

-- Works out, for one forward, which nodes need gradients, which values backward will read, and
-- which Conv -> BN -> ReLU chains run fused.
function Model:_plan(keep)
  local nodes, cons = self.nodes, self._consumers
  local ng, need_x, need_y = {}, {}, {}
  local need_params = {}
  for _, n in ipairs(nodes) do
    if self._is_input[n] then
      ng[n] = keep and self._need_gin or false
    else
      local l = n.layer
      local tp = keep and l:has_trainable() or false
      local g = tp
      if keep then for _, p in ipairs(n.inputs) do if ng[p] then g = true end end end
      ng[n] = g
      need_params[n] = tp
    end
  end
  local retain = {}
  for _, n in ipairs(nodes) do
    if ng[n] and not self._is_input[n] then
      local gin = false
      for _, p in ipairs(n.inputs) do if ng[p] then gin = true end end
      local nx, ny = n.layer:needs(gin, need_params[n])
      if nx then for _, p in ipairs(n.inputs) do retain[p] = true end end
      if ny then retain[n] = true end
      need_x[n], need_y[n] = nx, ny
    end
  end
  -- Fusion, where no intermediate value is needed elsewhere:
  --  'conv': Conv -> inference BN (-> ReLU) as one convolution, where no gradient flows;
  --  'relu': BN / Add / ScaledAdd -> ReLU as one pass, with or without gradients (the layer's
  --          backward then masks gy by the ReLU output, which it keeps instead of its own output).
  local fused, skip, relu_into, padfold, bias_into = {}, {}, {}, {}, {}
  local function single(n) return #cons[n] == 1 and not self._is_output[n] and not retain[n] and cons[n][1] end
  -- ZeroPadding2D -> Conv2D without gradients: the padding goes into the convolution's window
  for _, n in ipairs(nodes) do
    local l = n.layer
    if nn.fusion and not ng[n] and l.class_name == 'Conv2D' and not l.activation then
      local z = n.inputs[1]
      local zl = z.layer
      local s = z.inputs[1] and z.inputs[1].shape
      if zl.class_name == 'ZeroPadding2D' and not ng[z] and not self._is_input[z] and single(z) == n and s then
        local pad = {zl.pt, zl.pb, zl.pl, zl.pr}
        if l:can_fold_pad(pad, s[1], s[2]) then padfold[n] = {node = z, pad = pad}; skip[z] = true end
      end
    end
  end
  for _, n in ipairs(nodes) do
    local l = n.layer
    if nn.fusion and not skip[n] and not self._is_input[n] then
      local nxt = single(n)
      if not ng[n] and fusable[l.class_name] and not l.activation and nxt and not ng[nxt]
          and nxt.layer.class_name == 'BatchNormalization' and not nxt.layer:uses_batch_stats() then
        local bn, relu = nxt, nil
        local r = single(bn)
        if r and not ng[r] and is_relu(r.layer) then relu = r end
        fused[n] = {kind = 'conv', bn = bn, relu = relu, pad = padfold[n] and padfold[n].pad}
        skip[bn] = true
        if relu then skip[relu] = true end
      elseif padfold[n] then
        fused[n] = {kind = 'pad', pad = padfold[n].pad}
      elseif ng[n] and l.class_name == 'Conv2D' and l.bias and not l.activation and #cons[n] == 1
          and not self._is_output[n] and ng[cons[n][1]] and cons[n][1].layer.class_name == 'BatchNormalization'
          and cons[n][1].layer:uses_batch_stats() then
        local bn = cons[n][1]   -- the only reader of the convolution's value (BN backward keeps it)
        -- a bias before a batch-statistics BatchNormalization cancels in its output (the batch mean
        -- moves with it): the convolution skips the bias pass and the BN adds (1-momentum)*bias to
        -- its moving mean, which is what the mean of (conv + bias) would have put there. Backward is
        -- unchanged (the bias gradient is the column sum of the BN's input gradient either way).
        fused[n] = {kind = 'bias_bn'}
        bias_into[bn] = n
      elseif l.fuses_relu and nxt and is_relu(nxt.layer) and ng[nxt] == ng[n] then
        fused[n] = {kind = 'relu', relu = nxt}
        skip[nxt] = true
        relu_into[nxt] = n
        if ng[n] then retain[n] = true end
      end
    end
  end
  return {ng = ng, retain = retain, need_params = need_params, fused = fused, skip = skip, keep = keep,
          relu_into = relu_into, padfold = padfold, bias_into = bias_into}
end

local function run_fused(n, f, x, keep)
  local l = n.layer
  if f.kind == 'relu' then return l:_forward(x, keep, true) end
  if f.kind == 'pad' then return l:_forward_fused(x, nil, l.bias, false, f.pad) end
  if f.kind == 'bias_bn' then return l:_forward(x, keep, true) end
  local bnl = f.bn.layer
  local scale, shift, inv = bnl:coefficients()
  if l.bias then
    local s = (l.bias * scale):add_(shift)
    shift:free()
    shift = s
  end
  local y = l:_forward_fused(x, scale, shift, f.relu ~= nil, f.pad)
  if inv ~= scale then inv:free() end
  scale:free()
  shift:free()
  return y
end

local function input_values(n, values)
  if n.layer.multi then
    local xs = {}
    for i, p in ipairs(n.inputs) do xs[i] = values[p] end
    return xs
  end
  return values[n.inputs[1]]
end

-- x: a tensor, or a list for several inputs. keep: a backward will follow.
-- nn.profile = {} collects seconds and calls per layer class and direction (forward / backward)
local function profile_add(prof, key, dt)
  local e = prof[key]
  if not e then e = {time = 0, calls = 0}; prof[key] = e end
  e.time = e.time + dt
  e.calls = e.calls + 1
end

function Model:_run(x, keep)
  local prof = nn.profile
  self:_release()
  local plan = self:_plan(keep)
  local xs = x
  if is_node(x) then error('forward expects tensors; call the model on nodes to build a graph', 0) end
  if flower.is_tensor(x) then xs = {x} end
  if #xs ~= #self.inputs then
    error(string.format('expects %d input tensor(s), got %d', #self.inputs, #xs), 0)
  end
  local tr = tracker()
  local values, remaining = {}, {}
  for i, n in ipairs(self.inputs) do
    local t = xs[i]
    if not flower.is_tensor(t) then error(string.format('input %d must be a tensor, got %s', i, type(t)), 0) end
    local want = n.shape
    if t:dim() ~= #want + 1 then
      error(string.format("input %d ('%s') must have %d dims (batch, %s), got %d", i, n.layer.name, #want + 1,
        nn.shape_str(want, false):sub(2, -2), t:dim()), 0)
    end
    for k = 1, #want do
      if want[k] >= 0 and t:size(k + 1) ~= want[k] then
        error(string.format("input %d ('%s') has shape %s, the model expects %s", i, n.layer.name,
          table.concat(t:size(), 'x'), 'Nx' .. table.concat(want, 'x'):gsub('%-1', '?')), 0)
      end
    end
    local dt = t:dtype()
    if (dt == 'float32' or dt == 'float64') and dt ~= self.dtype then
      error(string.format("input %d is %s, the model is %s (convert one of them: x:type(...) or model:type(...))",
        i, dt, self.dtype), 0)
    end
    values[n] = t
    tr:protect(t)
  end
  for _, n in ipairs(self.nodes) do
    remaining[n] = #self._consumers[n]
    if plan.retain[n] or self._is_output[n] then remaining[n] = math.huge end
    if values[n] then tr:hold(values[n]) end
  end
  for _, n in ipairs(self.nodes) do
    if not self._is_input[n] and not plan.skip[n] then
      local l = n.layer
      local pf = plan.padfold[n]
      local xin = pf and values[pf.node.inputs[1]] or input_values(n, values)
      local f = plan.fused[n]
      local ok, y
      local t0 = prof and C.now()
      -- where no backward follows, an element-wise layer writes over an input nobody else needs: no
      -- later node reads it, no other node value is this tensor, it is not the caller's, and no
      -- other tensor shares its storage (a Reshape/Flatten view of a value still needed, or of the
      -- caller's input)
      local donor
      if l._forward_into and nn.inplace and tr.reuse and not (keep and plan.ng[n]) and (not f or f.kind == 'relu')
          and l:can_forward_into() then
        for _, p in ipairs(n.inputs) do
          local t = values[p]
          if t and remaining[p] == 1 and tr.live[t] == 1 and not tr.keep[t] and not self._is_input[p]
              and t:is_contiguous() and not t:is_shared() then
            donor = t
            break
          end
        end
      end
      if donor then ok, y = pcall(l._forward_into, l, xin, f ~= nil, donor)
      elseif f then ok, y = pcall(run_fused, n, f, xin, keep and plan.ng[n])
      else ok, y = pcall(l._forward, l, xin, keep and plan.ng[n]) end
      if not ok then error(wrap_err(l, y), 0) end
      if plan.bias_into[n] then l:shift_moving_mean(plan.bias_into[n].layer.bias) end
      if prof then profile_add(prof, (f and 'fused ' or '') .. l.class_name .. ' forward', C.now() - t0) end
      local target = f and (f.relu or f.bn) or n
      values[target] = y
      tr:hold(y)
      if f and f.kind == 'relu' and plan.ng[n] and keep then   -- the fused layer's backward reads it
        values[n] = y
        tr:hold(y)
      end
      for _, p in ipairs(pf and pf.node.inputs or n.inputs) do
        local r = remaining[p] - 1
        remaining[p] = r
        if r == 0 then tr:drop(values[p]); values[p] = nil end
      end
      if f and f.kind == 'conv' and f.relu then
        -- the BN node's value never existed; its consumer (the ReLU) is done too
        remaining[f.bn] = 0
      end
      -- a value nobody reads (e.g. a dead branch) is dropped at once
      if remaining[target] == 0 then tr:drop(y); values[target] = nil end
    end
  end
  local outs = {}
  for i, o in ipairs(self.outputs) do outs[i] = values[o]; tr:protect(outs[i]) end
  self._state = {plan = plan, values = values, tracker = tr, outputs = outs}
  if not keep then self:_release() end
  if self._single_output then return outs[1] end
  return outs
end

-- frees what the last forward kept for backward (never inputs or outputs)
function Model:_release()
  local st = self._state
  if not st then return end
  self._state = nil
  for n, v in pairs(st.values) do
    if not self._is_input[n] and not self._is_output[n] then st.tracker:drop(v) end
  end
end

local function add_grad(grads, owned, tr, n, g)
  local cur = grads[n]
  if cur == nil then
    grads[n] = g
    tr:hold(g)
  else
    if owned[n] then
      cur:add_(g)
    else
      local s = cur + g
      tr:drop(cur)
      grads[n] = s
      owned[n] = true
      tr:hold(s)
    end
    -- g is spent: free it unless another gradient still holds it (Add hands one tensor to each input)
    tr:hold(g)
    tr:drop(g)
  end
end

-- gy: a tensor, or a list per output (nil entries: no gradient from that output)
function Model:_run_backward(x, y, gy, need_gin)
  local st = self._state
  if not st or not st.plan.keep then
    error('backward needs a forward in training mode (model:training()) or with model.grad_enabled = true', 0)
  end
  local plan, values, tr = st.plan, st.values, st.tracker
  local prof = nn.profile
  local gys = gy
  if flower.is_tensor(gy) then gys = {gy} end
  local grads, owned = {}, {}
  for i, o in ipairs(self.outputs) do
    if gys[i] then tr:protect(gys[i]); add_grad(grads, owned, tr, o, gys[i]) end
  end
  local nodes = self.nodes
  for i = #nodes, 1, -1 do
    local n = nodes[i]
    local g = grads[n]
    local into = plan.relu_into[n]
    if into then   -- a ReLU fused into the layer before it: that layer's backward applies it
      if g then grads[into], owned[into] = g, owned[n]; grads[n] = nil end
    elseif g and plan.ng[n] and not self._is_input[n] then
      local l = n.layer
      local gin = false
      for _, p in ipairs(n.inputs) do if plan.ng[p] then gin = true end end
      local xin = input_values(n, values)
      local t0 = prof and C.now()
      local f = plan.fused[n]
      local ok, gx = pcall(l._backward, l, xin, values[n], g, gin, plan.need_params[n], f and f.kind == 'relu')
      if not ok then error(wrap_err(l, gx), 0) end
      if prof then profile_add(prof, l.class_name .. ' backward', C.now() - t0) end
      grads[n] = nil
      if gin then
        if l.multi then
          for k, p in ipairs(n.inputs) do if plan.ng[p] and gx[k] then add_grad(grads, owned, tr, p, gx[k]) end end
        else
          add_grad(grads, owned, tr, n.inputs[1], gx)
        end
      end
      tr:drop(g)     -- after handing gx on: gx may be g itself (Add, linear activations)
    end
    -- this node's value is read by no one after its own backward
    if values[n] and not self._is_input[n] and not self._is_output[n] then
      tr:drop(values[n])
      values[n] = nil
    end
    if grads[n] and (self._is_input[n] == nil) then tr:drop(grads[n]); grads[n] = nil end
  end
  self._state = nil
  if not need_gin then
    for _, n in ipairs(self.inputs) do if grads[n] then tr:drop(grads[n]) end end
    return nil
  end
  local r = {}
  for k, n in ipairs(self.inputs) do
    r[k] = grads[n]
    if r[k] == nil then   -- an input no gradient reached: zeros
      local xk = flower.is_tensor(x) and x or x[k]
      r[k] = nn.like(xk, xk:size(), self.dtype)
    end
  end
  if self._single_input then return r[1] end
  return r
end

-- As a layer in a bigger graph, a model keeps its own values; the outer executor tells it whether
-- its inputs need gradients.
function Model:needs(need_gin)
  self._need_gin = need_gin
  -- its first layers may read the input and its last the output: the outer graph keeps both
  return true, true
end

function Model:forward(input)
  local keep = (self.train or self.grad_enabled) and true or false
  self._need_gin = self.input_grad and true or false
  self:_refresh()
  local ok, y = pcall(self._forward, self, input, keep, true)
  if not ok then error(wrap_err(self, y), 0) end
  self.output = y
  return y
end

function Model:backward(input, gradOutput)
  local ok, gx = pcall(self._backward, self, input, self.output, gradOutput, self._need_gin)
  if not ok then error(wrap_err(self, gx), 0) end
  self.gradInput = gx
  return gx
end

-- predict(x [, batch_size]): inference in evaluate mode, batch by batch, results concatenated
function Model:predict(x, batch_size)
  local was = self.train
  self:evaluate()
  local n = x:size(1)
  batch_size = batch_size or n
  local parts = {}
  local ok, err = pcall(function()
    for s = 1, n, batch_size do
      local len = math.min(batch_size, n - s + 1)
      parts[#parts + 1] = self:forward(x:narrow(1, s, len))
    end
  end)
  if was then self:training() end
  if not ok then error(err, 0) end
  if #parts == 1 then return parts[1] end
  if not flower.is_tensor(parts[1]) then
    local r = {}
    for k = 1, #parts[1] do
      local col = {}
      for i, p in ipairs(parts) do col[i] = p[k] end
      r[k] = flower.cat(col, 1)
    end
    return r
  end
  return flower.cat(parts, 1)
end

-- nn.profile_report(prof) -> text table of a collected profile, slowest first
function nn.profile_report(prof)
  local rows, total = {}, 0
  for k, e in pairs(prof) do rows[#rows + 1] = {k, e}; total = total + e.time end
  table.sort(rows, function(a, b) return a[2].time > b[2].time end)
  local out = {string.format('%-40s %10s %7s %6s', 'layer', 'seconds', 'calls', '%')}
  for _, r in ipairs(rows) do
    out[#out + 1] = string.format('%-40s %10.4f %7d %6.1f', r[1], r[2].time, r[2].calls, 100 * r[2].time / total)
  end
  out[#out + 1] = string.format('%-40s %10.4f', 'total', total)
  return table.concat(out, '\n')
end

-------------------------------------------------------------------------------- summary

local function py_shape(s) return nn.shape_str(s) end

local function fmt_int(n) return string.format('%d', n) end

local function readable_size(b)
  local units = {'Byte', 'KB', 'MB', 'GB', 'TB', 'PB'}
  for _, u in ipairs(units) do
    if b / 1024 < 1 then return string.format('%.2f %s', b, u) end
    b = b / 1024
  end
  return string.format('%.2f %s', b, 'PB')
end

-- tf-keras's print_row: columns cut at positions, long fields wrapped on '),' '],' etc.
local function print_row(out, fields, positions)
  local left = {}
  for i, f in ipairs(fields) do left[i] = tostring(f) end
  local function any() for _, s in ipairs(left) do if s ~= '' then return true end end return false end
  while any() do
    local line = ''
    for col = 1, #left do
      local start = col > 1 and positions[col - 1] or 0
      local space = col ~= #positions and 2 or 0
      local cutoff = positions[col] - start - space
      if col ~= #positions then cutoff = cutoff - 1 end
      local fit = left[col]:sub(1, cutoff)
      local best
      for _, pat in ipairs({'),', '},', '],', "',"}) do
        local p = fit:find(pat, 1, true)
        if p then local c = p + #pat - 1; if not best or c < best then best = c end end
      end
      if best then cutoff = best; fit = fit:sub(1, cutoff) end
      if col == 1 then line = line .. ' ' end
      line = line .. fit .. string.rep(' ', space)
      left[col] = left[col]:sub(cutoff + 1)
      line = line .. string.rep(' ', positions[col] - #line)
    end
    out[#out + 1] = line
  end
end

local function type_name(l)
  if l.type_name then return l.type_name end
  if l._is_model then return l.class_name == 'Sequential' and 'Sequential' or 'Functional' end
  return l.class_name
end

-- Keras's model.summary() (tf-keras 2.x layout). Prints with print_fn (default print) and returns
-- the text.
function Model:summary(opts)
  opts = opts or {}
  self:_refresh()
  local layers = self:keras_layers()
  local seq = self.class_name == 'Sequential'
  if seq then   -- Keras's Sequential does not list its InputLayer
    local r = {}
    for _, l in ipairs(layers) do if getmetatable(l) ~= nn.InputLayer then r[#r + 1] = l end end
    layers = r
  end
  if not seq then
    seq = true
    for _, n in ipairs(self.nodes) do
      if #n.inputs > 1 or #self._consumers[n] > 1 then seq = false end
    end
  end
  local line_length, positions, header
  if seq then
    line_length = opts.line_length or 65
    positions = {math.floor(line_length * 0.45), math.floor(line_length * 0.85), line_length}
    header = {'Layer (type)', 'Output Shape', 'Param #'}
  else
    line_length = opts.line_length or 98
    positions = {math.floor(line_length * 0.3), math.floor(line_length * 0.6), math.floor(line_length * 0.7),
                 line_length}
    header = {'Layer (type)', 'Output Shape', 'Param #', 'Connected to'}
  end
  local out = {}
  out[#out + 1] = string.format('Model: "%s"', self.name)
  out[#out + 1] = string.rep('_', line_length)
  print_row(out, header, positions)
  out[#out + 1] = string.rep('=', line_length)
  for _, l in ipairs(layers) do
    local n = l._nodes[1]
    for _, cand in ipairs(l._nodes) do if self._consumers[cand] then n = cand end end
    local shape = py_shape(n.shape)
    if getmetatable(l) == nn.InputLayer then shape = '[' .. shape .. ']' end
    local total = l._is_model and select(1, l:count_params()) or select(1, l:count_params())
    local fields = {l.name .. ' (' .. type_name(l) .. ')', shape, fmt_int(total)}
    if not seq then
      local conn = {}
      if not self._is_input[n] then
        for _, p in ipairs(n.inputs) do conn[#conn + 1] = "'" .. p.layer.name .. "[0][0]'" end
      end
      fields[4] = '[' .. table.concat(conn, ', ') .. ']'
    end
    print_row(out, fields, positions)
    out[#out + 1] = string.rep(' ', line_length)
  end
  out[#out + 1] = string.rep('=', line_length)
  local total, trainable = self:count_params()
  local bytes = self.dtype == 'float64' and 8 or 4
  out[#out + 1] = string.format('Total params: %s (%s)', fmt_int(total), readable_size(total * bytes))
  out[#out + 1] = string.format('Trainable params: %s (%s)', fmt_int(trainable), readable_size(trainable * bytes))
  out[#out + 1] = string.format('Non-trainable params: %s (%s)', fmt_int(total - trainable),
    readable_size((total - trainable) * bytes))
  out[#out + 1] = string.rep('_', line_length)
  local text = table.concat(out, '\n')
  local pf = opts.print_fn
  if pf == nil then pf = print end
  if pf then pf(text) end
  return text
end

-------------------------------------------------------------------------------- Sequential

local Sequential = class('Sequential', Model)
nn.Sequential = Sequential

-- nn.Sequential{layer, layer, ...} (the first may be an nn.Input node, or a layer with input_shape);
-- without a known input it is built at the first forward, from the tensor's shape.
function Sequential.new(list, opts)
  opts = opts or {}
  if type(list) ~= 'table' then error('Sequential: expected a list of layers', 3) end
  local self = setmetatable({}, Sequential)
  Layer.init(self, {name = opts.name or list.name or nn.unique_name('sequential'), trainable = opts.trainable},
    Sequential)
  self._pending = {}
  self.built = false
  for i, l in ipairs(list) do
    if i == 1 and is_node(l) then
      self._input = l
      self._out = l
    else
      self:add(l)
    end
  end
  return self
end

function Sequential:add(layer)
  if getmetatable(layer) == nil or layer.class_name == nil then
    error('Sequential:add: expected a layer, got ' .. type(layer), 2)
  end
  if not self._input and layer.input_shape_opt then
    self._input = nn.Input(layer.input_shape_opt)
    self._out = self._input
  end
  if self._input then
    self._out = layer(self._out)
    self:_set_graph(self._input, self._out)
  else
    self._pending[#self._pending + 1] = layer
  end
  return self
end

function Sequential:_build_from(shape)
  self._input = nn.Input(shape)
  self._out = self._input
  local pending = self._pending
  self._pending = {}
  for _, l in ipairs(pending) do self._out = l(self._out) end
  self:_set_graph(self._input, self._out)
end

function Sequential:forward(input)
  if not self.built then
    if #self._pending == 0 then error(self:owner() .. ': has no layers', 2) end
    local ok, err = pcall(self._build_from, self, nn._tensor_shape(input))
    if not ok then error(err, 0) end
    if self.dtype ~= 'float32' then self:type(self.dtype) end
    if not self.train then self:evaluate() end
  end
  return Model.forward(self, input)
end

-- used as a layer before it was built: built from the input shape
function Sequential:build(s)
  if not self._input then self:_build_from(s) end
end

end
