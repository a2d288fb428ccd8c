#!/usr/bin/env bash
# issues 21/22 on the H200, call 29: patches 0010-0011 (the GQA decode kernel for every GQA ratio,
# head size 64, drafts of up to 8 tokens): build, the op against the CPU (GQA ratios 1-8 and 16,
# head sizes 64/128/256, 4/16 sequences in their own streams, drafts of 2-8 tokens) with the kernel
# on and off, then decode speed on the Qwen2.5-7B shape (GQA 7) with the kernel on
# (GGML_CUDA_FA_VEC_GQA unset) and off (0), KVTuner's Qwen presets included, at 32768; then the
# presets at 16384 while time is left. call30.sh follows on the same machine.
C=$PWD/.device-carry; B=$PWD/.device-build; OUT=${OUT:-/tmp/out}; O=/tmp/call29; mkdir -p $O
pack() { tar czf $OUT/call29.tgz -C $O .; }  # after every stage: a call cut short keeps what it measured
trap pack EXIT
mv $C/kvtuner $C/kvtuner.bin 2>/dev/null; K=$C/kvtuner.bin  # without it device-run.sh only builds
SKIP="stock speed fattn fbench ncu quality" DEADLINE=450 OUT=$OUT bash $C/device-run.sh build > $O/build.txt 2>&1 || { tail -30 $O/build.txt; exit 1; }
export LD_LIBRARY_PATH=$B/lib-patched
grep -h "build patched" $O/build.txt | tail -1; echo "built at ${SECONDS}s"
P="q4_0-q4_0;q8_0-q8_0;f16-q4_0;q8_0-q4_0;kv2-kv2;kv3-kv3;kv2-q4_0;q4_0-kv2"
for f in fattn-test fattn-bench; do
  g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/$f.cpp -o $B/$f -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
done
timeout 150 $B/fattn-test "$P" > $O/fattn-test.txt 2>&1; echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test.txt | head -20; tail -1 $O/fattn-test.txt; pack
GGML_CUDA_FA_VEC_GQA=0 timeout 60 $B/fattn-test "q4_0-q4_0;q8_0-q8_0;kv2-kv2" > $O/fattn-test-gqa0.txt 2>&1; echo "fattn-test gqa0 rc=$? FAIL=$(grep -c '^FAIL' $O/fattn-test-gqa0.txt) at ${SECONDS}s"; tail -1 $O/fattn-test-gqa0.txt
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/q7b.gguf ] || { timeout 100 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7b.gguf > /dev/null 2>&1; echo "synth q7b rc=$?"; }
$K profile import-kvtuner $C/Qwen2.5-7B-Instruct_kivi_KVTuner4_1.yaml -m $M/q7b.gguf --name qwen25-7b-kivi-4.1 -o $O/qwen-kivi41.yaml > $O/import-qwen.txt 2>&1
$K profile import-kvtuner $C/Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml -m $M/q7b.gguf --name qwen25-7b-pertoken-4.0 -o $O/qwen-pertoken40.yaml >> $O/import-qwen.txt 2>&1
qab() { # $1 = GGML_CUDA_FA_VEC_GQA ("" = unset: kernel on), $2 = depth, $3 = file tag
  env ${1:+GGML_CUDA_FA_VEC_GQA=$1} timeout $((590 - SECONDS)) $K ab -m $M/q7b.gguf --profile $O/qwen-kivi41.yaml --profile $O/qwen-pertoken40.yaml \
    --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0,kv3,kv2 --depths $2 --reps 2 --json $O/$3.json > $O/$3.md 2> $O/$3.log
  echo "$3 rc=$? at ${SECONDS}s"; pack
}
qab "" 32768 qwen-32768-gqa
qab 0 32768 qwen-32768-gqa0
[ $SECONDS -lt 520 ] && qab "" 16384 qwen-16384-gqa
for f in $O/qwen-*.md; do echo "== $f"; grep -E '^\| (f16|q8_0|q4_0|kv3|kv2|profile)' $f | awk -F'|' '{print $2, $3, $(NF-1)}'; done
