#!/usr/bin/env bash
# The CUDA kernels' tests (tests/cuda/run.sh: fattn-test, GPU against CPU) on a lent GPU, on the
# pairs and kernel settings a study names (bench/gpu-kernel-correctness.md). Run from the
# repository root there, after `scripts/gpu/pack.sh` here; on a fresh machine the CUDA build comes
# first (BUILD_DEADLINE, default 420 s: a whole build), on a warm one it is already done.
#
#   PAIRS="q5_0-q5_0" MODES="0 1" bash scripts/gpu/fattn-study.sh
#
# PAIRS: K-V pairs (';'-separated, default every pair the build has); MODES: settings of
# GGML_CUDA_FA_VEC_GQA (0: upstream's kernels, 1: ours; default "0 1", so each failure can be
# compared with upstream's error on the same data); BUDGET: seconds for the whole call, build
# included (each pair and mode gets its share of what is left, default 400). Results:
# $OUT/fattn-study.tgz (one log per pair and mode) and the runner's line per run on stdout, with the
# failing cases.
set -uo pipefail
NAME=fattn-study BUILD_DEADLINE=${BUILD_DEADLINE:-420} source .device-carry/call-prelude.sh
MODES="${MODES:-0 1}" BUDGET=$((${BUDGET:-400} - SECONDS)) RESULTS=$O GGML_LIBS=$B/lib-patched GGML_INCLUDE=$B/patched/ggml/include \
    bash tests/cuda/run.sh "${PAIRS:-}"
echo "tests/cuda/run.sh: exit $? at ${SECONDS}s"
