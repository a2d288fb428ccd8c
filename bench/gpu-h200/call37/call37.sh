#!/usr/bin/env bash
# issue 22 on the H200 (prepared in the thirteenth session, to run in the next, on libraries with
# patch 0014 built here: PREBUILT):
#  1. patch 0014 (K dot products on tensor cores for 8 heads per block, opt-in): the op against the
#     CPU with GGML_CUDA_FA_VEC_GQA_K_MMA=1 for pairs with a q4_0/q5_0/q8_0 K;
#  2. the op's speed with it off and on (ABBA over the shapes) where 8 heads share a block (GQA 7,
#     5, 8), one token and drafts of 4;
#  3. the model: Qwen2.5-7B and Qwen2.5-14B shapes at depths 0/16384/32768 with drafts of 4, off
#     and on in one build (the order swapped between the shapes). Make it the default if it wins;
#     Before the speed runs, the KLD of q8_0 and q4_0 token by token (each token through the decode
#     kernel) with upstream's kernels, ours, and ours with K on tensor cores: it must not change;
# Where depth 0 loses is call39.sh, run right after on the warm machine.
NAME=call37 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
for f in fattn-test fattn-bench; do
  g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/$f.cpp -o $B/$f -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
done
GGML_CUDA_FA_VEC_GQA_K_MMA=1 timeout 150 $B/fattn-test "q8_0-q8_0;q4_0-q4_0;q5_0-q5_0;q8_0-q4_0;q4_0-kv2;q8_0-kv3" > $O/fattn-test-kmma.txt 2>&1
echo "fattn-test kmma rc=$? ok=$(grep -c '^ok' $O/fattn-test-kmma.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test-kmma.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test-kmma.txt | head; pack
order="0 1"
for shape in 28/4/128 40/8/128 64/8/128; do
  for toks in 1 4; do
    for m in $order; do
      GGML_CUDA_FA_VEC_GQA_K_MMA=$m timeout 40 $B/fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "4096,32768" 16 10 $shape $toks >> $O/fbench-kmma$m.txt 2>&1
    done
    [ "$order" = "0 1" ] && order="1 0" || order="0 1"
  done
done
grep -h -E "^#|^(f16|q8_0|q4_0)" $O/fbench-kmma*.txt; pack
M=/dev/shm/kvt; mkdir -p $M
order="0 1"
for preset in qwen2.5-7b qwen2.5-14b; do
  [ $SECONDS -lt 420 ] || break
  w=f16; [ $preset = qwen2.5-7b ] || w=q8_0
  timeout 120 $K synth --preset $preset --weights $w -o $M/$preset.gguf > /dev/null 2>&1; echo "synth $preset rc=$? at ${SECONDS}s"
  if [ $preset = qwen2.5-7b ]; then
    # token by token (--eval-ubatch 1: every token through the decode kernel), held-out text: the KLD
    # of each cache with upstream's kernels, ours, and ours with K on tensor cores
    for kern in 0/0 1/0 1/1; do
      GGML_CUDA_FA_VEC_GQA=${kern%/*} GGML_CUDA_FA_VEC_GQA_K_MMA=${kern#*/} KVTUNER_CACHE=$C timeout 90 $K ab -m $M/$preset.gguf -ngl 99 -fa on \
        --text lee-evaluation -c 512 --chunks 1 --eval-ubatch 1 --no-speed --against q8_0,q4_0 \
        --json $O/kld-tokens-${kern/\//-}.json > $O/kld-tokens-${kern/\//-}.md 2>&1
      echo "kld token by token gqa/kmma=$kern rc=$? at ${SECONDS}s"; grep -E '^\| (q8_0|q4_0)' $O/kld-tokens-${kern/\//-}.md | cut -c1-120
    done
    pack
  fi
  for m in $order; do
    GGML_CUDA_FA_VEC_GQA_K_MMA=$m timeout $((590 - SECONDS)) $K ab -m $M/$preset.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,16384,32768 --draft 4 --reps 1 --json $O/$preset-kmma$m.json > $O/$preset-kmma$m.md 2> $O/$preset-kmma$m.log
    echo "$preset kmma$m rc=$? at ${SECONDS}s"; pack
  done
  order="1 0"
  rm -f $M/$preset.gguf
done
