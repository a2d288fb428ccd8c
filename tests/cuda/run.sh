#!/usr/bin/env bash
# The CUDA kernels' correctness tests, on a machine with an NVIDIA GPU: fattn-test.cpp (the
# flash-attention op, then whole decode steps of a layer with RoPE and rotations, on CUDA against
# ggml's CPU backend on the same bytes; NMSE bound 5e-4 as test-backend-ops, layer cases bit for
# bit) for each K-V pair, under upstream's decode kernels (GGML_CUDA_FA_VEC_GQA=0) and kvtuner's
# (1), with the decode kernel taking every cache size (GGML_CUDA_FA_VEC_GQA_MIN_KV=0) so short
# caches test it too. The host-side models beside it run in `cargo test` (tests/cuda_models.rs).
#
#   GGML_LIBS=DIR GGML_INCLUDE=DIR tests/cuda/run.sh ["q8_0-q8_0;q4_0-kv2"]
#
# GGML_LIBS: the folder of libggml*.so of a CUDA build of the patched tree (on a lent device:
# .device-build/lib-patched, as scripts/gpu/device-run.sh builds it); GGML_INCLUDE: that tree's
# ggml/include. Pairs: ';'-separated K-V pairs of src/cuda_fa_pairs.txt (default: all of them;
# others are refused, the build has no kernel for them). Other environment:
#   MODES    settings of GGML_CUDA_FA_VEC_GQA to run (default "0 1")
#   BUDGET   seconds for the whole run, shared out between pairs and modes (default: no limit);
#            a pair cut by time is reported as incomplete, never as passed
#   RESULTS  folder for one log per pair and mode (default: a temporary folder, removed)
# Extra switches (GGML_CUDA_FA_VEC_GQA_ROPE_K=1, FA_WINDOW_ONLY=1 / FA_LAYER_ONLY=1: the window or
# the layer cases alone, ...) pass through to the test.
# Prints one line per pair and mode and a total; exits 1 if a case failed or a test did not run
# to its end for another reason, 3 if nothing failed but time cut some pairs short.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
: "${GGML_LIBS:?set GGML_LIBS to the folder of libggml*.so of a CUDA build of the patched tree}"
: "${GGML_INCLUDE:?set GGML_INCLUDE to the ggml/include folder of that tree}"
built=$(grep -v '^#' "$root/src/cuda_fa_pairs.txt" | awk 'NF==2 {printf "%s%s-%s", (n++ ? ";" : ""), $1, $2}')
IFS=';' read -r -a pairs <<< "${1:-$built}"
read -r -a modes <<< "${MODES:-0 1}"
results=${RESULTS:-}
if [ -z "$results" ]; then
    results=$(mktemp -d) && trap 'rm -rf "$results"' EXIT
fi
mkdir -p "$results"

exe=$results/fattn-test
g++ -O2 -std=c++17 -I"$GGML_INCLUDE" "$root/tests/cuda/fattn-test.cpp" -o "$exe" \
    -L"$GGML_LIBS" -lggml -lggml-base -lggml-cpu -Wl,-rpath,"$GGML_LIBS" || exit 1

runs=$((${#pairs[@]} * ${#modes[@]}))
ok_all=0 failed_all=0 broken=0 cut=0
for p in "${pairs[@]}"; do
    for m in "${modes[@]}"; do
        limit=0 # no limit
        if [ -n "${BUDGET:-}" ]; then
            limit=$(((BUDGET - SECONDS) / runs))
            [ "$limit" -lt 10 ] && limit=10
        fi
        log=$results/fattn-$p-gqa$m.txt
        GGML_CUDA_FA_VEC_GQA=$m GGML_CUDA_FA_VEC_GQA_MIN_KV=0 FA_BUILT_PAIRS="$built" \
            timeout "$limit" "$exe" "$p" > "$log" 2>&1
        rc=$?
        runs=$((runs - 1))
        ok=$(grep -c '^ok' "$log") failed=$(grep -c '^FAIL' "$log")
        ok_all=$((ok_all + ok)) failed_all=$((failed_all + failed))
        state=done
        if [ "$rc" -eq 124 ]; then
            state="cut by time" cut=$((cut + 1))
        elif [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
            state="exit $rc" broken=$((broken + 1))
            tail -5 "$log"
        fi
        echo "$p GGML_CUDA_FA_VEC_GQA=$m: $ok passed, $failed failed ($state, ${SECONDS}s)"
        grep '^FAIL' "$log" | head -5
    done
done
echo "total: $ok_all passed, $failed_all failed, $broken runs broken, $cut cut by time"
[ "$failed_all" -eq 0 ] && [ "$broken" -eq 0 ] || exit 1
[ "$cut" -eq 0 ] || exit 3
