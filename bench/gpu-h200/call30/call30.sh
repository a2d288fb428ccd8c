#!/usr/bin/env bash
# issues 21/22 on the H200, call 30 (right after call 29, same warm machine and build):
#  1. the decode op alone (fattn-bench, 16 layers of caches) for the shapes of issue 22, with the
#     GQA kernel on and off in alternating processes, at 4096 and 32768 cells; drafts of 4 tokens;
#  2. N = 4, 16, 32 sequences at 8192 tokens each on the Llama-3.1-8B shape (ab -np), kernel on;
#  3. single-sequence decode on the Qwen2.5-7B shape at depths 0-65536 with the kernel off and on;
#  4. the Llama presets' missing depth (pertoken 6.0 and q8_0 at 32768) while time is left.
C=$PWD/.device-carry; B=$PWD/.device-build; OUT=${OUT:-/tmp/out}; O=/tmp/call30; mkdir -p $O
pack() { tar czf $OUT/call30.tgz -C $O .; }
trap pack EXIT
K=$C/kvtuner.bin; [ -x $K ] || K=$C/kvtuner
export LD_LIBRARY_PATH=$B/lib-patched
[ -x $B/fattn-bench ] || { echo "no build on this machine: run call29.sh first"; exit 1; }
FB="f16-f16;q8_0-q8_0;q4_0-q4_0;kv2-kv2;kv3-kv3"
order="0 1"
for shape in 32/8/128 28/4/128 40/8/128 15/5/64 16/8/256 12/2/128 64/8/128 32/32/128; do
  for g in $order; do  # the modes in alternating processes, ABBA over the shapes
    GGML_CUDA_FA_VEC_GQA=$g timeout 60 $B/fattn-bench "$FB" "4096,32768" 16 10 $shape 1 >> $O/fbench-gqa$g.txt 2>&1
  done
  [ "$order" = "0 1" ] && order="1 0" || order="0 1"
done
echo "fbench shapes done at ${SECONDS}s"; pack
for shape in 32/8/128 28/4/128; do
  for g in 0 1; do GGML_CUDA_FA_VEC_GQA=$g timeout 60 $B/fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "4096,32768" 16 10 $shape 4 >> $O/fbench-draft4-gqa$g.txt 2>&1; done
done
echo "fbench drafts done at ${SECONDS}s"; pack
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth l8b rc=$?"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name llama31-kivi-4.0 -o $O/llama-kivi4.yaml > $O/import-llama.txt 2>&1
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner6_0.yaml -m $M/l8b.gguf --name llama31-pertoken-6.0 -o $O/llama-pertoken6.yaml >> $O/import-llama.txt 2>&1
timeout $((400 - SECONDS)) $K ab -m $M/l8b.gguf --profile $O/llama-kivi4.yaml --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
  --depths 8192 -np 4,16,32 --reps 1 --json $O/llama-np-8192.json > $O/llama-np-8192.md 2> $O/llama-np-8192.log
echo "np rc=$? at ${SECONDS}s"; pack
if [ $SECONDS -lt 450 ] && [ -f $M/q7b.gguf ]; then
  for g in 0 1; do
    GGML_CUDA_FA_VEC_GQA=$g timeout $((585 - SECONDS)) $K ab -m $M/q7b.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096,16384,32768 --reps 1 --json $O/qwen-depths-gqa$g.json > $O/qwen-depths-gqa$g.md 2> $O/qwen-depths-gqa$g.log
    echo "qwen depths gqa$g rc=$? at ${SECONDS}s"; pack
  done
fi
if [ $SECONDS -lt 520 ]; then
  timeout $((590 - SECONDS)) $K ab -m $M/l8b.gguf --profile $O/llama-pertoken6.yaml --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
    --depths 32768 --reps 2 --json $O/llama-32768.json > $O/llama-32768.md 2> $O/llama-32768.log
  echo "llama 32768 rc=$? at ${SECONDS}s"
fi
python3 - $O <<'PY'
import sys, glob, re
o = sys.argv[1]
rows = {}
for f in sorted(glob.glob(f"{o}/fbench-gqa*.txt")):
    mode = f.split("gqa")[-1][0]
    shape = None
    for l in open(f):
        m = re.match(r"# fattn-bench: \d+ layers, (\d+) query heads, (\d+) KV heads, D (\d+)", l)
        if m: shape = "/".join(m.groups()); continue
        p = l.split()
        if len(p) == 6 and p[1].isdigit():
            rows.setdefault((shape, p[0], int(p[1])), {}).setdefault(mode, []).append(float(p[2]))
print(f"{'shape':12} {'K-V':10} {'depth':>6} {'us gqa0':>8} {'us on':>8} {'on/off':>7}")
for (shape, kv, d), m in sorted(rows.items()):
    a = sorted(m.get("0", [float('nan')])); b = sorted(m.get("1", [float('nan')]))
    print(f"{shape:12} {kv:10} {d:6} {a[len(a)//2]:8.2f} {b[len(b)//2]:8.2f} {a[len(a)//2]/b[len(b)//2]:7.2f}x")
PY
for f in $O/*.md; do echo "== $f"; grep -E '^\| (f16|q8_0|q4_0|kv3|kv2|profile)' $f | awk -F'|' '{print $2, $3, $(NF-1)}'; done
