#!/usr/bin/env bash
# Applies patches/series to a copy of the pinned llama.cpp tree one patch at a time and builds the
# tree after every patch: the CPU libraries with the options build.rs uses (llama, ggml with its
# CPU and RPC backends, llama-common), and optionally the CUDA compile check of CI
# (scripts/ci/cuda-compile.sh, run on the series up to that patch: the CUDA translation units the
# patches so far touch, for sm_90). So every patch of the series builds on top of the ones before
# it, as a reviewer applies them.
#
#   scripts/check-series.sh
#
# Environment:
#   CHECK_CPU=0          skip the CPU builds (default 1)
#   CHECK_CUDA=1         also run the CUDA compile check after each patch that leaves a patch to
#                        ggml/src/ggml-cuda in the series (default 0; needs nvcc: see cuda-compile.sh)
#   CHECK_FROM=N, CHECK_TO=M
#                        check only after patches N..M (1-based; the patches before N are still
#                        applied). Default: all.
#   CHECK_CUDA_PAIRS="q8_0 q8_0;q4_0 kv2"
#                        the K-V pairs whose flash-attention instances the CUDA check compiles
#                        (default: src/cuda_fa_pairs.txt, as CI), to check a step faster
#   CHECK_JOBS=N         parallel compile jobs (default nproc); CUDA: CUDA_COMPILE_JOBS
#   CHECK_DIR=DIR        where the trees, builds and caches live (default: $CARGO_TARGET_DIR or
#                        target/, then check-series/). Kept between runs: a rerun rebuilds only what
#                        changed (stable mtimes, ccache).
#   PINNED_TREE=DIR      the unpatched llama.cpp tree (default: scripts/pinned-tree.sh), e.g. on a
#                        machine without cargo
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tgt=${CARGO_TARGET_DIR:-$root/target}
dir=${CHECK_DIR:-$tgt/check-series}
mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
upstream=${PINNED_TREE:-$("$root/scripts/pinned-tree.sh")}
upstream=$(cd "$upstream" && pwd)
jobs=${CHECK_JOBS:-$(nproc)}
cpu=${CHECK_CPU:-1}
cuda=${CHECK_CUDA:-0}

