#!/usr/bin/env bash
# Is the single-half floor the kernel path rather than the stored precision? On the CPU, a layer
# whose K and V types differ (or are quantized) runs ggml's one-row flash-attention path (Q rounded
# to K's dot type, f16 V summed in f16), while the all-f16 baseline runs the f32 tiled path. Layer
# 0's K or V stored as f32 takes the one-row path with no storage loss at all; if the path cost
# anything, these profiles would show it. About 3 minutes on this 2-core machine.
#
#   bench/gemma3-270m-floor/path-check.sh [OUT_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
kvtuner=$root/target/release/kvtuner
out=${1:-$root/target/floor-path}
mkdir -p "$out"
model=$("$kvtuner" fetch --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"]["gemma3-270m"])')
fingerprint=$(grep fingerprint "$root/profiles/gemma3-270m-5.5bpv.yaml" | awk '{print $2}')
profile() { # name, layer-0 K type, layer-0 V type (the other 17 layers f16)
    {
        printf 'schema: 1\nname: %s\nmodel:\n  architecture: gemma3\n  layers: 18\n  fingerprint: %s\n  name: Gemma 3 270m\nlayers:\n' "$1" "$fingerprint"
        echo "- { k: $2, v: $3 }"
        for _ in $(seq 1 17); do echo "- { k: f16, v: f16 }"; done
    } > "$out/$1.yaml"
    args+=(--profile "$out/$1.yaml")
}
args=()
profile L0V-f32 f16 f32
profile L0K-f32 f32 f16
profile L0KV-f32 f32 f32
profile L0V-q8 f16 q8_0
profile L0KV-q8 q8_0 q8_0
"$kvtuner" ab -m "$model" --text lee-evaluation --no-speed -t 2 --against f32,q8_0 "${args[@]}" \
    --json "$out/path-check.json" > "$out/path-check.md"
cat "$out/path-check.md"
