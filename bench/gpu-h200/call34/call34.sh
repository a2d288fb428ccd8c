#!/usr/bin/env bash
# issue 22 on the H200 (prepared in the twelfth session, to run in the next, on libraries with
# patch 0013 built here: PREBUILT):
#  1. patch 0013 (q8_0 V on tensor cores for 8 heads, opt-in): the op against the CPU with
#     GGML_CUDA_FA_VEC_GQA_Q8_MMA=1 for q8_0/q8_0, then the op's speed with it off and on (ABBA) on
#     the shapes where q8_0 lost to f16 (GQA 5, 7, 8) and one with 4 heads;
#  2. drafts of 4 and 8 tokens at the model level (ab --draft), Qwen2.5-7B shape, kernel off/on;
#  3. single-sequence decode at depths 0-65536 on the shapes only measured as an op so far
#     (SmolLM2-360M, Qwen2.5-14B with q8_0 weights, Gemma-3-12B with q8_0 weights), kernel off/on.
NAME=call34 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
for f in fattn-test fattn-bench; do
  g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/$f.cpp -o $B/$f -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
done
GGML_CUDA_FA_VEC_GQA_Q8_MMA=1 timeout 90 $B/fattn-test "q8_0-q8_0" > $O/fattn-test-q8mma.txt 2>&1
echo "fattn-test q8mma rc=$? ok=$(grep -c '^ok' $O/fattn-test-q8mma.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test-q8mma.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test-q8mma.txt | head; pack
order="0 1"
for shape in 28/4/128 40/8/128 64/8/128 32/8/128; do
  for m in $order; do
    GGML_CUDA_FA_VEC_GQA_Q8_MMA=$m timeout 40 $B/fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "4096,32768" 16 10 $shape 1 >> $O/fbench-q8mma$m.txt 2>&1
  done
  [ "$order" = "0 1" ] && order="1 0" || order="0 1"
done
grep -h -E "^#|^(f16|q8_0|q4_0)" $O/fbench-q8mma*.txt; pack
M=/dev/shm/kvt; mkdir -p $M
# drafts at the model level (ab --draft): Qwen2.5-7B shape, 4- and 8-token drafts at 32768, kernel off/on
timeout 100 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7b.gguf > /dev/null 2>&1; echo "synth q7b rc=$? at ${SECONDS}s"
for g in 0 1; do
  GGML_CUDA_FA_VEC_GQA=$g timeout 120 $K ab -m $M/q7b.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 --depths 32768 --draft 4,8 \
    --reps 1 --json $O/qwen-draft-gqa$g.json > $O/qwen-draft-gqa$g.md 2> $O/qwen-draft-gqa$g.log
  echo "qwen draft gqa$g rc=$? at ${SECONDS}s"; pack
done
rm -f $M/q7b.gguf
for preset in smollm2-360m qwen2.5-14b gemma3-12b; do
  [ $SECONDS -lt 450 ] || break
  w=f16; [ $preset = smollm2-360m ] || w=q8_0
  timeout 120 $K synth --preset $preset --weights $w -o $M/$preset.gguf > /dev/null 2>&1; echo "synth $preset rc=$? at ${SECONDS}s"
  for g in 0 1; do
    GGML_CUDA_FA_VEC_GQA=$g timeout $((590 - SECONDS)) $K ab -m $M/$preset.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096,16384,32768 --reps 1 --json $O/$preset-gqa$g.json > $O/$preset-gqa$g.md 2> $O/$preset-gqa$g.log
    echo "$preset gqa$g rc=$? at ${SECONDS}s"; pack
  done
  rm -f $M/$preset.gguf
done
