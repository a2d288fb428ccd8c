#!/usr/bin/env bash
# Builds the CUDA shared libraries of the patched llama.cpp tree on this machine (no GPU needed),
# so that the lent GPU machine only measures: `PREBUILT=<out>/build/bin scripts/gpu/pack.sh`.
# nvcc, the CUDA runtime and cuBLAS come from NVIDIA's PyPI wheels (13.0, the device's version)
# unpacked into CUDA_HOME (default /opt/cuda13) by install-nvcc.sh; libcuda.so is a link-time stub
# (the real driver library is on the device; --no-as-needed keeps the stub's libcuda.so.1 among the
# needed libraries although it defines none of the driver's symbols). Incremental: a second run
# rebuilds what changed (ninja + ccache).
#
#   scripts/gpu/build-cuda-here.sh [OUT_DIR]     (default target/cuda-here)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/target/cuda-here}
# the toolkit scripts/ci/cuda-compile.sh installs (target/cuda13) if there is one
cuda=${CUDA_HOME:-/opt/cuda13}
[ -z "${CUDA_HOME:-}" ] && [ -x "$root/target/cuda13/bin/nvcc" ] && cuda=$root/target/cuda13
export CCACHE_DIR=${CCACHE_DIR:-$root/target/ccache-cuda}

"$root/scripts/gpu/install-nvcc.sh" "$cuda"
command -v ninja > /dev/null || python3 -m pip install -q ninja 2> /dev/null || true
gen=Ninja
command -v ninja > /dev/null || gen="Unix Makefiles"

# the same tree and flash-attention pairs the device would build (pack.sh)
bash "$root/scripts/gpu/pack.sh" > /dev/null
mkdir -p "$out/src" "$out/new" && rm -rf "$out/new"/* && tar xzf "$root/.device-carry/patched.tgz" -C "$out/new"
# copy only what changed, so ninja rebuilds only that (pack.sh gives every file a new mtime)
python3 "$root/scripts/sync-tree.py" "$out/new" "$out/src"
export PATH=$cuda/bin:$PATH CUDACXX=$cuda/bin/nvcc
if [ ! -f "$out/build/CMakeCache.txt" ]; then
    # the options shared with device-run.sh, plus: this machine's toolchain, a CPU baseline the
    # device's CPU has (no -march=native here), ccache
    mapfile -t opts < <(grep -v '^#' "$root/scripts/gpu/cmake-cuda-options.txt" | sed '/^\s*$/d')
    cmake -S "$out/src" -B "$out/build" -G "$gen" "${opts[@]}" \
        -DCUDAToolkit_ROOT="$cuda" -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc" \
        -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--no-as-needed \
        -DGGML_CUDA_FA_QUANTS="$(cat "$root/.device-carry/fa_pairs.txt")" \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_CCACHE=ON
fi
cmake --build "$out/build" --target llama llama-common -j"$(nproc)"
# The stub gets the driver functions libggml-cuda calls, so that a static link here resolves too
# (`cargo build --features cuda` with CUDA_PATH=$cuda); they are never called on this machine.
nm -D --undefined-only "$out/build/bin/libggml-cuda.so" | awk '$2 ~ /^cu[A-Z]/ {sub(/@.*/, "", $2); print $2}' | sort -u |
    awk '{printf "int %s(void) { return 999; }\n", $1}' > "$out/libcuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$out/libcuda-stub.c"
strip --strip-unneeded "$out"/build/bin/lib*.so.*.*
ls -la "$out/build/bin"
