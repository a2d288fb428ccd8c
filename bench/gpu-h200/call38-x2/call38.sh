#!/usr/bin/env bash
# issue 24's multi-GPU layer split, for the first time a 2-GPU machine (kind nvidia-h200-x2) is
# lent (prepared in the thirteenth session; libraries carried with PREBUILT, as for the H200):
#  1. `layers` with both GPUs: each layer's device (CUDA0 / CUDA1, llama.cpp's -sm layer) and type
#     under KVTuner's kivi preset, KV per device;
#  2. `ab` on both GPUs against one GPU (CUDA_VISIBLE_DEVICES=0): the same KLD expected (up to the
#     rounding a split changes), speed side by side;
#  3. `fit --vram 9GiB,9GiB`: each GPU's layers within its own budget (the last GPU also holds the
#     output layer, so the two differ), then the
#     written profile's memory per device read back by `ab`.
NAME=call38 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
nvidia-smi -L
M=/dev/shm/kvt; mkdir -p $M
export KVTUNER_CACHE=$C
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth rc=$? at ${SECONDS}s"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name llama31-kivi-4.0 -o $O/kivi4.yaml > $O/import.txt 2>&1
$K layers -m $M/l8b.gguf -ngl 99 -c 8192 -fa on --kv-profile $O/kivi4.yaml > $O/layers-2gpu.txt 2>&1; echo "layers rc=$?"
grep -E "KV per device|CUDA1" $O/layers-2gpu.txt | head -3
for gpus in 0 0,1; do
  CUDA_VISIBLE_DEVICES=$gpus timeout 150 $K ab -m $M/l8b.gguf -ngl 99 -fa on --text lee-evaluation -c 512 --chunks 2 --profile $O/kivi4.yaml \
    --against f16,q4_0 --depths 8192 --reps 1 --json $O/ab-gpus${gpus/,/}.json > $O/ab-gpus${gpus/,/}.md 2> $O/ab-gpus${gpus/,/}.log
  echo "ab on GPUs $gpus rc=$? at ${SECONDS}s"; grep -E '^\| (f16|q4_0|profile)' $O/ab-gpus${gpus/,/}.md | cut -c1-200; pack
done
timeout 200 $K calibrate -m $M/l8b.gguf -ngl 99 -fa on --text lee-calibration -c 512 --chunks 1 --types f16,q8_0,q4_0 -o $O/sens.yaml > $O/calibrate.log 2>&1
echo "calibrate rc=$? at ${SECONDS}s"
$K fit $O/sens.yaml -m $M/l8b.gguf --vram 9GiB,9GiB -c 32768 --text lee-calibration --verify lee-evaluation --chunks 2 -o $O/fit.yaml > $O/fit.md 2> $O/fit.log
echo "fit rc=$?"; grep -E "budget|CUDA|chosen" $O/fit.md $O/fit.log | head -8
ngl=$(grep -o 'run it with -ngl [0-9]*' $O/fit.log | grep -o '[0-9]*$')
[ -n "$ngl" ] && timeout 200 $K ab -m $M/l8b.gguf -ngl $ngl -fa on --no-quality --profile $O/fit.yaml --against q8_0 --depths 32256 --reps 1 \
  --json $O/ab-fit.json > $O/ab-fit.md 2> $O/ab-fit.log
echo "ab fit rc=$? at ${SECONDS}s"; pack
