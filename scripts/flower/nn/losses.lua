-- flower.nn losses and metrics (loaded by flower.nn).
--
--   local loss = nn.CategoricalCrossentropy{from_logits=true, label_smoothing=0.1}
--   local l = loss:forward(output, target)      -- a number: the batch mean (Keras's reduction)
--   local g = loss:backward(output, target)     -- dL/doutput, to pass to model:backward
--   nn.softmax_cross_entropy(logits, target, {label_smoothing=0.1}) -> loss, grad  (fused, stable)
--   nn.accuracy(output, target), nn.top_k_accuracy(output, target, 5) -> fraction in [0, 1]
--   nn.one_hot(labels, K)
-- target: integer class labels (N) — 1-based, as argmax gives them — or probabilities / one-hot
-- rows (N, K). With probabilities from a softmax output (from_logits=false) the loss follows
-- Keras: rows are renormalised, clipped to [1e-7, 1 - 1e-7], and -sum(t*log p) averaged.
local flower = require 'flower'

return function(nn)
local C = nn.C
local class = nn.class

local function is_label(t) local d = t:dtype(); return d == 'int64' or d == 'int32' end

local function check_pair(fname, output, target)
  if not flower.is_tensor(output) or output:dim() ~= 2 then
    error(fname .. ': output must be a (N, K) tensor', 3)
  end
  if not flower.is_tensor(target) then error(fname .. ': target must be a tensor', 3) end
  local n, k = output:size(1), output:size(2)
  if is_label(target) then
    if target:dim() ~= 1 or target:size(1) ~= n then
      error(string.format('%s: labels must have shape (%d), got (%s)', fname, n, table.concat(target:size(), ',')), 3)
    end
  elseif target:dim() == 1 then
    error(string.format('%s: labels must be an integer tensor (int64 or int32) of classes 1..%d, got %s; convert '
      .. "them with :type('int64')", fname, k, target:dtype()), 3)
  elseif target:dim() ~= 2 or target:size(1) ~= n or target:size(2) ~= k then
    error(string.format('%s: target must be labels (%d) or probabilities (%d, %d), got (%s)', fname, n, n, k,
      table.concat(target:size(), ',')), 3)
  end
end

-- 1-based labels (N) -> one-hot rows (N, K) of dtype, on the device of `ref` (default: labels)
function nn.one_hot(labels, k, dtype, ref)
  local n = labels:size(1)
  local t = nn.like(labels, {n, k}, dtype or 'float32')     -- built on the host, moved at the end
  local l = labels:cpu():totable()
  for i = 1, n do
    local c = l[i]
    if math.type(c) ~= 'integer' or c < 1 or c > k then
      error(string.format('one_hot: label %s of row %d is outside 1..%d', tostring(c), i, k), 2)
    end
    t:narrow(1, i, 1):narrow(2, c, 1):fill(1)
  end
  return nn.to_device(t, nn.device_of(ref or labels))
end

-- Fused softmax + cross-entropy on logits: returns the mean loss (a number) and dL/dlogits.
-- opts: label_smoothing (0), reduction ('mean' | 'sum' | 'none': then the loss is a (N) tensor)
function nn.softmax_cross_entropy(logits, target, opts)
  opts = opts or {}
  check_pair('softmax_cross_entropy', logits, target)
  local n = logits:size(1)
  local red = opts.reduction or 'mean'
  local scale = red == 'mean' and 1 / n or 1
  local tgt = target
  if is_label(target) then tgt = target - 1 end      -- the C kernel counts classes from 0
  local ok, loss, grad = pcall(C.softmax_xent, logits, tgt, opts.label_smoothing or 0, scale, opts.grad ~= false)
  if not ok then
    -- the kernel's classes count from 0, the caller's from 1: say it in the caller's terms
    local l, row, k = tostring(loss):match('label (%-?%d+) of row (%d+) is outside %[0, (%d+)%)')
    if l then
      error(string.format('softmax_cross_entropy: label %d of row %s is outside 1..%s (labels count classes from 1)',
        math.tointeger(l) + 1, row, k), 2)
    end
    error(loss, 0)
  end
  if red == 'none' then return loss, grad end
  local s = loss:sum():item()
  return red == 'mean' and s / n or s, grad
end

local CategoricalCrossentropy = class('CategoricalCrossentropy')
nn.CategoricalCrossentropy = CategoricalCrossentropy

local EPS = 1e-7

function CategoricalCrossentropy.new(opts)
  opts = opts or {}
  local self = setmetatable({}, CategoricalCrossentropy)
  self.from_logits = opts.from_logits == true
  self.label_smoothing = opts.label_smoothing or 0
  if type(self.label_smoothing) ~= 'number' or self.label_smoothing < 0 or self.label_smoothing > 1 then
    error('CategoricalCrossentropy: label_smoothing must be in [0, 1]', 2)
  end
  self.name = opts.name or 'categorical_crossentropy'
  return self
end

-- smoothed probability targets (N, K)
function CategoricalCrossentropy:_targets(output, target)
  local k = output:size(2)
  local t = is_label(target) and nn.one_hot(target, k, output:dtype(), output) or target
  if t:dtype() ~= output:dtype() then t = t:type(output:dtype()) end
  if self.label_smoothing > 0 then t = t * (1 - self.label_smoothing) + self.label_smoothing / k end
  return t
end

function CategoricalCrossentropy:forward(output, target)
  check_pair(self.name, output, target)
  if self.from_logits then
    local l, g = nn.softmax_cross_entropy(output, target, {label_smoothing = self.label_smoothing})
    self._grad = g
    self.output = l
    return l
  end
  local t = self:_targets(output, target)
  local p = output / output:sum(2, true)
  p:clamp_(EPS, 1 - EPS)
  local l = -(t * p:log()):sum():item() / output:size(1)
  self.output = l
  return l
end

function CategoricalCrossentropy:backward(output, target)
  check_pair(self.name, output, target)
  local n = output:size(1)
  if self.from_logits then
    local g = self._grad
    self._grad = nil
    if not g then
      local _
      _, g = nn.softmax_cross_entropy(output, target, {label_smoothing = self.label_smoothing})
    end
    return g
  end
  -- L = -1/N sum t*log(clip(p/S)), S = row sums: dL/dp = (-t/q * [q inside the clip] + sum(t*[..]/q*q)/S)/N
  local t = self:_targets(output, target)
  local s = output:sum(2, true)
  local q = output / s
  local inside = q:gt(EPS):type(output:dtype()):mul_(q:lt(1 - EPS):type(output:dtype()))
  local a = (t / q:clamp(EPS, 1 - EPS)):mul_(inside)        -- d(-L*N)/dq
  -- q = p/S: dq_i/dp_j = (delta_ij - q_i)/S, so dL/dp_j = -(a_j - sum_i a_i q_i)/S / N
  local dot = (a * q):sum(2, true)
  return ((a - dot) / s):mul_(-1 / n)
end

-- integer labels: the same loss
function nn.SparseCategoricalCrossentropy(opts)
  local l = CategoricalCrossentropy.new(opts)
  l.name = (opts and opts.name) or 'sparse_categorical_crossentropy'
  return l
end

-- labels (N) from integer targets or from probability rows
local function labels_of(output, target)
  if is_label(target) then return target end
  return target:argmax(2):view(-1)
end

-- fraction of rows whose argmax is the target class
function nn.accuracy(output, target)
  check_pair('accuracy', output, target)
  local pred = output:argmax(2):view(-1)
  local lab = labels_of(output, target)
  return pred:eq(lab:type(pred:dtype())):sum():item() / output:size(1)
end

-- fraction of rows whose target class is among the k highest scores (ties count as inside, like
-- tf.math.in_top_k)
function nn.top_k_accuracy(output, target, k)
  check_pair('top_k_accuracy', output, target)
  k = k or 5
  local n, kk = output:size(1), output:size(2)
  local lab = labels_of(output, target)
  local mask = nn.one_hot(lab, kk, output:dtype(), output)
  local st = (output * mask):sum(2, true)                 -- the target's score, (N, 1)
  local above = output:gt(st):type('int64'):sum(2)        -- classes scoring strictly higher
  return above:lt(k):type('int64'):sum():item() / n
end

-- Keras adds each regularizer's penalty to the loss: l2 * sum(w^2) per regularized weight.
-- obj: a model or layer (its trainable weights) or a list of weight records.
function nn.regularization_loss(obj)
  local recs = obj.trainable_weights and obj:trainable_weights() or obj
  local s = 0
  for _, w in ipairs(recs) do
    if w.regularizer then s = s + w.regularizer.l2 * (w.tensor * w.tensor):sum():item() end
  end
  return s
end

end
