#!/usr/bin/env bash
# Builds `tevatron` with candle's CUDA backend on a machine without a GPU, from PyPI wheels
# (recipe: docs/cuda-build.md). CUDA 13.0 to match the GPU machines' driver; sm_90.
#   scripts/build-cuda.sh           release build -> target/cuda/release/tevatron
#   scripts/build-cuda.sh check     cargo clippy --features cuda,nccl --all-targets only (what CI runs;
#                                   the GPU tests are compiled, not run)
#   scripts/build-cuda.sh tests     the model and train crates' unit tests with CUDA
#                                   -> target/cuda/release/tevatron-{model,train}-tests (gpu-check runs them)
# Features: cuda (candle's CUDA backend, cuBLAS) and nccl (GPU collectives for --nproc_per_node;
# NCCL 2.30 from the nvidia-nccl-cu13 wheel, the version PyTorch's CUDA 13 wheels carry).
# The wheels (~1.6 GB) go to a virtualenv in .cache/cuda-venv (or TEVATRON_CUDA_VENV), reused.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${TEVATRON_CUDA_VENV:-$root/.cache/cuda-venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import nvidia' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cublas==13.0.2.14
fi
if [ -z "$(find "$venv" -name 'libnccl.so.2' -print -quit)" ]; then
  "$venv/bin/pip" install -q nvidia-nccl-cu13==2.30.7
fi
cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
nccl=$(dirname "$(find "$venv" -name 'libnccl.so.2' -print -quit)")
[ -e "$nccl/libnccl.so" ] || ln -s libnccl.so.2 "$nccl/libnccl.so"
# Unversioned names for the linker.
for l in cublas cublasLt cudart nvrtc; do
  [ -e "$cu/lib/lib$l.so" ] || ln -s "lib$l.so.13" "$cu/lib/lib$l.so"
done
[ -e "$cu/lib/libcurand.so" ] || ln -s libcurand.so.10 "$cu/lib/libcurand.so"
# libcuda (the driver) is in no wheel: a link-time stub with every driver function cudarc
# declares. At run time the GPU machine's real libcuda.so.1 is used.
cargo fetch -q
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | head -n 1)
mkdir -p "$cu/lib/stubs"
if [ ! -f "$cu/lib/stubs/libcuda.so" ]; then
  grep -oh 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc"/src/driver/sys/*.rs | sed 's/pub unsafe fn //' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$cu/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$cu/lib/stubs/cuda_stub.c"
  ln -sf libcuda.so "$cu/lib/stubs/libcuda.so.1"
fi
export CUDA_HOME=$cu CUDA_PATH=$cu PATH=$cu/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs:$nccl${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L $cu/lib -L $cu/lib/stubs -L $nccl"
if [ "${1:-build}" = check ]; then
  cargo clippy --features cuda,nccl -p tevatron-cli -p tevatron-train -p tevatron-model --all-targets --target-dir target/cuda -- -D warnings
elif [ "${1:-}" = tests ]; then
  # The model and train crates' unit tests with CUDA, for scripts/gpu-check.sh to run their
  # gpu_ tests on the GPU machine. Release, with candle's nccl feature as in the release build,
  # so that the dependencies that build compiled are reused.
  for crate in model train; do
    bin=$(cargo test --release --features cuda,candle-core/nccl -p tevatron-$crate --lib --no-run --target-dir target/cuda \
      --message-format=json | "$venv/bin/python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "tevatron_$crate")
    cp "$bin" "target/cuda/release/tevatron-$crate-tests"
    echo "built target/cuda/release/tevatron-$crate-tests"
  done
else
  cargo build --release --features cuda,nccl -p tevatron-cli --target-dir target/cuda
  echo "built target/cuda/release/tevatron"
fi
