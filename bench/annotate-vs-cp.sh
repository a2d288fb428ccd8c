#!/usr/bin/env bash
# `kvtuner annotate` on the real 253 MB model against `cp` of the same file, in one run:
# whole-process wall time (median of N interleaved runs) and peak memory (max RSS).
# `-o NEW` is compared with `cp`; `--in-place` (which fsyncs, so a crash leaves the old or the
# new file) with `cp` followed by `sync` of the copy.
#
#   bench/annotate-vs-cp.sh [ROUNDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-7}
kvtuner=$root/target/release/kvtuner
model=$("$kvtuner" fetch --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"]["gemma3-270m"])')
profile=$root/profiles/gemma3-270m-6.5bpv.yaml
[ -f "$profile" ] || { echo "missing $profile" >&2; exit 1; }
work=$(mktemp -d "$root/target/annotate-bench.XXXX")
trap 'rm -rf "$work"' EXIT

# peak RSS in KiB and wall seconds of one command, via /proc (no GNU time needed)
measure() {
    local start end pid peak=0 rss
    start=$(date +%s.%N)
    "$@" >/dev/null &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        rss=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
        [ -n "$rss" ] && [ "$rss" -gt "$peak" ] && peak=$rss
        sleep 0.005
    done
    wait "$pid"
    end=$(date +%s.%N)
    echo "$(echo "$end $start" | awk '{printf "%.4f", $1-$2}') $peak"
}

sync
cp_sync() { cp "$1" "$2" && sync "$2"; }
cp "$model" "$work/inplace.gguf"
: > "$work/cp.txt"; : > "$work/annotate.txt"; : > "$work/cp_sync.txt"; : > "$work/inplace.txt"
# Every timed command starts from the same state: the previous output deleted and all dirty
# pages written back (untimed), so no command pays for the writeback of the one before it.
fresh() { rm -f "$work/out.gguf"; sync; }
for i in $(seq "$rounds"); do
    fresh; measure cp "$model" "$work/out.gguf" >> "$work/cp.txt"
    fresh; measure "$kvtuner" annotate "$model" --profile "$profile" -o "$work/out.gguf" >> "$work/annotate.txt"
    fresh; measure cp_sync "$model" "$work/out.gguf" >> "$work/cp_sync.txt"
    fresh; measure "$kvtuner" annotate "$work/inplace.gguf" --profile "$profile" --in-place >> "$work/inplace.txt"
done
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
t_cp=$(awk '{print $1}' "$work/cp.txt" | median); t_an=$(awk '{print $1}' "$work/annotate.txt" | median)
m_cp=$(awk '{print $2}' "$work/cp.txt" | sort -n | tail -1); m_an=$(awk '{print $2}' "$work/annotate.txt" | sort -n | tail -1)
echo "file: $model ($(stat -c %s "$model") bytes), $rounds interleaved rounds"
echo "| command | wall s (median) | peak RSS MiB (max) |"
echo "|---|---|---|"
echo "| cp | $t_cp | $(echo "$m_cp" | awk '{printf "%.1f", $1/1024}') |"
echo "| kvtuner annotate | $t_an | $(echo "$m_an" | awk '{printf "%.1f", $1/1024}') |"
echo "| ratio annotate/cp | $(echo "$t_an $t_cp" | awk '{printf "%.2f", $1/$2}') | |"
t_cs=$(awk '{print $1}' "$work/cp_sync.txt" | median); t_ip=$(awk '{print $1}' "$work/inplace.txt" | median)
m_ip=$(awk '{print $2}' "$work/inplace.txt" | sort -n | tail -1)
echo "| cp + sync | $t_cs | |"
echo "| kvtuner annotate --in-place (fsync) | $t_ip | $(echo "$m_ip" | awk '{printf "%.1f", $1/1024}') |"
echo "| ratio in-place/(cp + sync) | $(echo "$t_ip $t_cs" | awk '{printf "%.2f", $1/$2}') | |"
