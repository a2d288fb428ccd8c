#!/usr/bin/env python3
"""Markdown table of `kvtuner ab --json` runs at several contexts: mean KLD per configuration,
and the peak resident memory of each run (the evaluator streams its reference beyond 2 GiB).

    bench/kld-vs-context/table.py bench/kld-vs-context/MODEL-c*.json
"""
import json
import re
import sys

runs = sorted((int(re.search(r"-c(\d+)\.json$", p).group(1)), json.load(open(p))) for p in sys.argv[1:])
names = [r["name"] for r in runs[0][1]]
print("| context | " + " | ".join(names) + " | peak memory |")
print("|---" * (len(names) + 2) + "|")
for ctx, rows in runs:
    by = {r["name"]: r for r in rows}
    cells = [f"{by[n]['kld_mean']:.5f}" if n in by else "-" for n in names]
    peak = rows[0]["eval_peak_rss_bytes"] / 2**20
    print(f"| {ctx} | " + " | ".join(cells) + f" | {peak:.0f} MiB |")
