#!/usr/bin/env bash
# SIGINT and SIGTERM during flower.train.fit: the current step finishes, a checkpoint is written,
# the process exits cleanly (the script's own status 130 / 143), and resuming from the checkpoint
# gives weights identical to an uninterrupted run. A second SIGINT kills at once.
# Then the quickstart (--tiny, 3 epochs of cosine decay): stopped by SIGKILL, SIGINT or SIGTERM at
# chosen steps and checkpoint writes (FLOWER_KILLPOINT) and resumed with --resume, it writes a
# predict.csv (and histories) byte-identical to an uninterrupted run's.
set -u
cd "$(dirname "$0")/../.."
FL=${FLOWERLUA:-./flowerlua}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/run.lua" <<'EOF'
-- usage: run.lua MODE DIR   (MODE: full | interruptible | slow | resume)
local flower = require 'flower'
local nn = require 'flower.nn'
local optim = require 'flower.optim'
local data = require 'flower.data'
local train = require 'flower.train'
local files = require 'flower.files'
local mode, dir = arg[1], arg[2]
if not require('flower.core')._util then
  io.stderr:write('flower.core._util is missing (bindings/l_util.c is not registered in l_core.c)\n')
  os.exit(3)
end
flower.manual_seed(0)
local W = flower.randn({ 10, 4 })
local x = flower.randn({ 512, 10 })
local y = x:matmul(W):argmax(2):view(-1)
local loader = data.FeatureLoader { x = x, y = y, batch_size = 16, shuffle = true, seed = 3 }
nn.reset_names()
flower.manual_seed(1)
local inp = nn.Input { 10 }
local h = nn.Dense { units = 32, activation = 'relu', name = 'fc1' }(inp)
h = nn.Dropout { rate = 0.25, name = 'drop' }(h)
local model = nn.Model(inp, nn.Dense { units = 4, name = 'out' }(h))
-- slow steps (a busy wait, so the signal is never lost in a child process), and a marker file once
-- training is under way
local steps = 0
local slow = setmetatable({}, { __len = function() return #loader end, __index = { epoch = function(_, e)
  local it = loader:epoch(e)
  return function()
    local b = it()
    steps = steps + 1
    if mode == 'interruptible' or mode == 'slow' then
      local t = files.now() + (mode == 'slow' and 0.5 or 0.03)
      while files.now() < t do end
      if steps == 5 then files.write_atomic(dir .. '/started', 'yes') end
    end
    return b
  end
end } })
local hist = train.fit(model, { train = slow, optimizer = optim.Adam { lr = 0.01 }, epochs = 3, progress = false,
  checkpoint_dir = dir .. '/ckpt', resume = mode == 'resume', log = function(m) io.stderr:write(m, '\n') end })
if hist.stopped == 'interrupted' then
  print('INTERRUPTED ' .. hist.interrupted)
  os.exit(hist.interrupted == 'SIGTERM' and 143 or 130)
end
for _, w in ipairs(model:weights()) do
  print(w.path, string.format('%.17g %.17g', w.tensor:sum():item(), w.tensor:abs():sum():item()))
end
EOF

ok() { echo "ok - $1"; }
notok() { echo "not ok - $1"; }

mkdir -p "$tmp/full"
if ! "$FL" "$tmp/run.lua" full "$tmp/full" >"$tmp/full.out" 2>"$tmp/full.err"; then
  notok "uninterrupted run: $(tail -3 "$tmp/full.err" | tr '\n' ' ')"
  exit 1
fi

