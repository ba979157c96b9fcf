-- flower.dist: data-parallel work across the ranks of a job, through MPI (host tensors) and NCCL
-- (CUDA tensors). Launch with `mpirun -np 2 ./flowerlua script.lua` (one host), `mpirun --hostfile
-- H ...` (several) or `srun ./flowerlua ...` (Slurm); a plain `./flowerlua` is rank 0 of 1 and
-- every call below is then a no-op (all_gather a copy).
--
--   local dist = require 'flower.dist'           -- or flower.dist
--   dist.rank(), dist.size(), dist.local_rank(), dist.is_main()   -- ranks count from 0
--   dist.barrier()
--   dist.allreduce(t, 'sum' | 'mean' | 'max' | 'min')   -- in place, returns t
--   dist.broadcast(t, root)                       -- in place: root's values everywhere (root 0)
--   dist.all_gather(t)                            -- new tensor: every rank's t along dim 1, rank
--                                                 -- order; the first dim may differ between ranks
--   dist.set_timeout(seconds), dist.timeout()     -- how long a rank waits for the others (300 s,
--                                                 -- or FLOWER_DIST_TIMEOUT): then an error, not a hang
-- A GPU tensor goes through NCCL (one communicator per job, rank r on cuda:<local_rank>), a host
-- tensor through MPI. Every collective first checks that all ranks called the same thing with the
-- same dtype and shape (an error on every rank otherwise, naming the ranks); see core/dist.h.
--
-- Training (flower.train calls these; see the hooks marked `dist` there):
--   dist.fit_context(model, opts, dev) -> nil when not distributed, else a context that shards each
--   epoch's batches (global batch b of the loader's order goes to rank (b-1) % size: a function of
--   the loader's seed and epoch, the rank and the size; the global batch is the sum of the ranks'),
--   averages gradients every step (weighted by each rank's batch size, so a short last batch counts
--   as in one process), keeps the loss and metrics global, agrees on interrupts, and lets only rank 0
--   write files and logs. BatchNorm statistics stay per rank (as PyTorch's DDP without SyncBatchNorm).
local flower = require 'flower'
local C = require('flower.core')._dist

local dist = {}

function dist.rank() return C.rank() end
function dist.size() return C.size() end
function dist.local_rank() return C.local_rank() end
function dist.local_size() return C.local_size() end
function dist.is_main() return C.rank() == 0 end
function dist.has_mpi() return C.has_mpi() end
function dist.has_nccl() return C.has_nccl() end
function dist.barrier() C.barrier() end
function dist.timeout() return C.timeout() end
function dist.set_timeout(s) C.set_timeout(s) end
-- seconds spent in collectives, bytes reduced and calls made by this rank so far
function dist.stats() return C.stats() end

local function tensor_arg(t, fname)
  if not flower.is_tensor(t) then error(string.format('dist.%s: expected a tensor, got %s', fname, type(t)), 3) end
end

function dist.allreduce(t, op)
  tensor_arg(t, 'allreduce')
  return C.allreduce(t, op or 'sum')
end

function dist.broadcast(t, root)
  tensor_arg(t, 'broadcast')
  if root ~= nil and math.type(root) ~= 'integer' then
    error('dist.broadcast: root must be an integer rank, got ' .. tostring(root), 2)
  end
  return C.broadcast(t, root or 0)
end

function dist.all_gather(t)
  tensor_arg(t, 'all_gather')
  return C.all_gather(t)
end

-- {numbers} summed (or 'max', 'min', 'mean') across ranks: a new list
function dist.allreduce_numbers(list, op) return C.allreduce_numbers(list, op or 'sum') end

-- Rank 0's string on every rank (a run directory's name).
function dist.broadcast_string(s)
  local n = C.size() > 1 and math.tointeger(C.allreduce_numbers({ C.rank() == 0 and #s or 0 }, 'max')[1]) or #s
  if C.size() == 1 then return s end
  local t = flower.zeros(math.max(n, 1), 'uint8')
  if C.rank() == 0 then for i = 1, n do t[i] = s:byte(i) end end
  C.broadcast(t, 0)
  local bytes = t:totable()
  return string.char(table.unpack(bytes, 1, n))
end

-- Whether a run with option `distributed` is distributed: nil: when launched as several ranks;
-- true: always (one rank too: a single GPU then goes through NCCL as many do); false: never.
-- Asking for it in a build without MPI that was launched as several ranks fails here (dist.size does).
function dist.wanted(opt)
  if opt == false then return false end
  return opt == true or C.size() > 1
end

---------------------------------------------------------------------------------------------------
-- Sharding: batch b (1-based, the loader's order) of an epoch belongs to rank (b-1) % size. A step
-- is one batch on every rank; the last step of an epoch may leave some ranks without one.

-- Steps per epoch for a loader of nb batches over size ranks.
function dist.steps(nb, size) return (nb + size - 1) // size end

-- Iterates this rank's share of loader:epoch(e): one entry per step, a batch or {n = 0} (no batch
-- for this rank at this step). Loaders with :epoch_shard(e, rank, size) (flower.data's image and
-- feature loaders) produce only their share: each rank decodes only its own images. Others are
-- walked in full and the other ranks' batches dropped.
function dist.shard(loader, e, rank, size)
  local nb = #loader
  local steps = dist.steps(nb, size)
  if loader.epoch_shard then
    local it = loader:epoch_shard(e, rank, size)
    local s = 0
    return function()
      s = s + 1
      if s > steps then return nil end
      return it() or { n = 0 }
    end
  end
  local it, seen, s = loader:epoch(e), 0, 0
  return function()
    s = s + 1
    if s > steps then
      while it() do end       -- finish the loader's epoch (its workers stop cleanly)
      return nil
    end
    local want = (s - 1) * size + rank + 1
    local b
    while seen < want do
      b = it()
      if b == nil then seen = nb break end
      seen = seen + 1
    end
    if seen ~= want or b == nil then return { n = 0 } end
    return b
  end
end

---------------------------------------------------------------------------------------------------
-- The training context

local Fit = {}
Fit.__index = Fit

local function finite(v) return v == v and v ~= math.huge and v ~= -math.huge end

-- The trainable weights' gradients, in a fixed order (the same on every rank: one model).
local function grads_of(model)
  local _, gs = model:parameters()
  return gs
end

-- dist.fit_context(model, opts, dev): opts.distributed (nil: on with several ranks), opts.bucket_mb
-- (25: the size of one gradient reduction), opts.sync_batchnorm (dist.sync_batchnorm(model)).
-- nil when the run is not distributed.
function dist.fit_context(model, o, dev)
  if not dist.wanted(o.distributed) then return nil end
  local self = setmetatable({ rank = C.rank(), size = C.size(), dev = dev, agreed_interrupt = nil,
                              bucket = math.floor((o.bucket_mb or 25) * 1024 * 1024) }, Fit)
  self.main = self.rank == 0
  if o.sync_batchnorm then dist.sync_batchnorm(model) end
  return self
end

-- Rank 0's weights (every weight: BatchNorm's moving statistics too) on every rank.
function Fit:broadcast_weights(model)
  for _, w in ipairs(model:weights()) do C.broadcast(w.tensor, 0) end
end

function Fit:barrier() C.barrier() end
function Fit:steps(loader) return dist.steps(#loader, self.size) end
function Fit:epoch(loader, e) return dist.shard(loader, e, self.rank, self.size) end

-- A log function that writes on rank 0 only.
function Fit:log(fn) if self.main then return fn end return function() end end

-- One step: forward on this rank's batch, global loss and metrics, backward, gradients summed
-- across ranks with weight n_rank / n_global (the mean over the global batch), optimizer step.
-- Returns the global loss, accuracy, top-k accuracies and batch size; the loss non-finite on any
-- rank makes it non-finite on all (every rank stops alike, before any update).
function Fit:step(model, batch, dev, lossfn, optimizer, ks, interrupted)
  local nn = require 'flower.nn'
  model:zero_grad()
  local n = batch.n or (batch.x and batch.x:size(1)) or 0
  local l, acc, g, tops = 0, 0, nil, {}
  if n > 0 then
    batch = require('flower.train').batch_to_device(batch, dev)
    local out = model:forward(batch.x)
    l, g = lossfn(out, batch.y)
    acc = nn.accuracy(out, batch.y)
    for _, k in ipairs(ks or {}) do tops[#tops + 1] = nn.top_k_accuracy(out, batch.y, k) end
  end
  local nums = { n, l * n, acc * n, interrupted and 1 or 0 }
  for i = 1, #(ks or {}) do nums[#nums + 1] = (tops[i] or 0) * n end
  local tot = C.allreduce_numbers(nums, 'sum')
  local N = tot[1]
  self.agreed_interrupt = tot[4] > 0 and (interrupted or 'interrupted on another rank') or nil
  local gtops = {}
  for i, k in ipairs(ks or {}) do gtops[k] = N > 0 and tot[4 + i] / N or 0 end
  local gl, gacc = N > 0 and tot[2] / N or 0, N > 0 and tot[3] / N or 0
  if not finite(gl) then return gl, gacc, gtops, N end
  if n > 0 then model:backward(batch.x, g) end
  local gs = grads_of(model)
  if n == 0 then for _, t in ipairs(gs) do t:fill(0) end end
  -- no_sync (as DDP's): this rank's own gradient, scaled as its share of the global batch, no
  -- reduction (gradient accumulation, benchmarks); the weights then drift apart until synced
  if self.no_sync then
    if N > 0 and n ~= N then for _, t in ipairs(gs) do t:mul_(n * self.size / N) end end
  else
    C.allreduce_grads(gs, N > 0 and n / N or 0, self.bucket)
  end
  if type(optimizer) == 'function' then optimizer(model) else optimizer:step(model) end
  return gl, gacc, gtops, N
end

-- The interrupt every rank agreed on at the last step (nil: none).
function Fit:interrupted() return self.agreed_interrupt end

---------------------------------------------------------------------------------------------------
-- Evaluation split across ranks (train.evaluate with a context): batch b of the loader goes to rank
-- (b-1) % size, sums are reduced, and collected rows come back on every rank in the loader's order.

-- Global sums of an evaluation: (sum of losses, correct, n, has_y); topsum is updated in place.
function Fit:reduce_sums(sum, correct, n, has_y, topsum, topk)
  local nums = { sum, correct, n, has_y and 1 or 0 }
  for i, k in ipairs(topk or {}) do nums[4 + i] = topsum[k] or 0 end
  local t = C.allreduce_numbers(nums, 'sum')
  for i, k in ipairs(topk or {}) do topsum[k] = t[4 + i] end
  return t[1], t[2], math.tointeger(t[3]) or t[3], t[4] > 0
end

-- train.evaluate(..., {collect = true}) over the ranks: each rank evaluates its share (as a loader
-- of its own batches), then rows are gathered and put back in the loader's order, so pred, labels,
-- index and probs are those of a single-process run (the numbers within float rounding: each row
-- is computed by one rank, in a batch of the same size as in one process).
function dist.evaluate_collect(train, model, loader, opts, D, dev)
  local counts = {}                      -- rows of each batch this rank evaluated, in order
  local share = setmetatable({}, { __len = function() return D:steps(loader) end })
  function share.epoch(_, e)
    local it = D:epoch(loader, e)
    return function()
      while true do
        local b = it()
        if b == nil then return nil end
        if b.n ~= 0 then counts[#counts + 1] = b.n; return b end
      end
    end
  end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.dist, o.progress = false, opts.progress ~= false and D.main
  local r = train.evaluate(model, share, o)
  -- sums over every rank
  local n_local = r.n
  local topsum = {}
  for k, v in pairs(r.top or {}) do topsum[k] = v * n_local end
  local has_y = r.loss ~= nil
  local sum, correct, n
  sum, correct, n, has_y = D:reduce_sums((r.loss or 0) * n_local, (r.acc or 0) * n_local, n_local, has_y, topsum, opts.topk)
  -- the rows: [pred, label, index] as int64 and the probabilities, gathered in rank order
  local width = C.allreduce_numbers({ r.probs and r.probs:size(2) or 0 }, 'max')[1]
  local keys = flower.zeros(n_local, 3):long()
  for i = 1, n_local do
    keys[i][1], keys[i][2], keys[i][3] = r.pred[i], r.labels[i] or 0, r.index[i]
  end
  local probs = r.probs or flower.zeros(0, math.tointeger(width))
  local all_keys, all_probs = C.all_gather(keys), C.all_gather(probs)
  -- each rank's batch sizes, padded to the steps of the epoch, tell where each batch's rows are
  local steps = D:steps(loader)
  local c = flower.zeros(1, math.max(steps, 1)):long()
  for i, v in ipairs(counts) do c[1][i] = v end
  local all_counts = C.all_gather(c):totable()     -- size x steps
  local start, off = {}, 0
  for rk = 1, D.size do
    start[rk] = off
    for _, v in ipairs(all_counts[rk]) do off = off + v end
  end
  local order, pos = {}, {}
  for rk = 1, D.size do pos[rk] = start[rk] end
  for s = 1, steps do
    for rk = 1, D.size do
      for _ = 1, all_counts[rk][s] do pos[rk] = pos[rk] + 1; order[#order + 1] = pos[rk] end
    end
  end
  local gather = require('flower.core')._data.gather_rows
  local k = #order > 0 and gather(all_keys, order):totable() or {}
  local out = { loss = has_y and n > 0 and sum / n or nil, acc = has_y and n > 0 and correct / n or nil, n = n, top = {},
                pred = {}, labels = {}, index = {} }
  for kk, v in pairs(topsum) do out.top[kk] = v / n end
  for i, row in ipairs(k) do
    out.pred[i], out.index[i] = row[1], row[3]
    if has_y then out.labels[i] = row[2] end
  end
  out.probs = #order > 0 and gather(all_probs, order) or nil
  return out
end

-- Rank 0's values of a few booleans / numbers (where an export continues, from rank 0's file).
function Fit:from_main(...)
  local vals, nums = table.pack(...), {}
  for i = 1, vals.n do
    local v = vals[i]
    nums[i] = v == true and 1 or v == false and 0 or v
  end
  local t = flower.tensor(nums, 'float64')
  C.broadcast(t, 0)
  local out = t:totable()
  for i = 1, vals.n do
    if type(vals[i]) == 'boolean' then out[i] = out[i] ~= 0 else out[i] = math.tointeger(out[i]) or out[i] end
  end
  return table.unpack(out, 1, vals.n)
end

-- An interrupt seen by any rank (its reason, or a note that another rank saw one), nil if none.
function Fit:any(why)
  local t = C.allreduce_numbers({ why and 1 or 0 }, 'max')
  if t[1] > 0 then return why or 'interrupted on another rank' end
  return nil
end

-- One step of a split inference: this rank's (feats (n, D), probs (n, K) or nil, index list) or
-- nils when it had no batch; returns every rank's rows in rank order (= the loader's order for the
-- step), with the index lists joined, or nothing when no rank had rows.
function Fit:gather_batches(feats, probs, idx)
  local n = feats and feats:size(1) or 0
  local w = C.allreduce_numbers({ n, feats and feats:size(2) or 0, probs and probs:size(2) or 0 }, 'max')
  local D, K = math.tointeger(w[2]), math.tointeger(w[3])
  if w[1] == 0 then return nil end
  local f = C.all_gather(feats and feats:contiguous() or flower.zeros(0, D))
  local p = K > 0 and C.all_gather(probs and probs:contiguous() or flower.zeros(0, K)) or nil
  local it = flower.zeros(n):long()
  for i = 1, n do it[i] = idx[i] end
  return f, p, C.all_gather(it):totable()
end

-- A stand-in for an h5 file on the ranks that do not write: writes go nowhere, reads find nothing.
function dist.null_file()
  local nop = function() end
  return setmetatable({}, { __index = function(_, k)
    if k == 'exists' then return function() return false end end
    if k == 'shape' then return function() return { 0 } end end
    return nop
  end, __close = nop })
end

---------------------------------------------------------------------------------------------------
-- Synchronised BatchNorm (PyTorch's SyncBatchNorm): opt in with dist.sync_batchnorm(model) (or
-- train.fit{sync_batchnorm = true}). Every BatchNormalization of the model that normalises with
-- batch statistics then uses the statistics of the global batch: the mean, then the variance
-- around it, each summed across ranks (two small collectives per layer and forward), and the
-- backward pass reduces sum(dy) and sum(dy * xhat) the same way, weighted so that each rank's
-- gradient stays in the units of its own mean loss (the trainer weights it by n_rank / n_global).
-- One process gives exactly the ordinary layer's numbers (up to rounding).

-- the per-channel sums travel through the host (a few numbers per layer: MPI, not NCCL)
local function to_host(t) return t:is_cuda() and t:cpu() or t end
local function like(t, x) return x:is_cuda() and t:cuda(x:get_device()) or t end

local function sync_forward(self, x, keep, relu)
  if not self:uses_batch_stats() then return self._plain_forward(self, x, keep, relu) end
  local nn = require 'flower.nn'
  local c = x:size(x:dim())
  local xs = x:contiguous():view(-1, c)
  local n = xs:size(1)
  local s1 = flower.cat({ to_host(xs:sum(1):view(-1)):double(), flower.tensor({ n }, 'float64') }, 1)
  C.allreduce(s1, 'sum')
  local N = s1[c + 1]
  local mean = like((s1:narrow(1, 1, c) / N):float(), x)
  local d = xs - mean:view(1, c)
  local s2 = to_host((d * d):sum(1):view(-1)):double()
  C.allreduce(s2, 'sum')
  local var = like((s2 / N):float(), x)
  local invstd = 1 / (var + self.epsilon):sqrt()
  local scale = self.gamma and (self.gamma * invstd) or invstd
  local shift = -(mean * scale)
  if self.beta then shift:add_(self.beta) end
  -- the moving statistics as the C kernel updates them (unbiased variance for 4-d inputs, as tf-keras)
  local unbiased = (x:dim() == 4 and N > 1) and var * (N / (N - 1)) or var
  nn.C.axpby(self.moving_mean, 1 - self.momentum, mean, self.momentum)
  nn.C.axpby(self.moving_variance, 1 - self.momentum, unbiased, self.momentum)
  if keep then self._saved = { mean = mean, invstd = invstd, batch = true, n = n, N = N } end
  return nn.C.channel_affine(x, scale, shift, relu)
end

local function sync_backward(self, x, y, gy, need_gin, need_params, relu)
  local s = self._saved
  if not s or not s.N then return self._plain_backward(self, x, y, gy, need_gin, need_params, relu) end
  self._saved = nil
  local nn = require 'flower.nn'
  local c = x:size(x:dim())
  local g = relu and nn.C.act_backward('relu', gy, y) or gy
  local gs = g:contiguous():view(-1, c)
  local xhat = (x:contiguous():view(-1, c) - s.mean:view(1, c)) * s.invstd:view(1, c)
  local sdy, sdyx = gs:sum(1):view(-1), (gs * xhat):sum(1):view(-1)
  if need_params then
    local function acc(name, v)
      local t, beta = self:grad_beta(name)
      if beta == 0 then t:copy(v) else t:add_(v) end
    end
    if self.gamma then acc('gamma', sdyx) end
    if self.beta then acc('beta', sdy) end
  end
  if not need_gin then return nil end
  -- A, B: sum over every rank of (n_rank / N) * sum(dy), * sum(dy * xhat)
  local ab = to_host(flower.cat({ sdy, sdyx }, 1)):double():mul(s.n / s.N)
  C.allreduce(ab, 'sum')
  ab = like(ab:float(), x)
  local A, B = ab:narrow(1, 1, c):view(1, c), ab:narrow(1, c + 1, c):view(1, c)
  local k = self.gamma and (self.gamma * s.invstd) or s.invstd
  local gx = (gs - (A + xhat * B) / s.n) * k:view(1, c)
  return gx:view(table.unpack(x:size()))
end

-- Makes every BatchNormalization of the model synchronised (see above); returns how many.
function dist.sync_batchnorm(model)
  local nn = require 'flower.nn'
  local count = 0
  for _, l in ipairs(model._leaves and (model:_leaves()) or { model }) do
    if getmetatable(l) and l.class_name == 'BatchNormalization' and not l._plain_forward then
      l._plain_forward, l._plain_backward = nn.BatchNormalization._forward, nn.BatchNormalization._backward
      l._forward, l._backward = sync_forward, sync_backward
      l.fuses_relu = true
      count = count + 1
    end
  end
  return count
end

-- A checkpoint's step within its epoch in the steps of a run of `size` ranks: written mid-epoch by
-- `ranks` ranks, it has consumed step * ranks batches of the epoch, which must split evenly.
function dist.resume_step(step, ranks, size, path)
  ranks, size = ranks or 1, size or 1
  if not step or step == 0 or ranks == size then return step or 0 end
  local batches = step * ranks
  if batches % size ~= 0 then
    error(string.format('train.fit: %s was written mid-epoch by %d rank(s) after %d batches of the epoch, '
      .. 'which %d rank(s) cannot split evenly; resume with %d rank(s), or from an epoch-end checkpoint',
      path or 'the checkpoint', ranks, batches, size, ranks), 0)
  end
  return batches // size
end

return dist
