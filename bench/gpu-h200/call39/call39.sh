#!/usr/bin/env bash
# issue 22 on the H200 (prepared in the thirteenth session; run right after call37 on the warm
# machine, same carry): where depth 0 loses 5-15% against f16.
#  1. SmolLM2-360M shape (a token in 1.4 ms: fixed per-layer costs show) at depths 0 and 4096 with K
#     and V quantized apart (f16/q4_0, q4_0/f16), llama.cpp's Hadamard rotations on and off
#     (LLAMA_ATTN_ROT_DISABLE=1): the cost of K's path, V's path and the rotations;
#  2. each kernel of two decode steps under ncu (bench/gpu/decode-kernels.cpp), f16 against q4_0
#     and q8_0, summed per kernel (bench/gpu/ncu-kernels.py);
#  3. Phi-3-mini's shape (head 96, no GQA), if time is left.
NAME=call39 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
M=/dev/shm/kvt; mkdir -p $M
timeout 60 $K synth --preset smollm2-360m --weights f16 -o $M/smol.gguf > /dev/null 2>&1; echo "synth smol rc=$? at ${SECONDS}s"
for rot in 0 1; do
  [ $SECONDS -lt 400 ] || break
  LLAMA_ATTN_ROT_DISABLE=$rot timeout $((590 - SECONDS)) $K ab -m $M/smol.gguf --no-quality -ngl 99 -fa on --against f16,q4_0,f16/q4_0,q4_0/f16 \
    --depths 0,4096 --reps 2 --json $O/smol-rotoff$rot.json > $O/smol-rotoff$rot.md 2> $O/smol-rotoff$rot.log
  echo "smol rot-disable=$rot rc=$? at ${SECONDS}s"; pack
done
# each kernel of two decode steps at 68 tokens (ncu, graphs off so that kernels launch one by one):
# what a quantized cache adds or slows at a short context
if [ $SECONDS -lt 480 ] && command -v ncu > /dev/null; then
  g++ -O2 -std=c++17 -I$B/patched/include -I$B/patched/ggml/include $C/decode-kernels.cpp -o $B/decode-kernels \
    -L$B/lib-patched -lllama -lggml -lggml-base -ldl -Wl,-rpath,$B/lib-patched
  for kv in f16/f16 q4_0/q4_0 q8_0/q8_0; do
    GGML_CUDA_DISABLE_GRAPHS=1 timeout 60 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      $B/decode-kernels $M/smol.gguf ${kv%/*} ${kv#*/} 64 2 > $O/ncu-smol-${kv%/*}.csv 2> $O/ncu-smol-${kv%/*}.log
    echo "ncu smol $kv rc=$? at ${SECONDS}s"
  done
  python3 $C/ncu-kernels.py f16=$O/ncu-smol-f16.csv q4_0=$O/ncu-smol-q4_0.csv q8_0=$O/ncu-smol-q8_0.csv > $O/ncu-smol.md 2>&1
  head -30 $O/ncu-smol.md; pack
fi
# Phi-3-mini's shape (head 96, no GQA: neither decode kernel takes a quantized cache there), if time is left
if [ $SECONDS -lt 500 ]; then
  timeout 60 $K synth --preset phi3-mini --weights f16 -o $M/phi3.gguf > /dev/null 2>&1; echo "synth phi3 rc=$? at ${SECONDS}s"
  timeout $((590 - SECONDS)) $K ab -m $M/phi3.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 --depths 0,16384 --reps 1 \
    --json $O/phi3.json > $O/phi3.md 2> $O/phi3.log
  echo "phi3 rc=$? at ${SECONDS}s"; pack
fi
