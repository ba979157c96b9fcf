#!/usr/bin/env bash
# Tests of the flowerlua host: command line (arg table, -e, -l, -i, stdin, --version, --help),
# errors and exit codes, Ctrl-C, finding the Lua library from any cwd / through a symlink /
# after `make install`, embedding (tests/embed/embed.c against libflower.a and libflower.so),
# stock lua5.4 with the C module, and the REPL driven through tmux (tests/sh/repl_tmux.sh).
# Env: FLOWERLUA (default ./flowerlua), BUILD (default build), SANITIZE=1 for the ASan build.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${BUILD:-build}
BUILD_ABS=$(realpath "$BUILD")
FL=$(realpath "${FLOWERLUA:-./flowerlua}")
SAN=0; [ "${SANITIZE:-0}" = 1 ] && SAN=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset FLOWERLUA_PATH LUA_INIT LUA_INIT_5_4

ok() { echo "ok - $1"; }
notok() { echo "not ok - $1"; shift; for l in "$@"; do printf '    %s\n' "$l" | head -20; done; }
# expect NAME WANT_RC CMD...: runs CMD, keeps stdout in $out, stderr in $err, rc in $rc.
run() { "$@" >"$tmp/out" 2>"$tmp/err"; rc=$?; out=$(cat "$tmp/out"); err=$(cat "$tmp/err"); }
# verdict NAME CONDITION-STRING: evaluates a condition over $out/$err/$rc.
verdict() {
  local name=$1; shift
  if eval "$@"; then ok "$name"; else notok "$name" "rc=$rc" "stdout: $out" "stderr: $err"; fi
}

version=$(sed -n 's/^VERSION *:= *//p' Makefile)

# ---- command line ----
run "$FL" --version
verdict "--version prints the version" '[ $rc = 0 ] && [[ "$out" =~ ^flowerlua\ $version\ \(Lua\ 5\.4 ]]'
run "$FL" --help
verdict "--help prints usage and options" '[ $rc = 0 ] && [[ "$out" == *"usage: flowerlua"* && "$out" == *"-e stat"* && "$out" == *"-l mod"* ]]'
run "$FL" -v
verdict "-v prints the version" '[ $rc = 0 ] && [[ "$out" == "flowerlua $version"* ]]'
run "$FL" -e 'print(1 + 2, arg[0] ~= nil, arg[1])'
verdict "-e runs code (arg holds the options like lua.c)" '[ $rc = 0 ] && [ "$out" = "3	true	-e" ]'
run "$FL" -e 'x = 40' -e 'print(x + 2)'
verdict "several -e run in order" '[ $rc = 0 ] && [ "$out" = 42 ]'
echo 'print(os.getenv("OMP_WAIT_POLICY"), os.getenv("OPENBLAS_THREAD_TIMEOUT"), #arg, arg[2])' > "$tmp/threads.lua"
run env -u OMP_WAIT_POLICY -u OPENBLAS_THREAD_TIMEOUT "$FL" "$tmp/threads.lua" a b
verdict "the thread pools wait passively unless the user chose (set before the libraries load), arguments kept" '[ $rc = 0 ] && [ "$out" = "passive	4	2	b" ]'
run env OMP_WAIT_POLICY=active OPENBLAS_THREAD_TIMEOUT=28 "$FL" "$tmp/threads.lua" a b
verdict "the user's thread settings are kept" '[ $rc = 0 ] && [ "$out" = "active	28	2	b" ]'

