#!/usr/bin/env bash
# Issue 35 on a lent GPU: the recent window (with sinks) on CUDA, patches 0023-0029 (bench/gpu-window.md).
# Run from the repository root there, after `scripts/gpu/pack.sh` here:
#
#   bash scripts/gpu/window-study.sh
#
# Stages, in this order (one that would not fit is left for the next call on the same warm machine):
# 1. The runtime on the GPU against the CPU: `kvtuner ab` KLD of windowed caches on a small
#    synthetic model over the carried Lee corpus (QUALITY: ubatch:ngl runs, default
#    "1:99 1:0 32:99 32:0"; ubatch 1 takes the decode path, 32 the joined path).
# 2. Decode speed at DEPTHS (default 32768) of AGAINST (default the issue's profiles' caches
#    beside q4_0 and f16) on SHAPES (shape-study.sh's names, default "l8b q7b"), q8_0 weights.
# 3. fattn-test's window cases (tests/cuda/run.sh, FA_WINDOW_ONLY=1) for FT_PAIRS, under kvtuner's
#    decode kernel (its warps attend over the window's rows too) and upstream's kernels (the
#    cache and the window joined in f16): the op against the CPU backend's.
# 4. NCU=1: each kernel of two decode steps after NCU_PROMPT (default 4096) tokens under ncu, q4_0
#    without and with a w128+s4 window, on the first of SHAPES (decode-kernels.cpp, WINDOW=128):
#    what the window adds per token (ncu-window.md).
# SKIP (e.g. "quality speed fattn") leaves stages out (speed's model is still made, for NCU).
# TAG (default none) names this study's results and stamps, so that a second run on the same warm
# machine (another build's libraries, an environment switch) is measured beside the first.
# Stages already done on a warm machine are not run again. Results: $OUT/window.tgz.
# Folds against launches of their own (patch 0028: kv2/kv3 writes paired; 0029: the key scale and
# shift in the rotated write and the Q load), one after the other on the same warm machine:
#   GGML_CUDA_FA_VEC_GQA_PAIR_KV=0 GGML_CUDA_FA_VEC_GQA_KEY_FOLD=0 TAG=apart SKIP="quality fattn" \
#       SHAPES="l8b q3b" bash scripts/gpu/window-study.sh
#   SKIP="quality fattn" SHAPES="l8b q3b" bash scripts/gpu/window-study.sh
set -uo pipefail
NAME=window BUILD_DEADLINE=${BUILD_DEADLINE:-420} source .device-carry/call-prelude.sh
M=/dev/shm/kvt
W=$B/window # kept between calls on the same machine
mkdir -p "$M" "$W"
export KVTUNER_CACHE=$C
left() { echo $((${DEADLINE:-585} - SECONDS)); }
skip() { case " ${SKIP:-} " in *" $1 "*) return 0 ;; esac; return 1; }
T=${TAG:+-$TAG}
FT_PAIRS=${FT_PAIRS:-q4_0-q4_0;kv3-kv2;q8_0-q8_0;f16-f16}
DEPTHS=${DEPTHS:-32768}
AGAINST=${AGAINST:-f16,q4_0,q4_0+w128+s4,kv3/kv2+ks+kc+w128+s4,kv3+ks+kc+w128+s4}
SHAPES=${SHAPES:-l8b q7b}
declare -A SPEC=(
    [l8b]="--preset llama31-8b"                                                                 # GQA 4, head 128
    [q7b]="--preset qwen2.5-7b"                                                                 # GQA 7
    [q3b]="--preset qwen2.5-7b --layers 36 --heads 16 --kv-heads 2 --head-dim 128 --ffn 11008" # GQA 8
    [l1b]="--preset llama31-8b --layers 16 --heads 32 --kv-heads 8 --head-dim 64 --ffn 8192"   # GQA 4, head 64
)

