-- The executor of flower.nn models (loaded by flower.nn): forward and backward over the graph in
-- construction order, freeing each value after its last reader (buffer reuse) and running the
-- fused groups that Model:_plan (flower/nn/model/plan.lua) chose; forward / backward / predict.
local flower = require 'flower'

return function(nn)
local C = nn.C
local Model, is_node = nn.Model, nn.is_node
local wrap_err = nn._wrap_err

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

end
