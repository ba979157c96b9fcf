-- flower.train: the training loop, its callbacks, checkpoints and freeze/unfreeze stages.
--
--   local train = require 'flower.train'
--   local hist = train.fit(model, {
--     train = loader, valid = vloader,        -- loaders: loader:epoch(e) yields {x, y, n}; #loader
--                                             -- or, as Keras's fit(x, y), tensors in memory:
--                                             -- x = X, y = Y, batch_size = 32, shuffle = true,
--                                             -- seed = 0, validation_data = {Xv, Yv}
--     optimizer = optim.Adam{lr = 1e-3},      -- flower.optim optimizer
--     loss = 'logits',                        -- fused softmax cross-entropy on logits (default);
--                                             -- 'categorical_crossentropy' on softmax outputs; or an
--                                             -- object with forward/backward (flower.nn losses)
--     epochs = 5,                             -- the last epoch (absolute, like Keras's `epochs`)
--     initial_epoch = 0,                      -- epochs already done (a later stage starts later)
--     metrics = {'acc', 'top5'},              -- accuracy always; 'top<k>' adds top<k> and val_top<k>
--                                             -- (progress line, history, history.csv)
--     callbacks = {train.EarlyStopping{patience = 2}, train.ReduceLROnPlateau{patience = 2},
--                  train.LearningRateScheduler(optim.cosine{lr = 1e-3, decay_steps = 5})},
--     checkpoint_dir = 'runs/x/ckpt/cnn',     -- last.h5 every epoch (and on interrupt); best.h5
--     save_best = 'val_acc',                  -- with the best `val_acc` so far (false: none)
--     resume = true,                          -- continue from checkpoint_dir/last.h5 if present
--     history = hist,                         -- rows are appended (several stages, one history)
--     history_csv = 'runs/x/history.csv',     -- rewritten atomically after every epoch
--     stage = 1, label = 'cnn head',          -- recorded in the history / shown in the bar
--     progress = false,                       -- no bar (or {out =, tty =, interval =}: its options)
--     device = 'cuda',                        -- 'cpu' (default), 'cuda', 'cuda:<n>' or 'auto'
--     mixed_precision = 'bfloat16',           -- model:mixed_precision(...) before training: bf16
--                                             -- activations, float32 weights and optimizer state
--                                             -- ('float32' / false turns it off; nil leaves the model's)
--     distributed = true,                     -- data parallel over the job's ranks (flower.dist);
--                                             -- nil: on when launched as several ranks, false: off
--     sync_batchnorm = true,                  -- with distributed: BatchNorm on the global batch's
--                                             -- statistics (default: each rank's own)
--   })
--   -- hist.rows = {{stage, epoch, loss, acc, val_loss, val_acc, lr, seconds, images_per_s}, ...}
--   -- hist.stopped = nil | 'early_stopping' | 'interrupted'; hist.interrupted = 'SIGINT' | ...
--
-- Exactness of resume: a checkpoint (nn.save_checkpoint's format) holds the weights (BatchNorm
-- moving statistics included), the optimizer's state, the epoch and the step within it, the global
-- RNG state and every seeded Dropout's stream offset, every callback's state, the learning rate, the
-- best monitored value, the running sums of the epoch and the history. Loaders give batches as a
-- function of (seed, epoch) only, so a resumed run sees the same batches, and its weights, history
-- and best checkpoint are bit-identical to an uninterrupted run's, wherever it stopped
-- (tests/lua/test_train_resume.lua: SIGINT after every step, SIGKILL at every checkpoint write).
-- Crash tests: FLOWER_KILLPOINT='train.step:<n>' kills the process after its n-th optimizer step.
--
-- Interrupts: while fit runs, SIGINT and SIGTERM (through flower.core._util) only raise a flag;
-- the current step finishes, a checkpoint is written and fit returns with hist.stopped =
-- 'interrupted' (a second Ctrl-C kills at once). One that comes in the last epoch is reported too
-- (the epoch completes and is saved), so that fit_stages or a pipeline stops instead of going on;
-- a reported interrupt is cleared. Without _util, the host's Ctrl-C error is caught:
-- the interrupted epoch is lost and the run continues from the last epoch's checkpoint.
-- A NaN or infinite loss raises an error naming the epoch and the step; the last checkpoint on disk
-- is the last good one (nothing is written after a bad step).
--
-- Devices: with device = 'cuda' the model moves to the GPU (model:cuda()) before anything else and
-- stays there; each batch goes up with flower.cuda.to_device_async (the upload overlaps the previous
-- step's backward pass; a loader made with pin_memory = true hands out page-locked batches, which
-- the GPU copies by DMA), its labels with y:cuda(). Losses and metrics come back as numbers,
-- checkpoints hold host data (a GPU run's checkpoint loads on a CPU-only machine, and a resumed
-- run may change device). Without the option, fit and evaluate run where the model is. Asking
-- for a device that is not there fails before anything is done, with flower.cuda's reason.
local flower = require 'flower'
local files = require 'flower.files'
local progress = require 'flower.progress'

local train = {}

local function nn() return require 'flower.nn' end

local function fail(fmt, ...) error('train.fit: ' .. string.format(fmt, ...), 3) end

---------------------------------------------------------------------------------------------------
-- Interrupt flag

local requested
-- Asks a running fit to stop after its current step (tests, callbacks).
function train.request_interrupt(reason) requested = reason or 'request' end

-- nil, or the reason the run should stop ('SIGINT', 'SIGTERM', or a requested reason)
function train.interrupted()
  if requested then return requested end
  local u = files.util()
  if u then return u.interrupted() end
  return nil
end

-- Forgets a pending interrupt (fit and export call it when they start).
local function clear_interrupt()
  requested = nil
  local u = files.util()
  if u then u.clear_interrupt() end
end
train.clear_interrupt = clear_interrupt

---------------------------------------------------------------------------------------------------
-- Devices

-- train.resolve_device(spec [, who]) -> nil (the host) or a CUDA device index (0, 1, ...).
-- spec: nil, false or 'cpu' (the host); 'cuda' (device 0), 'cuda:<n>' or an integer n; 'auto'
-- (device 0 when flower.cuda.available(), else the host). A device that is not there raises here,
-- "<who>: device 'cuda': <flower.cuda.unavailable_reason()>", so that a run fails before it starts.
function train.resolve_device(spec, who)
  who = who or 'device'
  if spec == nil or spec == false or spec == 'cpu' then return nil end
  local cuda = flower.cuda
  if spec == 'auto' then return cuda.available() and 0 or nil end
  local dev
  if math.type(spec) == 'integer' then dev = spec
  elseif type(spec) == 'string' then
    if spec == 'cuda' then dev = 0 else dev = math.tointeger(tonumber(spec:match('^cuda:(%d+)$'))) end
  end
  if dev == nil or dev < 0 then
    error(string.format("%s: device must be 'cpu', 'cuda', 'cuda:<n>' or 'auto', got %s", who,
      type(spec) == 'string' and ("'" .. spec .. "'") or tostring(spec)), 0)
  end
  if not cuda.available() then
    error(string.format("%s: device '%s': %s", who, tostring(spec), cuda.unavailable_reason()), 0)
  end
  if dev >= cuda.device_count() then
    error(string.format("%s: device '%s': there %s %d CUDA device%s (0..%d)", who, tostring(spec),
      cuda.device_count() == 1 and 'is' or 'are', cuda.device_count(), cuda.device_count() == 1 and '' or 's',
      cuda.device_count() - 1), 0)
  end
  return dev
end

local function model_device(model)
  local d = model.get_device and model:get_device() or -1
  if d ~= nil and d >= 0 then return d end
  return nil
end

-- The device a run uses, with the model moved there: the one asked for (resolved as above), else
-- the model's own (nil: the host). A model already there is left alone.
local function run_device(model, spec, who)
  local dev = model_device(model)
  if spec == nil then return dev end
  local want = train.resolve_device(spec, who)
  if want ~= dev then
    if want == nil then model:cpu() else model:cuda(want) end
  end
  return want
end
train.run_device = run_device

-- A batch {x, y, n, index} with x and y on device dev (the batch itself for the host): x without
-- waiting for the copy (flower.cuda.to_device_async), y (a few labels) with an ordinary copy.
function train.batch_to_device(batch, dev)
  if dev == nil then return batch end
  local b = {}
  for k, v in pairs(batch) do b[k] = v end
  b.n = batch.n or batch.x:size(1)
  b.x = flower.cuda.to_device_async(batch.x, dev)
  if batch.y ~= nil then b.y = batch.y:cuda(dev) end
  return b
end

---------------------------------------------------------------------------------------------------
-- Losses and steps

-- loss spec -> function(output, target) returning loss (number) and dL/doutput
local function make_loss(spec)
  if spec == nil or spec == 'logits' or spec == 'softmax_cross_entropy' then
    return function(out, y) return nn().softmax_cross_entropy(out, y) end
  elseif spec == 'categorical_crossentropy' then
    local l = nn().CategoricalCrossentropy {}
    return function(out, y)
      local v = l:forward(out, y)
      return v, l:backward(out, y)
    end
  elseif type(spec) == 'function' then
    return spec
  elseif type(spec) == 'table' and spec.forward and spec.backward then
    return function(out, y)
      local v = spec:forward(out, y)
      return v, spec:backward(out, y)
    end
  end
  error("train: loss must be 'logits', 'categorical_crossentropy', a function or an object with forward/backward", 3)
end
train.make_loss = make_loss

local function finite(v) return v == v and v ~= math.huge and v ~= -math.huge end

-- The regularization penalty Keras adds to the loss (for display; the optimizer adds the gradient).
local function penalty(model)
  local f = nn().regularization_loss
  if f then return f(model) end
  return 0
end

-- One optimizer update from the gradients accumulated in the model.
local function optimizer_step(opt, model)
  if type(opt) == 'function' then return opt(model) end
  return opt:step(model)
end

-- Top-k accuracies {[k] = fraction} of a batch for the ks asked for (metrics 'top5', ...).
local function topk_of(out, y, ks)
  local r = {}
  for _, k in ipairs(ks or {}) do r[k] = nn().top_k_accuracy(out, y, k) end
  return r
end

-- metrics = {'acc', 'top5'} -> {5}: the k of each top-k metric ('acc' is always computed)
local function metric_ks(metrics)
  local ks = {}
  for _, m in ipairs(metrics or {}) do
    local k = type(m) == 'string' and tonumber(m:match('^top_?(%d+)$'))
    if k then ks[#ks + 1] = math.tointeger(k)
    elseif m ~= 'acc' and m ~= 'accuracy' then
      error("train.fit: unknown metric '" .. tostring(m) .. "' (expected 'acc' or 'top<k>', e.g. 'top5')", 3)
    end
  end
  return ks
end

-- One training step on a batch: returns loss, accuracy and top-k accuracies (fractions over the batch).
function train.step(model, batch, lossfn, optimizer, ks)
  if type(batch) ~= 'table' or batch.x == nil then
    error('train.step: argument 2 must be a batch {x = inputs, y = targets}, got ' .. type(batch), 2)
  end
  if type(lossfn) ~= 'function' then
    error(string.format("train.step: argument 3 must be a loss function(output, target) -> loss, grad, got %s %s; "
      .. "make one with train.make_loss('logits')", type(lossfn), tostring(lossfn)), 2)
  end
  model:zero_grad()
  local out = model:forward(batch.x)
  local l, g = lossfn(out, batch.y)
  local acc = nn().accuracy(out, batch.y)
  local tops = topk_of(out, batch.y, ks)
  if not finite(l) then return l, acc, tops end
  model:backward(batch.x, g)
  -- the gradients of this batch are complete here, before the optimizer's update
  optimizer_step(optimizer, model)
  return l, acc, tops
end

-- Evaluates a model over a loader: {loss, acc, n}. With opts.collect, also pred (list of predicted
-- labels), labels (list), index (data set indices) and probs (a (N, K) host tensor of outputs), in
-- loader order. opts.softmax turns logits into probabilities in `probs`. opts.device as fit's
-- (default: where the model is; the model is moved there).
function train.evaluate(model, loader, opts)
  opts = opts or {}
  local dev = run_device(model, opts.device, 'train.evaluate')
  -- dist: each rank evaluates its share of the batches; sums are reduced below
  local D = opts.dist
  if D == nil then D = require('flower.dist').fit_context(model, opts, dev) end
  D = D or nil
  if D and opts.collect then return require('flower.dist').evaluate_collect(train, model, loader, opts, D, dev) end
  local lossfn = make_loss(opts.loss)
  local was = model.train
  model:evaluate()
  local sum, correct, n, has_y = 0, 0, 0, false
  local topsum = {}
  local pred, labels, index, parts = {}, {}, {}, {}
  local bar = opts.progress ~= false and (not D or D.main)
    and progress.new { total = D and D:steps(loader) or #loader, label = opts.label or 'evaluate' } or nil
  local step = 0
  local ok, err = pcall(function()
    for hbatch in (D and D:epoch(loader, opts.epoch or 1) or loader:epoch(opts.epoch or 1)) do
     if hbatch.n ~= 0 then   -- dist: a rank may have no batch at the last step
      local batch = train.batch_to_device(hbatch, dev)
      local out = model:forward(batch.x)
      local bn = batch.n or out:size(1)
      if batch.y then
        has_y = true
        local l = lossfn(out, batch.y)
        sum = sum + l * bn
        correct = correct + nn().accuracy(out, batch.y) * bn
        for k, v in pairs(topk_of(out, batch.y, opts.topk)) do topsum[k] = (topsum[k] or 0) + v * bn end
      end
      n = n + bn
      if opts.collect then
        if dev ~= nil then out = out:cpu() end
        local p = out:argmax(2):view(-1):totable()
        for i = 1, #p do pred[#pred + 1] = p[i] end
        if hbatch.y then
          local y = hbatch.y:totable()
          for i = 1, #y do labels[#labels + 1] = y[i] end
        end
        for i = 1, bn do index[#index + 1] = batch.index and batch.index[i] or #index + 1 end
        parts[#parts + 1] = opts.softmax and out:softmax(2) or out:clone()
      end
     end
      step = step + 1
      if bar then bar:update(step) end
    end
  end)
  if was then model:training() end
  if not ok then error(err, 0) end
  if bar then bar:finish() end
  if D then sum, correct, n, has_y = D:reduce_sums(sum, correct, n, has_y, topsum, opts.topk) end
  local r = { loss = n > 0 and sum / n or nil, acc = n > 0 and correct / n or nil, n = n, top = {} }
  for k, v in pairs(topsum) do r.top[k] = v / n end
  if not has_y then r.loss, r.acc = nil, nil end
  if opts.collect then
    r.pred, r.labels, r.index = pred, labels, index
    r.probs = #parts > 0 and flower.cat(parts, 1) or nil
  end
  return r
end

---------------------------------------------------------------------------------------------------
-- RNG state: the global generator and every seeded Dropout's stream offset.

-- The leaf layers of a model and their path prefixes (flower.nn's one walker, Model._leaves), or the
-- object itself when it is a single layer. order: nil or 'keras' (see Model._leaves).
local function leaves(model, order)
  if model._is_model then return nn().Model._leaves(model, order) end
  return { model }, { '' }
end

-- {global = the generator's state, layers = {[layer path] = stream offset}}
function train.rng_state(model)
  local s = { global = flower.get_rng_state(), layers = {} }
  local ls, prefixes = leaves(model)
  for i, l in ipairs(ls) do
    if l._offset ~= nil then s.layers[prefixes[i] .. l.name] = l._offset end
  end
  return s
end

function train.set_rng_state(model, s)
  if s.global then flower.set_rng_state(s.global) end
  local ls, prefixes = leaves(model)
  for i, l in ipairs(ls) do
    local v = s.layers and s.layers[prefixes[i] .. l.name]
    if v == nil and s.layers then v = s.layers[l.name] end   -- files before format 2 keyed by name
    if v ~= nil then l._offset = v end
  end
end

---------------------------------------------------------------------------------------------------
-- History

local HISTORY_COLUMNS = { 'stage', 'epoch', 'loss', 'acc', 'val_loss', 'val_acc', 'lr', 'seconds', 'images_per_s' }
train.HISTORY_COLUMNS = HISTORY_COLUMNS

function train.History() return { rows = {} } end

-- The columns of a history: the standard ones, then any others the rows have (top-k metrics), sorted.
function train.history_columns(hist)
  local cols, known = {}, {}
  for i, c in ipairs(HISTORY_COLUMNS) do cols[i] = c; known[c] = true end
  local extra = {}
  for _, r in ipairs(hist.rows) do
    for k in pairs(r) do if not known[k] then known[k] = true; extra[#extra + 1] = k end end
  end
  table.sort(extra)
  for _, c in ipairs(extra) do cols[#cols + 1] = c end
  return cols
end

function train.write_history_csv(path, hist)
  local cols = train.history_columns(hist)
  local rows = {}
  for i, r in ipairs(hist.rows) do
    local row = {}
    for j, c in ipairs(cols) do row[j] = r[c] end
    rows[i] = row
  end
  files.mkdir(files.dirname(path))
  files.csv_write(path, cols, rows)
end

---------------------------------------------------------------------------------------------------
-- Callbacks. Each is a table with any of on_train_begin(ctx), on_epoch_begin(ctx, epoch),
-- on_batch_end(ctx, epoch, step, {loss, acc, global_step}) (flower.tensorboard's callback uses it),
-- on_epoch_end(ctx, epoch, logs), on_train_end(ctx), and state() / load_state(s): whatever a
-- callback changes as it goes must be in its state(), which every checkpoint saves and a resumed
-- fit restores (after on_train_begin), so that a resumed run equals an uninterrupted one.
-- ctx = {model, optimizer, history, log, device, initial_epoch, stop (set it to stop after this
-- epoch)}; the learning rate through train.get_lr / train.set_lr. epoch counts from 1.
-- A run resumed in the middle of an epoch does not call on_epoch_begin again for that epoch: the
-- callbacks' states and the learning rate are restored as they were when it stopped.

function train.get_lr(opt)
  if opt.get_lr then return opt:get_lr() end
  return opt.lr
end

function train.set_lr(opt, lr)
  if opt.set_lr then opt:set_lr(lr) else opt.lr = lr end
end

local function is_schedule(lr) return require('flower.optim').is_schedule(lr) end

local function better(mode, a, b, delta)
  if b == nil then return true end
  if mode == 'max' then return a > b + delta end
  return a < b - delta
end

-- 'auto' (Keras's MonitorCallback): accuracies and top-k accuracies should rise, the rest fall
local function resolve_mode(monitor, mode, who)
  if mode == 'min' or mode == 'max' then return mode end
  if mode ~= nil and mode ~= 'auto' then
    error(string.format("%s: mode must be 'auto', 'min' or 'max', got %s", who or 'train', tostring(mode)), 3)
  end
  if monitor:find('acc') or monitor:find('top_?%d') then return 'max' end
  return 'min'
end

local function check_opt(v, name, who, lo, hi, int)
  if type(v) ~= 'number' or v ~= v or v < lo or (hi and v >= hi) or (int and math.tointeger(v) == nil) then
    error(string.format('%s: %s must be %s >= %g%s, got %s', who, name, int and 'an integer' or 'a number', lo,
      hi and string.format(' and < %g', hi) or '', tostring(v)), 3)
  end
  return int and math.tointeger(v) or v
end

-- Keras's EarlyStopping (its defaults: monitor 'val_loss', min_delta 0, patience 0): stops when
-- `monitor` has not improved by more than min_delta for `patience` epochs in a row.
function train.EarlyStopping(o)
  o = o or {}
  local who = 'train.EarlyStopping'
  local cb = { name = 'early_stopping', monitor = o.monitor or 'val_loss',
               patience = check_opt(o.patience or 0, 'patience', who, 0, nil, true),
               min_delta = math.abs(check_opt(o.min_delta or 0, 'min_delta', who, -math.huge)), wait = 0 }
  cb.mode = resolve_mode(cb.monitor, o.mode, who)
  function cb:on_epoch_end(ctx, epoch, logs)
    local v = logs[self.monitor]
    if v == nil then return end
    if better(self.mode, v, self.best, self.min_delta) then
      self.best, self.wait, self.best_epoch = v, 0, epoch
    else
      self.wait = self.wait + 1
      if self.wait >= self.patience then
        ctx.stop = 'early_stopping'
        ctx.log(string.format('early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)',
          self.monitor, self.wait, self.best, self.best_epoch or 0))
      end
    end
  end
  function cb:state() return { wait = self.wait, best = self.best, best_epoch = self.best_epoch } end
  function cb:load_state(s) self.wait, self.best, self.best_epoch = s.wait, s.best, s.best_epoch end
  return cb
end

-- Keras's LearningRateScheduler: sets the learning rate at the start of each epoch from
--   a flower.optim schedule, called with the epoch's index in this fit counted from 0 (a stage's
--     schedule starts with the stage): train.LearningRateScheduler(optim.cosine{lr = 1e-3,
--     decay_steps = epochs}) is Keras's CosineDecay by epoch; optim.step_decay, optim.piecewise too;
--   or fn(epoch, lr) -> lr, epoch the absolute epoch counted from 1.
-- The rate is a function of the epoch (and of the rate, which checkpoints hold): no state of its own.
function train.LearningRateScheduler(schedule)
  local sched = is_schedule(schedule)
  if not sched and type(schedule) ~= 'function' then
    error('train.LearningRateScheduler: expected a flower.optim schedule or a function(epoch, lr), got '
      .. type(schedule), 2)
  end
  local cb = { name = 'lr_scheduler' }
  function cb:on_epoch_begin(ctx, epoch)
    local lr
    if sched then lr = schedule(epoch - (ctx.initial_epoch or 0) - 1)
    else lr = schedule(epoch, train.get_lr(ctx.optimizer)) end
    train.set_lr(ctx.optimizer, lr)
  end
  return cb
end

-- Keras's ReduceLROnPlateau and its defaults (monitor 'val_loss', factor 0.1, patience 10,
-- min_delta 1e-4, cooldown 0, min_lr 0, mode 'auto'): after `patience` epochs without an
-- improvement by more than min_delta, the rate is multiplied by `factor` (not below min_lr), then
-- `cooldown` epochs pass before epochs count again. cb:update(value, optimizer) applies one epoch's
-- value outside fit and returns the rate.
function train.ReduceLROnPlateau(o)
  o = o or {}
  local who = 'train.ReduceLROnPlateau'
  local cb = { name = 'reduce_lr', monitor = o.monitor or 'val_loss',
               factor = check_opt(o.factor or 0.1, 'factor', who, 0, 1),
               patience = check_opt(o.patience or 10, 'patience', who, 0, nil, true),
               min_delta = math.abs(check_opt(o.min_delta or 1e-4, 'min_delta', who, -math.huge)),
               cooldown = check_opt(o.cooldown or 0, 'cooldown', who, 0, nil, true),
               min_lr = check_opt(o.min_lr or 0, 'min_lr', who, 0),
               wait = 0, cooldown_counter = 0 }
  cb.mode = resolve_mode(cb.monitor, o.mode, who)
  -- Keras's order: the cooldown counts down first; an improvement resets the wait; otherwise (out
  -- of cooldown, the counter read after the decrement) the wait grows and may reduce the rate
  function cb:update(value, opt)
    if is_schedule(opt.lr) then
      error(who .. ': the optimizer\'s learning rate is a schedule; ReduceLROnPlateau needs a number', 2)
    end
    if self.cooldown_counter > 0 then self.cooldown_counter, self.wait = self.cooldown_counter - 1, 0 end
    if better(self.mode, value, self.best, self.min_delta) then
      self.best, self.wait = value, 0
    elseif self.cooldown_counter == 0 then
      self.wait = self.wait + 1
      local lr = train.get_lr(opt)
      if self.wait >= self.patience and lr > self.min_lr then
        train.set_lr(opt, math.max(lr * self.factor, self.min_lr))
        self.cooldown_counter, self.wait = self.cooldown, 0
      end
    end
    return train.get_lr(opt)
  end
  function cb:on_epoch_end(ctx, epoch, logs)
    local v = logs[self.monitor]
    if v == nil then return end
    local before = train.get_lr(ctx.optimizer)
    local after = self:update(v, ctx.optimizer)
    if after ~= before then ctx.log(string.format('epoch %d: reducing the learning rate to %.3g', epoch, after)) end
  end
  function cb:state() return { wait = self.wait, best = self.best, cooldown_counter = self.cooldown_counter } end
  function cb:load_state(s)
    self.wait, self.best = s.wait, s.best
    self.cooldown_counter = s.cooldown_counter or s.cool or 0   -- 'cool': files before format 2
  end
  return cb
end

local function call_cbs(cbs, event, ...)
  for _, cb in ipairs(cbs) do
    if cb[event] then cb[event](cb, ...) end
  end
end

local function cb_states(cbs)
  local s = {}
  for i, cb in ipairs(cbs) do if cb.state then s[i] = cb:state() end end
  return s
end

local function load_cb_states(cbs, states)
  for i, s in pairs(states or {}) do
    local cb = cbs[tonumber(i)]
    if cb and cb.load_state then cb:load_state(s) end
  end
end

---------------------------------------------------------------------------------------------------
-- fit

local function check_loader(l, what)
  if type(l) ~= 'table' or type(l.epoch) ~= 'function' then
    fail('%s must be a loader (with :epoch(e) and #loader), got %s', what, type(l))
  end
end

local function default_log(msg) io.stdout:write(msg, '\n'); io.stdout:flush() end

-- Keras's fit(x, y): tensors in memory instead of loaders. x (N, ...) samples, y (N) labels,
-- batch_size (32), shuffle (true; the order of epoch e is a function of (seed, e), seed 0 unless
-- given), validation_data = {x_valid, y_valid} (batched in order). Returns the two loaders
-- (flower.data.FeatureLoader) fit then uses.
local function tensor_loaders(o)
  if o.train ~= nil then fail('give either train (a loader) or x and y (tensors), not both') end
  if not flower.is_tensor(o.x) then fail('x must be a tensor of samples, got %s', type(o.x)) end
  if not flower.is_tensor(o.y) then fail('y must be a tensor of labels (one per sample of x), got %s', type(o.y)) end
  if o.y:size(1) ~= o.x:size(1) then fail('x has %d samples, y %d labels', o.x:size(1), o.y:size(1)) end
  local bs = o.batch_size or 32
  if math.type(bs) ~= 'integer' or bs < 1 then fail('batch_size must be a positive integer, got %s', tostring(bs)) end
  local data = require 'flower.data'
  local tl = data.FeatureLoader { x = o.x, y = o.y, batch_size = bs, shuffle = o.shuffle ~= false, seed = o.seed or 0 }
  local vd, vl = o.validation_data, nil
  if vd ~= nil then
    if type(vd) ~= 'table' or not flower.is_tensor(vd[1]) or not flower.is_tensor(vd[2]) then
      fail('validation_data must be {x_valid, y_valid} (two tensors)')
    end
    if vd[2]:size(1) ~= vd[1]:size(1) then
      fail('validation_data has %d samples and %d labels', vd[1]:size(1), vd[2]:size(1))
    end
    vl = data.FeatureLoader { x = vd[1], y = vd[2], batch_size = bs }
  end
  return tl, vl
end

-- The progress line's metrics: loss, acc and the top-k asked for (then their validation twins).
local function bar_order(ks)
  local order = { 'loss', 'acc' }
  for _, k in ipairs(ks) do order[#order + 1] = 'top' .. k end
  order[#order + 1] = 'val_loss'
  order[#order + 1] = 'val_acc'
  for _, k in ipairs(ks) do order[#order + 1] = 'val_top' .. k end
  return order
end

-- The training state a checkpoint holds besides the weights and the optimizer (nn.save_checkpoint's
-- meta): where the run is (epoch, and the step within it with the epoch's running sums when it
-- stopped mid-epoch), the RNG, the callbacks' states, the learning rate (a number one; a schedule
-- follows the optimizer's iterations), the history, the best monitored value and why it stopped.
local function train_state(run, epoch, step, sums, stopped)
  local opt = run.optimizer
  return { epoch = epoch, step = step, ranks = run.ranks, sums = sums, stage = run.stage, rng = train.rng_state(run.model),
           callbacks = cb_states(run.callbacks), lr = not is_schedule(opt.lr) and train.get_lr(opt) or nil,
           history = run.history.rows, best = run.best, stopped = stopped }
end

local function save(path, run, meta)
  if not run.writes then return end   -- dist: rank 0 alone writes
  nn().save_checkpoint(path, run.model, { optimizer = run.optimizer, meta = meta })
end

-- A write killed before its rename leaves its temporary (last.h5.tmp-<pid>); no other process
-- writes this run's checkpoints, so a resume removes them.
local function remove_stale_temporaries(dir)
  local ok, names = pcall(require('flower.core')._data.listdir, dir)
  if not ok then return end
  for _, n in ipairs(names) do
    if n:match('^last%.h5%.tmp%-') or n:match('^best%.h5%.tmp%-') then os.remove(files.join(dir, n)) end
  end
end

-- Loads checkpoint_dir/last.h5 into the model and the optimizer, and the run's state from it; returns
-- the epoch to start at, the steps of it already done and their running sums, and the meta (whose
-- callback states are restored once on_train_begin has run).
local function resume(run, last_path, log)
  local meta = nn().load_checkpoint(last_path, run.model, { optimizer = run.optimizer })
  if meta.stage ~= nil and run.stage ~= nil and tostring(meta.stage) ~= tostring(run.stage) then
    fail('%s belongs to stage %s, this is stage %s', last_path, tostring(meta.stage), tostring(run.stage))
  end
  train.set_rng_state(run.model, meta.rng or {})
  -- an optimizer with state has its rate back from it (typed, from the HDF5 attribute); a plain
  -- object with an lr field from the meta
  local opt = run.optimizer
  if meta.lr ~= nil and not opt.load_state and not is_schedule(opt.lr) then train.set_lr(opt, meta.lr) end
  -- the history up to the checkpoint replaces what the caller passed for this stage
  if meta.history then run.history.rows = meta.history end
  run.best = meta.best
  log(string.format('%s: resumed from %s (epoch %d, step %d)', run.label, last_path, meta.epoch, meta.step or 0))
  -- dist: a mid-epoch step counts steps of the run that wrote it (meta.ranks ranks)
  if meta.step and meta.step > 0 then
    return meta.epoch, require('flower.dist').resume_step(meta.step, meta.ranks, run.ranks, last_path), meta.sums, meta
  end
  return meta.epoch + 1, 0, nil, meta
end

-- Reports an interrupt (once: the flag is cleared, so that the caller's next fit starts afresh).
local function stop_interrupted(hist, why, log, msg)
  log(msg)
  hist.stopped, hist.interrupted = 'interrupted', why
  clear_interrupt()
end

function train.fit(model, o)
  if type(model) ~= 'table' or type(model.forward) ~= 'function' then fail('expected a model, got %s', type(model)) end
  if type(o) ~= 'table' then fail('expected a table of options') end
  if o.x ~= nil or o.y ~= nil then
    if o.valid ~= nil and o.validation_data ~= nil then fail('give either valid (a loader) or validation_data, not both') end
    local tl, vl = tensor_loaders(o)
    local oo = {}
    for k, v in pairs(o) do oo[k] = v end
    oo.train, oo.valid, oo.x, oo.y, oo.validation_data = tl, o.valid or vl, nil, nil, nil
    o = oo
  elseif o.validation_data ~= nil then
    fail('validation_data goes with x and y; with a train loader, give valid (a loader)')
  end
  check_loader(o.train, 'train')
  if o.valid ~= nil then check_loader(o.valid, 'valid') end
  if o.optimizer == nil then fail('optimizer is required') end
  local epochs = o.epochs or 1
  if math.type(epochs) ~= 'integer' or epochs < 0 then fail('epochs must be a non-negative integer, got %s', tostring(epochs)) end
  local initial = o.initial_epoch or 0
  local lossfn = make_loss(o.loss)
  local ks = metric_ks(o.metrics)
  local log = o.log or default_log
  local cbs = o.callbacks or {}
  local hist = o.history or train.History()
  local label = o.label or 'train'
  local dir = o.checkpoint_dir
  local last_path = dir and files.join(dir, 'last.h5')
  local best_path = dir and files.join(dir, 'best.h5')
  local save_best = o.save_best
  if save_best == nil then save_best = o.valid and 'val_acc' or false end
  local nsteps = #o.train
  local mp
  if o.mixed_precision ~= nil then
    if type(model.mixed_precision) ~= 'function' then fail('mixed_precision needs a model with :mixed_precision (a flower.nn model)') end
    mp = nn().check_mixed_precision(o.mixed_precision, 'train.fit: mixed_precision', 2)
  end
  -- the device before anything else: a missing GPU fails here, not half-way
  local dev = run_device(model, o.device, 'train.fit')
  if mp ~= nil then model:mixed_precision(mp) end
  -- dist: data parallel over the job's ranks (nil when not): shards batches, averages gradients,
  -- and only rank 0 (D.main) writes checkpoints, history and logs
  local D = require('flower.dist').fit_context(model, o, dev)
  local writes = not D or D.main
  if D then log, nsteps = D:log(log), D:steps(o.train) end
  local ctx = { model = model, optimizer = o.optimizer, history = hist, log = log, device = dev, initial_epoch = initial }
  -- what a checkpoint holds of this run
  local run = { model = model, optimizer = o.optimizer, callbacks = cbs, history = hist, stage = o.stage,
                label = label, best = nil, ranks = D and D.size or 1, writes = writes }

  local start_epoch, skip, sums, resumed = initial + 1, 0, nil, nil
  if o.resume and dir and writes then remove_stale_temporaries(dir) end
  if o.resume and last_path and files.exists(last_path) then
    start_epoch, skip, sums, resumed = resume(run, last_path, log)
    if resumed.stopped then
      log(string.format('%s: already finished (%s)', label, resumed.stopped))
      hist.stopped, hist.best = resumed.stopped, run.best
      return hist
    end
  end
  if D then D:broadcast_weights(model) end     -- dist: every rank starts from rank 0's weights

  local u = files.util()
  local prev_catch = u and u.catch_signals(true)
  clear_interrupt()
  local ok, err = pcall(function()
    call_cbs(cbs, 'on_train_begin', ctx)
    if resumed then load_cb_states(cbs, resumed.callbacks) end
    for epoch = start_epoch, epochs do
      -- a run resumed mid-epoch has had this epoch's on_epoch_begin (its effects are in the state)
      if skip == 0 then call_cbs(cbs, 'on_epoch_begin', ctx, epoch) end
      model:training()
      local popts = type(o.progress) == 'table' and o.progress or {}
      local bar = progress.new { total = nsteps, label = string.format('%s epoch %d/%d', label, epoch, epochs),
                                 silent = o.progress == false or not writes, order = bar_order(ks), out = popts.out,
                                 tty = popts.tty, interval = popts.interval }
      local t0 = files.now()
      local s = sums or { loss = 0, correct = 0, n = 0, top = {} }
      s.top = s.top or {}
      sums = nil
      local step, images = 0, 0
      -- batches: a function of (loader seed, epoch), so a resumed epoch skips the ones done
      for batch in (D and D:epoch(o.train, epoch) or o.train:epoch(epoch)) do
        step = step + 1
        if step > skip then
          -- forward, backward (the gradients complete) and the optimizer's update
          local l, acc, tops, bn
          if D then   -- dist: global loss, metrics and batch size; gradients summed across ranks
            l, acc, tops, bn = D:step(model, batch, dev, lossfn, o.optimizer, ks, train.interrupted())
          else
            l, acc, tops = train.step(model, train.batch_to_device(batch, dev), lossfn, o.optimizer, ks)
            bn = batch.n or batch.x:size(1)
          end
          files.killpoint('train.step')   -- crash tests: FLOWER_KILLPOINT='train.step:<n>'
          if not finite(l) then
            error(string.format('train.fit: %s: the loss became %s at epoch %d, step %d of %d; stopping '
              .. '(the last good checkpoint is %s)', label, tostring(l), epoch, step, nsteps,
              last_path or 'not written: no checkpoint_dir'), 0)
          end
          s.loss, s.correct, s.n = s.loss + l * bn, s.correct + acc * bn, s.n + bn
          for k, v in pairs(tops) do s.top[tostring(k)] = (s.top[tostring(k)] or 0) + v * bn end
          images = images + bn
          local shown = { loss = s.loss / s.n, acc = s.correct / s.n }
          for _, k in ipairs(ks) do shown['top' .. k] = (s.top[tostring(k)] or 0) / s.n end
          bar:update(step, shown)
          call_cbs(cbs, 'on_batch_end', ctx, epoch, step, { loss = l, acc = acc, global_step = (epoch - 1) * nsteps + step })
          local why = D and D:interrupted() or (not D and train.interrupted())   -- dist: agreed by every rank
          if why and step < nsteps then
            -- a mid-epoch checkpoint: the epoch goes on from the next step when resumed
            if last_path then save(last_path, run, train_state(run, epoch, step, s)) end
            bar:finish()
            stop_interrupted(hist, why, log, string.format('%s: %s at epoch %d, step %d/%d: %s', label, why, epoch,
              step, nsteps, last_path and ('checkpoint written to ' .. last_path) or 'no checkpoint_dir, nothing saved'))
            return
          end
        end
      end
      skip = 0
      local train_seconds = files.now() - t0
      local logs = { stage = run.stage, epoch = epoch, loss = s.n > 0 and s.loss / s.n or nil,
                     acc = s.n > 0 and s.correct / s.n or nil, lr = train.get_lr(o.optimizer) }
      for _, k in ipairs(ks) do
        if s.n > 0 then logs['top' .. k] = (s.top[tostring(k)] or 0) / s.n end
      end
      if o.valid then
        local v = train.evaluate(model, o.valid, { loss = o.loss, progress = false, epoch = 1, topk = ks, device = dev,
                                                   dist = D or false })
        logs.val_loss, logs.val_acc = v.loss, v.acc
        for k, t in pairs(v.top) do logs['val_top' .. k] = t end
      end
      logs.seconds = files.now() - t0
      logs.images_per_s = train_seconds > 0 and images / train_seconds or nil
      local shown = { val_loss = logs.val_loss, val_acc = logs.val_acc }
      for _, k in ipairs(ks) do shown['val_top' .. k] = logs['val_top' .. k] end
      bar:finish(shown)
      hist.rows[#hist.rows + 1] = logs
      call_cbs(cbs, 'on_epoch_end', ctx, epoch, logs)
      if o.history_csv and writes then train.write_history_csv(o.history_csv, hist) end
      local improved = false
      if save_best and logs[save_best] ~= nil then
        if better(resolve_mode(save_best), logs[save_best], run.best and run.best.value, 0) then
          run.best = { value = logs[save_best], epoch = epoch, monitor = save_best }
          improved = true
        end
      end
      -- the epoch's checkpoints: best.h5 before last.h5, so that a crash between the two redoes the
      -- epoch (last.h5 still the previous one) and writes best.h5 again
      if last_path then
        if improved then save(best_path, run, train_state(run, epoch, 0, nil, 'best')) end
        save(last_path, run, train_state(run, epoch, 0, nil, ctx.stop))
      end
      if ctx.stop then hist.stopped = ctx.stop; break end
      local why = D and D:interrupted() or (not D and train.interrupted())
      if why and epoch < epochs then
        stop_interrupted(hist, why, log, string.format('%s: %s after epoch %d: checkpoint written to %s', label, why,
          epoch, last_path or '(none)'))
        return
      end
    end
    call_cbs(cbs, 'on_train_end', ctx)
    -- an interrupt in the last epoch: this fit is complete (and its checkpoint says so), but the
    -- caller (the next stage, the next step of a pipeline) must stop, so it is reported, not dropped
    local why = D and D:interrupted() or (not D and train.interrupted())
    if why then
      stop_interrupted(hist, why, log, string.format('%s: %s in the last epoch: finished%s; stopping', label, why,
        last_path and (', checkpoint written to ' .. last_path) or ''))
    end
  end)
  if u then u.catch_signals(prev_catch) end
  if not ok then
    -- the host turned Ctrl-C into an error mid-step (no _util): the weights may be half updated,
    -- so nothing is saved; the last epoch's checkpoint stays the one to resume from
    if tostring(err):find('interrupted!', 1, true) then
      log(string.format('%s: interrupted; resume continues from the last completed epoch%s', label,
        last_path and (' (' .. last_path .. ')') or ''))
      hist.stopped, hist.interrupted = 'interrupted', 'SIGINT'
      return hist
    end
    error(err, 0)
  end
  hist.best = run.best
  return hist
end

---------------------------------------------------------------------------------------------------
-- Freeze / unfreeze stages

local function has_weights(l) return l._wnames and #l._wnames > 0 end

local function set_models_trainable(model)
  local function walk(m)
    m.trainable = true
    for _, l in ipairs(m:layers()) do if l._is_model then walk(l) end end
  end
  walk(model)
end

-- Sets layer.trainable for a stage's `train` spec and returns the number of trainable layers:
--   'all'           every layer
--   'head'          the layers named in head (a list), or after the layer named `feature_layer`
--                   (model.feature_layer), or else the last layer that has weights
--   'from:<name>'   the layer called <name> and every layer after it (the seed's
--                   `for layer in model.layers[:N]: layer.trainable = False`)
--   'none'          nothing (feature extraction)
function train.set_trainable(model, spec, opts)
  opts = opts or {}
  local layers = leaves(model, 'keras')
  set_models_trainable(model)
  local from
  if spec == 'all' then
    from = 1
  elseif spec == 'none' then
    from = #layers + 1
  elseif spec == 'head' then
    local head = opts.head or model.head
    if head then
      local names = {}
      for _, n in ipairs(head) do names[n] = true end
      local count = 0
      for _, l in ipairs(layers) do
        l.trainable = names[l.name] or false
        if names[l.name] then count = count + 1 end
      end
      if count == 0 then error("train.set_trainable: none of the head layers is in the model", 2) end
      return count
    end
    local fl = opts.feature_layer or model.feature_layer
    if fl then
      for i, l in ipairs(layers) do if l.name == fl then from = i + 1 end end
      if not from then error(string.format("train.set_trainable: no layer named '%s' (the feature layer)", fl), 2) end
    else
      for i = #layers, 1, -1 do if has_weights(layers[i]) then from = i break end end
      from = from or #layers + 1
    end
  elseif type(spec) == 'string' and spec:sub(1, 5) == 'from:' then
    local name = spec:sub(6)
    for i, l in ipairs(layers) do if l.name == name then from = i end end
    if not from then error(string.format("train.set_trainable: no layer named '%s' in %s", name, tostring(model.name)), 2) end
  else
    error("train.set_trainable: train must be 'all', 'head', 'none' or 'from:<layer name>', got " .. tostring(spec), 2)
  end
  local count = 0
  for i, l in ipairs(layers) do
    l.trainable = i >= from
    if l.trainable and has_weights(l) then count = count + 1 end
  end
  return count
end

-- Runs stages in order: stages = {{epochs = 1, train = 'head', lr = 1e-3}, {epochs = 4, train = 'all',
-- lr = 1e-4}, ...}. Each stage gets a fresh optimizer from make_optimizer(stage) (the seed recompiled
-- the model between stages, which resets Adam), its own checkpoint directory <dir>/stage<i>, and
-- epochs numbered on from the previous stage. Other fit options (train, valid, callbacks as a
-- function(stage) -> list, ...) are passed through. A stage whose checkpoint says it finished is
-- skipped on resume (its weights are loaded from it).
function train.fit_stages(model, stages, o)
  if type(stages) ~= 'table' or #stages == 0 then error('train.fit_stages: expected a non-empty list of stages', 2) end
  if o.device ~= nil then train.resolve_device(o.device, 'train.fit_stages') end   -- before any stage
  if o.mixed_precision ~= nil then nn().check_mixed_precision(o.mixed_precision, 'train.fit_stages: mixed_precision', 2) end
  local hist = o.history or train.History()
  local epoch0 = 0
  for i, st in ipairs(stages) do
    if math.type(st.epochs) ~= 'integer' or st.epochs < 0 then
      error(string.format('train.fit_stages: stage %d: epochs must be a non-negative integer, got %s', i, tostring(st.epochs)), 2)
    end
    local n = train.set_trainable(model, st.train or 'all', { head = st.head or o.head, feature_layer = o.feature_layer })
    local opt = o.make_optimizer(st)
    local fo = {}
    for k, v in pairs(o) do fo[k] = v end
    fo.optimizer, fo.initial_epoch, fo.epochs, fo.stage, fo.history = opt, epoch0, epoch0 + st.epochs, i, hist
    fo.callbacks = type(o.callbacks) == 'function' and o.callbacks(st) or o.callbacks
    fo.checkpoint_dir = o.checkpoint_dir and files.join(o.checkpoint_dir, 'stage' .. i)
    fo.label = string.format('%s stage %d (%s)', o.label or 'train', i, tostring(st.train or 'all'))
    if o.log then o.log(string.format('%s: %d layers with weights trainable, lr %g', fo.label, n, train.get_lr(opt))) end
    local h = train.fit(model, fo)
    if h.stopped == 'interrupted' then return hist end
    epoch0 = epoch0 + st.epochs
  end
  return hist
end

return train
