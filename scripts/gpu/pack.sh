#!/usr/bin/env bash
# Packs what the lent H200 machine needs into .device-carry/ (ignored by git, carried by the
# device tool): the dynamically linked kvtuner built here (xz-compressed), the pinned llama.cpp tree with our
# patch series applied and as it is (both trimmed to what a CUDA build needs), the CUDA
# flash-attention pair list, the op-speed sources and the Lee corpus.
#
#   scripts/gpu/pack.sh        (after: CARGO_TARGET_DIR=target/dyn cargo build --release --features dynamic-link)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
carry=$root/.device-carry
bin=$root/target/dyn/release/kvtuner
[ -x "$bin" ] || echo "warning: $bin is missing: packing the trees only (enough for device-run.sh build)" >&2
upstream=$("$root/scripts/pinned-tree.sh")
rm -rf "$carry" && mkdir -p "$carry"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
cp -r "$upstream" "$tmp/stock"
cp -r "$upstream" "$tmp/patched"
mapfile -t series < <(grep -v '^#' "$root/patches/series" | sed '/^\s*$/d')
for p in "${series[@]}"; do
    (cd "$tmp/patched" && GIT_CEILING_DIRECTORIES="$tmp" git apply -p1 "$root/patches/$p")
done
patched=$tmp/patched

# Only the CPU, CUDA and RPC backends of ggml travel.
excludes=()
for d in "$patched"/ggml/src/ggml-*/; do
    name=$(basename "$d")
    case $name in ggml-cpu|ggml-cuda|ggml-rpc) ;; *) excludes+=(--exclude="ggml/src/$name") ;; esac
done
parts=(CMakeLists.txt LICENSE cmake include src common vendor ggml tools/CMakeLists.txt)
if [ -n "${PREBUILT:-}" ]; then
    # libraries built here travel instead (below): the device needs the headers only, and no
    # unpatched tree (the carry is capped at 64 MiB with the repository)
    tar czf "$carry/patched.tgz" -C "$patched" include ggml/include
else
    tar czf "$carry/patched.tgz" -C "$patched" "${excludes[@]}" "${parts[@]}"
    # The unpatched tree: the pinned source as it is.
    tar czf "$carry/stock.tgz" -C "$tmp/stock" "${excludes[@]}" "${parts[@]}"
fi

grep -v '^#' "$root/src/cuda_fa_pairs.txt" | awk 'NF==2 {printf "%s%s-%s", (n++ ? ";" : ""), $1, $2}' > "$carry/fa_pairs.txt"
# stripped and xz-compressed (6.5 -> 2 MB; symbols stay here: the carry is capped at 64 MiB);
# call-prelude.sh and device-run.sh measure unpack it
[ -x "$bin" ] && strip -o "$tmp/kvtuner" "$bin" && xz -T0 -9 -c "$tmp/kvtuner" > "$carry/kvtuner.xz"
# (the kernel tests, tests/cuda/, travel with the repository and run from it: tests/cuda/run.sh;
# fattn-test.cpp is in the carry too for the call scripts of bench/gpu-h200/, which build it there)
cp "$root/bench/stock-vs-patched/step.c" "$root/bench/stock-vs-patched/interleave.c" "$root/tests/cuda/fattn-test.cpp" \
    "$root/scripts/gpu/fattn-bench.cpp" "$root/tests/cuda/fattn-common.h" "$root/scripts/gpu/decode-kernels.cpp" \
    "$root/scripts/gpu/ncu-kernels.py" "$carry/"
# PREBUILT=DIR: CUDA libraries of this same patched tree, built here (scripts/gpu/build-cuda-here.sh),
# so the device only measures
if [ -n "${PREBUILT:-}" ]; then
    (cd "$PREBUILT" && tar cf - lib*.so*) | xz -T0 -6 > "$carry/libs-patched.tar.xz"
fi
cp "$root/scripts/gpu/device-run.sh" "$root/scripts/gpu/call-prelude.sh" "$root/scripts/gpu/cmake-cuda-options.txt" "$carry/"
# KVTuner's published presets (imported on the device into profiles of synthetic models)
cp "$root"/bench/kvtuner-presets/*.yaml "$carry/"
corpus=${KVTUNER_CACHE:-$HOME/.cache/kvtuner}/lee_background.cor
[ -f "$corpus" ] && cp "$corpus" "$carry/"
du -sh "$carry" && ls -la "$carry"
# What travels (tracked and untracked-not-ignored files, and the carry) must stay under 64 MiB as the
# device tool counts it (each small file takes a whole 4 KiB block).
travel_kib=$( { (cd "$root" && git ls-files -z --cached --others --exclude-standard | du -c -k --files0-from=- 2>/dev/null | tail -1 | cut -f1); \
    du -s -k "$carry" | cut -f1; } | awk '{s += $1} END {print s}')
echo "travels: $travel_kib KiB of 65536"
[ "$travel_kib" -le 65536 ] || echo "warning: over the device tool's 64 MiB"