if ! skip quality && [ ! -f "$W/quality$T.done" ] && [ "$(left)" -gt 120 ]; then
    [ -f "$M/small.gguf" ] || "$K" synth --preset tiny --layers 8 --heads 8 --kv-heads 2 --head-dim 128 --ffn 2048 --vocab 4096 -o "$M/small.gguf" > /dev/null
    for run in ${QUALITY:-1:99 1:0 32:99 32:0}; do
        ub=${run%:*} ngl=${run#*:}
        {
            timeout "$(($(left) - 60))" "$K" ab -m "$M/small.gguf" --text "$C/lee_background.cor" -c 512 --chunks 2 --ngl $ngl --no-speed \
                --eval-ubatch $ub --against f16,q4_0,q4_0+w32,q4_0+w32+s4,kv3+w32+s4,kv3+w32:q8_0+s4 \
                --json "$O/quality$T-ub$ub-ngl$ngl.json" > "$O/quality$T-ub$ub-ngl$ngl.md" 2> "$O/quality$T-ub$ub-ngl$ngl.log"
            echo "quality$T ubatch $ub ngl $ngl rc=$? at ${SECONDS}s"
            cat "$O/quality$T-ub$ub-ngl$ngl.md"
        }
    done
    touch "$W/quality$T.done"
    pack
fi

for shape in $SHAPES; do
    tag=$shape-q8_0$T
    if [ -s "$W/$tag.json" ]; then cp "$W/$tag.json" "$W/$tag.log" "$O/" 2> /dev/null; continue; fi
    [ "$(left)" -lt 120 ] && { echo "left for the next call: $tag"; continue; }
    gguf=$M/$shape-q8_0.gguf
    if [ ! -f "$gguf" ]; then
        rm -f "$M"/[lq][0-9]*.gguf # one large model at a time in /dev/shm
        # shellcheck disable=SC2086 # SPEC holds an argument list
        "$K" synth ${SPEC[$shape]} --weights q8_0 -o "$gguf.tmp" > /dev/null && mv "$gguf.tmp" "$gguf" || continue
    fi
    skip speed && continue # the model stays for the ncu stage
    timeout "$(left)" "$K" ab -m "$gguf" --no-quality -ngl 99 -fa on --depths "$DEPTHS" --reps 2 --against "$AGAINST" \
        --json "$W/$tag.json.tmp" > "$W/$tag.log" 2>&1 && mv "$W/$tag.json.tmp" "$W/$tag.json"
    echo "$tag rc=$? at ${SECONDS}s"
    cp "$W/$tag.json" "$W/$tag.log" "$O/" 2> /dev/null
    tail -15 "$W/$tag.log"
    pack
done
if ! skip fattn && [ ! -f "$W/fattn$T.done" ] && [ "$(left)" -gt 150 ]; then
    RESULTS=$O/fattn$T FA_WINDOW_ONLY=1 MODES="1 0" BUDGET=${FT_BUDGET:-120} GGML_LIBS=$B/lib-patched \
        GGML_INCLUDE=$B/patched/ggml/include bash tests/cuda/run.sh "$FT_PAIRS" | tee "$O/fattn$T.txt"
    touch "$W/fattn$T.done"
    pack
fi

first=${SHAPES%% *}
if [ "${NCU:-0}" = 1 ] && [ ! -f "$W/ncu$T.done" ] && [ "$(left)" -gt 120 ] && command -v ncu > /dev/null &&
    [ -f "$M/$first-q8_0.gguf" ]; then
    g++ -O2 -std=c++17 -I"$B/patched/include" -I"$B/patched/ggml/include" "$C/decode-kernels.cpp" -o "$B/decode-kernels" \
        -L"$B/lib-patched" -lllama -lggml -lggml-base -ldl -Wl,-rpath,"$B/lib-patched"
    for run in plain:0 window:128; do
        name=${run%:*}
        WINDOW=${run#*:} WINDOW_SINKS=4 GGML_CUDA_DISABLE_GRAPHS=1 timeout 90 ncu --profile-from-start off --clock-control none \
            --metrics gpu__time_duration.sum --csv "$B/decode-kernels" "$M/$first-q8_0.gguf" q4_0 q4_0 "${NCU_PROMPT:-4096}" 2 \
            > "$O/ncu$T-$name.csv" 2> "$O/ncu$T-$name.log"
        echo "ncu $first q4_0 $name rc=$? at ${SECONDS}s"
    done
    python3 "$C/ncu-kernels.py" q4_0="$O/ncu$T-plain.csv" q4_0+w128+s4="$O/ncu$T-window.csv" > "$O/ncu-window$T.md" 2>&1
    head -30 "$O/ncu-window$T.md"
    touch "$W/ncu$T.done"
    pack
fi

ls "$O"/*-q8_0*.json > /dev/null 2>&1 && python3 scripts/gpu/shape-table.py "$O"/*-q8_0*.json | tee "$O/table.md"
