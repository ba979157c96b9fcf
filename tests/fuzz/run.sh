#!/usr/bin/env bash
# Runs each libFuzzer target (build-fuzz/fuzz/fuzz_<t>, built by `make fuzz`) for FUZZ_SECONDS on
# a scratch copy of its seed corpus (tests/fuzz/seeds/<t>, plus tests/fuzz/crashers/h5 for the
# HDF5 targets), and prints one line per target: executions, corpus size, crashes. Crash inputs
# go to build-fuzz/artifacts/. Exits 1 if any target crashed (a sanitizer report, a crash, a
# timeout of 60 s on one input, or more than 3 GiB of memory).
# Usage: FUZZ_SECONDS=600 tests/fuzz/run.sh [target...]
set -u
cd "$(dirname "$0")/../.."
secs=${FUZZ_SECONDS:-600}
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(jpeg kaggle_json h5 keras)
mkdir -p build-fuzz/artifacts build-fuzz/corpus
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
failed=0
for t in "${targets[@]}"; do
  bin=build-fuzz/fuzz/fuzz_$t
  corpus=build-fuzz/corpus/$t
  mkdir -p "$corpus"
  seeds=(tests/fuzz/seeds/$t)
  case $t in h5|keras) seeds+=(tests/fuzz/seeds/h5 tests/fuzz/crashers/h5) ;; esac
  log=build-fuzz/fuzz_$t.log
  nice "$bin" -max_total_time="$secs" -timeout=60 -rss_limit_mb=3072 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/artifacts/$t-" "$corpus" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  crashes=$(ls build-fuzz/artifacts/ 2>/dev/null | grep -c "^$t-")
  printf '%-12s %4ds  %10s executions  %5s in corpus  %s crash files  (rc %d)\n' "$t" "$secs" "${execs:-?}" \
    "$(ls "$corpus" | wc -l)" "$crashes" "$rc"
  if [ $rc -ne 0 ]; then failed=1; grep -E 'ERROR|SUMMARY|==[0-9]+==' "$log" | head -5 | sed 's/^/    /'; fi
done
exit $failed
