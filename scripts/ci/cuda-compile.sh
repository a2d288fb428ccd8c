#!/usr/bin/env bash
# CI: compiles the CUDA translation units of the patched llama.cpp that our patch series touches,
# for sm_90 (the H200 we ship for), with nvcc 13.0 from NVIDIA's PyPI wheels. Objects only: the
# whole ggml-cuda library is far too slow for 2 cores. No GPU is needed.
#
# Which TUs: every .cu under ggml/src/ggml-cuda that a patch in patches/series adds or changes,
# plus every .cu that includes (transitively, by its quoted #includes) a file a patch adds or
# changes, among the TUs that CMake would build. Computed from the patches on every run, so a
# patch that starts touching another kernel brings its TUs in. With today's series (0007-0010)
# that is fattn.cu, fattn-gqa-fuse.cu, ggml-cuda.cu and the fattn-vec template instance of every
# pair in src/cuda_fa_pairs.txt (they include fattn-vec.cuh -> fattn-vec-gqa.cuh, and each
# instantiates the GQA decode kernel for its K/V types); CMake builds only those instances, as
# GGML_CUDA_FA_QUANTS is set from the same list as build.rs and pack.sh set it. Only files under
# ggml/src/ggml-cuda count as touched: a patch to a header every TU includes (ggml.h) would make
# this the whole library, which 2 cores cannot build within CI's time.
#
# Flags: exactly CMake's, from compile_commands.json of a configure with the options every CUDA
# build of ours uses (scripts/gpu/cmake-cuda-options.txt, CMAKE_CUDA_ARCHITECTURES=90).
# Caches under the cargo target folder (CI keeps it): the unpacked toolkit (cuda13/) and ccache's
# objects (ccache-cuda/), so a second run neither downloads nor recompiles what did not change.
#
#   scripts/ci/cuda-compile.sh          (CUDA_COMPILE_JOBS=N: parallel nvcc runs, default nproc;
#                                        CUDA_COMPILE_ONLY="fattn.cu ...": those TUs only)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tgt=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$tgt" && tgt=$(cd "$tgt" && pwd)
cuda=$tgt/cuda13
out=$tgt/cuda-ci
export CCACHE_DIR=$tgt/ccache-cuda CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-2G} CCACHE_SLOPPINESS=time_macros
t0=$(date +%s)

"$root/scripts/gpu/install-nvcc.sh" "$cuda"

# the pinned tree with our series applied, copied into $out/src where it changed only (stable
# mtimes: cmake's configure and ccache see only real changes)
upstream=$("$root/scripts/pinned-tree.sh")
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
cp -r "$upstream" "$tmp/patched"
mapfile -t series < <(grep -v '^#' "$root/patches/series" | sed '/^\s*$/d')
for p in "${series[@]}"; do
    (cd "$tmp/patched" && GIT_CEILING_DIRECTORIES="$tmp" git apply -p1 "$root/patches/$p")
done
mkdir -p "$out/src"
python3 "$root/scripts/sync-tree.py" "$tmp/patched" "$out/src"

# configure (incremental after the first run; re-globs the sources and takes new pairs)
pairs=$(grep -v '^#' "$root/src/cuda_fa_pairs.txt" | awk 'NF==2 {printf "%s%s-%s", (n++ ? ";" : ""), $1, $2}')
mapfile -t opts < <(grep -v '^#' "$root/scripts/gpu/cmake-cuda-options.txt" | sed '/^\s*$/d')
PATH=$cuda/bin:$PATH CUDACXX=$cuda/bin/nvcc cmake -S "$out/src" -B "$out/build" "${opts[@]}" \
    -DCUDAToolkit_ROOT="$cuda" -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc" \
    -DGGML_CUDA_FA_QUANTS="$pairs" -DGGML_NATIVE=OFF -DGGML_CCACHE=OFF \
    -DCMAKE_EXPORT_COMPILE_COMMANDS=ON > "$out/configure.log" 2>&1 ||
    { cat "$out/configure.log"; echo "CUDA compile: cmake configure failed" >&2; exit 1; }
