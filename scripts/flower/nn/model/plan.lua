-- Planning and fusion for flower.nn models (loaded by flower.nn): for one forward, which nodes need
-- gradients, which values backward reads, and which layers run fused (see the hooks in the
-- protocol at the top of flower/nn.lua).

return function(nn)
local Model = nn.Model

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

-- runs node n's fused group f (chosen by _plan) on its input x
function Model:_run_fused(n, f, x, keep)
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

end
