#!/usr/bin/env bash
# Runs on the lent H200 machine, from the repository root there, with .device-carry/ carried.
#
#   bash .device-carry/device-run.sh build    builds the CUDA libraries of the patched and the
#                                             unpatched tree into .device-build/ (kept while the
#                                             machine stays warm)
#   bash .device-carry/device-run.sh measure  synthetic Llama-3.1-8B-shaped model, then speed and
#                                             memory (kvtuner ab), patched vs unpatched (speed.c),
#                                             GPU vs CPU quality on a small synthetic model
# Results go to $OUT.
set -euo pipefail
C=$PWD/.device-carry
B=$PWD/.device-build
OUT=${OUT:-/tmp/out}
mkdir -p "$B" "$OUT"
export PATH=/usr/local/cuda/bin:$PATH

build() { # $1 = patched|stock
    local src=$B/$1
    rm -rf "$src" && mkdir -p "$src" && tar xzf "$C/$1.tgz" -C "$src"
    local t0=$SECONDS
    cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF \
        -DGGML_CUDA_FA_QUANTS="$(cat "$C/fa_pairs.txt")" -DGGML_NATIVE=ON -DGGML_OPENMP=OFF \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$OUT/cmake-$1.log" 2>&1
    cmake --build "$src/build" --target llama -j"$(nproc)" > "$OUT/build-$1.log" 2>&1
    echo "build $1: $((SECONDS - t0)) s" | tee -a "$OUT/build-times.txt"
}

case ${1:-} in
build)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    build patched
    build stock
    ;;
measure)
    export LD_LIBRARY_PATH=$B/patched/build/bin
    K=$C/kvtuner
    ldd "$K" | grep -E "llama|ggml" | tee "$OUT/ldd.txt"
    "$K" synth --preset llama31-8b --weights f16 -o /dev/shm/l8b.gguf | tee "$OUT/synth.txt"
    "$K" inspect /dev/shm/l8b.gguf > "$OUT/inspect.txt"
    # mixed profiles near 6.5 and 5.5 bits per value: more precision in the first and last 8 layers
    python3 - "$C" <<'PY'
import sys
c = sys.argv[1]
def preset(name, edge, middle):
    with open(f"{c}/{name}.preset.yaml", "w") as f:
        for i in range(32):
            k, v = edge if (i < 8 or i >= 24) else middle
            f.write(f"{i}: {{nbits_key: {k}, nbits_value: {v}}}\n")
preset("mixed-6.5", (8, 5), (8, 5))  # replaced below
# 6.5 bpv: 24 layers q8_0/q5_0 (7.0) + 8 middle layers q5_0/q4_0 (5.0)
with open(f"{c}/mixed-6.5.preset.yaml", "w") as f:
    for i in range(32):
        k, v = (5, 4) if 12 <= i < 20 else (8, 5)
        f.write(f"{i}: {{nbits_key: {k}, nbits_value: {v}}}\n")
# 5.5 bpv: 16 outer layers q8_0/q4_0 (6.5) + 16 middle layers q4_0/q4_0 (4.5)
with open(f"{c}/mixed-5.5.preset.yaml", "w") as f:
    for i in range(32):
        k, v = (4, 4) if 8 <= i < 24 else (8, 4)
        f.write(f"{i}: {{nbits_key: {k}, nbits_value: {v}}}\n")
PY
    for p in mixed-6.5 mixed-5.5; do
        "$K" profile import-kvtuner "$C/$p.preset.yaml" -m /dev/shm/l8b.gguf --name "$p" -o "$OUT/$p.yaml" > /dev/null
    done
    # patched (no profile) vs unpatched, same tree, interleaved
    for v in patched stock; do
        gcc -O2 -I"$B/$v/include" -I"$B/$v/ggml/include" "$C/speed.c" -o "$B/speed-$v" -L"$B/$v/build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$B/$v/build/bin"
    done
    : > "$OUT/speed-patched.txt"; : > "$OUT/speed-stock.txt"
    for i in 1 2 3; do
        LD_LIBRARY_PATH=$B/patched/build/bin "$B/speed-patched" /dev/shm/l8b.gguf 2 "$B/logits-patched.bin" >> "$OUT/speed-patched.txt"
        LD_LIBRARY_PATH=$B/stock/build/bin "$B/speed-stock" /dev/shm/l8b.gguf 2 "$B/logits-stock.bin" >> "$OUT/speed-stock.txt"
    done
    cmp -s "$B/logits-patched.bin" "$B/logits-stock.bin" && echo "logits bit-identical" > "$OUT/logits.txt" || echo "logits DIFFERENT" > "$OUT/logits.txt"
    # speed and memory at depth
    "$K" ab -m /dev/shm/l8b.gguf --no-quality -ngl 99 -fa on --depths 0,8192,32768,65536 --reps 2 \
        --against f16,q8_0,q4_0,q8_0/q4_0 --profile "$OUT/mixed-6.5.yaml" --profile "$OUT/mixed-5.5.yaml" \
        --json "$OUT/ab-8b.json" > "$OUT/ab-8b.md" 2> "$OUT/ab-8b.log"
    # GPU vs CPU quality: a small synthetic model, one mixed profile
    "$K" synth --preset tiny --layers 8 --heads 8 --kv-heads 2 --head-dim 128 --ffn 2048 --vocab 4096 -o /dev/shm/small.gguf > /dev/null
    printf '%s\n' 0 1 2 3 4 5 6 7 | awk '{k=($1%2)?4:8; printf "%d: {nbits_key: %d, nbits_value: 4}\n", $1, k}' > "$C/small.preset.yaml"
    "$K" profile import-kvtuner "$C/small.preset.yaml" -m /dev/shm/small.gguf --name small-mixed -o "$OUT/small-mixed.yaml" > /dev/null
    for ngl in 99 0; do
        "$K" ab -m /dev/shm/small.gguf --text "$C/lee_background.cor" -c 512 --chunks 4 -ngl $ngl --no-speed \
            --against f16,q8_0/q4_0 --profile "$OUT/small-mixed.yaml" --json "$OUT/quality-ngl$ngl.json" > "$OUT/quality-ngl$ngl.md" 2>&1
    done
    ;;
*) echo "usage: $0 build|measure" >&2; exit 2 ;;
esac
