#!/usr/bin/env bash
# issue 21 on the H200, call 28 (right after call 27, same warm machine and build): decode speed of
# KVTuner's published presets, imported with 2-bit layers as kv2, against f16/q8_0/q4_0 and
# uniform kv2/kv3, at depths 16384/32768/65536 on the Llama-3.1-8B shape and at 32768 on the
# Qwen2.5-7B shape (28 layers, 28 heads, 4 KV heads of 128: GQA 7, upstream's vector kernel).
# One ab run per depth; ab interleaves the configurations within each of its 2 repetitions.
C=$PWD/.device-carry; B=$PWD/.device-build; OUT=${OUT:-/tmp/out}; O=/tmp/call28; mkdir -p $O  # one archive comes back (the tool returns at most 8 files)
pack() { tar czf $OUT/call28.tgz -C $O .; }  # after every stage: a call cut short keeps what it measured
trap pack EXIT
K=$C/kvtuner.bin; [ -x $K ] || K=$C/kvtuner
export LD_LIBRARY_PATH=$B/lib-patched
[ -f $B/done.patched ] || { echo "no build on this machine: run call27.sh first"; exit 1; }
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth l8b rc=$?"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name llama31-kivi-4.0 -o $O/llama-kivi4.yaml > $O/import-llama.txt 2>&1
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_0.yaml -m $M/l8b.gguf --name llama31-pertoken-6.0 -o $O/llama-pertoken6.yaml >> $O/import-llama.txt 2>&1
for d in 16384 65536; do
  timeout $((400 - SECONDS)) $K ab -m $M/l8b.gguf --profile $O/llama-kivi4.yaml --profile $O/llama-pertoken6.yaml --no-quality -ngl 99 -fa on \
    --against f16,q8_0,q4_0,kv3,kv2 --depths $d --reps 2 --json $O/llama-$d.json > $O/llama-$d.md 2> $O/llama-$d.log
  echo "llama $d rc=$? at ${SECONDS}s"; pack
done
rm -f $M/l8b.gguf
timeout 100 $K synth --preset llama31-8b --layers 28 --heads 28 --kv-heads 4 --head-dim 128 --ffn 18944 --vocab 152064 --weights f16 -o $M/q7b.gguf > /dev/null 2>&1; echo "synth q7b rc=$?"
$K profile import-kvtuner $C/Qwen2.5-7B-Instruct_kivi_KVTuner4_1.yaml -m $M/q7b.gguf --name qwen25-7b-kivi-4.1 -o $O/qwen-kivi41.yaml > $O/import-qwen.txt 2>&1
$K profile import-kvtuner $C/Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml -m $M/q7b.gguf --name qwen25-7b-pertoken-4.0 -o $O/qwen-pertoken40.yaml >> $O/import-qwen.txt 2>&1
timeout $((470 - SECONDS)) $K ab -m $M/q7b.gguf --profile $O/qwen-kivi41.yaml --profile $O/qwen-pertoken40.yaml --no-quality -ngl 99 -fa on \
  --against f16,q8_0,q4_0,kv3,kv2 --depths 32768 --reps 2 --json $O/qwen-32768.json > $O/qwen-32768.md 2> $O/qwen-32768.log
echo "qwen 32768 rc=$? at ${SECONDS}s"
for f in $O/llama-*.md $O/qwen-*.md; do echo "== $f"; grep -E '^\| (f16|q8_0|q4_0|kv3|kv2|profile)' $f | awk -F'|' '{print $2, $3, $(NF-1)}'; done
