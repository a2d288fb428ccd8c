#!/usr/bin/env bash
# Runs on the lent H200 machine, from the repository root there, with .device-carry/ carried
# (filled by scripts/gpu/pack.sh).
#
#   bash .device-carry/device-run.sh build    CUDA shared libraries of the patched tree, then of the
#                                             unpatched tree (only libllama differs: the patches
#                                             touch include/ and src/ alone, so the unpatched
#                                             libllama is rebuilt in the same build folder), the
#                                             synthetic models, and, while time is left, the
#                                             patched-vs-unpatched speed and the quality stages
#   bash .device-carry/device-run.sh measure  whatever stage is not done yet: step.c/interleave.c patched vs
#                                             unpatched, GPU vs CPU quality on a small synthetic
#                                             model, then `kvtuner ab --no-quality` on the
#                                             Llama-3.1-8B-shaped model at depths 0, 32768, 8192,
#                                             65536 (one run per depth)
#
# Everything the machine keeps between calls (while it stays warm) is in .device-build/ and the
# models in /dev/shm; each stage leaves a stamp there, so a later call resumes. Results collect
# in .device-build/out/; every call ends by packing them into $OUT/results.tgz plus
# $OUT/summary.txt (the device tool brings back at most 8 files).
# Environment that shapes a call:
#   DEPTHS       default "0 32768 8192 65536"; one ab run each (`0,0` = a warm-up pass then depth 0)
#   REPS         default 2; repetitions inside one ab run (configurations interleaved)
#   ROUNDS       default 1; more repeats every depth in new processes, modes in ABBA order
#                (prefill moves by up to 3% from one process to the next)
#   AGAINST      the uniform caches ab compares, default f16,q8_0,q4_0,q8_0/q4_0
#   AB_PROFILES  default "mixed-6.5 mixed-5.5" ("" for none): profiles ab runs besides AGAINST
#   SKIP         e.g. "stock speed quality fattn fbench ncu": stages left out
#   EVAL_UBATCH  default 1 (every scored token through the single-token decode kernels): the
#                quality stage's --eval-ubatch
#   FT_PAIRS     default every pair built (fa_pairs.txt): the K-V pairs fattn-test checks
#   GQA_MODES    default "1": the settings of GGML_CUDA_FA_VEC_GQA that `ab`, the op benchmark and
#                the quality stage run under; "0 2" measures upstream's decode kernels and patches
#                0009-0010's in the same call, on the same machine and build (files *-gqa0, *-gqa2)
# fattn-bench (the decode op alone, FB_PAIRS/FB_DEPTHS/FB_REPS) and ncu (hardware counters,
# Firecracker machines only) run once per call.
# DEADLINE (seconds, default 560) bounds this call: stages that would not fit are left for the
# next call, and long ones run under `timeout`.
set -euo pipefail
C=$PWD/.device-carry
B=$PWD/.device-build
R=$B/out
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-560}
DEPTHS=${DEPTHS:-0 32768 8192 65536}
REPS=${REPS:-2}
AGAINST=${AGAINST:-f16,q8_0,q4_0,q8_0/q4_0}
GQA_MODES=${GQA_MODES:-1}
mkdir -p "$B" "$R" "$OUT"
export PATH=/usr/local/cuda/bin:$PATH
K=$C/kvtuner
# pack.sh carries the binary xz-compressed; `measure` unpacks it (`build` stays build-only)
if [ "${1:-}" = measure ] && [ ! -x "$K" ] && [ -f "$C/kvtuner.xz" ]; then
    python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$C/kvtuner.xz" "$K" && chmod +x "$K"
fi
LIBP=$B/lib-patched
LIBS=$B/lib-stock

log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$R/progress.log"; }
left() { echo $((DEADLINE - SECONDS)); }
limit() { local l=$(($(left) - $1)); echo $((l < 10 ? 10 : l)); } # timeout for a step, keeping $1 s
done_() { [ -f "$B/done.$1" ]; }
mark() { touch "$B/done.$1"; }
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; } # SKIP="stock speed quality" leaves those stages out

