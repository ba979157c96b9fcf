#!/usr/bin/env bash
# Tests of scripts/fetch_weights.sh that need no network: help, argument errors, the md5 table
# (every hash is the one the installed tf-keras / keras sources use), and an already-present file
# that fails its md5 check is never accepted.
set -u
cd "$(dirname "$0")/../.."
S=scripts/fetch_weights.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok() { echo "ok - $1"; }
notok() { echo "not ok - $1"; shift; for l in "$@"; do printf '    %s\n' "$l"; done; }

out=$(bash "$S" --help 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -q 'resnet50_keras1' <<<"$out"; then ok "fetch_weights --help"; else notok "fetch_weights --help" "rc=$rc" "$out"; fi

out=$(bash "$S" --dir "$tmp" vgg16 2>&1); rc=$?
if [ $rc -eq 1 ] && grep -q "unknown model 'vgg16'" <<<"$out" && [ "$(wc -l <<<"$out")" -eq 1 ]; then
  ok "fetch_weights: an unknown model is one clear line"
else notok "fetch_weights: an unknown model is one clear line" "rc=$rc" "$out"; fi

# `fetch_weights.sh DIR` as README shows it: the path is the directory, not a model name
out=$(timeout 60 bash "$S" "$tmp/pos" xception 2>&1); rc=$?
if [ -d "$tmp/pos" ] && ! grep -q 'unknown model' <<<"$out" && [ ! -e "$tmp/pos/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5.part" ]; then
  ok "fetch_weights DIR: a path argument is the directory"
else notok "fetch_weights DIR: a path argument is the directory" "rc=$rc" "$out"; fi

out=$(bash "$S" --bogus 2>&1); rc=$?
if [ $rc -eq 2 ] && grep -q 'unknown option --bogus' <<<"$out"; then ok "fetch_weights: unknown option"
else notok "fetch_weights: unknown option" "rc=$rc" "$out"; fi

# The hashes in the script are the ones Keras itself checks (read from the installed sources).
py=${PYTHON:-.venv/bin/python}
site=$("$py" -c 'import tf_keras, os; print(os.path.dirname(tf_keras.__file__))' 2>/dev/null)
if [ -n "$site" ]; then
  missing=""
  for h in 4d473c1dd8becc155b73f8504c6f6626 2cb95161c43110f7111970584f804107 bcbd6486424b2319ff4ef7d526e38f63 \
           9a0d58056eeedaa3f26cb7ebd46da564 b0042744bf5b25fce3cb969f33bebb97 0a58e3b7378bc2990ea3b43d5981f1f6 \
           d19885ff4a710c122648d3b5c3b684e4 e693bd0210a403b3192acc6073ad2e96; do
    grep -q "$h" "$S" || missing="$missing $h(script)"
    grep -rq "$h" "$site/src/applications" || missing="$missing $h(tf_keras)"
  done
  if [ -z "$missing" ]; then ok "fetch_weights: md5 hashes equal tf-keras's"
  else notok "fetch_weights: md5 hashes equal tf-keras's" "missing:$missing"; fi
else
  notok "fetch_weights: md5 hashes equal tf-keras's" "cannot import tf_keras with $py (run make deps)"
fi

# A present file with the wrong content is not accepted: the script tries to download it again
# (and without network says so in one line), and never reports it as ok.
name=xception_weights_tf_dim_ordering_tf_kernels_notop.h5
echo "not the weights" >"$tmp/$name"
out=$(timeout 60 bash "$S" --dir "$tmp" xception 2>&1); rc=$?
if [ $rc -ne 0 ] && ! grep -q '^ok xception' <<<"$out" && [ ! -e "$tmp/$name.part" ]; then
  ok "fetch_weights: a file with the wrong md5 is not accepted"
elif [ $rc -eq 0 ] && [ "$(md5sum "$tmp/$name" | cut -d' ' -f1)" = b0042744bf5b25fce3cb969f33bebb97 ]; then
  ok "fetch_weights: a file with the wrong md5 is replaced by the checked download"
else notok "fetch_weights: a file with the wrong md5 is not accepted" "rc=$rc" "$out"; fi
