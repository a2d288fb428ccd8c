#!/usr/bin/env bash
# Patched-without-profile vs unpatched llama.cpp, same pinned tree, same options, one run,
# ONE process: both builds are loaded side by side (dlmopen) and timed back to back in every
# round, so the per-round speed ratio cancels the drift of this shared VM.
#
# Needs kvtuner's shared-library build of the patched tree:
#   CARGO_TARGET_DIR=target/dyn cargo build --release --features dynamic-link
# Builds the pinned source as it is (scripts/pinned-tree.sh) as shared libraries with the same options,
# compiles step.c against each tree's llama.h, and runs interleave.c.
#
#   bench/stock-vs-patched/run.sh [MODEL] [ROUNDS] [THREADS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
model=${1:-${KVTUNER_CACHE:-$HOME/.cache/kvtuner}/gemma-3-270m-q4_k_m.gguf}
rounds=${2:-30}
threads=${3:-2}
work=$root/target/bench-stock-vs-patched
mkdir -p "$work"

# kvtuner's patched shared build: the most recently built cache entry whose tree carries patch 0001
patched=""
for stamp in $(ls -t "$root"/target/dyn/kvtuner-llama/*/built.stamp 2>/dev/null); do
    d=$(dirname "$stamp")
    if grep -q type_k_layers "$d/src/include/llama.h"; then patched=$d; break; fi
done
[ -n "$patched" ] && [ -f "$patched/built.stamp" ] || {
    echo "build the shared patched tree first: CARGO_TARGET_DIR=target/dyn cargo build --release --features dynamic-link" >&2
    exit 1
}

# the unpatched tree: the pinned source as it is, built with the same options
stock=$work/stock-shared
if [ ! -f "$stock/built.stamp" ]; then
    rm -rf "$stock" && mkdir -p "$stock"
    cp -r "$("$root/scripts/pinned-tree.sh")" "$stock/src"
    opts=$(grep -E '^(LLAMA_BUILD|LLAMA_CURL|LLAMA_OPENSSL|GGML_OPENMP|GGML_NATIVE|GGML_BLAS|GGML_CCACHE|LLAMA_ALL_WARNINGS|BUILD_SHARED_LIBS)[A-Z_]*:' "$patched/build/CMakeCache.txt" | sed -E 's/^([A-Z_]+):[A-Z]+=(.*)$/-D\1=\2/')
    CCACHE_BASEDIR="$stock" CCACHE_NOHASHDIR=1 cmake -S "$stock/src" -B "$stock/build" -DCMAKE_BUILD_TYPE=Release $opts >/dev/null
    CCACHE_BASEDIR="$stock" CCACHE_NOHASHDIR=1 cmake --build "$stock/build" --target llama -j"$(nproc)" >/dev/null
    touch "$stock/built.stamp"
fi

step() { # $1 = tree (src/ and build/bin/), $2 = output .so
    # DT_RPATH (not RUNPATH) so libllama's own dependencies resolve to the same tree too
    cc -O2 -shared -fPIC -I"$1/src/include" -I"$1/src/ggml/include" "$root/bench/stock-vs-patched/step.c" -o "$2" \
        -L"$1/build/bin" -lllama -Wl,--disable-new-dtags,-rpath,"$1/build/bin"
}
step "$stock" "$work/step-stock.so"
step "$patched" "$work/step-patched.so"
cc -O2 "$root/bench/stock-vs-patched/interleave.c" -o "$work/interleave" -ldl -lm

echo "model: $model"
"$work/interleave" "$work/step-stock.so" "$work/step-patched.so" "$model" "$rounds" "$threads"