pack_out() { # $1 = exit status (or "running"): summary.txt + results.tgz in $OUT, also mid-call
    local rc=$1
    {
        echo "== $(date -u +%FT%TZ) call '$MODE', rc $rc"
        # `|| true` and `if`: under set -e a missing file would end the EXIT trap before the tar
        cat "$R/gpu.txt" "$R/build-times.txt" "$R/speed-summary.txt" "$R/logits.txt" 2>/dev/null || true
        if [ -f "$R/fattn-test.txt" ]; then echo "-- fattn-test.txt"; tail -3 "$R/fattn-test.txt"; fi
        for f in "$R"/quality-*.md "$R"/ab-d*.md; do if [ -f "$f" ]; then echo "-- $(basename "$f")"; cat "$f"; fi; done
        echo "-- progress"; cat "$R/progress.log"
    } > "$OUT/summary.txt" 2>&1
    tar czf "$OUT/results.tgz.tmp" -C "$R" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz" || true
}
finish() {
    local rc=$?
    log "exit $rc; stages done: $(cd "$B" && ls done.* 2>/dev/null | sed 's/done\.//' | tr '\n' ' ')"
    pack_out "$rc"
}
MODE=${1:-}
trap finish EXIT

# --- builds --------------------------------------------------------------------------------
cmake_configure() { # $1 = source tree; the options shared with build-cuda-here.sh, plus this machine's CPU
    local gen=Ninja opts
    command -v ninja > /dev/null || gen="Unix Makefiles"
    mapfile -t opts < <(grep -v '^#' "$C/cmake-cuda-options.txt" | sed '/^\s*$/d')
    cmake -S "$1" -B "$1/build" -G "$gen" "${opts[@]}" -DGGML_CUDA_FA_QUANTS="$(cat "$C/fa_pairs.txt")" \
        -DGGML_NATIVE=ON -DGGML_CCACHE=OFF
}

unpack_prebuilt() { # libraries built on the development machine (pack.sh with PREBUILT=DIR)
    local t0=$SECONDS
    rm -rf "$LIBP" "$B/patched" && mkdir -p "$LIBP" "$B/patched"
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$C/libs-patched.tar.xz" "$LIBP"
    tar xzf "$C/patched.tgz" -C "$B/patched" include ggml/include # headers for step.c and the op tests
    # the libraries find each other through the folder (their RUNPATH names the build machine's)
    # (ldd -r: a driver symbol left unresolved, e.g. a stub libcuda dropped by --as-needed, shows too)
    if LD_LIBRARY_PATH=$LIBP ldd -r "$LIBP/libggml-cuda.so" 2>&1 | grep -q "not found\|undefined symbol"; then
        LD_LIBRARY_PATH=$LIBP ldd -r "$LIBP/libggml-cuda.so" 2>&1 | tee "$R/ldd-prebuilt.txt"
        log "prebuilt libraries miss a dependency here: building from source"
        rm -rf "$B/patched"
        build_patched
        return
    fi
    echo "prebuilt patched libraries unpacked: $((SECONDS - t0)) s" | tee -a "$R/build-times.txt"
    ls -la "$LIBP" > "$R/libs-patched.txt"
    mark patched
}

build_patched() { # resumable: a call that runs out of time leaves the build folder for the next
    local src=$B/patched t0=$SECONDS
    if [ ! -f "$src/build/CMakeCache.txt" ]; then
        rm -rf "$src" && mkdir -p "$src" && tar xzf "$C/patched.tgz" -C "$src"
        log "configure patched"
        cmake_configure "$src" > "$R/cmake-patched.log" 2>&1 || { tail -30 "$R/cmake-patched.log"; return 1; }
    fi
    log "build patched (targets llama and llama-common, -j$(nproc), $(left) s left)"
    timeout "$(limit 20)" cmake --build "$src/build" --target llama llama-common -j"$(nproc)" >> "$R/build-patched.log" 2>&1 \
        || { log "patched build stopped or failed"; tail -30 "$R/build-patched.log"; return 1; }
    rm -rf "$LIBP" && mkdir -p "$LIBP" && cp -a "$src"/build/bin/lib*.so* "$LIBP"/
    echo "build patched (llama + ggml + ggml-cuda, this call): $((SECONDS - t0)) s" | tee -a "$R/build-times.txt"
    ls -la "$LIBP" > "$R/libs-patched.txt"
    mark patched
}

