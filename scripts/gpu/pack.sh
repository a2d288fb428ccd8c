#!/usr/bin/env bash
# Packs what the lent H200 machine needs into .device-carry/ (ignored by git, carried by the
# device tool): the dynamically linked kvtuner built here, our patched llama.cpp tree and the
# unpatched pinned tree (both trimmed to what a CUDA build needs), the CUDA flash-attention pair
# list, speed.c and the Lee corpus.
#
#   scripts/gpu/pack.sh        (after: CARGO_TARGET_DIR=target/dyn cargo build --release --features dynamic-link)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
carry=$root/.device-carry
bin=$root/target/dyn/release/kvtuner
[ -x "$bin" ] || echo "warning: $bin is missing: packing the trees only (enough for device-run.sh build)" >&2
patched=$(grep -l type_k_layers "$root"/target/kvtuner-llama/*/src/include/llama.h | head -1 | xargs dirname | xargs dirname)
[ -d "$patched/ggml" ] || { echo "no patched tree under target/kvtuner-llama: cargo build --release first" >&2; exit 1; }
rm -rf "$carry" && mkdir -p "$carry"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT

# Only the CPU and CUDA backends of ggml travel.
excludes=()
for d in "$patched"/ggml/src/ggml-*/; do
    name=$(basename "$d")
    case $name in ggml-cpu|ggml-cuda) ;; *) excludes+=(--exclude="ggml/src/$name") ;; esac
done
parts=(CMakeLists.txt LICENSE cmake include src common vendor ggml tools/CMakeLists.txt)
tar czf "$carry/patched.tgz" -C "$patched" "${excludes[@]}" "${parts[@]}"

# The unpatched tree: the same copy with the series reversed.
cp -r "$patched" "$tmp/stock"
mapfile -t series < <(grep -v '^#' "$root/patches/series" | sed '/^\s*$/d' | tac)
for p in "${series[@]}"; do
    (cd "$tmp/stock" && GIT_CEILING_DIRECTORIES="$tmp" git apply -R -p1 "$root/patches/$p")
done
! grep -q type_k_layers "$tmp/stock/include/llama.h"
tar czf "$carry/stock.tgz" -C "$tmp/stock" "${excludes[@]}" "${parts[@]}"

grep -v '^#' "$root/src/cuda_fa_pairs.txt" | awk 'NF==2 {printf "%s%s-%s", (n++ ? ";" : ""), $1, $2}' > "$carry/fa_pairs.txt"
[ -x "$bin" ] && cp "$bin" "$carry/kvtuner"
cp "$root/bench/stock-vs-patched/speed.c" "$carry/"
cp "$root/scripts/gpu/device-run.sh" "$carry/"
corpus=${KVTUNER_CACHE:-$HOME/.cache/kvtuner}/lee_background.cor
[ -f "$corpus" ] && cp "$corpus" "$carry/"
du -sh "$carry" && ls -la "$carry"
