-- flower.tensorboard: TensorBoard event files, written directly (no TensorFlow needed).
--
--   local tb = require 'flower.tensorboard'
--   local w = tb.writer('runs/x/tb/train')   -- a new events.out.tfevents.* file in that directory
--   w:scalar('loss', 0.52, 10)               -- tag, value, step
--   w:close()
--
--   train.fit(model, {..., callbacks = {tb.callback{log_dir = 'runs/x/tb'}}})
--
-- The callback follows Keras's TensorBoard callback: `<log_dir>/train` gets `epoch_loss`,
-- `epoch_acc`, `epoch_top<k>`, `epoch_lr`, `epoch_images_per_s` at step = epoch and `batch_loss`,
-- `batch_acc` at every training step (step = the step's number counted over all epochs);
-- `<log_dir>/validation` gets `epoch_loss`, `epoch_acc`, `epoch_top<k>` from the validation
-- metrics. `tensorboard --logdir runs/x/tb` shows them while the run goes on.
--
-- Format: a file of TFRecords (length, masked CRC-32C of the length, the bytes, their masked CRC),
-- each an `Event` protocol buffer: wall_time (1, double), step (2, varint), file_version (3) on the
-- first record, summary (5) holding Summary.Value{tag (1), simple_value (2, float)}. Each record is
-- flushed once written, so a reader sees every finished record and a killed run leaves at most a
-- torn last record, which TensorBoard's reader skips. A resumed run starts a new file beside the
-- old one (as Keras does); steps already written are not written again by the callback.
local files = require 'flower.files'

local tb = {}

-- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
local crc_table = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do
    if c & 1 == 1 then c = (c >> 1) ~ 0x82F63B78 else c = c >> 1 end
  end
  crc_table[i] = c
end

local function crc32c(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do
    c = crc_table[(c ~ s:byte(i)) & 0xFF] ~ (c >> 8)
  end
  return c ~ 0xFFFFFFFF
end
tb.crc32c = crc32c

-- TFRecord's masking: rotate right by 15 and add a constant, modulo 2^32.
local function masked_crc(s)
  local c = crc32c(s)
  return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
end

local function varint(n)
  local out = {}
  repeat
    local b = n & 0x7F
    n = n >> 7
    if n ~= 0 then b = b | 0x80 end
    out[#out + 1] = string.char(b)
  until n == 0
  return table.concat(out)
end

local function field_bytes(num, s) return varint(num << 3 | 2) .. varint(#s) .. s end

local function event(wall_time, step, body)
  local parts = { varint(1 << 3 | 1), string.pack('<d', wall_time) }
  if step then parts[#parts + 1] = varint(2 << 3 | 0) .. varint(step) end
  parts[#parts + 1] = body
  return table.concat(parts)
end

local function summary_scalar(tag, value)
  local v = field_bytes(1, tag) .. varint(2 << 3 | 5) .. string.pack('<f', value)
  return field_bytes(5, field_bytes(1, v))
end

local Writer = {}
Writer.__index = Writer

local function hostname()
  local f = io.open('/proc/sys/kernel/hostname', 'r')
  local h = f and f:read('l') or 'localhost'
  if f then f:close() end
  return h
end

local file_counter = 0
-- A writer on a new event file in `dir` (created if needed).
function tb.writer(dir)
  if type(dir) ~= 'string' or dir == '' then error('tensorboard.writer: expected a directory name', 2) end
  files.mkdir(dir)
  file_counter = file_counter + 1
  local now = os.time()   -- wall-clock seconds since the epoch, as TensorBoard's wall_time
  local path = files.join(dir, string.format('events.out.tfevents.%d.%s.%d.flowerlua', now,
    hostname(), file_counter))
  local f, err = io.open(path, 'wb')
  if not f then error('tensorboard.writer: cannot create ' .. path .. ': ' .. tostring(err), 2) end
  local w = setmetatable({ path = path, f = f }, Writer)
  w:_record(event(now, 0, field_bytes(3, 'brain.Event:2')))
  return w
end

function Writer:_record(data)
  if not self.f then error('tensorboard: writer for ' .. self.path .. ' is closed', 3) end
  local len = string.pack('<I8', #data)
  assert(self.f:write(len, string.pack('<I4', masked_crc(len)), data, string.pack('<I4', masked_crc(data))))
  assert(self.f:flush())
end

-- Writes one scalar: tag (string), value (number), step (non-negative integer).
function Writer:scalar(tag, value, step)
  if type(tag) ~= 'string' or tag == '' then error('tensorboard: scalar tag must be a non-empty string', 2) end
  if type(value) ~= 'number' then error(string.format("tensorboard: scalar '%s' must be a number, got %s", tag, type(value)), 2) end
  if math.type(step) ~= 'integer' or step < 0 then
    error(string.format("tensorboard: step of '%s' must be a non-negative integer, got %s", tag, tostring(step)), 2)
  end
  self:_record(event(os.time(), step, summary_scalar(tag, value)))
end

function Writer:close()
  if self.f then self.f:close(); self.f = nil end
end

---------------------------------------------------------------------------------------------------
-- The fit callback

local Callback = {}
Callback.__index = Callback

-- tb.callback{log_dir = DIR, batch = true}: batch = false leaves out the per-step scalars.
function tb.callback(o)
  if type(o) ~= 'table' or type(o.log_dir) ~= 'string' then
    error('tensorboard.callback: expected {log_dir = DIR}', 2)
  end
  return setmetatable({ log_dir = o.log_dir, batch = o.batch ~= false, last_epoch = 0, last_step = 0 }, Callback)
end

function Callback:_writers()
  if not self.train then
    self.train = tb.writer(files.join(self.log_dir, 'train'))
    self.valid = tb.writer(files.join(self.log_dir, 'validation'))
  end
  return self.train, self.valid
end

-- the scalars of an epoch's logs, in a stable order
local function sorted_numbers(logs)
  local keys = {}
  for k, v in pairs(logs) do
    if type(k) == 'string' and type(v) == 'number' and k ~= 'epoch' and k ~= 'stage' and k ~= 'seconds' then
      keys[#keys + 1] = k
    end
  end
  table.sort(keys)
  return keys
end

function Callback:on_batch_end(_, _, _, logs)
  if not self.batch or logs.global_step <= self.last_step then return end
  local w = self:_writers()
  w:scalar('batch_loss', logs.loss, logs.global_step)
  w:scalar('batch_acc', logs.acc, logs.global_step)
  self.last_step = logs.global_step
end

function Callback:on_epoch_end(_, epoch, logs)
  if epoch <= self.last_epoch then return end
  local w, v = self:_writers()
  for _, k in ipairs(sorted_numbers(logs)) do
    local vk = k:match('^val_(.+)$')
    if vk then v:scalar('epoch_' .. vk, logs[k], epoch) else w:scalar('epoch_' .. k, logs[k], epoch) end
  end
  self.last_epoch = epoch
end

function Callback:on_train_end()
  if self.train then self.train:close(); self.valid:close(); self.train, self.valid = nil, nil end
end

-- checkpointed with the run, so a resumed run writes each step and epoch once
function Callback:state() return { last_epoch = self.last_epoch, last_step = self.last_step } end
function Callback:load_state(s) self.last_epoch, self.last_step = s.last_epoch or 0, s.last_step or 0 end

return tb