for sig in INT TERM; do
  d="$tmp/$sig"
  mkdir -p "$d"
  "$FL" "$tmp/run.lua" interruptible "$d" >"$d/out" 2>"$d/err" &
  pid=$!
  for _ in $(seq 1 200); do [ -f "$d/started" ] && break; sleep 0.05; done
  kill -"$sig" "$pid"
  wait "$pid"
  rc=$?
  want=$([ "$sig" = INT ] && echo 130 || echo 143)
  if [ "$rc" = "$want" ] && grep -q "INTERRUPTED SIG$sig" "$d/out" && [ -f "$d/ckpt/last.h5" ] \
     && grep -q "checkpoint written" "$d/err"; then
    ok "SIG$sig finishes the step, writes a checkpoint and exits with $want"
  else
    notok "SIG$sig: status $rc (want $want); out: $(cat "$d/out") err: $(tail -3 "$d/err" | tr '\n' ' ')"
    continue
  fi
  if "$FL" "$tmp/run.lua" resume "$d" >"$d/resumed.out" 2>"$d/resumed.err" && cmp -s "$d/resumed.out" "$tmp/full.out"; then
    ok "resumed after SIG$sig: weights identical to the uninterrupted run"
  else
    notok "resumed after SIG$sig differs: $(diff "$d/resumed.out" "$tmp/full.out" | head -5 | tr '\n' ' ') $(tail -3 "$d/resumed.err" | tr '\n' ' ')"
  fi
done

# a second Ctrl-C while the first is pending kills the process (SIGINT's default action)
# (0.5 s steps: the second signal surely comes while the first step is still finishing)
d="$tmp/twice"
mkdir -p "$d"
"$FL" "$tmp/run.lua" slow "$d" >"$d/out" 2>"$d/err" &
pid=$!
for _ in $(seq 1 200); do [ -f "$d/started" ] && break; sleep 0.05; done
kill -INT "$pid"; sleep 0.1; kill -INT "$pid"
wait "$pid"
rc=$?
if [ "$rc" = 130 ] && ! grep -q INTERRUPTED "$d/out"; then ok "a second SIGINT kills the process at once"
else notok "second SIGINT: status $rc, out: $(cat "$d/out")"; fi

# --- the quickstart, interrupted and resumed ---------------------------------------------------
# (3 steps an epoch, 1 head epoch + 3 cosine epochs per model: 12 steps per model, then the
# ensemble's own fit)
qs() { "$FL" experiments/quickstart.lua --tiny --epochs 3 --data "$tmp/qdata" --runs "$tmp/qruns" "$@"; }
if ! qs --run-name full >"$tmp/qfull.log" 2>&1; then
  notok "quickstart --tiny: $(tail -3 "$tmp/qfull.log" | tr '\n' ' ')"
  exit 1
fi
histories() { (cd "$1" && for h in $(find . -name history.csv | sort); do echo "$h"; cut -d, -f1-7 "$h"; done); }
for kp in train.step:2 train.step:5 train.step:16 train.step:27 checkpoint.before_rename:3 checkpoint.after_rename:4 \
          checkpoint.before_rename:7 train.step:6:INT train.step:13:TERM train.step:4:INT; do
  name=$(echo "$kp" | tr ':.' '__')
  run="$tmp/qruns/$name"
  FLOWER_KILLPOINT=$kp qs --run-name "$name" >"$tmp/q$name.log" 2>&1
  rc=$?
  case "$kp" in *:INT) want=130 ;; *:TERM) want=143 ;; *) want=137 ;; esac
  if [ "$rc" != "$want" ]; then
    notok "quickstart stopped at $kp: status $rc, want $want: $(tail -3 "$tmp/q$name.log" | tr '\n' ' ')"
    continue
  fi
  if [ -f "$run/predict.csv" ]; then notok "quickstart stopped at $kp: predict.csv written before the stop"; continue; fi
  if ! "$FL" experiments/quickstart.lua --resume "$run" >>"$tmp/q$name.log" 2>&1; then
    notok "quickstart resumed after $kp: $(tail -3 "$tmp/q$name.log" | tr '\n' ' ')"
    continue
  fi
  if cmp -s "$run/predict.csv" "$tmp/qruns/full/predict.csv" && [ "$(histories "$run")" = "$(histories "$tmp/qruns/full")" ]; then
    ok "quickstart stopped at $kp and resumed: predict.csv and histories byte-identical to the uninterrupted run"
  else
    notok "quickstart stopped at $kp and resumed differs: $(diff "$run/predict.csv" "$tmp/qruns/full/predict.csv" | head -4 | tr '\n' ' ') $(diff <(histories "$run") <(histories "$tmp/qruns/full") | head -4 | tr '\n' ' ')"
  fi
done