build_stock() { # the unpatched libllama, rebuilt in the patched build folder (ggml is the same)
    local src=$B/patched t0=$SECONDS f
    rm -rf "$B/stock" && mkdir -p "$B/stock" && tar xzf "$C/stock.tgz" -C "$B/stock"
    rm -rf "$B/patched-orig" && mkdir -p "$B/patched-orig" && tar xzf "$C/patched.tgz" -C "$B/patched-orig" include src
    mapfile -t changed < <(cd "$B/stock" && { diff -rq include "$B/patched-orig/include" || true; diff -rq src "$B/patched-orig/src" || true; } | awk '/^Files / {print $2}')
    log "unpatched files: ${changed[*]}"
    [ ${#changed[@]} -gt 0 ]
    if ! diff -rq "$B/stock/ggml" "$src/ggml" --exclude=build > /dev/null 2>&1; then
        # patches of ours touch ggml (0006-0010: ggml-cpu, ggml-cuda): the unpatched tree needs its own build
        log "ggml differs between the trees: full unpatched build ($(left) s left)"
        cmake_configure "$B/stock" > "$R/cmake-stock.log" 2>&1 || { tail -30 "$R/cmake-stock.log"; return 1; }
        timeout "$(limit 20)" cmake --build "$B/stock/build" --target llama llama-common -j"$(nproc)" > "$R/build-stock.log" 2>&1 \
            || { log "unpatched build stopped or failed"; tail -30 "$R/build-stock.log"; return 1; }
        rm -rf "$LIBS" && mkdir -p "$LIBS" && cp -a "$B/stock"/build/bin/lib*.so* "$LIBS"/
        echo "build unpatched (whole tree): $((SECONDS - t0)) s" | tee -a "$R/build-times.txt"
        mark stock
        return 0
    fi
    for f in "${changed[@]}"; do cp "$B/stock/$f" "$src/$f"; done # new mtimes: ninja rebuilds these
    log "build unpatched libllama"
    cmake --build "$src/build" --target llama llama-common -j"$(nproc)" > "$R/build-stock.log" 2>&1 || { tail -30 "$R/build-stock.log"; return 1; }
    rm -rf "$LIBS" && mkdir -p "$LIBS" && cp -a "$src"/build/bin/lib*.so* "$LIBS"/
    # put the patched sources back (touched, so a later rebuild redoes them) and the patched libllama
    tar xzf "$C/patched.tgz" -C "$src" "${changed[@]}" && touch "${changed[@]/#/$src/}"
    cp -a "$LIBP"/libllama.so* "$src/build/bin/"
    for f in "$LIBP"/lib*.so.*.*; do
        b=$(basename "$f")
        cmp -s "$f" "$LIBS/$b" && echo "same     $b" || echo "differs  $b"
    done | tee "$R/libs-compare.txt"
    echo "build unpatched (libllama only): $((SECONDS - t0)) s" | tee -a "$R/build-times.txt"
    mark stock
}

# --- preparation ---------------------------------------------------------------------------
models_dir() {
    local avail
    avail=$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)
    if [ "${avail:-0}" -lt 24 ]; then mount -o remount,size=48G /dev/shm 2> /dev/null || true; fi
    avail=$(df -BG --output=avail /dev/shm | tail -1 | tr -dc 0-9)
    if [ "${avail:-0}" -ge 24 ]; then echo /dev/shm/kvt; else echo /tmp/kvt; fi
}

prep() {
    export LD_LIBRARY_PATH=$LIBP
    M=$(models_dir) && mkdir -p "$M" && echo "$M" > "$B/models_dir"
    ldd "$K" | grep -E "llama|ggml|not found" | tee "$R/ldd.txt"
    "$K" --version | tee "$R/kvtuner-version.txt"
    log "synth 8B-shaped model into $M"
    "$K" synth --preset llama31-8b --weights f16 -o "$M/l8b.gguf" 2>&1 | tee "$R/synth.txt"
    "$K" inspect "$M/l8b.gguf" > "$R/inspect.txt" 2>&1
    # mixed profiles near 6.5 and 5.5 bits per value
    python3 - "$B" <<'PY'
import sys
b = sys.argv[1]
def write(name, pick):
    with open(f"{b}/{name}.preset.yaml", "w") as f:
        for i in range(32):
            k, v = pick(i)
            f.write(f"{i}: {{nbits_key: {k}, nbits_value: {v}}}\n")
# 6.5 bpv: 24 layers q8_0/q5_0 (7.0) + 8 middle layers q5_0/q4_0 (5.0)
write("mixed-6.5", lambda i: (5, 4) if 12 <= i < 20 else (8, 5))
# 5.5 bpv: 16 outer layers q8_0/q4_0 (6.5) + 16 middle layers q4_0/q4_0 (4.5)
write("mixed-5.5", lambda i: (4, 4) if 8 <= i < 24 else (8, 4))
PY
    for p in mixed-6.5 mixed-5.5; do
        "$K" profile import-kvtuner "$B/$p.preset.yaml" -m "$M/l8b.gguf" --name "$p" -o "$R/$p.yaml"
    done
    "$K" synth --preset tiny --layers 8 --heads 8 --kv-heads 2 --head-dim 128 --ffn 2048 --vocab 4096 -o "$M/small.gguf"
    printf '%s\n' 0 1 2 3 4 5 6 7 | awk '{k=($1%2)?4:8; printf "%d: {nbits_key: %d, nbits_value: 4}\n", $1, k}' > "$B/small.preset.yaml"
    "$K" profile import-kvtuner "$B/small.preset.yaml" -m "$M/small.gguf" --name small-mixed -o "$R/small-mixed.yaml"
    for v in patched stock; do
        [ -d "$B/lib-$v" ] || continue
        gcc -O2 -shared -fPIC -I"$B/$v/include" -I"$B/$v/ggml/include" "$C/step.c" -o "$B/step-$v.so" \
            -L"$B/lib-$v" -lllama -Wl,--disable-new-dtags,-rpath,"$B/lib-$v"
    done
    gcc -O2 "$C/interleave.c" -o "$B/interleave" -ldl -lm
    mark prep
}

# --- measurements --------------------------------------------------------------------------
speed_stock_vs_patched() { # patched (no profile) vs unpatched, same tree, both in one process
    local M; M=$(cat "$B/models_dir")
    log "interleave patched vs unpatched, 10 rounds"
    # no LD_LIBRARY_PATH: each step.so finds its own build through its rpath
    env -u LD_LIBRARY_PATH "$B/interleave" "$B/step-stock.so" "$B/step-patched.so" "$M/l8b.gguf" 10 4 \
        > "$R/speed-summary.txt" 2> "$R/speed-rounds.txt"
    cat "$R/speed-summary.txt"
    mark speed
}

fattn_test() { # the flash-attention op and a layer's decode step, GPU against CPU, upstream's kernels and ours
    log "fattn-test (tests/cuda/run.sh), GGML_CUDA_FA_VEC_GQA=${FT_MODES:-0 $GQA_MODES}"
    MODES="${FT_MODES:-0 $GQA_MODES}" BUDGET=$(limit 5) RESULTS=$R/fattn-test GGML_LIBS=$LIBP GGML_INCLUDE=$B/patched/ggml/include \
        bash tests/cuda/run.sh "${FT_PAIRS:-}" > "$R/fattn-test.txt" 2>&1 || log "fattn-test: failures or cut short (see fattn-test.txt)"
    tail -1 "$R/fattn-test.txt"
    mark fattn
}

fattn_bench() { # the decode op alone, 32 layers of caches, per K-V pair, depth and kernel setting
    g++ -O2 -std=c++17 -I"$B/patched/ggml/include" "$C/fattn-bench.cpp" -o "$B/fattn-bench" \
        -L"$LIBP" -lggml -lggml-base -Wl,-rpath,"$LIBP"
    local m
    for m in $GQA_MODES; do
        log "fattn-bench GGML_CUDA_FA_VEC_GQA=$m"
        GGML_CUDA_FA_VEC_GQA=$m GGML_CUDA_FA_VEC_GQA_MIN_KV=0 timeout "$(limit 5)" "$B/fattn-bench" "${FB_PAIRS:-f16-f16;q8_0-q8_0;q4_0-q4_0;q8_0-q4_0;q5_0-q5_0;q8_0-q5_0;f16-q4_0}" \
            "${FB_DEPTHS:-256,16384,32768,65536}" 32 "${FB_REPS:-20}" > "$R/fattn-bench-gqa$m.txt" 2>&1 || log "fattn-bench gqa $m failed"
        cat "$R/fattn-bench-gqa$m.txt"
    done
    mark fbench
}

ncu_profile() { # hardware counters for one decode op per kernel setting (Firecracker machines only)
    uname -r | tee "$R/uname.txt"
    command -v ncu > /dev/null || { log "no ncu"; mark ncu; return 0; }
    case $(uname -r) in *fc*) ;; *) log "ncu reads counters on Firecracker machines only"; mark ncu; return 0 ;; esac
    local m
    for m in ${NCU_MODES:-0 2}; do
        log "ncu GGML_CUDA_FA_VEC_GQA=$m"
        GGML_CUDA_FA_VEC_GQA=$m timeout 120 ncu --clock-control none --kernel-name regex:flash_attn --launch-skip 64 --launch-count 2 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
            "$B/fattn-bench" "${NCU_PAIRS:-q4_0-q4_0;f16-f16}" 32768 32 1 > "$R/ncu-gqa$m.txt" 2>&1 || log "ncu gqa $m: rc $?"
        tail -60 "$R/ncu-gqa$m.txt"
    done
    mark ncu
}

