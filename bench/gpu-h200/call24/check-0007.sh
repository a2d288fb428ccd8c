#!/usr/bin/env bash
# issue 20 / patch 0007 on the H200: a K/V pair without a CUDA kernel warns once, naming the layers
set -x
K=$PWD/.device-carry/kvtuner.bin
export LD_LIBRARY_PATH=$PWD/.device-build/lib-patched
D=/tmp/chk && mkdir -p $D
$K synth --preset tiny --layers 6 --heads 8 --kv-heads 2 --head-dim 128 --ffn 1024 --vocab 4096 -o $D/s.gguf
# layer 0: K q4_0 / V q8_0 (K narrower than V: no kernel), layer 3: q8_0 / f16 (not listed); the rest listed pairs
printf '0: {nbits_key: 4, nbits_value: 8}\n1: {nbits_key: 8, nbits_value: 8}\n2: {nbits_key: 8, nbits_value: 4}\n3: {nbits_key: 8, nbits_value: 16}\n4: {nbits_key: 4, nbits_value: 4}\n5: {nbits_key: 8, nbits_value: 4}\n' > $D/bad.preset.yaml
printf '0: {nbits_key: 8, nbits_value: 4}\n1: {nbits_key: 8, nbits_value: 8}\n2: {nbits_key: 8, nbits_value: 4}\n3: {nbits_key: 16, nbits_value: 8}\n4: {nbits_key: 4, nbits_value: 4}\n5: {nbits_key: 8, nbits_value: 4}\n' > $D/good.preset.yaml
$K profile import-kvtuner $D/bad.preset.yaml -m $D/s.gguf --name bad -o $D/bad.yaml
$K profile import-kvtuner $D/good.preset.yaml -m $D/s.gguf --name good -o $D/good.yaml
echo "=== bad profile: layers"
$K layers -m $D/s.gguf --kv-profile $D/bad.yaml -ngl 99 -c 4096 -fa on
echo "=== bad profile: layers --json (attn_fallback)"
$K layers -m $D/s.gguf --kv-profile $D/bad.yaml -ngl 99 -c 4096 -fa on --json | python3 -c 'import json,sys; j=json.load(sys.stdin); print([ (i, l["type_k"], l["type_v"], l["attn_fallback"]) for i,l in enumerate(j["layers"])])'
echo "=== good profile: layers (no warning expected)"
$K layers -m $D/s.gguf --kv-profile $D/good.yaml -ngl 99 -c 4096 -fa on
echo "=== ab, speed only, both profiles and f16 / q8_0"
$K ab -m $D/s.gguf --profile $D/good.yaml --profile $D/bad.yaml --against f16,q8_0 --no-quality -ngl 99 --depths 0,4096 -c 4096 2>&1 | tail -30
