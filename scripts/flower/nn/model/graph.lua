-- flower.nn models (loaded by flower.nn): Model, a graph of nodes, and Sequential -- building the
-- graph, its layers and weights, modes, types and devices. The other parts of a model are beside
-- this file: plan.lua (gradient flow, fusion), executor.lua (forward / backward, freeing),
-- mixed_precision.lua (the casts at a model's boundary), summary.lua (Keras's table).
return function(nn)
local Layer, class, is_node = nn.Layer, nn.class, nn.is_node

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
Model._for_layers = for_layers

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
    local ok, err = pcall(function()
      nn._check_batch(input, 'forward')
      self:_build_from(nn._tensor_shape(input))
    end)
    if not ok then error(nn._wrap_err(self, err), 2) end
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
