#!/usr/bin/env bash
# Data-parallel training over `mpirun -np 2` (tests/lua/dist_train.lua): equality with one process
# at the same global batch, identical weights on both ranks, BatchNorm per rank, evaluation split
# across ranks; checkpoints written by 2 ranks resume under 1 and vice versa and equal an
# uninterrupted run; kill -9 of one rank mid-epoch ends the job non-zero, naming the rank, and the
# checkpoint on disk loads.
set -u
cd "$(dirname "$0")/../.."
FL=${FLOWERLUA:-./flowerlua}
if ! command -v mpirun >/dev/null; then echo "ok - dist_train # SKIP mpirun not found (tools/deps.sh installs openmpi-bin)"; exit 0; fi
if [ "$($FL -e 'io.write(tostring(require("flower").dist.has_mpi()))')" != true ]; then
  echo "ok - dist_train # SKIP this flowerlua was built without MPI"; exit 0
fi
MPIRUN=(mpirun -np 2 --oversubscribe --allow-run-as-root)
export FLOWER_DIST_TIMEOUT=60
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$tmp"' EXIT
ok() { echo "ok - dist_train: $1"; }
notok() { echo "not ok - dist_train: $1"; }

# 1. equality, BatchNorm, evaluation (each rank prints its own ok lines)
for mode in equal bn syncbn evaluate export; do
  timeout 300 "${MPIRUN[@]}" "$FL" tests/lua/dist_train.lua $mode "$tmp" >"$tmp/$mode.txt" 2>&1
  rc=$?
  grep -E '^(not )?ok - ' "$tmp/$mode.txt"
  if [ $rc -ne 0 ]; then notok "$mode: mpirun exited with status $rc"; tail -15 "$tmp/$mode.txt"; fi
done

# 2. resume across rank counts: the weights' sums printed by rank 0, compared within rounding
run1() { timeout 300 "$FL" tests/lua/dist_train.lua ckpt "$1" "$2" 2>&1 | grep -E '^(W|ROWS|not ok)'; }
run2() { timeout 300 "${MPIRUN[@]}" "$FL" tests/lua/dist_train.lua ckpt "$1" "$2" 2>&1 | grep -E '^(W|ROWS|not ok)'; }
same() {  # file a, file b: every W line within 1e-4 relative, same rows
  python3 - "$1" "$2" <<'EOF'
import sys
a, b = (open(p).read().split('\n') for p in sys.argv[1:3])
if len(a) != len(b) or not any(l.startswith('W ') for l in a): sys.exit('different lines: %r vs %r' % (a, b))
for x, y in zip(a, b):
    if x.startswith('W '):
        u, v = float(x.split()[2]), float(y.split()[2])
        if abs(u - v) > 1e-4 * max(1, abs(u)): sys.exit('%s vs %s' % (x, y))
    elif x != y: sys.exit('%s vs %s' % (x, y))
EOF
}
mkdir -p "$tmp/u1" "$tmp/u2" "$tmp/a" "$tmp/b"
run1 "$tmp/u1" 2 >"$tmp/u1.txt"
run2 "$tmp/u2" 2 >"$tmp/u2.txt"
if msg=$(same "$tmp/u1.txt" "$tmp/u2.txt" 2>&1); then ok "2 ranks at 8 = 1 process at 16 over 2 epochs (Adam)"
else notok "2 ranks vs 1 process: $msg"; fi
run2 "$tmp/a" 1 >/dev/null; run1 "$tmp/a" 2 >"$tmp/a.txt"
if msg=$(same "$tmp/u1.txt" "$tmp/a.txt" 2>&1); then ok "a checkpoint of 2 ranks resumed by 1 process = uninterrupted"
else notok "2 ranks -> 1: $msg"; fi
run1 "$tmp/b" 1 >/dev/null; run2 "$tmp/b" 2 >"$tmp/b.txt"
if msg=$(same "$tmp/u1.txt" "$tmp/b.txt" 2>&1); then ok "a checkpoint of 1 process resumed by 2 ranks = uninterrupted"
else notok "1 -> 2 ranks: $msg"; fi
if [ "$(head -1 "$tmp/a/history.csv" 2>/dev/null | cut -c1-5)" = stage ] && [ "$(wc -l <"$tmp/a/history.csv")" -eq 3 ]; then
  ok "history.csv: one header and one row per epoch (written by rank 0 only)"
else notok "history.csv: $(cat "$tmp/a/history.csv" 2>&1 | head -5)"; fi

# 3. a whole recipe under 2 ranks: one run directory, written by rank 0, with every file
timeout 600 "${MPIRUN[@]}" "$FL" experiments/quickstart.lua --tiny --runs "$tmp/runs" --run-name two >"$tmp/qs.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ "$(ls "$tmp/runs")" = two ] && [ -f "$tmp/runs/two/predict.csv" ] && [ -f "$tmp/runs/two/report.html" ] \
   && [ "$(grep -c 'run directory' "$tmp/runs/two/log.txt")" -eq 1 ]; then
  ok "quickstart --tiny under 2 ranks: one run directory with predict.csv and report.html, one log"
else notok "quickstart under 2 ranks: status $rc, runs: $(ls "$tmp/runs" 2>&1)"; tail -10 "$tmp/qs.txt"; fi

# 4. kill -9 of rank 1 mid-epoch, once a checkpoint exists
mkdir -p "$tmp/k"
"${MPIRUN[@]}" "$FL" tests/lua/dist_train.lua slow "$tmp/k" >"$tmp/k.txt" 2>&1 &
mp=$!; pids+=("$mp")
for _ in $(seq 1 600); do [ -f "$tmp/k/ckpt/last.h5" ] && [ -f "$tmp/k/pid.1" ] && break; sleep 0.1; done
sleep 0.3                       # mid-epoch
start=$SECONDS
kill -9 "$(cat "$tmp/k/pid.1")"
for _ in $(seq 1 1200); do kill -0 "$mp" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$mp" 2>/dev/null; then notok "kill -9 of rank 1: the job still runs after 120 s"; kill -9 "$mp"; fi
wait "$mp"; rc=$?
took=$((SECONDS - start))
if [ $rc -ne 0 ] && grep -q 'rank 1 .*exited on signal 9' "$tmp/k.txt"; then
  ok "kill -9 of rank 1 ends the job with status $rc after ${took}s, naming rank 1"
else notok "kill -9 of rank 1: status $rc after ${took}s"; tail -10 "$tmp/k.txt"; fi
if "$FL" -e "
  local nn = require 'flower.nn'
  local inp = nn.Input{10}
  local m = nn.Model(inp, nn.Dense{units = 4, name = 'out'}(nn.Activation('relu')(nn.Dense{units = 16, name = 'fc1'}(inp))))
  local meta = nn.load_checkpoint('$tmp/k/ckpt/last.h5', m)
  assert(meta.epoch >= 1)" 2>"$tmp/load.err"; then
  ok "the checkpoint on disk after the kill loads"
else notok "the checkpoint after the kill: $(cat "$tmp/load.err")"; fi
if ls "$tmp/k/ckpt" | grep -v '^last.h5$' | grep -q .; then notok "leftovers in the checkpoint directory: $(ls "$tmp/k/ckpt")"
else ok "nothing but last.h5 in the checkpoint directory"; fi