quality() { # GPU vs CPU, small synthetic model, one mixed profile
    local M ngl; M=$(cat "$B/models_dir")
    local runs=("0 -") m ngl name
    for m in $GQA_MODES; do runs+=("99 $m"); done
    for run in "${runs[@]}"; do
        read -r ngl m <<< "$run"
        name=quality-ngl$ngl; [ "$m" = - ] || name=$name-gqa$m
        log "quality ngl $ngl, GGML_CUDA_FA_VEC_GQA=$m"
        # MIN_KV=0: the kernel runs whatever its cut-off for the pair (an f16 K needs 4096 cells); the quality check is for the kernel
        GGML_CUDA_FA_VEC_GQA=${m/-/1} GGML_CUDA_FA_VEC_GQA_MIN_KV=0 LD_LIBRARY_PATH=$LIBP timeout "$(limit 5)" "$K" ab -m "$M/small.gguf" --text "$C/lee_background.cor" -c 512 --chunks "${QUALITY_CHUNKS:-8}" --ngl $ngl --no-speed --eval-ubatch "${EVAL_UBATCH:-1}" \
            --against f16,q8_0,q4_0,q8_0/q4_0 --profile "$R/small-mixed.yaml" --json "$R/$name.json" > "$R/$name.md" 2> "$R/$name.log"
    done
    mark quality
}

