#!/usr/bin/env bash
# Installs what flowerlua needs on Debian: build dependencies always, and with --test the
# Python virtual environment (.venv) that computes references and runs the peers.
# Idempotent and quiet when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

build_pkgs=(build-essential pkg-config lua5.4 liblua5.4-dev lua-cjson libjpeg62-turbo-dev
            libhdf5-dev libopenblas-dev libdnnl-dev libreadline-dev
            libopenmpi-dev openmpi-bin)
test_pkgs=(python3 python3-venv python3-numpy python3-torch python3-torchvision tmux libturbojpeg0
           dataset-fashion-mnist)

want_test=0
[ "${1:-}" = "--test" ] && want_test=1
# --fuzz: the libFuzzer toolchain for `make fuzz` (clang and its runtime libraries)
[ "${1:-}" = "--fuzz" ] && build_pkgs+=(clang libclang-rt-14-dev)

pkgs=("${build_pkgs[@]}")
[ $want_test = 1 ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ $want_test = 1 ] || exit 0

# The venv sees Debian's numpy and torch (system site packages); numpy stays below 2 because
# Debian's torch is built against numpy 1.x.
venv=.venv
stamp=$venv/.deps-v2
if [ ! -f "$stamp" ]; then
  echo "deps: creating the Python environment in $venv (TensorFlow, Keras, h5py, Pillow, OpenCV)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "numpy<2" tensorflow-cpu tf-keras keras h5py pillow opencv-python-headless "PyTurboJPEG<2"
  touch "$stamp"
fi
# Added after the stamp, so existing environments get them too: scikit-learn (the split tests
# compare ds:split with its train_test_split), tensorboard (its own reader checks our event files).
for mod_pkg in sklearn:scikit-learn tensorboard:tensorboard; do
  if ! "$venv/bin/python" -c "import ${mod_pkg%%:*}" 2>/dev/null; then
    "$venv/bin/pip" install -q --disable-pip-version-check "numpy<2" "${mod_pkg#*:}"
  fi
done
