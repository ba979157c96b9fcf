-- bfloat16 mixed precision for flower.nn models (loaded by flower.nn): the policy and the casts at
-- a model's boundary around the executor (flower/nn/model/executor.lua).
local flower = require 'flower'

return function(nn)
local Model, is_node = nn.Model, nn.is_node
local for_layers, leaves = Model._for_layers, Model._leaves


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
  self:_check_inputs(x, 'forward')
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

end
