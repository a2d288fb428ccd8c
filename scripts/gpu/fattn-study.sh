#!/usr/bin/env bash
# Issue 34, item 5 on a lent GPU (bench/gpu-kernel-correctness.md): fattn-test, GPU against CPU, on
# the pairs and kernel settings a study names. Run from the repository root there, after
# `scripts/gpu/pack.sh` here, once the CUDA libraries are built on the machine
# (`STEP=build bash scripts/gpu/tune-study.sh`):
#
#   PAIRS="q5_0-q5_0" MODES="0 1" bash scripts/gpu/fattn-study.sh
#
# PAIRS: K-V pairs (';'-separated, default every pair the build has); MODES: settings of
# GGML_CUDA_FA_VEC_GQA (0: upstream's kernels, 1: ours; default "0 1", so each failure can be
# compared with upstream's error on the same data); BUDGET: seconds for the whole study (each pair
# and mode gets its share, default 400). Results: $OUT/fattn-study.tgz (one file per pair and mode)
# and a line per run on stdout, with the failing cases.
set -uo pipefail
NAME=fattn-study BUILD_DEADLINE=${BUILD_DEADLINE:-60} source .device-carry/call-prelude.sh
g++ -O2 -std=c++17 -I"$B/patched/ggml/include" "$C/fattn-test.cpp" -o "$B/fattn-test" \
    -L"$B/lib-patched" -lggml -lggml-base -lggml-cpu -Wl,-rpath,"$B/lib-patched" || exit 1
IFS=';' read -r -a pairs <<< "${PAIRS:-$(cat "$C/fa_pairs.txt")}"
modes=(${MODES:-0 1})
share=$(((${BUDGET:-400} - SECONDS) / (${#pairs[@]} * ${#modes[@]})))
for p in "${pairs[@]}"; do
    for m in "${modes[@]}"; do
        f=$O/fattn-$p-gqa$m.txt
        GGML_CUDA_FA_VEC_GQA=$m GGML_CUDA_FA_VEC_GQA_MIN_KV=0 FA_BUILT_PAIRS="$(cat "$C/fa_pairs.txt")" \
            timeout $((share < 10 ? 10 : share)) "$B/fattn-test" "$p" > "$f" 2>&1
        echo "$p gqa=$m rc=$? ok=$(grep -c '^ok' "$f") FAIL=$(grep -c '^FAIL' "$f") at ${SECONDS}s"
        grep '^FAIL' "$f" | head -5
    done
    pack
done
