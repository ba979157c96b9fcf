#!/usr/bin/env bash
# The prepared device check of the CUDA backend (issue 7): in one call, get a CUDA build of
# flowerlua, run the GPU tests (tests/c/test_backend_ops.c: every op and nn kernel against the CPU's;
# tests/lua/test_cuda.lua, the GPU test of test_mixed_precision.lua), then the GPU benchmark beside PyTorch
# (tests/bench/gpu.lua) and the quickstart on the GPU and on the CPUs, and print the test counts,
# the benchmark table and the quickstart's accuracies. Logs go to $OUT (the device tool's folder)
# when set, else to build-cuda/gpu-check/.
#
#   bash tests/gpu/check.sh --bundle      # HERE, no GPU needed: build with CUDA=1 and pack
#                                         #   build-cuda/gpu-bundle.tar.xz (flowerlua + its libraries)
#   bash tests/gpu/check.sh [--quick|--tests]   # ON THE GPU MACHINE (carry build-cuda/gpu-bundle.tar.xz);
#                                         #   --quick: batch 32, 5 steps (a fast sanity run);
#                                         #   --tests: the tests and the quickstart, no benchmark
#
# Why a bundle: the GPU image has nvcc, PyTorch and torchvision but not the Lua, HDF5, OpenBLAS and
# libjpeg development packages flowerlua builds against, and nothing can be installed there. So the
# binary is built here and travels with the shared libraries such an image may lack; CUDA's own
# libraries (cudart, cuBLAS, cuDNN) are taken from the machine: /usr/local/cuda or the nvidia-*
# wheels next to PyTorch. Without a bundle the script tries `make CUDA=1` on the machine itself.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUNDLE=build-cuda/gpu-bundle.tar.xz

# The Makefile links with cc; nvcc's objects need the C++ runtime. Until the Makefile's CUDA block
# links -lstdc++ itself, add it to the host link line.
make_cuda() {
  local extra=()
  grep -q -- '-lstdc++' Makefile || extra=(HOST_LIBS="-llua5.4 -lreadline -lstdc++")
  make CUDA=1 BUILD=build-cuda -j"$(nproc)" "${extra[@]}" "$@"
}

if [ "${1:-}" = "--bundle" ]; then
  set -e
  make_cuda build-cuda/flowerlua build-cuda/tests/test_backend_ops
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/gpubin/lib"
  cp build-cuda/flowerlua build-cuda/tests/test_backend_ops "$tmp/gpubin/"
  # every resolved library except the C library family, the GCC runtime (the machine's newer one
  # must serve cuDNN too) and CUDA's own
  ldd build-cuda/flowerlua | awk '$3 ~ /^\// {print $1, $3}' | while read -r name path; do
    case "$name" in
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|ld-linux*|libstdc++*|libgcc_s*) ;;
      libcuda.so*|libcudart*|libcublas*|libcudnn*|libnvrtc*|libnvJitLink*) ;;
      *) cp -L "$path" "$tmp/gpubin/lib/$name" ;;
    esac
  done
  # Lua C modules the scripts load (lua-cjson: JSON annotations, Keras model configs)
  mkdir -p "$tmp/gpubin/lua/cjson"
  cjson=$(ls /usr/lib/x86_64-linux-gnu/lua/5.4/cjson.so 2>/dev/null || true)
  [ -n "$cjson" ] && cp -L "$cjson" "$tmp/gpubin/lua/cjson.so" && cp -L "$cjson" "$tmp/gpubin/lua/cjson/safe.so"
  tar -C "$tmp" -cJf "$BUNDLE" gpubin
  echo "packed $BUNDLE ($(du -h "$BUNDLE" | cut -f1)): flowerlua and $(ls "$tmp/gpubin/lib" | wc -l) libraries"
  echo "on the GPU machine: bash tests/gpu/check.sh   (carry $BUNDLE)"
  exit 0
fi

BATCH=128; STEPS=20; BENCH=1
[ "${1:-}" = "--quick" ] && { BATCH=32; STEPS=5; }
[ "${1:-}" = "--tests" ] && BENCH=0
LOGS=${OUT:-build-cuda/gpu-check}
mkdir -p "$LOGS"
exec > >(tee "$LOGS/check.log") 2>&1
echo "== flowerlua GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), batch $BATCH, $STEPS steps"
START=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'

