#!/usr/bin/env bash
# issue 22 on the H200 (fourteenth session), libraries of the series through 0016 built here:
#  1. fattn-test: its layer cases (llama.cpp's node order) run K's and V's cache writes in one
#     launch and must equal the unfused run bit for bit;
#  2. the Qwen2.5-7B shape decoded token by token on held-out text with the writes paired and not
#     (GGML_CUDA_FA_VEC_GQA_PAIR_WRITES=1|0): the KLD must not move (in the model the deferred V
#     write relies on the allocation dependency that keeps its input alive);
#  3. SmolLM2-360M and Qwen2.5-7B shapes at depths 0 and 4096, pairing off and on, balanced order.
NAME=call43 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/fattn-test.cpp -o $B/fattn-test -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
timeout 100 $B/fattn-test "q8_0-q4_0;q4_0-q4_0;q5_0-q8_0" > $O/fattn-test.txt 2>&1
echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test.txt) at ${SECONDS}s"
grep -E '^FAIL|layer' $O/fattn-test.txt | head -8; pack
M=/dev/shm/kvt; mkdir -p $M
timeout 60 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7.gguf > /dev/null 2>&1; echo "synth q7 rc=$? at ${SECONDS}s"
for p in 1 0; do
  GGML_CUDA_FA_VEC_GQA_PAIR_WRITES=$p KVTUNER_CACHE=$C timeout 60 $K ab -m $M/q7.gguf -ngl 99 -fa on \
    --text lee-evaluation -c 512 --chunks 1 --eval-ubatch 1 --no-speed --against q8_0,q4_0,q8_0/q4_0 \
    --json $O/kld-tokens-pair$p.json > $O/kld-tokens-pair$p.md 2>&1
  echo "kld token by token pair=$p rc=$? at ${SECONDS}s"; grep -E '^\| (q8_0|q4_0)' $O/kld-tokens-pair$p.md | cut -c1-110
done
pack
timeout 60 $K synth --preset smollm2-360m --weights f16 -o $M/smol.gguf > /dev/null 2>&1; echo "synth smol rc=$? at ${SECONDS}s"
order="0 1"
for m in smol q7; do
  for p in $order; do
    [ $SECONDS -lt 400 ] || break
    GGML_CUDA_FA_VEC_GQA_PAIR_WRITES=$p timeout 100 $K ab -m $M/$m.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096 --reps 2 --json $O/$m-pair$p.json > $O/$m-pair$p.md 2> $O/$m-pair$p.log
    echo "$m pair$p rc=$? at ${SECONDS}s"; grep -E '^\| (f16|q8_0|q4_0) ' $O/$m-pair$p.md | awk -F'|' '{print $2, $13, $15}'
  done
  order="1 0"; pack
done
