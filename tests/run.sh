#!/usr/bin/env bash
# Runs every test: C unit tests ($BUILD/tests/test_*), then Lua tests (tests/lua/test_*.lua) under
# ./flowerlua, then the shell tests (tests/sh/test_*.sh). Each prints `ok - name` or `not ok - name`
# lines (`ok - name # SKIP reason` counts as skipped); a program that exits non-zero without reporting a failure counts as one failure.
# Ends with one line: `N passed, N failed`.
# Usage: tests/run.sh [pattern]   (only test files whose name contains pattern)
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
FLOWERLUA=${FLOWERLUA:-./flowerlua}
export FLOWERLUA BUILD
filter=${1:-}
passed=0; failed=0; skipped=0; failures=()
log=$(mktemp); trap 'rm -f "$log"' EXIT

run_one() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$log" 2>&1; local rc=$?
  local p f s
  s=$(grep -c '^ok - .*# SKIP' "$log")
  p=$(( $(grep -c '^ok - ' "$log") - s )); f=$(grep -c '^not ok - ' "$log")
  if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then f=1; echo "not ok - $name exited with status $rc" >>"$log"; fi
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
  printf '%-40s %4d passed %4d failed %4d skipped  (%ds)\n' "$name" "$p" "$f" "$s" $((SECONDS - start))
  if [ "$f" -gt 0 ]; then
    failures+=("$name"); sed -n '/^not ok - /,/^ok - /p' "$log" | grep -v '^ok - ' | head -40 | sed 's/^/    /'
    [ $rc -ne 0 ] && tail -15 "$log" | sed 's/^/    | /'
  fi
}

for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] || continue
  case "$t" in *"$filter"*) run_one "$(basename "$t")" "$t" ;; esac
done
for t in tests/lua/test_*.lua; do
  [ -f "$t" ] || continue
  case "$t" in *"$filter"*) run_one "$(basename "$t")" "$FLOWERLUA" "$t" ;; esac
done
for t in tests/sh/test_*.sh; do
  [ -f "$t" ] || continue
  case "$t" in *"$filter"*) run_one "$(basename "$t")" bash "$t" ;; esac
done

[ ${#failures[@]} -gt 0 ] && echo "failing: ${failures[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