mapfile -t series < <(grep -v '^#' "$root/patches/series" | sed '/^\s*$/d')
from=${CHECK_FROM:-1}
to=${CHECK_TO:-${#series[@]}}

# the tree, patched step by step (a git repository, so that each patch is applied as git apply does
# in build.rs); only the parts build.rs copies
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/t"
for part in CMakeLists.txt LICENSE cmake include src common vendor ggml tools/CMakeLists.txt; do
    [ -e "$upstream/$part" ] || continue
    mkdir -p "$tmp/t/$(dirname "$part")"
    cp -r "$upstream/$part" "$tmp/t/$part"
done

# CPU: build.rs's cmake options (see cmake_options there), static, host CPU
cpu_opts=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_ALL_WARNINGS=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF
    -DGGML_CCACHE=ON -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF)
if [ -n "${KVTUNER_PORTABLE:-}" ]; then
    cpu_opts+=(-DGGML_NATIVE=OFF)
else
    cpu_opts+=(-DGGML_NATIVE=ON)
    if [ "$(uname -m)" = x86_64 ]; then
        cpu_opts+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
    fi
fi
export CCACHE_BASEDIR=$dir CCACHE_NOHASHDIR=1

# CUDA: CI's own script, pointed at the series up to this patch through a copy of the repository's
# layout (its scripts and pair list, this series' first patches, this pinned tree)
fake=$tmp/root
mkdir -p "$fake/scripts/ci" "$fake/patches" "$fake/src"
cp "$root/scripts/ci/cuda-compile.sh" "$fake/scripts/ci/"
ln -s "$root/scripts/gpu" "$fake/scripts/gpu"
ln -s "$root/scripts/sync-tree.py" "$fake/scripts/sync-tree.py"
# the pairs the CUDA check compiles at a step: CHECK_CUDA_PAIRS or src/cuda_fa_pairs.txt, less
# those of types the tree does not know yet (GGML_CUDA_FA_QUANTS takes kv2/kv3 from patch 0008 on)
pairs_for_step() {
    local types
    types=$(sed -n 's/^ *set(FA_TYPES \([^)]*\)).*/\1/p' "$tmp/t/ggml/cmake/common.cmake")
    if [ -n "${CHECK_CUDA_PAIRS:-}" ]; then tr ';' '\n' <<< "$CHECK_CUDA_PAIRS"; else grep -v '^#' "$root/src/cuda_fa_pairs.txt"; fi |
        awk -v types="$types" 'BEGIN { n = split(types, t, " "); for (i = 1; i <= n; i++) ok[t[i]] = 1 }
            NF == 2 && ($1 in ok) && ($2 in ok)' > "$fake/src/cuda_fa_pairs.txt"
}
printf '#!/bin/sh\necho %q\n' "$upstream" > "$fake/scripts/pinned-tree.sh" && chmod +x "$fake/scripts/pinned-tree.sh"
for p in "${series[@]}"; do ln -s "$root/patches/$p" "$fake/patches/$p"; done
# cuda-compile.sh installs nvcc into its target folder unless one is there: use CUDA_HOME's (default
# /opt/cuda13, where scripts/gpu/install-nvcc.sh puts it) if it has one
cuda_home=${CUDA_HOME:-/opt/cuda13}
if [ "$cuda" = 1 ] && [ -x "$cuda_home/bin/nvcc" ] && [ ! -e "$dir/cuda/cuda13" ]; then
    mkdir -p "$dir/cuda" && ln -s "$cuda_home" "$dir/cuda/cuda13"
fi

summary=()
t_all=$(date +%s)
for i in "${!series[@]}"; do
    n=$((i + 1)) p=${series[$i]}
    (cd "$tmp/t" && GIT_CEILING_DIRECTORIES="$tmp" git apply -p1 --whitespace=nowarn "$root/patches/$p") ||
        { echo "check-series: $p does not apply" >&2; exit 1; }
    [ "$n" -ge "$from" ] && [ "$n" -le "$to" ] || continue
    echo "== $n/${#series[@]} $p"
    line="$p:"
    if [ "$cpu" = 1 ]; then
        t0=$(date +%s)
        mkdir -p "$dir/src"
        python3 "$root/scripts/sync-tree.py" "$tmp/t" "$dir/src"
        cmake -S "$dir/src" -B "$dir/build" "${cpu_opts[@]}" > "$dir/cpu-configure.log" 2>&1 ||
            { tail -30 "$dir/cpu-configure.log"; echo "check-series: $p: CPU configure failed" >&2; exit 1; }
        cmake --build "$dir/build" -j "$jobs" --target llama ggml llama-common > "$dir/cpu-build.log" 2>&1 ||
            { grep -B2 -A12 -m5 'error' "$dir/cpu-build.log" || tail -40 "$dir/cpu-build.log"
              echo "check-series: $p: CPU build failed" >&2; exit 1; }
        line+=" CPU ok ($(($(date +%s) - t0)) s)"
    fi
    if [ "$cuda" = 1 ]; then
        # (grep reads the files itself: `cat | grep -q` fails under pipefail when grep stops early)
        if (cd "$root/patches" && grep -q '^+++ b/ggml/src/ggml-cuda/' "${series[@]:0:$n}"); then
            t0=$(date +%s)
            printf '%s\n' "${series[@]:0:$n}" > "$fake/patches/series"
            pairs_for_step
            CARGO_TARGET_DIR=$dir/cuda "$fake/scripts/ci/cuda-compile.sh" > "$dir/cuda-$n.log" 2>&1 ||
                { tail -60 "$dir/cuda-$n.log"; echo "check-series: $p: CUDA compile check failed" >&2; exit 1; }
            tus=$(grep -o '[0-9]* translation units OK' "$dir/cuda-$n.log" | cut -d' ' -f1)
            line+=" CUDA ok, ${tus:-?} TUs ($(($(date +%s) - t0)) s)"
        else
            line+=" CUDA: no ggml-cuda patch yet"
        fi
    fi
    echo "   $line"
    summary+=("$line")
done
echo "check-series: every step built, $(($(date +%s) - t_all)) s:"
printf '    %s\n' "${summary[@]}"
