-- Planning and fusion for flower.nn models (loaded by flower.nn): for one forward, which nodes need
-- gradients, which values backward reads, and which layers run fused. The plan asks the layers
-- what they can do through the hooks of the layer protocol (top of flower/nn.lua): needs,
-- fuses_relu, is_relu, folds_affine / is_affine / affine, can_fold_pad / zero_padding,
-- can_omit_bias / absorbs_bias. It never looks at class names.

return function(nn)
local Model = nn.Model

-- ng[n]: node n needs a gradient (some layer at or above it, towards the inputs, has trainable
-- weights); need_params[n]: its layer accumulates parameter gradients
local function gradient_flow(self, keep)
  local ng, need_params = {}, {}
  for _, n in ipairs(self.nodes) do
    if self._is_input[n] then
      ng[n] = keep and self._need_gin or false
    else
      local tp = keep and n.layer:has_trainable() or false
      local g = tp
      if keep then for _, p in ipairs(n.inputs) do if ng[p] then g = true end end end
      ng[n], need_params[n] = g, tp
    end
  end
  return ng, need_params
end

-- retain[n]: node n's value stays until backward has run (a layer's backward reads it)
local function retained(self, ng, need_params)
  local retain = {}
  for _, n in ipairs(self.nodes) do
    if ng[n] and not self._is_input[n] then
      local gin = false
      for _, p in ipairs(n.inputs) do if ng[p] then gin = true end end
      local nx, ny = n.layer:needs(gin, need_params[n])
      if nx then for _, p in ipairs(n.inputs) do retain[p] = true end end
      if ny then retain[n] = true end
    end
  end
  return retain
end

-- Works out, for one forward, which nodes need gradients, which values backward will read, and
-- which groups run fused, where no intermediate value is needed elsewhere:
--  'conv':    a folds_affine layer -> an is_affine layer (inference BatchNorm) (-> ReLU) as one
--             call of the first one's _forward_fused, where no gradient flows;
--  'pad':     a zero_padding layer -> a layer that can_fold_pad, the padding in the window;
--  'bias_bn': a layer that can_omit_bias -> a layer that absorbs_bias (training BatchNorm);
--  'relu':    a fuses_relu layer -> ReLU as one pass, with or without gradients (the layer's
--             backward then masks gy by the ReLU output, which it keeps instead of its own output).
function Model:_plan(keep)
  local cons = self._consumers
  local ng, need_params = gradient_flow(self, keep)
  local retain = retained(self, ng, need_params)
  local fused, skip, relu_into, padfold, bias_into = {}, {}, {}, {}, {}
  local function single(n) return #cons[n] == 1 and not self._is_output[n] and not retain[n] and cons[n][1] end
  local function relu_after(n)
    local r = single(n)
    return r and not ng[r] and r.layer:is_relu() and r or nil
  end
  if not nn.fusion then
    return {ng = ng, retain = retain, need_params = need_params, fused = fused, skip = skip, keep = keep,
            relu_into = relu_into, padfold = padfold, bias_into = bias_into}
  end
  -- padding -> convolution without gradients: the padding goes into the convolution's window
  for _, n in ipairs(self.nodes) do
    local z = n.inputs[1]
    local pad = z and not ng[n] and not ng[z] and not self._is_input[z] and single(z) == n and z.layer:zero_padding()
    local s = pad and z.inputs[1].shape
    if s and n.layer:can_fold_pad(pad, s[1], s[2]) then padfold[n] = {node = z, pad = pad}; skip[z] = true end
  end
  for _, n in ipairs(self.nodes) do
    local l = n.layer
    if not skip[n] and not self._is_input[n] then
      local nxt = single(n)
      if not ng[n] and nxt and not ng[nxt] and l:folds_affine() and nxt.layer:is_affine() then
        local relu = relu_after(nxt)
        fused[n] = {kind = 'conv', bn = nxt, relu = relu, pad = padfold[n] and padfold[n].pad}
        skip[nxt] = true
        if relu then skip[relu] = true end
      elseif padfold[n] then
        fused[n] = {kind = 'pad', pad = padfold[n].pad}
      elseif ng[n] and #cons[n] == 1 and not self._is_output[n] and ng[cons[n][1]] and l:can_omit_bias()
          and cons[n][1].layer:absorbs_bias() then
        -- a bias before a batch-statistics BatchNormalization cancels in its output (the batch mean
        -- moves with it): the convolution skips the bias pass and the BN adds (1-momentum)*bias to
        -- its moving mean, which is what the mean of (conv + bias) would have put there. Backward is
        -- unchanged (the bias gradient is the column sum of the BN's input gradient either way).
        -- The BN is the only reader of the convolution's value (its backward keeps it).
        fused[n] = {kind = 'bias_bn'}
        bias_into[cons[n][1]] = n
      elseif l.fuses_relu and nxt and nxt.layer:is_relu() and ng[nxt] == ng[n] then
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

-- runs node n's fused group f (chosen by _plan) on its input x
function Model:_run_fused(n, f, x, keep)
  local l = n.layer
  if f.kind == 'relu' then return l:_forward(x, keep, true) end
  if f.kind == 'pad' then return l:_forward_fused(x, nil, l.bias, false, f.pad) end
  if f.kind == 'bias_bn' then return l:_forward(x, keep, true) end
  local scale, shift = f.bn.layer:affine()
  if l.bias then
    local s = (l.bias * scale):add_(shift)
    shift:free()
    shift = s
  end
  local y = l:_forward_fused(x, scale, shift, f.relu ~= nil, f.pad)
  scale:free()
  shift:free()
  return y
end

end