t1=$(date +%s)
echo "CUDA compile: toolkit, patched tree and configure in $((t1 - t0)) s"

# the TUs (see the top of this file) and their commands, with the objects under $out/obj
python3 - "$root/patches" "${series[@]}" > "$out/tus.tsv" <<PY
import json, os, re, shlex, sys
patches, series = sys.argv[1], sys.argv[2:]
src, cu = "$out/src", "$out/src/ggml/src/ggml-cuda"
touched = set()
for p in series:
    for line in open(os.path.join(patches, p), encoding="utf-8", errors="replace"):
        m = re.match(r"^\+\+\+ b/(ggml/src/ggml-cuda/\S+)", line)
        if m:
            touched.add(os.path.normpath(os.path.join(src, m.group(1))))
inc = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
closure = {}
def deps(f):
    if f not in closure:
        closure[f] = {f}
        found = set()
        for i in inc.findall(open(f, encoding="utf-8", errors="replace").read()):
            for c in (os.path.join(os.path.dirname(f), i), os.path.join(cu, i)):
                c = os.path.normpath(c)
                if os.path.isfile(c):
                    found |= deps(c)
                    break
        closure[f] |= found
    return closure[f]
n = 0
for e in json.load(open("$out/build/compile_commands.json")):
    f = os.path.normpath(os.path.join(e["directory"], e["file"]))
    if not f.startswith(cu + os.sep) or not f.endswith(".cu") or not deps(f) & touched:
        continue
    args = e.get("arguments") or shlex.split(e["command"])
    o = args.index("-o")
    rel = os.path.relpath(f, cu)
    args[o + 1] = os.path.join("$out/obj", rel + ".o")
    print(rel, e["directory"], shlex.join(args), sep="\t")
    n += 1
if n == 0:
    sys.exit("no CUDA translation unit is touched by the patch series: is compile_commands.json right?")
PY
# CUDA_COMPILE_ONLY="fattn.cu template-instances/..." (a developer's quick check): those TUs alone
if [ -n "${CUDA_COMPILE_ONLY:-}" ]; then
    awk -F'\t' -v only=" $CUDA_COMPILE_ONLY " 'index(only, " " $1 " ")' "$out/tus.tsv" > "$out/tus.only" && mv "$out/tus.only" "$out/tus.tsv"
fi
mapfile -t tus < <(cut -f1 "$out/tus.tsv")
echo "CUDA compile: ${#tus[@]} translation units touched by the patch series (pairs: $pairs):"
printf '    %s\n' "${tus[@]}"
mkdir -p "$out/obj/template-instances" "$out/log"
ccache -z > /dev/null

# one nvcc per core; a TU's log is printed when it fails
compile() {
    local rel=$1 dir=$2 cmd=$3 log s
    log=$out/log/${rel//\//_}.log
    s=$(date +%s)
    if (cd "$dir" && eval "ccache $cmd") > "$log" 2>&1; then
        echo "    ok   $(($(date +%s) - s)) s  $rel"
    else
        echo "    FAIL $(($(date +%s) - s)) s  $rel"
        sed 's/^/        /' "$log"
        return 1
    fi
}
export -f compile
export out
jobs=${CUDA_COMPILE_JOBS:-$(nproc)}
if ! seq "${#tus[@]}" | xargs -P "$jobs" -I{} bash -c \
    'IFS=$(printf "\t") read -r rel dir cmd < <(sed -n "$1p" "$out/tus.tsv"); compile "$rel" "$dir" "$cmd"' _ {}; then
    echo "CUDA compile: FAILED (see above), $(($(date +%s) - t0)) s" >&2
    exit 1
fi
t2=$(date +%s)
stats=$(ccache --print-stats 2>/dev/null | awk -F'\t' '$1 ~ /^(direct_cache_hit|preprocessed_cache_hit|cache_miss)$/ {printf "%s=%s ", $1, $2}')
echo "CUDA compile: compiled in $((t2 - t1)) s with $jobs jobs (ccache: ${stats% }), total $((t2 - t0)) s"
echo "CUDA compile: ${#tus[@]} translation units OK for sm_90"
