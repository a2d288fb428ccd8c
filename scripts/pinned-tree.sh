#!/usr/bin/env bash
# Prints the path of the pinned llama.cpp source tree (unpatched), resolved the way build.rs
# does it: `cargo metadata` on the vendor pin, then the crate's llama.cpp/ folder.
#
#   scripts/pinned-tree.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pin=$(cargo metadata --format-version 1 --manifest-path "$root/vendor/llama-cpp-pin/Cargo.toml" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="llama-cpp-sys-2"))')
tree=$(dirname "$pin")/llama.cpp
[ -f "$tree/include/llama.h" ] || { echo "no llama.cpp tree at $tree" >&2; exit 1; }
echo "$tree"
