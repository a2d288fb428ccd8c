#!/usr/bin/env bash
# Issue 34 on a lent GPU: decode speed of quantized caches against f16 by model shape, depth and
# weight type (bench/gpu-shapes.md). Synthetic random-weight models of real shapes, every layer on
# the GPU, `kvtuner ab --no-quality`: each configuration measured in the same process as f16,
# interleaved, so the ratios are side by side. Run from the repository root there, after
# `scripts/gpu/pack.sh` here:
#
#   SHAPES="q3b l1b" WEIGHTS="q8_0 f16" bash scripts/gpu/shape-study.sh
#
# SHAPES     which shapes (default: all, in the order below); WEIGHTS: q8_0 and/or f16 (default q8_0)
# DEPTHS     default 0,4096,16384,32768; AGAINST default f16,q8_0,q4_0,kv2,kv3; REPS default 2
# NP         e.g. "4,16": also N sequences at once (`ab --np`) at each depth; NP_SPREAD=1: at
#            depths spread from a quarter of each depth to it (`ab --np-spread`, a server's slots)
# TAG        suffix of the result names (default none): a second study of the same shapes (other
#            AGAINST or NP) keeps its own results. Key treatments (`+ks`, `+kc`) are measured on the
#            carried Lee corpus (KVTUNER_CACHE=the carry).
# A shape whose run would not fit the call's time (DEADLINE, default 585 s) is left for the next
# call on the same warm machine (its JSON is kept; a finished one is not run again).
# Results: $OUT/shapes.tgz (one ab JSON and log per shape and weight type) and the ratio table on
# stdout (scripts/gpu/shape-table.py).
set -uo pipefail
NAME=shapes BUILD_DEADLINE=${BUILD_DEADLINE:-420} source .device-carry/call-prelude.sh
M=/dev/shm/kvt
W=$B/shapes # kept between calls on the same machine
mkdir -p "$M" "$W"
DEPTHS=${DEPTHS:-0,4096,16384,32768}
AGAINST=${AGAINST:-f16,q8_0,q4_0,kv2,kv3}
REPS=${REPS:-2}
WEIGHTS=${WEIGHTS:-q8_0}
export KVTUNER_CACHE=$C
left() { echo $((${DEADLINE:-585} - SECONDS)); }

# name: GQA, head size and the model it stands for; synth arguments
declare -A SPEC=(
    [phi3]="--preset phi3-mini"                                                                        # GQA 1, head 96: Phi-3-mini
    [g27]="--preset llama31-8b --layers 20 --heads 32 --kv-heads 16 --head-dim 128 --ffn 21504"       # GQA 2, head 128: Gemma-3-27B's global layers
    [g12]="--preset gemma3-12b"                                                                        # GQA 2, head 256, iSWA: Gemma-3-12B
    [l3b]="--preset llama31-8b --layers 28 --heads 24 --kv-heads 8 --head-dim 128 --ffn 8192"         # GQA 3: Llama-3.2-3B
    [l1b]="--preset llama31-8b --layers 16 --heads 32 --kv-heads 8 --head-dim 64 --ffn 8192"          # GQA 4, head 64: Llama-3.2-1B
    [l8b]="--preset llama31-8b"                                                                        # GQA 4, head 128: Llama-3.1-8B
    [q14]="--preset qwen2.5-14b"                                                                       # GQA 5: Qwen2.5-14B
    [q1b]="--preset qwen2.5-7b --layers 28 --heads 12 --kv-heads 2 --head-dim 128 --ffn 8960 --vocab 151936" # GQA 6: Qwen2.5-1.5B
    [q7b]="--preset qwen2.5-7b"                                                                        # GQA 7: Qwen2.5-7B
    [q3b]="--preset qwen2.5-7b --layers 36 --heads 16 --kv-heads 2 --head-dim 128 --ffn 11008"        # GQA 8: Qwen2.5-3B
)
SHAPES=${SHAPES:-q3b l1b q7b q14 q1b l3b phi3 g27 g12 l8b}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for shape in $SHAPES; do
    [ -n "${SPEC[$shape]:-}" ] || { echo "unknown shape $shape (known: ${!SPEC[*]})"; exit 2; }
    for w in $WEIGHTS; do
        tag=$shape-$w${TAG:+-$TAG}
        if [ -s "$W/$tag.json" ]; then cp "$W/$tag.json" "$W/$tag.log" "$O/" 2> /dev/null; continue; fi
        [ "$(left)" -lt 120 ] && { echo "left for the next call: $tag"; continue; }
        gguf=$M/$shape-$w.gguf
        if [ ! -f "$gguf" ]; then
            rm -f "$M"/*.gguf # one model at a time in /dev/shm (the host's memory)
            # shellcheck disable=SC2086 # SPEC holds an argument list
            /usr/bin/time -f "synth $shape-$w: %e s" "$K" synth ${SPEC[$shape]} --weights "$w" -o "$gguf.tmp" > /dev/null &&
                mv "$gguf.tmp" "$gguf" || continue
        fi
        np=()
        [ -n "${NP:-}" ] && np=(--np "$NP")
        [ -n "${NP:-}" ] && [ "${NP_SPREAD:-0}" = 1 ] && np+=(--np-spread)
        timeout "$(left)" "$K" ab -m "$gguf" --no-quality -ngl 99 -fa on --depths "$DEPTHS" --reps "$REPS" \
            --against "$AGAINST" "${np[@]}" --json "$W/$tag.json.tmp" > "$W/$tag.log" 2>&1 &&
            mv "$W/$tag.json.tmp" "$W/$tag.json"
        echo "$tag rc=$? at ${SECONDS}s"
        cp "$W/$tag.json" "$W/$tag.log" "$O/" 2> /dev/null
        pack
    done
done
python3 scripts/gpu/shape-table.py "$O"/*.json | tee "$O/table.md"
