#!/usr/bin/env bash
# issue 22 on the H200 (fourteenth session): our kernel at short caches (256-4096 cells) is slower
# than upstream's (call 40: 8.7 against 6.8 and f16's 4.8 at 256 cells, GQA 7). Does a block of
# fewer columns (GGML_CUDA_FA_VEC_GQA_G=2|4: more blocks, less serial work in each) win there?
# And where a block of 8 spends its time (ncu, one launch, full sections).
NAME=call41 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/fattn-bench.cpp -o $B/fattn-bench -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
order="8 4 2"
for shape in 28/4/128 15/5/64 40/8/128 32/8/128; do
  for g in $order; do
    GGML_CUDA_FA_VEC_GQA_G=$g timeout 40 $B/fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "256,1024,4096" 16 20 $shape 1 > $O/fb.txt 2>&1
    sed "s/^/G$g /" $O/fb.txt >> $O/fbench-G.txt
  done
  [ "$order" = "8 4 2" ] && order="2 4 8" || order="8 4 2"
done
grep -E "^G. (#|f16|q8_0|q4_0)" $O/fbench-G.txt | sort -s -k1,1 | awk '{print}' > $O/fbench-G-sorted.txt
cat $O/fbench-G.txt | grep -v "^G. *$"; pack
if command -v ncu > /dev/null; then
  for tv in q8_0 q4_0; do
    timeout 120 ncu --set full -k regex:flash_attn_ext_vec_gqa -s 2 -c 1 $B/fattn-bench "$tv-$tv" "256" 1 3 28/4/128 1 > $O/ncu-full-$tv.txt 2>&1
    echo "ncu full $tv rc=$? at ${SECONDS}s"
  done
  timeout 120 ncu --set full -k regex:flash_attn_ext_vec -s 2 -c 1 $B/fattn-bench "f16-f16" "256" 1 3 28/4/128 1 > $O/ncu-full-f16.txt 2>&1
  grep -E "Duration|Registers Per|Achieved Occupancy|Block Size|Grid Size|Stall|Warp Cycles Per Issued|Dynamic Shared|Static Shared" $O/ncu-full-q8_0.txt | head -30
  pack
fi
