#!/usr/bin/env bash
# Patch 0010's two RoPE folds (K's RoPE in the cache write, Q's RoPE in the decode kernel) apart, on a
# lent GPU (issue 34; bench/gpu-rope-fusion.md): decode speed with neither, K's alone and both, at
# depths 0 and 4096, balanced order (00 10 11 11 10 00), on a launch-bound small model and a 7B
# shape (f16 weights), and the Llama-3.1-8B shape with q8_0 weights. Libraries built on the
# machine first (rope-study.sh's build).
NAME=rope-split BUILD_DEADLINE=${BUILD_DEADLINE:-60} source .device-carry/call-prelude.sh
M=/dev/shm/kvt
mkdir -p $M
[ -f $M/smol.gguf ] || timeout 60 $K synth --preset smollm2-360m --weights f16 -o $M/smol.gguf > /dev/null 2>&1
[ -f $M/q7.gguf ] || timeout 60 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7.gguf > /dev/null 2>&1
[ -f $M/l8q8.gguf ] || timeout 90 $K synth --preset llama31-8b --weights q8_0 -o $M/l8q8.gguf > /dev/null 2>&1
echo "models at ${SECONDS}s"
for m in smol q7 l8q8; do
  for kq in 00 10 11 11 10 00; do
    [ $SECONDS -lt 540 ] || break
    k=${kq:0:1} q=${kq:1:1}
    GGML_CUDA_FA_VEC_GQA_ROPE_K=$k GGML_CUDA_FA_VEC_GQA_ROPE_Q=$q timeout 100 $K ab -m $M/$m.gguf --no-quality -ngl 99 -fa on \
      --against f16,q8_0,q4_0 --depths 0,4096 --reps 2 --json $O/$m-k$k-q$q-$SECONDS.json > $O/$m-k$k-q$q-$SECONDS.md 2> /dev/null
    echo "$m K$k Q$q at ${SECONDS}s: $(grep -E '^\| (f16|q8_0|q4_0) ' $O/$m-k$k-q$q-*.md | tail -3 | awk -F'|' '{gsub(/ \([^)]*\)/, "", $13); gsub(/ \([^)]*\)/, "", $15); printf "%s %s/%s; ", $2, $13, $15}')"
  done
  pack
done
