# Per-kernel totals of Nsight Compute CSVs (`ncu --csv --metrics gpu__time_duration.sum`, one per
# cache configuration, each over the same decode steps of decode-kernels.cpp), side by side: which
# kernels a configuration adds, drops or slows against the first.
#
#   python3 scripts/gpu/ncu-kernels.py NAME=FILE.csv NAME=FILE.csv ...
import csv, re, sys
from collections import defaultdict

def short(name):
    # template arguments and parameters make one kernel many names: keep the function's name and
    # its leading template arguments (head size, columns, types), enough to tell the variants apart
    name = re.sub(r"\(.*$", "", name)
    return name[:90]

def totals(path):
    out = defaultdict(lambda: [0, 0.0])  # name -> [launches, microseconds]
    with open(path, newline="") as f:
        rows = [l for l in f if l.startswith('"')]  # ncu prints its own lines before the CSV
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        us = v / 1000.0 if unit.startswith("n") else v if unit.startswith("u") else v * 1000.0
        t = out[short(r["Kernel Name"])]
        t[0] += 1
        t[1] += us
    return out

def main():
    runs = [(a.split("=", 1)[0], totals(a.split("=", 1)[1])) for a in sys.argv[1:]]
    names = sorted({n for _, t in runs for n in t}, key=lambda n: -max(t.get(n, [0, 0])[1] for _, t in runs))
    print("| kernel | " + " | ".join(f"{r}: n, us" for r, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for n in names:
        cells = [f"{t[n][0]}, {t[n][1]:.1f}" if n in t else "-" for _, t in runs]
        print(f"| `{n}` | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"{sum(v[0] for v in t.values())}, {sum(v[1] for v in t.values()):.1f}" for _, t in runs) + " |")

main()
