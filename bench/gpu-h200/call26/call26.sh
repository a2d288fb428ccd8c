#!/usr/bin/env bash
# issue 21 on the H200, call 26: patch 0009's second version (integer levels, register tables,
# kv2/kv3 in patch 0003's GQA kernel): build, the op against the CPU for every kv pair, decode
# speed at 32768 on the Llama-3.1-8B shape with GQA kernel on (1) and off (0)
C=$PWD/.device-carry; B=$PWD/.device-build; O=${OUT:-/tmp/out}
mv $C/kvtuner $C/kvtuner.bin 2>/dev/null; K=$C/kvtuner.bin  # without it device-run.sh only builds
SKIP="stock speed fattn fbench ncu quality" DEADLINE=330 bash $C/device-run.sh build > $O/build.txt 2>&1 || { tail -30 $O/build.txt; exit 1; }
export LD_LIBRARY_PATH=$B/lib-patched
tail -2 $O/build.txt
KVP="q8_0-kv3;q8_0-kv2;q5_0-kv3;q5_0-kv2;q4_0-kv3;q4_0-kv2;kv3-kv3;kv3-kv2;kv2-kv2;kv2-q4_0;q4_0-q4_0"
g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/fattn-test.cpp -o $B/fattn-test -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
timeout 100 $B/fattn-test "$KVP" > $O/fattn-test-kv.txt 2>&1; echo "fattn-test rc=$?"; grep -c "^FAIL" $O/fattn-test-kv.txt; tail -1 $O/fattn-test-kv.txt
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth rc=$?"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name kvtuner-llama31-kivi-4.0 -o $O/kivi4.yaml > $O/import.txt 2>&1
for g in 1 0; do
  GGML_CUDA_FA_VEC_GQA=$g timeout 90 $K ab -m $M/l8b.gguf --profile $O/kivi4.yaml --no-quality -ngl 99 -fa on --against f16,q4_0,kv2,kv3,kv3/kv2,q8_0/kv2 --depths 32768 --reps 2 --json $O/speed-32768-gqa$g.json > $O/speed-32768-gqa$g.md 2> $O/speed-32768-gqa$g.log
  echo "speed gqa$g rc=$?"; tail -8 $O/speed-32768-gqa$g.md
done