cat >"$tmp/args.lua" <<'EOF'
local n = select('#', ...)
print(arg[0]:match('[^/]*$'), #arg, arg[1], arg[2], arg[3], n, (...))
print(arg[-1]:match('[^/]*$') or arg[-1], arg[-2] ~= nil)
EOF
run "$FL" "$tmp/args.lua" a 'b c' ''
verdict "script with arguments: arg[0], arg[1..n], ..." '[ $rc = 0 ] && [ "$(sed -n 1p <<<"$out")" = "args.lua	3	a	b c		3	a" ]'
verdict "arg[-1] is the program, nothing below it" '[ "$(sed -n 2p <<<"$out")" = "flowerlua	false" ]'
run "$FL" -e 'y = 1' "$tmp/args.lua" z
verdict "options before the script get negative indices" '[ $rc = 0 ] && [ "$(sed -n 2p <<<"$out")" = "y = 1	true" ]'

run "$FL" -l flower -e 'print(type(flower), flower.version)'
verdict "-l flower sets the global flower" '[ $rc = 0 ] && [ "$out" = "table	$version" ]'
run "$FL" -l s=string -e 'print(s.rep("ab", 2))'
verdict "-l g=mod sets the global g" '[ $rc = 0 ] && [ "$out" = abab ]'
run "$FL" -l no_such_module_xyz
verdict "-l of a missing module fails with the require message" '[ $rc = 1 ] && [[ "$err" == *"module '"'"'no_such_module_xyz'"'"' not found"* ]]'

run bash -c "echo 'print(\"from stdin\", ...)' | '$FL' - p q"
verdict "- runs stdin with arguments" '[ $rc = 0 ] && [ "$out" = "from stdin	p	q" ]'
run bash -c "echo 'print(6 * 7)' | '$FL'"
verdict "no arguments and stdin not a terminal: runs stdin" '[ $rc = 0 ] && [ "$out" = 42 ]'
run bash -c "printf 'x = 5\nx * 2\n{1, \"a\", k = true}\n' | '$FL' -i"
verdict "-i without a terminal reads statements and prints results" '[ $rc = 0 ] && [[ "$out" == *"> 10"* && "$out" == *"{1, \"a\", k=true}"* ]]'
run bash -c "printf 'm = flower.nn.Sequential{flower.nn.Input{3}, flower.nn.Dense{units = 2}}\nm:summary()\n' | '$FL' -i"
verdict "model:summary() in the REPL shows the table once" '[ $rc = 0 ] && [ "$(grep -c "^Total params: 8 " <<<"$out")" = 1 ]'

# ---- errors ----
cat >"$tmp/fail.lua" <<'EOF'
local function inner(x) error("bad value: " .. tostring(x)) end
local function outer() inner(7) end
print("before")
outer()
print("after")
EOF
run "$FL" "$tmp/fail.lua"
verdict "a failing script exits 1" '[ $rc = 1 ] && [ "$out" = before ]'
verdict "the error message names file, line and text" '[[ "$err" == *"fail.lua:1: bad value: 7"* ]]'
verdict "the traceback goes through the calling functions" '[[ "$err" == *"stack traceback:"* && "$err" == *"inner'"'"'"* && "$err" == *"in local '"'"'outer'"'"'"* && "$err" == *"fail.lua:4: in main chunk"* ]]'
run "$FL" -e 'error({code = 1})'
verdict "a non-string error object is reported" '[ $rc = 1 ] && [[ "$err" == *"error object is a table value"* ]]'
printf 'x = = 1\n' >"$tmp/syntax.lua"
run "$FL" "$tmp/syntax.lua"
verdict "a syntax error exits 1 with its place" '[ $rc = 1 ] && [[ "$err" == *"syntax.lua:1:"*"near"* ]]'
run "$FL" "$tmp/missing.lua"
verdict "a missing script exits 1" '[ $rc = 1 ] && [[ "$err" == *"cannot open"*"missing.lua"* ]]'
run "$FL" -e 'x ='
verdict "a bad -e chunk exits 1" '[ $rc = 1 ] && [[ "$err" == *"(command line):1:"* ]]'
run "$FL" -q
verdict "an unknown option exits 1 with usage" '[ $rc = 1 ] && [[ "$err" == *"unrecognized option '"'"'-q'"'"'"* && "$err" == *usage:* ]]'
run "$FL" -e
verdict "-e without its argument exits 1" '[ $rc = 1 ] && [[ "$err" == *"needs an argument"* ]]'
run "$FL" -e 'os.exit(3)'
verdict "os.exit(n) gives status n" '[ $rc = 3 ]'

# Ctrl-C (SIGINT) interrupts a running script: error "interrupted!", status 1
"$FL" -e "io.open('$tmp/started', 'w'):close() while true do end" >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 200); do [ -f "$tmp/started" ] && break; sleep 0.05; done
sleep 0.1; kill -INT $pid 2>/dev/null
for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
if kill -0 $pid 2>/dev/null; then kill -KILL $pid; fi
wait $pid; rc=$?; out=$(cat "$tmp/out"); err=$(cat "$tmp/err")
verdict "SIGINT interrupts a running script (exit 1, interrupted!)" '[ $rc = 1 ] && [[ "$err" == *"interrupted!"* && "$err" == *"stack traceback:"* ]]'

# ---- finding the Lua library ----
probe='local f = require "flower"; print(f.version, package.searchpath("flower", package.path))'
run bash -c "cd '$tmp' && '$FL' -e '$probe'"
verdict "from another cwd, require 'flower' finds scripts/" '[ $rc = 0 ] && [ "$out" = "$version	$ROOT/scripts/flower/init.lua" ]'
rel=$(realpath --relative-to="$ROOT/tests" "$FL")
run bash -c "cd '$ROOT/tests' && '$rel' -e '$probe'"
verdict "run by a relative path from a subdirectory" '[ $rc = 0 ] && [ "$out" = "$version	$ROOT/scripts/flower/init.lua" ]'
mkdir -p "$tmp/bin" && ln -s "$FL" "$tmp/bin/fl"
run bash -c "cd / && PATH='$tmp/bin':\$PATH fl -e '$probe'"
verdict "run through a symlink on PATH" '[ $rc = 0 ] && [ "$out" = "$version	$ROOT/scripts/flower/init.lua" ]'
mkdir -p "$tmp/lib/flower" && echo 'return {fake = "yes"}' >"$tmp/lib/flower/init.lua"
run env FLOWERLUA_PATH="$tmp/lib" "$FL" -e 'print(require("flower").fake)'
verdict "FLOWERLUA_PATH overrides the library directory" '[ $rc = 0 ] && [ "$out" = yes ]'

