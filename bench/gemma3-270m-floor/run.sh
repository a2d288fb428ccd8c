#!/usr/bin/env bash
# Single-half sensitivity of Gemma 3 270M on the held-out Lee text.
# One `kvtuner ab` run: the f16 baseline, uniform caches,
# and 72 profiles that quantize one layer's K or V (q8_0 or q4_0) with everything else f16.
# About 16 minutes on this 2-core machine.
#
#   bench/gemma3-270m-floor/run.sh [OUT_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
kvtuner=$root/target/release/kvtuner
out=${1:-$root/target/floor}
mkdir -p "$out/profiles"
model=$("$kvtuner" fetch --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"]["gemma3-270m"])')
layers=$("$kvtuner" inspect --json "$model" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"])')
args=()
for h in K V; do
    for b in 8 4; do
        for ((l = 0; l < layers; l++)); do
            name=$(printf '%s%s-L%02d' "$h" "$b" "$l")
            for ((i = 0; i < layers; i++)); do
                k=16 v=16
                if [ "$i" -eq "$l" ]; then if [ "$h" = K ]; then k=$b; else v=$b; fi; fi
                echo "$i: {nbits_key: $k, nbits_value: $v}"
            done > "$out/profiles/$name.preset.yaml"
            "$kvtuner" profile import-kvtuner "$out/profiles/$name.preset.yaml" -m "$model" --name "$name" \
                -o "$out/profiles/$name.yaml" > /dev/null
            args+=(--profile "$out/profiles/$name.yaml")
        done
    done
done
"$kvtuner" ab -m "$model" --text lee-evaluation --no-speed -t 2 \
    --against q8_0/f16,f16/q8_0,q4_0/f16,f16/q4_0,q8_0,q8_0/q4_0,q8_0/q5_0,q5_0 \
    "${args[@]}" --json "$out/single.json" > "$out/single.md"
"$kvtuner" inspect --json "$model" > "$out/inspect.json"
