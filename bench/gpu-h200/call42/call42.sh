#!/usr/bin/env bash
# issue 22 on the H200 (fourteenth session), libraries of the series through 0015 built here:
#  1. fattn-test (now also 256-cell caches, where one token takes 2 columns per block) for q8_0,
#     q4_0 and a mixed pair, with patch 0014's K on tensor cores and 0015's short-cache widths on
#     (their defaults);
#  2. the op at 256/1024/4096 cells with 0015's rule off and on (GGML_CUDA_FA_VEC_GQA_SHORT=0|1,
#     balanced order) at GQA 7, 3 (head 64), 5 and 4;
#  3. the models at depths 0 and 4096, the rule off and on (order swapped between the shapes):
#     Qwen2.5-7B, SmolLM2-360M, Qwen2.5-14B (q8_0 weights), Llama-3.1-8B shapes, as time allows;
#  4. Qwen2.5-7B's whole table, upstream's kernels against ours (GGML_CUDA_FA_VEC_GQA=0|1).
NAME=call42 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
for f in fattn-test fattn-bench; do
  g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/$f.cpp -o $B/$f -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
done
timeout 130 $B/fattn-test "q8_0-q8_0;q4_0-q4_0;q8_0-q4_0" > $O/fattn-test.txt 2>&1
echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test.txt | head; pack
order="0 1"
for shape in 28/4/128 15/5/64 40/8/128 32/8/128; do
  for m in $order; do
    GGML_CUDA_FA_VEC_GQA_SHORT=$m timeout 40 $B/fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "256,1024,4096" 16 20 $shape 1 >> $O/fbench-short$m.txt 2>&1
  done
  [ "$order" = "0 1" ] && order="1 0" || order="0 1"
done
for m in 0 1; do echo "== GGML_CUDA_FA_VEC_GQA_SHORT=$m"; grep -h -E "^#|^(f16|q8_0|q4_0)" $O/fbench-short$m.txt; done; pack
M=/dev/shm/kvt; mkdir -p $M
order="0 1"
for preset in qwen2.5-7b smollm2-360m qwen2.5-14b llama31-8b; do
  [ $SECONDS -lt 380 ] || break
  w=f16; [ $preset = qwen2.5-14b ] && w=q8_0
  timeout 120 $K synth --preset $preset --weights $w -o $M/$preset.gguf > /dev/null 2>&1; echo "synth $preset rc=$? at ${SECONDS}s"
  for m in $order; do
    GGML_CUDA_FA_VEC_GQA_SHORT=$m timeout 120 $K ab -m $M/$preset.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096 --reps 2 --json $O/$preset-short$m.json > $O/$preset-short$m.md 2> $O/$preset-short$m.log
    echo "$preset short$m rc=$? at ${SECONDS}s"; grep -E '^\| (f16|q8_0|q4_0) ' $O/$preset-short$m.md | awk -F'|' '{print $2, $13, $15}'
  done
  [ "$order" = "0 1" ] && order="1 0" || order="0 1"
  [ $preset = qwen2.5-7b ] || rm -f $M/$preset.gguf
  pack
done
for g in 0 1; do
  [ $SECONDS -lt 480 ] || break
  GGML_CUDA_FA_VEC_GQA=$g timeout $((590 - SECONDS)) $K ab -m $M/qwen2.5-7b.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
    --depths 0,4096,16384,32768 --reps 1 --json $O/qwen2.5-7b-gqa$g.json > $O/qwen2.5-7b-gqa$g.md 2> $O/qwen2.5-7b-gqa$g.log
  echo "qwen2.5-7b gqa$g rc=$? at ${SECONDS}s"; pack
done
