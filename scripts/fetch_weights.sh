#!/usr/bin/env bash
# Downloads the standard Keras Applications ImageNet weight files from their published URLs and
# checks them against the md5 hashes Keras itself uses (keras-applications / tf.keras sources).
# flowerlua never needs these files to build or test; they are for users with internet access.
#
#   scripts/fetch_weights.sh [--dir DIR] [--top] [MODEL ...]
#   scripts/fetch_weights.sh DIR [MODEL ...]     (a path argument is the directory)
#
# MODEL: resnet50 (the tf.keras file, names conv1_conv...), resnet50_keras1 (the original Keras 1
# file, names conv1/bn_conv1...), inception_v3, xception, inception_resnet_v2; default: all five
# notop files. --top fetches the files with the 1000-class classifier instead. DIR defaults to
# $FLOWER_WEIGHTS or ~/.keras/models (where Keras keeps them, so files already fetched by Keras
# are found and only checked). Each file is downloaded to DIR/NAME.part, checked, then renamed.
# Exit status: 0 when every requested file is present and checked, 1 otherwise.
set -u

dir=${FLOWER_WEIGHTS:-$HOME/.keras/models}
top=0
models=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=${2:?--dir needs a directory}; shift 2 ;;
    --top) top=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fetch_weights: unknown option $1 (see --help)" >&2; exit 2 ;;
    */*|.*|~*) dir=$1; shift ;;   # a path, not a model name: the directory
    *) if [ -d "$1" ]; then dir=$1; else models+=("$1"); fi; shift ;;
  esac
done
[ ${#models[@]} -eq 0 ] && models=(resnet50 resnet50_keras1 inception_v3 xception inception_resnet_v2)

G=https://storage.googleapis.com/tensorflow/keras-applications
O=https://github.com/fchollet/deep-learning-models/releases/download

# model -> "url md5" for the notop file and the file with the classifier
entry() {  # model top
  case "$1:$2" in
    resnet50:0) echo "$G/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 4d473c1dd8becc155b73f8504c6f6626" ;;
    resnet50:1) echo "$G/resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5 2cb95161c43110f7111970584f804107" ;;
    resnet50_keras1:0) echo "$O/v0.2/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 a268eb855778b3df3c7506639542a6af" ;;
    resnet50_keras1:1) echo "$O/v0.2/resnet50_weights_tf_dim_ordering_tf_kernels.h5 a7b3fe01876f51b976af0dea6bc144eb" ;;
    inception_v3:0) echo "$G/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 bcbd6486424b2319ff4ef7d526e38f63" ;;
    inception_v3:1) echo "$G/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5 9a0d58056eeedaa3f26cb7ebd46da564" ;;
    xception:0) echo "$G/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5 b0042744bf5b25fce3cb969f33bebb97" ;;
    xception:1) echo "$G/xception/xception_weights_tf_dim_ordering_tf_kernels.h5 0a58e3b7378bc2990ea3b43d5981f1f6" ;;
    inception_resnet_v2:0) echo "$G/inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5 d19885ff4a710c122648d3b5c3b684e4" ;;
    inception_resnet_v2:1) echo "$G/inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5 e693bd0210a403b3192acc6073ad2e96" ;;
    *) return 1 ;;
  esac
}

# The two ResNet50 files share a file name; keep the Keras 1 one apart.
local_name() {  # model url
  local base=${2##*/}
  [ "$1" = resnet50_keras1 ] && base=${base%.h5}_keras1.h5
  echo "$base"
}

md5_of() { md5sum "$1" 2>/dev/null | cut -d' ' -f1; }

download() {  # url out
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --connect-timeout 15 --retry 2 -o "$2" "$1" 2>&1 | tail -1
    return "${PIPESTATUS[0]}"
  elif command -v wget >/dev/null 2>&1; then
    wget -q --timeout=15 -O "$2" "$1" 2>&1 | tail -1
    return "${PIPESTATUS[0]}"
  fi
  echo "neither curl nor wget is installed"
  return 1
}

mkdir -p "$dir" || { echo "fetch_weights: cannot create $dir"; exit 1; }
status=0
for m in "${models[@]}"; do
  e=$(entry "$m" "$top") || { echo "fetch_weights: unknown model '$m' (resnet50, resnet50_keras1, inception_v3, xception, inception_resnet_v2; a directory is --dir DIR or a path)"; status=1; continue; }
  url=${e% *}; md5=${e#* }
  out="$dir/$(local_name "$m" "$url")"
  if [ -f "$out" ] && [ "$(md5_of "$out")" = "$md5" ]; then
    echo "ok $m: $out (md5 checked)"
    continue
  fi
  msg=$(download "$url" "$out.part")
  rc=$?
  if [ $rc -ne 0 ]; then
    rm -f "$out.part"
    case "$msg" in  # no network at all: one line, and stop trying the other files
      *"resolve host"*|*"Failed to connect"*|*"unable to resolve"*|*"Network is unreachable"*)
        echo "fetch_weights: offline: cannot reach ${url#https://} (${msg}); the tests never need these files"
        exit 1 ;;
    esac
    echo "fetch_weights: cannot download $m from $url: ${msg:-download failed}"
    status=1
    continue
  fi
  got=$(md5_of "$out.part")
  if [ "$got" != "$md5" ]; then
    rm -f "$out.part"
    echo "fetch_weights: $m: md5 $got differs from Keras's $md5; file discarded"
    status=1
    continue
  fi
  mv -f "$out.part" "$out" && echo "ok $m: $out (md5 $md5)"
done
exit $status
