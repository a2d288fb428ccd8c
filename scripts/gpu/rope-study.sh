#!/usr/bin/env bash
# Patch 0010's RoPE folds on a lent GPU (issue 34, item 1; bench/gpu-rope-fusion.md). Run from the
# repository root there after `scripts/gpu/pack.sh` here, once the CUDA libraries are built on the
# machine (`STEP=build bash scripts/gpu/tune-study.sh`, or PREBUILT):
#  1. patch 0010's RoPE folds (K's RoPE done by the cache write, Q's by the decode kernel; opt-in):
#     fattn-test with GGML_CUDA_FA_VEC_GQA_ROPE_K=1 and GGML_CUDA_FA_VEC_GQA_ROPE_Q=1; its layer
#     cases rope Q and K (NeoX at head 128, adjacent pairs with YaRN at 256) and must show both
#     RoPEs skipped ("ropeQ1 ropeK1") with outputs and caches equal to the unfused run's bit for
#     bit; then with both off;
#  2. token by token on held-out text (Qwen2.5-7B shape, NeoX), both switches 0 and 1: the KLD and
#     PPL must not move at all;
#  3. SmolLM2-360M (adjacent pairs) and Qwen2.5-7B shapes at depths 0 and 4096, both switches 0
#     and 1, balanced order; then Qwen2.5-7B at 32768 (the kernel's default path is compiled anew:
#     its speed there must not drop). Make them the default if they win and are exact.
NAME=rope-study BUILD_DEADLINE=${BUILD_DEADLINE:-60} source .device-carry/call-prelude.sh
for rk in 1 0; do
  GGML_CUDA_FA_VEC_GQA_ROPE_Q=$rk GGML_CUDA_FA_VEC_GQA_ROPE_K=$rk MODES=1 BUDGET=100 RESULTS=$O/fattn-ropek$rk \
    GGML_LIBS=$B/lib-patched GGML_INCLUDE=$B/patched/ggml/include bash tests/cuda/run.sh "q8_0-q4_0;q4_0-q4_0;q8_0-q8_0"
  grep -h layer $O/fattn-ropek$rk/*.txt | head -8; pack
done
M=/dev/shm/kvt; mkdir -p $M
timeout 60 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7.gguf > /dev/null 2>&1; echo "synth q7 rc=$? at ${SECONDS}s"
for rk in 1 0; do
  GGML_CUDA_FA_VEC_GQA_ROPE_Q=$rk GGML_CUDA_FA_VEC_GQA_ROPE_K=$rk KVTUNER_CACHE=$C timeout 60 $K ab -m $M/q7.gguf -ngl 99 -fa on \
    --text lee-evaluation -c 512 --chunks 1 --eval-ubatch 1 --no-speed --against q8_0,q4_0,q8_0/q4_0 \
    --json $O/kld-tokens-ropek$rk.json > $O/kld-tokens-ropek$rk.md 2>&1
  echo "kld token by token ropek=$rk rc=$? at ${SECONDS}s"; grep -E '^\| (q8_0|q4_0)' $O/kld-tokens-ropek$rk.md | cut -c1-110
done
pack
timeout 60 $K synth --preset smollm2-360m --weights f16 -o $M/smol.gguf > /dev/null 2>&1; echo "synth smol rc=$? at ${SECONDS}s"
order="0 1"
for m in smol q7; do
  for rk in $order; do
    [ $SECONDS -lt 450 ] || break
    GGML_CUDA_FA_VEC_GQA_ROPE_Q=$rk GGML_CUDA_FA_VEC_GQA_ROPE_K=$rk timeout 100 $K ab -m $M/$m.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096 --reps 3 --json $O/$m-ropek$rk.json > $O/$m-ropek$rk.md 2> $O/$m-ropek$rk.log
    echo "$m ropek$rk rc=$? at ${SECONDS}s"; grep -E '^\| (f16|q8_0|q4_0) ' $O/$m-ropek$rk.md | awk -F'|' '{print $2, $13, $15}'
  done
  order="1 0"; pack
done
[ $SECONDS -lt 480 ] && timeout $((590 - SECONDS)) $K ab -m $M/q7.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
  --depths 32768 --reps 1 --json $O/q7-32768.json > $O/q7-32768.md 2> $O/q7-32768.log && pack
