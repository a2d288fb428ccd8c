#!/usr/bin/env bash
# issue 22 on the H200 (fourteenth session): why depth 0 loses 6-7% on the Qwen2.5-7B shape
# (13 us per layer per token, against 5 on SmolLM2's, call 39):
#  1. each kernel of two decode steps at 68 tokens under ncu, f16 against q8_0 and q4_0;
#  2. the op alone at short caches (256, 1024 cells), upstream's kernels against ours, for
#     GQA 7 (Qwen2.5-7B), GQA 3 at head 64 (SmolLM2) and GQA 4 (Llama).
NAME=call40 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
M=/dev/shm/kvt; mkdir -p $M
timeout 120 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7.gguf > /dev/null 2>&1; echo "synth q7 rc=$? at ${SECONDS}s"
g++ -O2 -std=c++17 -I$B/patched/include -I$B/patched/ggml/include $C/decode-kernels.cpp -o $B/decode-kernels \
  -L$B/lib-patched -lllama -lggml -lggml-base -ldl -Wl,-rpath,$B/lib-patched
for kv in f16/f16 q8_0/q8_0 q4_0/q4_0; do
  GGML_CUDA_DISABLE_GRAPHS=1 timeout 90 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    $B/decode-kernels $M/q7.gguf ${kv%/*} ${kv#*/} 64 2 > $O/ncu-q7-${kv%/*}.csv 2> $O/ncu-q7-${kv%/*}.log
  echo "ncu q7 $kv rc=$? at ${SECONDS}s"
done
python3 $C/ncu-kernels.py f16=$O/ncu-q7-f16.csv q8_0=$O/ncu-q7-q8_0.csv q4_0=$O/ncu-q7-q4_0.csv > $O/ncu-q7.md 2>&1
cat $O/ncu-q7.md; pack
g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/fattn-bench.cpp -o $B/fattn-bench -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
order="0 1"
for shape in 28/4/128 15/5/64 32/8/128; do
  for g in $order; do
    GGML_CUDA_FA_VEC_GQA=$g timeout 40 $B/fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "256,1024" 16 20 $shape 1 >> $O/fbench-short-gqa$g.txt 2>&1
  done
  [ "$order" = "0 1" ] && order="1 0" || order="0 1"
done
for g in 0 1; do echo "== GGML_CUDA_FA_VEC_GQA=$g"; grep -h -E "^#|^(f16|q8_0|q4_0)" $O/fbench-short-gqa$g.txt; done; pack
