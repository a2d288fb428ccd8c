#!/usr/bin/env python3
"""Before/after tables for bench/gpu-long-depths.md from `kvtuner ab` runs on the device.

    summarize-ab.py DIR MODEL_BYTES [BEFORE_MODE AFTER_MODE]

DIR holds ab-d<depth>-gqa<mode>.json (scripts/gpu/device-run.sh), and ab-d<depth>-gqa<mode>-r<N>.json
for the later rounds of a call with ROUNDS > 1: every number is then the median over the rounds'
medians (min and max over all repetitions). MODEL_BYTES is the GGUF's size
(the weights a decode step reads, as issue 8 counts them). Prints generation before/after, after
divided by f16 of the same run, q4_0's share of its byte roofline (4.3 TB/s, the device-to-device
copy rate measured on this GPU) and prefill after/before.
"""
import glob
import json
import math
import os
import re
import statistics
import sys

BANDWIDTH = 4.3e12


def load(path):
    with open(path) as f:
        return {c["name"]: c for c in json.load(f)}


def load_rounds(root, d, mode):
    """The runs of one depth and mode, rounds pooled into one config list (None if not measured)."""
    paths = [os.path.join(root, f"ab-d{d}-gqa{mode}.json")]
    paths += sorted(glob.glob(os.path.join(root, f"ab-d{d}-gqa{mode}-r[0-9]*.json")))
    rounds = [load(p) for p in paths if os.path.exists(p)]
    if not rounds:
        return None
    pooled = rounds[0]
    for name, config in pooled.items():
        for s in config["speed"]:
            for what in ("pp512", "tg128"):
                stats = [speed(r[name], s["depth"], what) for r in rounds]
                s[what] = {"median": statistics.median(x["median"] for x in stats),
                           "min": min(x["min"] for x in stats), "max": max(x["max"] for x in stats)}
    return pooled, len(rounds)


def speed(config, depth, what):
    for s in config["speed"]:
        if s["depth"] == depth:
            return s[what]
    raise KeyError(f"{config['name']}: no {what} at depth {depth}")


def fmt(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def print_table(title, header, rows):
    print(f"{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main():
    root, model_bytes = sys.argv[1], float(sys.argv[2])
    before, after = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else ("0", "2")
    depths = sorted({int(re.search(r"ab-d(\d+)-gqa", p).group(1)) for p in glob.glob(os.path.join(root, "ab-d*-gqa*.json"))})
    runs, rounds = {}, {}
    for d in depths:
        b, a = (load_rounds(root, d, m) for m in (before, after))
        if b and a:
            runs[d] = (b[0], a[0])
            rounds[d] = (b[1], a[1])
    depths = sorted(runs)
    names = list(runs[depths[0]][1])
    print("rounds (processes per mode) pooled: " + ", ".join(f"d{d} {rounds[d][0]}+{rounds[d][1]}" for d in depths) + "\n")

    print_table(f"**tg128 tok/s**, median (min–max); before = GGML_CUDA_FA_VEC_GQA={before}, after = {after}",
                ["config", "bits/value"] + [f"d{d} {w}" for d in depths for w in ("before", "after")],
                [[n, f"{runs[depths[0]][1][n]['bits_per_value']:.2f}"]
                 + [c for d in depths for c in (fmt(speed(runs[d][0][n], d, "tg128")),
                                                 f"**{fmt(speed(runs[d][1][n], d, 'tg128'))}**")]
                 for n in names])

    def vs_f16(n, d):
        a = runs[d][1]
        r = speed(a[n], d, "tg128")["median"] / speed(a["f16"], d, "tg128")["median"]
        return f"{r:.3f}{'' if r >= 1.0 else ' (below)'}"

    print_table("\n**after ÷ f16 of the same run (generation)**", ["config"] + [f"d{d}" for d in depths],
                [[n] + [vs_f16(n, d) for d in depths] for n in names if n != "f16"])

    def roofline(n, d):
        a = runs[d][1][n]
        roof = BANDWIDTH / (model_bytes + a["kv_bytes_per_token"] * d)
        got = speed(a, d, "tg128")["median"]
        return f"{got:.1f} / {roof:.1f} = {100 * got / roof:.1f}%"

    print_table("\n**share of the byte roofline** (model bytes + the cache at that depth, read once per token at 4.3 TB/s)",
                ["config"] + [f"d{d}: tok/s / roofline" for d in depths],
                [[n] + [roofline(n, d) for d in depths] for n in names])

    pp = {(n, d): speed(runs[d][1][n], d, "pp512")["median"] / speed(runs[d][0][n], d, "pp512")["median"]
          for n in names for d in depths}
    print_table("\n**prefill (pp512) after ÷ before**", ["config"] + [f"d{d}" for d in depths],
                [[n] + [f"{pp[n, d]:.3f}" for d in depths] for n in names])
    logs = [math.log(r) for r in pp.values()]
    print(f"\ngeometric mean over all {len(logs)} cells: {math.exp(sum(logs) / len(logs)):.3f}")


if __name__ == "__main__":
    main()
