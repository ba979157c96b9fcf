-- The executor of flower.nn models (loaded by flower.nn): forward and backward over the graph in
-- construction order, freeing each value after its last reader (buffer reuse) and running the
-- fused groups that Model:_plan (flower/nn/model/plan.lua) chose; forward / backward / predict.
local flower = require 'flower'

return function(nn)
local C = nn.C
local Model, is_node = nn.Model, nn.is_node
local wrap_err = nn._wrap_err

-------------------------------------------------------------------------------- checks at the door

local float_dtypes = {float32 = true, float64 = true, bfloat16 = true}

local function size_str(t) return table.concat(t:size(), 'x') end
-- an input node's shape as the caller gives it: Nx8x8x3, unknown sizes as ?
local function input_str(n) return (('Nx' .. table.concat(n.shape, 'x')):gsub('%-1', '?')) end

-- what forward takes, for messages: "a tensor Nx8x8x3" or "a list of 2 tensors {Nx4, Nx4}"
local function inputs_str(self)
  if #self.inputs == 1 then return 'a tensor ' .. input_str(self.inputs[1]) end
  local r = {}
  for i, n in ipairs(self.inputs) do r[i] = input_str(n) end
  return string.format('a list of %d tensors {%s}', #self.inputs, table.concat(r, ', '))
end

-- the highest integer key of a list (its length even with holes: {t, nil, t})
local function list_len(xs)
  local n = 0
  for k in pairs(xs) do if math.type(k) == 'integer' and k > n then n = k end end
  return n
end

-- input tensor t for input node n (number i) against its shape, the batch of input 1 and the dtypes
-- the model computes with
local function check_input(self, i, n, t, batch)
  local name, want = n.layer.name, n.shape
  if not flower.is_tensor(t) then
    error(string.format("input %d ('%s') must be a tensor %s, got %s", i, name, input_str(n), type(t)), 0)
  end
  if t:dim() ~= #want + 1 then
    error(string.format("input %d ('%s') must have %d dims (batch, %s), got %d (shape %s)", i, name, #want + 1,
      nn.shape_str(want, false):sub(2, -2), t:dim(), size_str(t)), 0)
  end
  for k = 1, #want do
    if want[k] >= 0 and t:size(k + 1) ~= want[k] then
      if k == #want and #want == 3 then   -- an image: say it in channels
        error(string.format("input %d ('%s') has %d channels, the model expects %d (shape %s, expected %s)", i, name,
          t:size(k + 1), want[k], size_str(t), input_str(n)), 0)
      end
      error(string.format("input %d ('%s') has shape %s, the model expects %s", i, name, size_str(t), input_str(n)), 0)
    end
  end
  if batch and t:size(1) ~= batch then
    error(string.format("input %d ('%s') has batch size %d, input 1 has %d", i, name, t:size(1), batch), 0)
  end
  local dt = t:dtype()
  if (dt == 'float32' or dt == 'float64') and dt ~= self.dtype then
    error(string.format("input %d is %s, the model is %s (convert one of them: x:type(...) or model:type(...))",
      i, dt, self.dtype), 0)
  end
  if not float_dtypes[dt] and not self._own_cast[n] then   -- integer images go through Preprocess
    error(string.format("input %d ('%s') is %s, the layers reading it compute in %s (convert it with x:type('%s'), "
      .. 'or put a Preprocess layer first)', i, name, dt, self.dtype, self.dtype), 0)
  end
end

-- Checks what forward (verb) is given before anything runs: a tensor, or a list of one tensor per
-- model input, each of the input's rank, sizes and channels, one batch size, and a dtype the model
-- computes with. Returns the tensors as a list.
function Model:_check_inputs(x, verb)
  if is_node(x) then error(verb .. ' expects tensors; call the model on nodes to build a graph', 0) end
  local xs
  if flower.is_tensor(x) then xs = {x}
  elseif type(x) == 'table' and getmetatable(x) == nil then xs = x
  else error(string.format('%s expects %s, got %s', verb, inputs_str(self), type(x)), 0) end
  local n = list_len(xs)
  if n ~= #self.inputs then
    error(string.format('%s expects %d input tensor(s) (%s), got %d', verb, #self.inputs, inputs_str(self), n), 0)
  end
  for i, node in ipairs(self.inputs) do check_input(self, i, node, xs[i], i > 1 and xs[1]:size(1) or nil) end
  return xs
end

-- Checks gradOutput against the outputs of the forward that backward follows: a tensor (a list for
-- several outputs, nil entries for outputs without a gradient) of each output's shape and a float
-- dtype of the output's width.
function Model:_check_grad_output(gy)
  local st = self._state
  if not st or not st.plan.keep then
    error('backward needs a forward in training mode (model:training()) or with model.grad_enabled = true', 0)
  end
  local outs = self._single_output and {self.output} or self.output
  local gys
  if self._single_output then
    gys = {gy}
    if not flower.is_tensor(gy) then
      error(string.format('backward: gradOutput must be a tensor of the output\'s shape %s, got %s', size_str(outs[1]),
        type(gy)), 0)
    end
  else
    if type(gy) ~= 'table' or getmetatable(gy) ~= nil then
      error(string.format('backward: gradOutput must be a list of %d tensors (one per output; nil for none), got %s',
        #outs, type(gy)), 0)
    end
    gys = gy
    if list_len(gy) > #outs then
      error(string.format('backward: gradOutput has %d entries, the model has %d outputs', list_len(gy), #outs), 0)
    end
  end
  for i, o in ipairs(outs) do
    local g = gys[i]
    if g ~= nil then
      if not flower.is_tensor(g) then
        error(string.format('backward: gradOutput %d must be a tensor, got %s', i, type(g)), 0)
      end
      if size_str(g) ~= size_str(o) then
        error(string.format('backward: gradOutput %d has shape %s, output %d has %s', i, size_str(g), i,
          size_str(o)), 0)
      end
      local dt, odt = g:dtype(), o:dtype()
      if not float_dtypes[dt] or ((dt == 'float64' or odt == 'float64') and dt ~= odt) then
        error(string.format('backward: gradOutput %d is %s, output %d is %s', i, dt, i, odt), 0)
      end
    end
  end
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
  local xs = flower.is_tensor(x) and {x} or x   -- checked by Model:_forward (check_inputs)
  local tr = tracker()
  local values, remaining = {}, {}
  for i, n in ipairs(self.inputs) do
    values[n] = xs[i]
    tr:protect(xs[i])
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
      if nn.inplace and tr.reuse and not (keep and plan.ng[n]) and (not f or f.kind == 'relu')
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
      elseif f then ok, y = pcall(self._run_fused, self, n, f, xin, keep and plan.ng[n])
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
  return nn._run_as(self, 'output', self._forward, input, keep, true)
end

local function checked_backward(self, input, gradOutput)
  self:_check_inputs(input, 'backward')
  self:_check_grad_output(gradOutput)
  return self:_backward(input, self.output, gradOutput, self._need_gin)
end
function Model:backward(input, gradOutput) return nn._run_as(self, 'gradInput', checked_backward, input, gradOutput) end

-- predict(x [, batch_size]): inference in evaluate mode, batch by batch, results concatenated
-- x: a tensor, or a list of tensors for a model with several inputs (sliced alike)
function Model:predict(x, batch_size)
  local ok, err = pcall(function()
    if self.built then self:_check_inputs(x, 'predict') else nn._check_batch(x, 'predict') end
  end)
  if not ok then error(wrap_err(self, err), 2) end
  if batch_size ~= nil and (math.type(batch_size) ~= 'integer' or batch_size < 1) then
    error(string.format('%s: predict: batch_size must be an integer >= 1, got %s', self:owner(),
      tostring(batch_size)), 2)
  end
  local xs = flower.is_tensor(x) and {x} or x
  local n = xs[1]:size(1)
  batch_size = batch_size or math.max(n, 1)
  local was = self.train
  self:evaluate()
  local parts = {}
  ok, err = pcall(function()
    for s = 1, n, batch_size do
      local len = math.min(batch_size, n - s + 1)
      local slice = {}
      for i, t in ipairs(xs) do slice[i] = t:narrow(1, s, len) end
      parts[#parts + 1] = self:forward(flower.is_tensor(x) and slice[1] or slice)
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

end