# ---- a CUDA build of flowerlua
if [ -f "$BUNDLE" ]; then
  UNPACK=$(mktemp -d /tmp/flowerlua-gpu.XXXXXX)
  tar -C "$UNPACK" -xJf "$BUNDLE" || { echo "FAILED: cannot unpack $BUNDLE"; exit 1; }
  FLOWERLUA=$UNPACK/gpubin/flowerlua
  BACKEND_OPS=$UNPACK/gpubin/test_backend_ops
  LIBS=$UNPACK/gpubin/lib
  export FLOWERLUA_PATH=$ROOT/scripts          # the Lua library of this checkout
  export LUA_CPATH="$UNPACK/gpubin/lua/?.so;;"
  echo "binary: $BUNDLE (built elsewhere), unpacked in $UNPACK"
else
  echo "no $BUNDLE: building here"
  if ! make_cuda build-cuda/flowerlua build-cuda/tests/test_backend_ops > "$LOGS/build.log" 2>&1; then
    tail -20 "$LOGS/build.log"
    echo "FAILED: no bundle and no build (make a bundle with: bash tests/gpu/check.sh --bundle)"
    exit 1
  fi
  FLOWERLUA=$ROOT/build-cuda/flowerlua
  BACKEND_OPS=$ROOT/build-cuda/tests/test_backend_ops
  LIBS=
fi

