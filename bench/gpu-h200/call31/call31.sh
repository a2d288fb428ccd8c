#!/usr/bin/env bash
# issues 22-24 on the H200, call 31 (libraries built on the development machine and carried:
# PREBUILT, no build here): the op against the CPU for every ratio/head size/draft/stream case
# (softcap cases at head size 64 dropped: upstream's vector kernel has no code for them), drafts of
# 4 tokens with the q8_0 rule, `kvtuner capacity` (issue 23: 32k-token slots in 40 GiB of KV cache,
# f16/q8_0/q4_0 and KVTuner's Llama kivi preset), then KVTuner's Qwen presets at 65536 (issue 21).
C=$PWD/.device-carry; B=$PWD/.device-build; OUT=${OUT:-/tmp/out}; O=/tmp/call31; mkdir -p $O
pack() { tar czf $OUT/call31.tgz -C $O .; }
trap pack EXIT
# the carry is at its 64 MiB limit: the binary comes xz-compressed and patched.tgz holds the headers only
python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' $C/kvtuner.xz $C/kvtuner.bin
chmod +x $C/kvtuner.bin; K=$C/kvtuner.bin  # named so that device-run.sh only builds (here: unpacks)
SKIP="stock speed fattn fbench ncu quality" DEADLINE=120 OUT=$OUT bash $C/device-run.sh build > $O/build.txt 2>&1 || { tail -30 $O/build.txt; exit 1; }
export LD_LIBRARY_PATH=$B/lib-patched
grep -h "prebuilt\|build patched" $O/build.txt | tail -2; echo "libraries at ${SECONDS}s"
for f in fattn-test fattn-bench; do
  g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/$f.cpp -o $B/$f -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
done
P="q4_0-q4_0;q8_0-q8_0;f16-q4_0;q8_0-q4_0;kv2-kv2;kv3-kv3;kv2-q4_0;q4_0-kv2"
timeout 170 $B/fattn-test "$P" > $O/fattn-test.txt 2>&1; echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test.txt | head -20; tail -1 $O/fattn-test.txt; pack
GGML_CUDA_FA_VEC_GQA=0 timeout 60 $B/fattn-test "q4_0-q4_0;q8_0-q8_0" > $O/fattn-test-gqa0.txt 2>&1; echo "fattn-test gqa0 rc=$? FAIL=$(grep -c '^FAIL' $O/fattn-test-gqa0.txt) at ${SECONDS}s"; tail -1 $O/fattn-test-gqa0.txt; pack
for g in 0 1; do GGML_CUDA_FA_VEC_GQA=$g timeout 40 $B/fattn-bench "q8_0-q8_0;q4_0-q4_0" "4096,32768" 16 10 28/4/128 4 >> $O/fbench-draft4-gqa$g.txt 2>&1; done
grep -h -E "^q" $O/fbench-draft4-gqa*.txt; pack
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth l8b rc=$? at ${SECONDS}s"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name llama31-kivi-4.0 -o $O/llama-kivi4.yaml > $O/import-llama.txt 2>&1
timeout $((400 - SECONDS)) $K capacity -m $M/l8b.gguf --kv-budget 40GiB -c 32768 --against f16,q8_0,q4_0 --profile $O/llama-kivi4.yaml \
  -ngl 99 -fa on --json $O/capacity-40g.json > $O/capacity-40g.md 2> $O/capacity-40g.log
echo "capacity rc=$? at ${SECONDS}s"; cat $O/capacity-40g.md; pack
rm -f $M/l8b.gguf
# issue 21: KVTuner's Qwen presets at 65536 (calls 28-29 measured 16384 and 32768)
timeout 100 $K synth --preset qwen2.5-7b --weights f16 -o $M/q7b.gguf > /dev/null 2>&1; echo "synth q7b rc=$? at ${SECONDS}s"
$K profile import-kvtuner $C/Qwen2.5-7B-Instruct_kivi_KVTuner4_1.yaml -m $M/q7b.gguf --name qwen25-7b-kivi-4.1 -o $O/qwen-kivi41.yaml > $O/import-qwen.txt 2>&1
$K profile import-kvtuner $C/Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml -m $M/q7b.gguf --name qwen25-7b-pertoken-4.0 -o $O/qwen-pertoken40.yaml >> $O/import-qwen.txt 2>&1
timeout $((590 - SECONDS)) $K ab -m $M/q7b.gguf --profile $O/qwen-kivi41.yaml --profile $O/qwen-pertoken40.yaml --no-quality -ngl 99 -fa on \
  --against f16,q8_0,q4_0,kv3,kv2 --depths 65536 --reps 2 --json $O/qwen-65536.json > $O/qwen-65536.md 2> $O/qwen-65536.log
echo "qwen 65536 rc=$? at ${SECONDS}s"
grep -E '^\| (f16|q8_0|q4_0|kv3|kv2|profile)' $O/qwen-65536.md | awk -F'|' '{print $2, $3, $(NF-1)}'
