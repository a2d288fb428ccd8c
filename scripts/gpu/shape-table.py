#!/usr/bin/env python3
"""Ratio tables for bench/gpu-shapes.md from `kvtuner ab --json` runs (scripts/gpu/shape-study.sh).

    shape-table.py RUN.json [RUN.json ...]

Each file is one model (named SHAPE-WEIGHTS.json). Prints, per file, each quantized cache's
generation speed divided by f16's of the same run at every depth (tg128, medians of the
interleaved repetitions), then the same for N sequences at once where the run measured them.
"""
import json
import os
import sys


def median(stat):
    return stat["median"] if isinstance(stat, dict) else stat


def main():
    rows, header_depths, par_rows = [], None, []
    for path in sys.argv[1:]:
        with open(path) as f:
            configs = json.load(f)
        model = os.path.basename(path).removesuffix(".json")
        by_name = {c["name"]: c for c in configs}
        base = by_name.get("f16")
        if base is None:
            print(f"{model}: no f16 run", file=sys.stderr)
            continue
        depths = [s["depth"] for s in base["speed"]]
        header_depths = header_depths or depths
        f16_tg = {s["depth"]: median(s["tg128"]) for s in base["speed"]}
        for c in configs:
            if c["name"] == "f16":
                continue
            tg = {s["depth"]: median(s["tg128"]) for s in c["speed"]}
            rows.append([model, c["name"]] + [f"{tg[d] / f16_tg[d]:.2f}" if d in tg else "" for d in depths]
                        + [f"{f16_tg[depths[-1]]:.0f}"])
        f16_par = {(s["depth"], p["n_seq"]): median(p["aggregate"]) for s in base["speed"] for p in s.get("parallel", [])}
        for c in configs:
            if c["name"] == "f16":
                continue
            for s in c["speed"]:
                for p in s.get("parallel", []):
                    key = (s["depth"], p["n_seq"])
                    if key in f16_par:
                        par_rows.append([model, c["name"], str(p["n_seq"]), str(s["depth"]),
                                         f"{median(p['aggregate']) / f16_par[key]:.2f}", f"{f16_par[key]:.0f}"])
    if not rows:
        sys.exit("no runs with an f16 baseline")
    print("tg128, quantized cache / f16 in the same process (median of the repetitions)\n")
    print("| model | cache | " + " | ".join(f"@{d}" for d in header_depths) + f" | f16 tok/s @{header_depths[-1]} |")
    print("|---|---|" + "---|" * (len(header_depths) + 1))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if par_rows:
        print("\nN sequences at once, aggregate tok/s / f16's\n")
        print("| model | cache | N | depth each | ratio | f16 tok/s |")
        print("|---|---|---|---|---|---|")
        for r in par_rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
