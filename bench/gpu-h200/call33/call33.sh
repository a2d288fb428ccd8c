#!/usr/bin/env bash
# issue 24 on the H200 (prepared in the twelfth session, to run in the next): the VRAM-budget search.
#  1. a sensitivity table of the synthetic Llama-3.1-8B shape (random weights: the KLDs only rank
#     layers; calibrate on the GPU, 1 chunk of 512 tokens of the Lee corpus);
#  2. `kvtuner fit` at a budget f16 cannot fill with all layers at 32768 tokens (its pick measured
#     against the uniform GPU pairs of the same budget with --text, reported held out): the chosen -ngl and
#     profile, and each uniform type at the most layers it fits (the table: -ngl 0-33);
#  3. measured side by side: the fit's profile at its -ngl against the best uniform types at theirs
#     (KLD on held-out text and tg128 at 32768), one `ab` per -ngl (ab takes one -ngl per run).
# Dry run on the development machine (an rpc-server as the device, a tiny model):
#   DRY=1 M=model.gguf RPC=127.0.0.1:PORT VRAM=2MiB CTX=256 bash bench/gpu-h200/call33/call33.sh
set -u
if [ -n "${DRY:-}" ]; then
    K=${K:-target/release/kvtuner}; O=${O:-/tmp/call33}; C=${C:-$HOME/.cache/kvtuner}; mkdir -p "$O"
    RPCARG=(--rpc "$RPC"); FA=(); NGL_ALL=99
else
    NAME=call33 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
    M=/dev/shm/kvt/l8b.gguf; mkdir -p /dev/shm/kvt
    [ -f $M ] || { timeout 100 $K synth --preset llama31-8b --weights f16 -o $M > /dev/null 2>&1; echo "synth rc=$? at ${SECONDS}s"; }
    RPCARG=(); FA=(-fa on); NGL_ALL=99; VRAM=${VRAM:-17GiB}; CTX=${CTX:-32768}
fi
# calibrate on the Lee corpus's first half, score on the second (named halves of the corpus in $C)
export KVTUNER_CACHE=$C
# 1. sensitivity (all layers on the device)
timeout 200 $K calibrate -m $M -ngl $NGL_ALL "${RPCARG[@]}" "${FA[@]}" --text lee-calibration -c 512 --chunks 1 --types f16,q8_0,q4_0,kv3,kv2 \
    -o $O/sens.yaml > $O/calibrate.log 2>&1; echo "calibrate rc=$? at ${SECONDS}s"
# 2. the fit
$K fit $O/sens.yaml -m $M --vram $VRAM -c $CTX "${RPCARG[@]}" --text lee-calibration --verify lee-evaluation --chunks 2 -o $O/fit.yaml > $O/fit.md 2> $O/fit.log; echo "fit rc=$?"
$K fit $O/sens.yaml -m $M --vram $VRAM -c $CTX "${RPCARG[@]}" --json > $O/fit.json 2>/dev/null
cat $O/fit.md; tail -2 $O/fit.log
# 3. measured: the fit's profile at its -ngl, each uniform type at its own
python3 - $O/fit.json > $O/runs.txt <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(j["chosen_ngl"], "profile")
for u in j["uniform"]:
    if u["k"] in ("f16", "q8_0", "q4_0"):
        print(u["placement"]["ngl"], u["k"])
PY
cat $O/runs.txt
while read -r ngl what; do
    if [ "$what" = profile ]; then cfg=(--profile $O/fit.yaml --against f16); else cfg=(--profile auto --against "$what"); fi
    timeout 240 $K ab -m $M -ngl $ngl "${RPCARG[@]}" "${FA[@]}" --text lee-evaluation -c 512 --chunks 2 "${cfg[@]}" \
        --depths ${DEPTH:-$((CTX - 512))} --reps 1 --json $O/ab-ngl$ngl-$what.json > $O/ab-ngl$ngl-$what.md 2> $O/ab-ngl$ngl-$what.log
    echo "ab -ngl $ngl $what rc=$?"
    grep -E '^\| (f16|q8_0|q4_0|profile)' $O/ab-ngl$ngl-$what.md | cut -c1-220
done < $O/runs.txt