quality_stage() { # once per machine, if not skipped and a minute is left
    if ! done_ quality && ! skip quality && [ "$(left)" -gt 60 ]; then quality || log "quality failed"; fi
}

ab_depth() { # $1 = depth, $2 = GGML_CUDA_FA_VEC_GQA, $3 = file suffix (optional; extra env in AB_ENV)
    local M d=$1 m=$2 x=${3:-} p profiles=(); M=$(cat "$B/models_dir")
    local name=ab-d$d-gqa$m$x
    for p in ${AB_PROFILES-mixed-6.5 mixed-5.5}; do profiles+=(--profile "$R/$p.yaml"); done
    log "ab 8B at depth $d, GGML_CUDA_FA_VEC_GQA=$m ${AB_ENV:-} ($(left) s left)"
    env ${AB_ENV:-} GGML_CUDA_FA_VEC_GQA=$m LD_LIBRARY_PATH=$LIBP timeout "$(limit 5)" "$K" ab -m "$M/l8b.gguf" --no-quality --ngl 99 --fa on -c 66048 \
        --depths "$d" --reps "$REPS" --against "$AGAINST" \
        "${profiles[@]}" \
        --json "$R/$name.json" > "$R/$name.md" 2> "$R/$name.log" || { log "ab depth $d gqa $m$x failed or stopped"; tail -5 "$R/$name.log"; return 1; }
    mark "ab$d-gqa$m$x"
    pack_out running # a call cut off later still returns this depth
}