# ---- make install ----
# -o all: install what is built, never rebuild here (make test has just built it).
prefix="$tmp/prefix"
run make --no-print-directory -s -o all install PREFIX="$prefix" BUILD="$BUILD"
verdict "make install PREFIX=... succeeds" '[ $rc = 0 ] && [ -x "$prefix/bin/flowerlua" ] && [ -f "$prefix/include/flowerlua.h" ] && [ -f "$prefix/lib/libflower.so" ] && [ -f "$prefix/share/flowerlua/scripts/flower/init.lua" ]'
if [ "$SAN" = 1 ]; then cp "$FL" "$prefix/bin/flowerlua"; fi  # the rule installs ./flowerlua
run bash -c "cd / && '$prefix/bin/flowerlua' -e '$probe'"
verdict "the installed flowerlua finds share/flowerlua/scripts from elsewhere" '[ $rc = 0 ] && [ "$out" = "$version	$(realpath "$prefix")/share/flowerlua/scripts/flower/init.lua" ]'

# ---- embedding ----
# The Makefile's link flags, exactly (SAN=1 adds the sanitizers).
libs=$(make --no-print-directory -s --eval='print-libs: ; @echo $(LDLIBS)' print-libs BUILD="$BUILD" SAN="$SAN")
ccflags="-std=c11 -Wall -Wextra -Werror -g $(pkg-config --cflags lua5.4)"
[ "$SAN" = 1 ] && ccflags="$ccflags -fsanitize=address,undefined -fno-omit-frame-pointer"
embed_run() {  # name binary: runs the embed test program from $tmp, forwarding its ok lines
  local name=$1 bin=$2
  shift 2
  (cd "$tmp" && env "$@" "$bin" "$name") >"$tmp/out" 2>"$tmp/err"; rc=$?
  cat "$tmp/out"
  if [ $rc != 0 ] && ! grep -q '^not ok' "$tmp/out"; then notok "$name: the program ran to its end" "rc=$rc" "$(tail -20 "$tmp/err")"; fi
}
if cc $ccflags -Ibindings tests/embed/embed.c "$BUILD/libflower.a" $libs -llua5.4 -o "$tmp/embed_static" 2>"$tmp/err"; then
  ok "embed: compiles against flowerlua.h and libflower.a"
  embed_run "embed-static" "$tmp/embed_static" FLOWERLUA_PATH="$ROOT/scripts"
else
  notok "embed: compiles against flowerlua.h and libflower.a" "$(head -20 "$tmp/err")"
fi
# Shared: no FLOWERLUA_PATH, the library finds scripts/ from its own location (dladdr).
if cc $ccflags -Ibindings tests/embed/embed.c -L"$BUILD_ABS" -Wl,-rpath,"$BUILD_ABS" -lflower -llua5.4 \
     -o "$tmp/embed_shared" 2>"$tmp/err"; then
  ok "embed: compiles against flowerlua.h and libflower.so"
  embed_run "embed-shared" "$tmp/embed_shared"
else
  notok "embed: compiles against flowerlua.h and libflower.so" "$(head -20 "$tmp/err")"
fi
# Installed copy: header and shared library from PREFIX, scripts from PREFIX/share.
if cc $ccflags -I"$prefix/include" tests/embed/embed.c -L"$prefix/lib" -Wl,-rpath,"$prefix/lib" -lflower -llua5.4 \
     -o "$tmp/embed_installed" 2>"$tmp/err"; then
  embed_run "embed-installed" "$tmp/embed_installed"
else
  notok "embed: compiles against the installed header and library" "$(head -20 "$tmp/err")"
fi

# ---- stock lua5.4 with the C module ----
preload=""
if [ "$SAN" = 1 ]; then  # an ASan module needs the runtime loaded first in a plain interpreter
  preload="$(cc -print-file-name=libasan.so):$(cc -print-file-name=libubsan.so)"
fi
run env LD_PRELOAD="$preload" LUA_PATH='scripts/?.lua;scripts/?/init.lua;;' LUA_CPATH="$BUILD_ABS/lua/?.so;;" \
  lua5.4 -e "local flower = require 'flower'; print(flower.version, (flower.ones(2, 2) + 1):sum():item())"
verdict "stock lua5.4 requires flower (C module $BUILD/lua/flower/core.so)" '[ $rc = 0 ] && [ "$out" = "$version	8.0" ]'
run env LD_PRELOAD="$preload" LUA_PATH="$prefix/share/flowerlua/scripts/?.lua;$prefix/share/flowerlua/scripts/?/init.lua;;" \
  LUA_CPATH="$prefix/lib/lua/5.4/?.so;;" lua5.4 -e "print(require('flower').version)"
verdict "stock lua5.4 requires the installed flower" '[ $rc = 0 ] && [ "$out" = "$version" ]'

# ---- the REPL, through a terminal ----
bash tests/sh/repl_tmux.sh "$FL"
