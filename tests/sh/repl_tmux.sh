#!/usr/bin/env bash
# The flowerlua REPL driven through a real terminal (tmux send-keys / capture-pane): results of
# expressions, multi-line input, tab completion (globals, nested fields, methods through
# metatables, tensors), errors, Ctrl-C during a statement and at the prompt, Ctrl-D, and history
# saved across sessions. Every step polls the screen for the expected text (no fixed sleeps).
# Usage: bash tests/sh/repl_tmux.sh FLOWERLUA   (called by tests/sh/test_host.sh)
set -u
FL=${1:?usage: repl_tmux.sh FLOWERLUA}
if ! command -v tmux >/dev/null; then
  echo "not ok - repl: tmux is installed (make deps installs it)"
  exit 0
fi
tmp=$(mktemp -d)
sessions=0
hist="$tmp/history"
TIMEOUT=${REPL_TIMEOUT:-20}             # seconds per expectation; sanitizer builds start slowly

T() { tmux -S "$tmp/tmux$sessions.sock" "$@"; }
trap 'T kill-server 2>/dev/null; rm -rf "$tmp"' EXIT

start() {   # a fresh REPL in session "repl" of a new tmux server; the pane stays after exit
  T kill-server 2>/dev/null
  sessions=$((sessions + 1))
  T -f /dev/null new-session -d -s repl -x 160 -y 50 \
    "env INPUTRC=/dev/null HOME='$tmp' FLOWERLUA_HISTORY='$hist' '$FL'; echo REPL-EXITED-\$?; sleep 120"
}
screen() { T capture-pane -p -t repl -S -2000 2>/dev/null; }
# Waits until a line of the screen matches the extended regex $1.
wait_for() {
  local deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -le $deadline ]; do
    screen | grep -qE -- "$1" && return 0
    sleep 0.05
  done
  return 1
}
# Waits until the last non-empty line is exactly $1 (default ">", an empty prompt).
wait_prompt() {
  local want=${1:->} deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -le $deadline ]; do
    [ "$(screen | grep -v '^$' | tail -1)" = "$want" ] && return 0
    sleep 0.05
  done
  return 1
}
type_text() { T send-keys -t repl -l "$1"; }
send() { T send-keys -t repl -l "$1"; T send-keys -t repl Enter; }
key() { T send-keys -t repl "$@"; }
expect() {  # name regex: ok if the screen shows a matching line (waiting for it)
  if wait_for "$2"; then echo "ok - repl: $1"
  else echo "not ok - repl: $1"; echo "    expected a line matching: $2"; screen | grep -v '^$' | tail -12 | sed 's/^/    | /'
  fi
}
step() { wait_prompt; send "$1"; }     # runs a line at a fresh prompt

start
expect "starts with the banner and a prompt" '^flowerlua [0-9.]+ \(Lua 5\.4'
wait_prompt || { echo "not ok - repl: shows the prompt"; screen | tail -20 | sed 's/^/    | /'; exit 0; }
echo "ok - repl: shows the prompt"

step '1+2'
expect "an expression prints its value without = or return" '^3$'
step 'function sq(x)'; send 'return x * x'; send 'end'
expect "an incomplete statement continues with >>" '^>> return x \* x$'
step 'sq(7) + 1'
expect "a multi-line function definition works" '^50$'
step '1, "two", nil'
expect "multiple results are printed" '^1 +two +nil$'
step 'tbl = {10, 20, name = "x", sub = {1}, empty = {}}'
step 'tbl'
expect "tables print briefly on one line" '^\{10, 20, empty=\{\}, name="x", sub=\{\.\.\.\}\}$'

