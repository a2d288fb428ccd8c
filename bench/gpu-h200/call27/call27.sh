#!/usr/bin/env bash
# issue 21 on the H200, call 27: patch 0009 with the warp-per-block kv quantizer (set_rows): build,
# the op and a decode step (rotation, cache write, attention) against the CPU, GPU vs CPU KLD,
# then decode speed at 32768 on the Llama-3.1-8B shape while time is left
C=$PWD/.device-carry; B=$PWD/.device-build; OUT=${OUT:-/tmp/out}; O=/tmp/call27; mkdir -p $O  # one archive comes back (the tool returns at most 8 files)
trap 'tar czf $OUT/call27.tgz -C $O .' EXIT
mv $C/kvtuner $C/kvtuner.bin 2>/dev/null; K=$C/kvtuner.bin  # without it device-run.sh only builds
SKIP="stock speed fattn fbench ncu quality" DEADLINE=330 OUT=$OUT bash $C/device-run.sh build > $O/build.txt 2>&1 || { tail -30 $O/build.txt; exit 1; }
export LD_LIBRARY_PATH=$B/lib-patched
tail -1 $O/build.txt
KVP="kv2-kv2;kv3-kv3;q4_0-kv2;q8_0-kv3;kv3-kv2;kv2-q4_0"
g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/fattn-test.cpp -o $B/fattn-test -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
timeout 150 $B/fattn-test "$KVP" > $O/fattn-test-kv.txt 2>&1; echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test-kv.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test-kv.txt)"; tail -1 $O/fattn-test-kv.txt
M=/dev/shm/kvt; mkdir -p $M
$K synth --preset tiny --layers 8 --heads 8 --kv-heads 2 --head-dim 128 --ffn 2048 --vocab 4096 -o $M/small.gguf > /dev/null
AG="f16,q4_0,q8_0/kv3,q4_0/kv2,kv3,kv3/kv2,kv2,kv2/q4_0"
for run in "gpu-decode -ngl 99 --eval-ubatch 1" "cpu -ngl 0"; do
  set -- $run; name=$1; shift
  timeout 60 $K ab -m $M/small.gguf --text $C/lee_background.cor -c 512 --chunks 2 --no-speed -fa on --against $AG "$@" --json $O/quality-$name.json > $O/quality-$name.md 2> $O/quality-$name.log
  echo "quality $name rc=$?"
done
python3 - $O <<'PY'
import json, sys
o = sys.argv[1]
runs = {n: {r["name"]: r for r in json.load(open(f"{o}/quality-{n}.json"))} for n in ("cpu", "gpu-decode")}
print(f"{'config':12} {'cpu':>10} {'gpu-dec':>10}")
for name in runs["cpu"]:
    print(f"{name:12} " + " ".join(f"{runs[n].get(name, {}).get('kld_mean', float('nan')):10.5f}" for n in ("cpu", "gpu-decode")))
PY
echo "elapsed $SECONDS s"
if [ $SECONDS -lt 420 ]; then
  timeout 100 $K synth --preset llama31-8b --weights f16 -o $M/l8b.gguf > /dev/null 2>&1; echo "synth rc=$?"
  $K profile import-kvtuner $C/Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_0.yaml -m $M/l8b.gguf --name kvtuner-llama31-kivi-4.0 -o $O/kivi4.yaml > $O/import.txt 2>&1
  timeout $((570 - SECONDS)) $K ab -m $M/l8b.gguf --profile $O/kivi4.yaml --no-quality -ngl 99 -fa on --against f16,q4_0,kv2,kv3,kv3/kv2 --depths 32768 --reps 2 --json $O/speed-32768.json > $O/speed-32768.md 2> $O/speed-32768.log
  echo "speed rc=$?"; tail -7 $O/speed-32768.md
fi
