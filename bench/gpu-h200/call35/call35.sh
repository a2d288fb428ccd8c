#!/usr/bin/env bash
# issue 24 on the H200 (prepared in the twelfth session, to run in a later one; libraries carried
# with PREBUILT):
#  1. the GPU split between this process and an rpc-server on the same machine serving the same
#     GPU (`rpc-server --device CUDA0`): `layers` shows each layer's device and type, and `ab`
#     measures the split against all layers local (same KLD expected, speed side by side);
#  2. an -ngl sweep (0, 8, 16, 24, 32, 33 of the 8B shape's 32 layers + output) with f16, q4_0 and
#     KVTuner's kivi preset: tg128 at 8192 (and 32768 where most layers are on the GPU) and the
#     memory on the GPU each configuration used (ab's offload column, read back from the runtime).
NAME=call35 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth rc=$? at ${SECONDS}s"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name llama31-kivi-4.0 -o $O/kivi4.yaml > $O/import.txt 2>&1
# 1. same-GPU RPC split
$K rpc-server --port 50100 --device CUDA0 > $O/rpc-server.log 2>&1 &
RPC_PID=$!
for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/50100) 2>/dev/null && break; sleep 0.1; done
$K layers -m $M/l8b.gguf -ngl 99 --rpc 127.0.0.1:50100 -c 8192 -fa on --kv-profile $O/kivi4.yaml > $O/layers-split.txt 2>&1; echo "layers split rc=$?"
grep -E "CUDA0|RPC" $O/layers-split.txt | head -5
for split in local rpc; do
  extra=(); [ $split = rpc ] && extra=(--rpc 127.0.0.1:50100)
  timeout 150 $K ab -m $M/l8b.gguf -ngl 99 "${extra[@]}" -fa on --text $C/lee_background.cor -c 512 --chunks 2 --profile $O/kivi4.yaml \
    --against f16,q4_0 --depths 8192 --reps 1 --json $O/split-$split.json > $O/split-$split.md 2> $O/split-$split.log
  echo "ab split $split rc=$? at ${SECONDS}s"; pack
done
kill $RPC_PID 2>/dev/null
# 2. -ngl sweep
for ngl in 33 24 16 8 0; do
  [ $SECONDS -lt 540 ] || break
  depths=8192; [ $ngl -ge 24 ] && depths=8192,32768
  timeout $((590 - SECONDS)) $K ab -m $M/l8b.gguf -ngl $ngl -fa on --no-quality --profile $O/kivi4.yaml --against f16,q4_0 \
    --depths $depths --reps 1 --json $O/ngl$ngl.json > $O/ngl$ngl.md 2> $O/ngl$ngl.log
  echo "ngl $ngl rc=$? at ${SECONDS}s"; grep -E '^\| (f16|q4_0|profile)' $O/ngl$ngl.md | cut -c1-200; pack
done