# completion: a global's field, a nested path, a method through a metatable's __index table
wait_prompt; type_text 'string.for'; key Tab
expect "Tab completes a field (string.for -> string.format)" '^> string\.format$'
send '("%d-%d", 4, 2)'
expect "the completed call runs" '^4-2$'
wait_prompt; type_text 'package.loaded.string.reve'; key Tab
expect "Tab completes a nested path" '^> package\.loaded\.string\.reverse$'
send '("abc")'
expect "the nested completion runs" '^cba$'
wait_prompt; type_text 'io.stdout:wri'; key Tab
expect "Tab completes a method after : through the metatable" '^> io\.stdout:write$'
key C-u
step 'lazy = setmetatable({}, {__complete = {"alpha", "beta"}, __index = function(_, k) return k .. "!" end})'
wait_prompt; type_text 'lazy.al'; key Tab
expect "Tab completes names a metatable lists in __complete" '^> lazy\.alpha$'
send ''
expect "the __complete name resolves" '^alpha!$'
wait_prompt; type_text 'pri'; key Tab Tab
expect "Tab completes a global" '^> print$'
key C-u

# tensors: completion of flower's functions and of a tensor's methods, Torch-style display
wait_prompt; type_text 'flower.zer'; key Tab
expect "Tab completes flower.zer -> flower.zeros" '^> flower\.zeros$'
send '(2, 3)'
expect "a tensor prints Torch-style with its size" '2x3'
step 'tt = flower.ones(2, 2)'
wait_prompt; type_text 'tt:nu'; key Tab
expect "Tab completes a tensor method (tt:nu -> tt:numel)" '^> tt:numel$'
send '()'
expect "the tensor method runs" '^4$'

# a call that prints and returns nothing shows its output once (issue 12: summary printed twice)
step 'm = flower.nn.Sequential{flower.nn.Input{3}, flower.nn.Dense{units = 2}}'
step 'm:summary()'
expect "model:summary() shows its table" '^Total params: 8 '
wait_prompt
n=$(screen | grep -c '^Total params: 8 ')
if [ "$n" = 1 ]; then echo "ok - repl: model:summary() shows its table once"
else echo "not ok - repl: model:summary() shows its table once"; echo "    the table appeared $n times"; fi

# errors
step 'error("boom-" .. 42)'
expect "an error prints its message" '^stdin:1: boom-42$'
step '40 + 2'
expect "the REPL continues after an error" '^42$'
step 'nil + 1'
expect "a runtime error in an expression is reported" 'attempt to perform arithmetic on a nil value'

# Ctrl-C: interrupts a running statement, clears a line, abandons a multi-line chunk
step 'print("loop-" .. "started") while true do end'
wait_for '^loop-started$'; key C-c
expect "Ctrl-C interrupts a running statement" 'interrupted!'
step '6 * 7 + 1'
expect "the REPL continues after the interrupt" '^43$'
wait_prompt; type_text 'garbage_line'; wait_for '^> garbage_line$'; key C-c
expect "Ctrl-C at the prompt shows ^C" '^> garbage_line\^C$'
step '1000 + 1'
expect "after Ctrl-C at the prompt a new line runs" '^1001$'
step 'for i = 1, 3 do'; wait_prompt '>>'; key C-c
step '5 + 5'
expect "Ctrl-C abandons an incomplete chunk" '^10$'
if screen | grep -qx 'nil'; then echo "not ok - repl: the cleared line was not run"; else echo "ok - repl: the cleared line was not run"; fi

# Ctrl-D exits with status 0; history is in the file
wait_prompt; key C-d
expect "Ctrl-D exits with status 0" '^REPL-EXITED-0$'
h=$(cat "$hist" 2>/dev/null)
if grep -qx '1+2' <<<"$h" && grep -qx 'function sq(x)' <<<"$h" && grep -qx 'return x \* x' <<<"$h" \
   && grep -qx '5 + 5' <<<"$h" && ! grep -q garbage_line <<<"$h"; then
  echo "ok - repl: history is saved to FLOWERLUA_HISTORY"
else
  echo "not ok - repl: history is saved to FLOWERLUA_HISTORY"; sed 's/^/    | /' <<<"$h"
fi

# a new session recalls the history with Up
start
wait_prompt; key Up
expect "a new session recalls the last line with Up" '^> 5 \+ 5$'
key Enter
expect "the recalled line runs" '^10$'
wait_prompt; key C-d
expect "the second session exits" '^REPL-EXITED-0$'
