#!/usr/bin/env bash
# issue 22 (fourteenth session), right after call 43 on the warm machine, series through 0016:
# the whole tables of the SmolLM2-360M and Llama-3.1-8B shapes, upstream's kernels against ours.
NAME=call44 BUILD_DEADLINE=30 source .device-carry/call-prelude.sh
M=/dev/shm/kvt; mkdir -p $M
for m in smol llama; do
  [ $m = llama ] && { timeout 60 $K synth --preset llama31-8b --weights f16 -o $M/llama.gguf > /dev/null 2>&1; echo "synth llama rc=$? at ${SECONDS}s"; }
  for g in 0 1; do
    [ $SECONDS -lt 150 ] || break
    GGML_CUDA_FA_VEC_GQA=$g timeout $((175 - SECONDS)) $K ab -m $M/$m.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096,16384,32768 --reps 1 --json $O/$m-gqa$g.json > $O/$m-gqa$g.md 2> $O/$m-gqa$g.log
    echo "$m gqa$g rc=$? at ${SECONDS}s"; grep -E '^\| (f16|q8_0|q4_0) ' $O/$m-gqa$g.md | awk -F'|' '{print $2, $13, $15, $17, $19}'; pack
  done
done
