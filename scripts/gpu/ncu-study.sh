#!/usr/bin/env bash
# Issue 34 on a lent GPU: each kernel of a decode step under Nsight Compute, per cache
# configuration, on one synthetic model of a real shape (bench/gpu-depth-zero.md): which kernels a
# quantized cache adds or slows against f16 at a short context. Run from the repository root there,
# after `scripts/gpu/pack.sh` here:
#
#   SHAPE=l8b PROMPTS="64 4096" CONFIGS="f16 q8_0 q4_0" bash scripts/gpu/ncu-study.sh
#
# SHAPE      one of shape-study.sh's names (default l8b), q8_0 weights (WEIGHTS to change)
# PROMPTS    tokens decoded before the measured steps (default "64": depth 0 as `ab` decodes it)
# CONFIGS    cache types, K=V or K/V (default "f16 q8_0 q4_0"); +ks (a key shift and scale on every
#            layer) and +wN (a window of N, 4 sinks; last) allowed: e.g. "q4_0 kv3/kv2+ks+w128"
# STEPS      decode steps measured (default 2); CUDA graphs off, so that each kernel is its own launch
# Results: $OUT/ncu.tgz (one CSV per prompt and configuration, and ncu-PROMPT.md: the kernels side
# by side, scripts/gpu/ncu-kernels.py), the tables on stdout.
set -uo pipefail
NAME=ncu BUILD_DEADLINE=${BUILD_DEADLINE:-420} source .device-carry/call-prelude.sh
M=/dev/shm/kvt
mkdir -p "$M"
SHAPE=${SHAPE:-l8b}
WEIGHTS=${WEIGHTS:-q8_0}
left() { echo $((${DEADLINE:-585} - SECONDS)); }
spec=$(sed -n "s/^ *\[$SHAPE\]=\"\([^\"]*\)\".*/\1/p" scripts/gpu/shape-study.sh)
[ -n "$spec" ] || { echo "unknown shape $SHAPE"; exit 2; }
gguf=$M/$SHAPE-$WEIGHTS.gguf
if [ ! -f "$gguf" ]; then
    rm -f "$M"/*.gguf # one model at a time in /dev/shm
    # shellcheck disable=SC2086 # spec holds an argument list
    "$K" synth $spec --weights "$WEIGHTS" -o "$gguf.tmp" > /dev/null && mv "$gguf.tmp" "$gguf" || exit 1
fi
command -v ncu > /dev/null || { echo "no ncu on this machine"; exit 1; }
[ -x "$B/decode-kernels" ] || g++ -O2 -std=c++17 -I"$B/patched/include" -I"$B/patched/ggml/include" "$C/decode-kernels.cpp" \
    -o "$B/decode-kernels" -L"$B/lib-patched" -lllama -lggml -lggml-base -ldl -Wl,-rpath,"$B/lib-patched"
for prompt in ${PROMPTS:-64}; do
    args=()
    for config in ${CONFIGS:-f16 q8_0 q4_0}; do
        [ "$(left)" -lt 60 ] && { echo "left for the next call: $prompt $config"; continue; }
        types=${config%%+*} window=0 keys=0
        case $config in *+w*) window=${config##*+w} ;; esac
        case $config in *+ks*) keys=1 ;; esac
        tk=${types%/*} tv=${types#*/}
        csv=$O/ncu-$SHAPE-$prompt-${config//\//-}.csv
        KEYS=$keys WINDOW=$window WINDOW_SINKS=4 GGML_CUDA_DISABLE_GRAPHS=1 timeout 120 ncu --profile-from-start off --clock-control none \
            --metrics gpu__time_duration.sum --csv "$B/decode-kernels" "$gguf" "$tk" "$tv" "$prompt" "${STEPS:-2}" \
            > "$csv" 2> "${csv%.csv}.log"
        echo "ncu $SHAPE $config at $prompt rc=$? at ${SECONDS}s"
        args+=("$config=$csv")
    done
    python3 "$C/ncu-kernels.py" "${args[@]}" > "$O/ncu-$SHAPE-$prompt.md" 2>&1
    echo "### $SHAPE, $WEIGHTS weights, ${STEPS:-2} decode steps after $prompt tokens (µs)"
    cat "$O/ncu-$SHAPE-$prompt.md"
done
