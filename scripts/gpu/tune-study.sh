#!/usr/bin/env bash
# Issue 32 on a lent GPU: `kvtuner tune` end to end with every layer on the GPU, on synthetic models
# of real shapes, each stage timed (bench/tune-gpu.md). Run from the repository root there, after
# `scripts/gpu/pack.sh` here:
#
#   STEP=build bash scripts/gpu/tune-study.sh   CUDA libraries built there (or unpacked), then the
#                                               synthetic models while time is left
#   STEP=8b    bash scripts/gpu/tune-study.sh   the Llama-3.1-8B shape (q8_0 weights), tune at 6.5 bits
#   STEP=vram  bash scripts/gpu/tune-study.sh   the same model, tune --vram 11GiB -c 32768 (f16 does
#                                               not fit there), reusing the 8b step's table; then at
#                                               12GiB, where f16 fits (the uniform cache is kept)
#   STEP=32b   bash scripts/gpu/tune-study.sh   a 32B shape (64 layers, 40 heads, 8 KV heads of 128,
#                                               q8_0 weights), tune at 6.5 bits; a step cut off by the
#                                               device's 10 minutes resumes its calibration when run
#                                               again on the same warm machine
#
# Results: $OUT/tune-$STEP.tgz (logs, reports, profiles) and the log's tail on stdout.
set -uo pipefail
STEP=${STEP:-8b}
NAME=tune-$STEP BUILD_DEADLINE=${BUILD_DEADLINE:-420} source .device-carry/call-prelude.sh
M=/dev/shm/kvt
W=$B/tune # what later steps on the same machine reuse (tables, resume journals)
mkdir -p "$M" "$W"
export KVTUNER_CACHE=$C
left() { echo $((${DEADLINE:-585} - SECONDS)); }
synth() { # NAME ARGS...: a synthetic model into $M, once per machine
    local name=$1
    shift
    [ -f "$M/$name.gguf" ] && return 0
    /usr/bin/time -f "synth $name: %e s" "$K" synth "$@" -o "$M/$name.gguf.tmp" > /dev/null && mv "$M/$name.gguf.tmp" "$M/$name.gguf"
}
tune() { # MODEL TAG ARGS...: kvtuner tune into $W/TAG, log and report kept in $O
    local model=$1 tag=$2
    shift 2
    mkdir -p "$W/$tag"
    timeout "$(left)" "$K" tune -m "$M/$model.gguf" -ngl 99 -fa on --work-dir "$W/$tag" -o "$M/$tag-tuned.gguf" "$@" \
        > "$O/$tag.out" 2> "$O/$tag.log"
    echo "tune $tag rc=$? at ${SECONDS}s"
    cp "$W/$tag"/*.yaml "$W/$tag"/*.md "$O/" 2> /dev/null
    grep -E "tune finished|^wrote|measured KLD|no profile measured" "$O/$tag.out" "$O/$tag.log" | cut -c1-300
    pack
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case $STEP in
build)
    synth l8-q8 --preset llama31-8b --weights q8_0
    echo "synth 8b done at ${SECONDS}s"
    [ -z "${NO_32B:-}" ] && [ "$(left)" -gt 200 ] && synth q32-q8 --preset qwen2.5-14b --layers 64 --heads 40 --kv-heads 8 --head-dim 128 --ffn 27648 --weights q8_0
    echo "synth 32b done at ${SECONDS}s"
    ls -la "$M"
    exit 0
    ;;
8b)
    synth l8-q8 --preset llama31-8b --weights q8_0
    echo "synth done at ${SECONDS}s"
    tune l8-q8 l8-q8 --budget 6.5
    ;;
vram)
    synth l8-q8 --preset llama31-8b --weights q8_0
    tune l8-q8 l8-q8-vram --vram 12GiB -c 32768 --sensitivity "$W/l8-q8/l8-q8-tuned.sensitivity.yaml"
    ;;
32b)
    synth q32-q8 --preset qwen2.5-14b --layers 64 --heads 40 --kv-heads 8 --head-dim 128 --ffn 27648 --weights q8_0
    echo "synth done at ${SECONDS}s"
    tune q32-q8 q32-q8 --budget 6.5
    ;;
esac
tail -5 "$O/"*.log