# ---- CUDA's libraries: this machine's toolkit, then the nvidia-* wheels beside PyTorch
dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && dirs+=("$d"); done
sp=$(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
for d in $(find $sp -maxdepth 5 \( -name 'libcudnn.so.9' -o -name 'libcublas.so.1[0-9]' -o -name 'libcublasLt.so.1[0-9]' \
           -o -name 'libcudart.so.1[0-9]' \) -printf '%h\n' 2>/dev/null | sort -u); do dirs+=("$d"); done
export LD_LIBRARY_PATH=$(IFS=:; echo "${LIBS:+$LIBS:}${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
missing=$(ldd "$FLOWERLUA" | grep 'not found')
if [ -n "$missing" ]; then
  echo "FAILED: libraries not found for $FLOWERLUA:"; echo "$missing"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  exit 1
fi
ldd "$FLOWERLUA" | grep -E 'cudnn|cublas|cudart' | sed 's/^/lib: /'

# ---- GPU tests: every op and nn kernel of the CUDA backend against the CPU's (every dtype)
echo "== tests/c/test_backend_ops.c"
"$BACKEND_OPS" > "$LOGS/test_backend_ops.log" 2>&1
orc=$?
grep -v '^ok - ' "$LOGS/test_backend_ops.log" | head -60
grep -c '^ok - cuda' "$LOGS/test_backend_ops.log" | sed 's/^/cuda cases passed: /'
grep '^ok - cuda.*# SKIP' "$LOGS/test_backend_ops.log" || true

# ---- the GPU-only tests (allocator, streams, uploads, settings, a model and a run on the GPU)
echo "== tests/lua/test_cuda.lua"
"$FLOWERLUA" tests/lua/test_cuda.lua > "$LOGS/test_cuda.log" 2>&1
rc=$?
cat "$LOGS/test_cuda.log"
pass=$(grep -c '^ok - ' "$LOGS/test_cuda.log"); skip=$(grep -c '^ok - .*# SKIP' "$LOGS/test_cuda.log")
fail=$(grep -c '^not ok - ' "$LOGS/test_cuda.log")
[ $rc -ne 0 ] && [ "$fail" -eq 0 ] && fail=1
pass=$((pass + $(grep -c '^ok - ' "$LOGS/test_backend_ops.log"))); skip=$((skip + $(grep -c '^ok - .*# SKIP' "$LOGS/test_backend_ops.log")))
fail=$((fail + $(grep -c '^not ok - ' "$LOGS/test_backend_ops.log")))
[ $orc -ne 0 ] && [ "$fail" -eq 0 ] && fail=1

# ---- mixed precision on the GPU against the CPU's (its other tests run everywhere)
echo "== tests/lua/test_mixed_precision.lua"
"$FLOWERLUA" tests/lua/test_mixed_precision.lua > "$LOGS/test_mixed.log" 2>&1
mrc=$?
grep -v '^ok - ' "$LOGS/test_mixed.log" | head -40
grep -i 'gpu\|cuda' "$LOGS/test_mixed.log" | grep '^ok - ' || true
pass=$((pass + $(grep -c '^ok - ' "$LOGS/test_mixed.log"))); skip=$((skip + $(grep -c '^ok - .*# SKIP' "$LOGS/test_mixed.log")))
fail=$((fail + $(grep -c '^not ok - ' "$LOGS/test_mixed.log")))
[ $mrc -ne 0 ] && [ "$fail" -eq 0 ] && fail=1

# After a failure, each group once more in its own process (a sticky CUDA error such as an illegal
# address poisons every later group of the same process), and a failing group under
# compute-sanitizer to name the kernel and the bad access.
if [ $rc -ne 0 ]; then
  echo "== each group alone"
  FLOWER_GPU_LIST=1 "$FLOWERLUA" tests/lua/test_cuda.lua 2>&1 | grep -v -e "^ok - " -e "^not ok - " -e "^#" > "$LOGS/groups.txt"
  sanitized=0
  while IFS= read -r g; do
    FLOWER_GPU_GROUP=$g timeout 120 "$FLOWERLUA" tests/lua/test_cuda.lua > "$LOGS/one.log" 2>&1
    grc=$?
    if [ $grc -eq 0 ]; then echo "alone ok: $g"; continue; fi
    echo "alone FAILED (exit $grc): $g"; grep -v '^ok - ' "$LOGS/one.log" | head -25 | sed 's/^/   /'
    if [ $sanitized -lt 3 ] && command -v compute-sanitizer > /dev/null; then
      sanitized=$((sanitized + 1))
      echo "   -- compute-sanitizer:"
      FLOWER_GPU_GROUP=$g timeout 150 compute-sanitizer --print-limit 4 "$FLOWERLUA" tests/lua/test_cuda.lua 2>&1 |
        grep -v '^ok - ' | head -40 | sed 's/^/   /'
    fi
  done < "$LOGS/groups.txt"
fi

# ---- benchmark beside PyTorch
brc=0
if [ $BENCH -eq 1 ]; then
  echo "== tests/bench/gpu.lua $BATCH $STEPS"
  FLOWER_BENCH_PROFILE=1 FLOWER_BENCH_TIMEOUT=${FLOWER_BENCH_TIMEOUT:-150} FLOWER_PYTHON=python3 \
    "$FLOWERLUA" tests/bench/gpu.lua "$BATCH" "$STEPS" > "$LOGS/bench.log" 2>&1
  brc=$?
  cat "$LOGS/bench.log"
fi

# ---- the main job end to end: the quickstart on the GPU, then on this machine's CPUs
qrc=0
for run in cuda cuda-bf16 cpu; do
  dev=${run%-bf16}; mp=float32
  [ "$run" = cuda-bf16 ] && mp=bfloat16
  echo "== experiments/quickstart.lua --device $dev --mixed-precision $mp"
  t0=$SECONDS
  timeout 300 "$FLOWERLUA" experiments/quickstart.lua --device "$dev" --mixed-precision "$mp" \
    --run-name "gpu-check-$run" > "$LOGS/quickstart-$run.log" 2>&1
  r=$?
  [ $r -ne 0 ] && [ "$dev" = cuda ] && qrc=$r
  grep -E 'accuracy|rror|report:|images/s|epoch 12/12' "$LOGS/quickstart-$dev.log" | tail -16
  echo "quickstart --device $dev --mixed-precision $mp: exit $r in $((SECONDS - t0)) s"
done

echo "== summary"
echo "GPU tests: $((pass - skip)) passed, $fail failed, $skip skipped (exit $rc)"
echo "benchmark: exit $brc (table above; logs in $LOGS)"
echo "quickstart on the GPU: exit $qrc"
echo "check took $((SECONDS - START)) s"
[ "$fail" -eq 0 ] && [ $brc -eq 0 ] && [ $qrc -eq 0 ]
