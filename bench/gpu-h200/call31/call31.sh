#!/usr/bin/env bash
# issues 22-24 on the H200, call 31 (libraries built on the development machine and carried:
# PREBUILT, no build here): the op against the CPU for every ratio/head size/draft/stream case
# (softcap cases at head size 64 dropped: upstream's vector kernel has no code for them), drafts of
# 4 tokens with the q8_0 rule, `kvtuner capacity` (issue 23: 32k-token slots in 40 GiB of KV cache,
# f16/q8_0/q4_0 and KVTuner's Llama kivi preset), then the SmolLM2-360M shape (GQA 3, head 64) at
# depths 0-32768 with the GQA kernel off and on while time is left.
C=$PWD/.device-carry; B=$PWD/.device-build; OUT=${OUT:-/tmp/out}; O=/tmp/call31; mkdir -p $O
pack() { tar czf $OUT/call31.tgz -C $O .; }
trap pack EXIT
mv $C/kvtuner $C/kvtuner.bin 2>/dev/null; K=$C/kvtuner.bin  # without it device-run.sh only builds (here: unpacks)
SKIP="stock speed fattn fbench ncu quality" DEADLINE=120 OUT=$OUT bash $C/device-run.sh build > $O/build.txt 2>&1 || { tail -30 $O/build.txt; exit 1; }
export LD_LIBRARY_PATH=$B/lib-patched
grep -h "prebuilt\|build patched" $O/build.txt | tail -2; echo "libraries at ${SECONDS}s"
for f in fattn-test fattn-bench; do
  g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/$f.cpp -o $B/$f -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
done
P="q4_0-q4_0;q8_0-q8_0;f16-q4_0;q8_0-q4_0;kv2-kv2;kv3-kv3;kv2-q4_0;q4_0-kv2"
timeout 170 $B/fattn-test "$P" > $O/fattn-test.txt 2>&1; echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test.txt | head -20; tail -1 $O/fattn-test.txt; pack
GGML_CUDA_FA_VEC_GQA=0 timeout 60 $B/fattn-test "q4_0-q4_0;q8_0-q8_0" > $O/fattn-test-gqa0.txt 2>&1; echo "fattn-test gqa0 rc=$? FAIL=$(grep -c '^FAIL' $O/fattn-test-gqa0.txt) at ${SECONDS}s"; tail -1 $O/fattn-test-gqa0.txt; pack
for g in 0 1; do GGML_CUDA_FA_VEC_GQA=$g timeout 40 $B/fattn-bench "q8_0-q8_0;q4_0-q4_0" "4096,32768" 16 10 28/4/128 4 >> $O/fbench-draft4-gqa$g.txt 2>&1; done
grep -h -E "^q" $O/fbench-draft4-gqa*.txt; pack
M=/dev/shm/kvt; mkdir -p $M
[ -f $M/l8b.gguf ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth l8b rc=$? at ${SECONDS}s"; }
$K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name llama31-kivi-4.0 -o $O/llama-kivi4.yaml > $O/import-llama.txt 2>&1
timeout $((470 - SECONDS)) $K capacity -m $M/l8b.gguf --kv-budget 40GiB -c 32768 --against f16,q8_0,q4_0 --profile $O/llama-kivi4.yaml \
  -ngl 99 -fa on --json $O/capacity-40g.json > $O/capacity-40g.md 2> $O/capacity-40g.log
echo "capacity rc=$? at ${SECONDS}s"; cat $O/capacity-40g.md; pack
rm -f $M/l8b.gguf
if [ $SECONDS -lt 470 ]; then
  timeout 30 $K synth --preset smollm2-360m --weights f16 -o $M/smol.gguf > /dev/null 2>&1
  for g in 0 1; do
    GGML_CUDA_FA_VEC_GQA=$g timeout $((585 - SECONDS)) $K ab -m $M/smol.gguf --no-quality -ngl 99 -fa on --against f16,q8_0,q4_0 \
      --depths 0,4096,16384,32768 --reps 1 --json $O/smol-depths-gqa$g.json > $O/smol-depths-gqa$g.md 2> $O/smol-depths-gqa$g.log
    echo "smol gqa$g rc=$? at ${SECONDS}s"; pack
  done
  python3 - $O <<'PY'
import json, sys
o = sys.argv[1]
for g in ("0", "1"):
    try: rows = json.load(open(f"{o}/smol-depths-gqa{g}.json"))
    except Exception as e: print(g, e); continue
    f16 = {s["depth"]: s["tg128"]["median"] for s in rows[0]["speed"]}
    for r in rows:
        print(f"gqa{g} {r['name']:6} " + " ".join(f"d{s['depth']}: {s['tg128']['median']:.1f} ({s['tg128']['median']/f16[s['depth']]:.2f}x)" for s in r["speed"]))
PY
fi
