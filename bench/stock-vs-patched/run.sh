#!/usr/bin/env bash
# Patched-without-profile vs unpatched llama.cpp, same pinned tree, same options, one run.
#
# Builds the pinned tree without our patches (the patched build is kvtuner's own, in
# target/kvtuner-llama/), links speed.c (stock C API only) against each, runs them interleaved
# (A B A B …, so drift hits both alike), and prints the median pp512/tg128 speeds, their
# ratios, and whether the logits are bit-identical.
#
#   bench/stock-vs-patched/run.sh [MODEL] [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
model=${1:-${KVTUNER_CACHE:-$HOME/.cache/kvtuner}/gemma-3-270m-q4_k_m.gguf}
rounds=${2:-5}
work=$root/target/bench-stock-vs-patched
mkdir -p "$work"

# kvtuner's patched build: the cache entry whose tree carries patch 0001
patched=$(grep -l type_k_layers "$root"/target/kvtuner-llama/*/src/include/llama.h | head -1 | xargs dirname | xargs dirname | xargs dirname)
[ -f "$patched/built.stamp" ] || { echo "build kvtuner first (cargo build --release)" >&2; exit 1; }

# the unpatched tree: the patched copy with the series reversed (= the pinned source)
if [ ! -f "$work/stock/built.stamp" ]; then
    rm -rf "$work/stock" && mkdir -p "$work/stock"
    cp -r "$patched/src" "$work/stock/src"
    mapfile -t series < <(grep -v '^#' "$root/patches/series" | sed '/^\s*$/d' | tac)
    for p in "${series[@]}"; do
        (cd "$work/stock/src" && GIT_CEILING_DIRECTORIES="$work/stock" git apply -R -p1 "$root/patches/$p")
    done
    ! grep -q type_k_layers "$work/stock/src/include/llama.h"
    opts=$(grep -E '^(LLAMA|GGML)_[A-Z_]+:' "$patched/build/CMakeCache.txt" | grep -E '^(LLAMA_BUILD|LLAMA_CURL|LLAMA_OPENSSL|GGML_OPENMP|GGML_NATIVE|GGML_BLAS|GGML_CCACHE|LLAMA_ALL_WARNINGS)' | sed -E 's/^([A-Z_]+):[A-Z]+=(.*)$/-D\1=\2/')
    CCACHE_BASEDIR="$work/stock" CCACHE_NOHASHDIR=1 cmake -S "$work/stock/src" -B "$work/stock/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF $opts >/dev/null
    CCACHE_BASEDIR="$work/stock" CCACHE_NOHASHDIR=1 cmake --build "$work/stock/build" --target llama -j"$(nproc)" >/dev/null
    touch "$work/stock/built.stamp"
fi

link() { # $1 = build dir, $2 = include dir, $3 = output
    local libs
    libs=$(find "$1" -name 'libllama.a' -o -name 'libggml*.a' | sort -r | tr '\n' ' ')
    cc -O2 -I"$2/include" -I"$2/ggml/include" "$root/bench/stock-vs-patched/speed.c" -o "$3" \
        -Wl,--start-group $libs -Wl,--end-group -lstdc++ -lm -lpthread
}
link "$patched/build" "$patched/src" "$work/speed-patched"
link "$work/stock/build" "$work/stock/src" "$work/speed-stock"

: > "$work/patched.txt"; : > "$work/stock.txt"
for i in $(seq "$rounds"); do
    "$work/speed-patched" "$model" 1 "$work/logits-patched.bin" >> "$work/patched.txt"
    "$work/speed-stock" "$model" 1 "$work/logits-stock.bin" >> "$work/stock.txt"
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
pp_p=$(awk '{print $2}' "$work/patched.txt" | median); tg_p=$(awk '{print $4}' "$work/patched.txt" | median)
pp_s=$(awk '{print $2}' "$work/stock.txt" | median); tg_s=$(awk '{print $4}' "$work/stock.txt" | median)
same=$(cmp -s "$work/logits-patched.bin" "$work/logits-stock.bin" && echo "bit-identical" || echo "DIFFERENT")

echo "model: $model ($rounds interleaved rounds, 2 threads, f16 cache, no profile)"
echo "| build | pp512 tok/s (median) | tg128 tok/s (median) |"
echo "|---|---|---|"
echo "| unpatched | $pp_s | $tg_s |"
echo "| patched, no profile | $pp_p | $tg_p |"
echo "| ratio patched/unpatched | $(echo "$pp_p $pp_s" | awk '{printf "%.3f", $1/$2}') | $(echo "$tg_p $tg_s" | awk '{printf "%.3f", $1/$2}') |"
# per-round ratios (each round runs both builds back to back): median and range
ratios() { paste "$work/patched.txt" "$work/stock.txt" | awk -v c="$1" '{print $c/$(c+4)}' | sort -g; }
rpp=$(ratios 2 | median); rtg=$(ratios 4 | median)
echo "| per-round ratio, median (min–max) | $rpp ($(ratios 2 | head -1)–$(ratios 2 | tail -1)) | $rtg ($(ratios 4 | head -1)–$(ratios 4 | tail -1)) |"
echo "logits (last prompt token + 128 generated tokens): $same"