# rough seconds each stage needs (a stage starts only if it fits in what is left)
# 6 configs, REPS=2 (call 19): 16384 27-29 s, 32768 47-52 s, 65536 105-114 s; REPS=3 (call 22): 16384
# 38-43 s, 32768 67-75 s, so the time scales with REPS
need_ab() {
    local s
    case $1 in 0 | 0,0) s=30 ;; 8192) s=40 ;; 16384) s=32 ;; 32768) s=55 ;; *) s=120 ;; esac
    echo $((s * REPS / 2))
}

case $MODE in
build | measure)
    log "call $MODE, deadline ${DEADLINE}s"
    if [ ! -f "$R/gpu.txt" ]; then
        { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
          nvcc --version | tail -2; cmake --version | head -1; echo "ninja $(ninja --version 2>/dev/null)"; gcc --version | head -1
          echo "nproc $(nproc)"; grep MemTotal /proc/meminfo; df -h /dev/shm /tmp | tail -2; uname -r; } > "$R/gpu.txt" 2>&1 || true
        cat "$R/gpu.txt"
    fi
    if ! done_ patched; then if [ -f "$C/libs-patched.tar.xz" ]; then unpack_prebuilt; else build_patched; fi; fi
    if ! done_ stock && ! skip stock; then build_stock; fi
    [ -x "$K" ] || { log "no kvtuner binary in .device-carry: builds only"; exit 0; }
    if ! done_ prep; then prep; fi
    if ! done_ speed && ! skip speed && done_ stock && [ "$(left)" -gt 100 ]; then speed_stock_vs_patched; fi
    if ! done_ fattn && ! skip fattn && [ "$(left)" -gt 60 ]; then fattn_test || log "fattn-test failed"; fi
    if ! done_ fbench && ! skip fbench && [ "$(left)" -gt 60 ]; then fattn_bench || log "fattn-bench failed"; fi
    if ! done_ ncu && ! skip ncu && [ "$(left)" -gt 90 ]; then ncu_profile || log "ncu failed"; fi
    if [ "${QUALITY_FIRST:-0}" = 1 ]; then quality_stage; fi
    # ROUNDS > 1 repeats every depth in a new process per mode, modes in reverse order on even rounds
    # (ABBA): prefill moves by up to 3% between processes (in calls 20-21 the first of a pair was
    # the faster one, in call 22 not), and ABBA cancels order and slow drift alike; summarize-ab.py
    # pools the rounds (*-r2, ...)
    for ((r = 1; r <= ${ROUNDS:-1}; r++)); do
        modes=$GQA_MODES; ((r % 2 == 0)) && modes=$(echo "$GQA_MODES" | tr ' ' '\n' | tac | tr '\n' ' ')
        x=""; ((r > 1)) && x="-r$r"
        for d in $DEPTHS; do
            for m in $modes; do
                done_ "ab$d-gqa$m$x" && continue
                if [ "$(left)" -gt "$(need_ab "$d")" ]; then ab_depth "$d" "$m" "$x" || true; else log "skip ab depth $d gqa $m$x: $(left) s left"; fi
            done
        done
    done
    quality_stage
    # ROTOFF="DEPTH MODE": one more ab run without the Hadamard rotation of quantized caches
    # (LLAMA_ATTN_ROT_DISABLE=1), to show what the rotation's small kernels cost per token
    if [ -n "${ROTOFF:-}" ]; then
        read -r d m <<< "$ROTOFF"
        if ! done_ "ab$d-gqa$m-rotoff" && [ "$(left)" -gt "$(need_ab "$d")" ]; then AB_ENV=LLAMA_ATTN_ROT_DISABLE=1 ab_depth "$d" "$m" -rotoff || true; fi
    fi
    ;;
*) echo "usage: $0 build|measure" >&2; exit 2 ;;
esac
