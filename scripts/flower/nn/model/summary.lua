-- Keras's model.summary() for flower.nn models (loaded by flower.nn).

return function(nn)
local Model = nn.Model


local function py_shape(s) return nn.shape_str(s) end

local function fmt_int(n) return string.format('%d', n) end

local function readable_size(b)
  local units = {'Byte', 'KB', 'MB', 'GB', 'TB', 'PB'}
  for _, u in ipairs(units) do
    if b / 1024 < 1 then return string.format('%.2f %s', b, u) end
    b = b / 1024
  end
  return string.format('%.2f %s', b, 'PB')
end

-- tf-keras's print_row: columns cut at positions, long fields wrapped on '),' '],' etc.
local function print_row(out, fields, positions)
  local left = {}
  for i, f in ipairs(fields) do left[i] = tostring(f) end
  local function any() for _, s in ipairs(left) do if s ~= '' then return true end end return false end
  while any() do
    local line = ''
    for col = 1, #left do
      local start = col > 1 and positions[col - 1] or 0
      local space = col ~= #positions and 2 or 0
      local cutoff = positions[col] - start - space
      if col ~= #positions then cutoff = cutoff - 1 end
      local fit = left[col]:sub(1, cutoff)
      local best
      for _, pat in ipairs({'),', '},', '],', "',"}) do
        local p = fit:find(pat, 1, true)
        if p then local c = p + #pat - 1; if not best or c < best then best = c end end
      end
      if best then cutoff = best; fit = fit:sub(1, cutoff) end
      if col == 1 then line = line .. ' ' end
      line = line .. fit .. string.rep(' ', space)
      left[col] = left[col]:sub(cutoff + 1)
      line = line .. string.rep(' ', positions[col] - #line)
    end
    out[#out + 1] = line
  end
end

local function type_name(l)
  if l.type_name then return l.type_name end
  if l._is_model then return l.class_name == 'Sequential' and 'Sequential' or 'Functional' end
  return l.class_name
end

-- Keras's model.summary() (tf-keras 2.x layout). Does one thing, as Keras does: prints the table
-- (with print_fn, default print) and returns nothing, so the REPL shows it once. With
-- print_fn = false it prints nothing and returns the text instead.
-- summary's options, checked (errors at the caller of summary) -> opts, print_fn
local function summary_options(self, opts)
  opts = opts or {}
  local function bad(what, ...) error(string.format('%s: summary: ' .. what, self:owner(), ...), 4) end
  if type(opts) ~= 'table' then bad('expected a table of options {print_fn=, line_length=}, got %s', type(opts)) end
  local pf = opts.print_fn
  if pf == nil then pf = print end
  if pf ~= false and type(pf) ~= 'function' then
    bad('print_fn must be a function or false (return the text), got %s', type(pf))
  end
  local ll = opts.line_length
  if ll ~= nil and (math.type(ll) ~= 'integer' or ll < 20) then
    bad('line_length must be an integer >= 20, got %s', tostring(ll))
  end
  return opts, pf
end

function Model:summary(opts)
  local pf
  opts, pf = summary_options(self, opts)
  self:_refresh()
  local layers = self:keras_layers()
  local seq = self.class_name == 'Sequential'
  if seq then   -- Keras's Sequential does not list its InputLayer
    local r = {}
    for _, l in ipairs(layers) do if getmetatable(l) ~= nn.InputLayer then r[#r + 1] = l end end
    layers = r
  end
  if not seq then
    seq = true
    for _, n in ipairs(self.nodes) do
      if #n.inputs > 1 or #self._consumers[n] > 1 then seq = false end
    end
  end
  local line_length, positions, header
  if seq then
    line_length = opts.line_length or 65
    positions = {math.floor(line_length * 0.45), math.floor(line_length * 0.85), line_length}
    header = {'Layer (type)', 'Output Shape', 'Param #'}
  else
    line_length = opts.line_length or 98
    positions = {math.floor(line_length * 0.3), math.floor(line_length * 0.6), math.floor(line_length * 0.7),
                 line_length}
    header = {'Layer (type)', 'Output Shape', 'Param #', 'Connected to'}
  end
  local out = {}
  out[#out + 1] = string.format('Model: "%s"', self.name)
  out[#out + 1] = string.rep('_', line_length)
  print_row(out, header, positions)
  out[#out + 1] = string.rep('=', line_length)
  for _, l in ipairs(layers) do
    local n = l._nodes[1]
    for _, cand in ipairs(l._nodes) do if self._consumers[cand] then n = cand end end
    local shape = py_shape(n.shape)
    if getmetatable(l) == nn.InputLayer then shape = '[' .. shape .. ']' end
    local total = l._is_model and select(1, l:count_params()) or select(1, l:count_params())
    local fields = {l.name .. ' (' .. type_name(l) .. ')', shape, fmt_int(total)}
    if not seq then
      local conn = {}
      if not self._is_input[n] then
        for _, p in ipairs(n.inputs) do conn[#conn + 1] = "'" .. p.layer.name .. "[0][0]'" end
      end
      fields[4] = '[' .. table.concat(conn, ', ') .. ']'
    end
    print_row(out, fields, positions)
    out[#out + 1] = string.rep(' ', line_length)
  end
  out[#out + 1] = string.rep('=', line_length)
  local total, trainable = self:count_params()
  local bytes = self.dtype == 'float64' and 8 or 4
  out[#out + 1] = string.format('Total params: %s (%s)', fmt_int(total), readable_size(total * bytes))
  out[#out + 1] = string.format('Trainable params: %s (%s)', fmt_int(trainable), readable_size(trainable * bytes))
  out[#out + 1] = string.format('Non-trainable params: %s (%s)', fmt_int(total - trainable),
    readable_size((total - trainable) * bytes))
  out[#out + 1] = string.rep('_', line_length)
  local text = table.concat(out, '\n')
  if pf == false then return text end
  pf(text)
end

end
