#!/usr/bin/env python3
"""Per-layer costs measured against a q8_0 background, then an exact search on them.

`kvtuner calibrate` measures each layer against an f16 background, where one quantized half of an
early layer already costs ~0.006 KLD and errors saturate (gemma3-270m-floor.md); profiles near 7
bits per value live in the q8_0 regime instead. This measures, end to end on the calibration half
(2 x 1024 tokens), every layer's change of KLD when that layer alone leaves uniform q8_0 for
another `cuda` pair (K at least as precise as V), picks per budget the profile with the least
summed change by exact dynamic programming over layers, and measures the picks on the held-out half.

    q8bg.py KVTUNER MODEL SENS.yaml OUT_DIR

Results go to OUT_DIR (one `kvtuner ab` JSON per candidate pair, so an interrupted run resumes;
summary in OUT_DIR/q8bg.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refine import BITS, bits, measure, profile_header, read_kld, sens_table, write_profile  # noqa: E402

BACKGROUND = ("q8_0", "q8_0")
PAIRS = [("q8_0", "q5_0"), ("q8_0", "q4_0"), ("q5_0", "q5_0"), ("q5_0", "q4_0"), ("q4_0", "q4_0"),
         ("f16", "q8_0"), ("f16", "q4_0")]
BUDGETS = {"q8_0/q5_0": 7.0, "q8_0/q4_0": 6.5, "q5_0/q5_0": 5.5}


def half_bits(pair):
    return int(2 * (BITS[pair[0]] + BITS[pair[1]]))  # integer units of half a bit per cell


def best_profile(deltas, cells, budget_bpv):
    """Least summed delta over layers with at most budget_bpv bits per value (exact DP)."""
    unit = min(cells)
    cap = int(round(budget_bpv * 2 * 2 * sum(cells) / unit))  # same units as half_bits * cells/unit
    states = {0: (0.0, ())}  # used units -> (summed delta, choices)
    for i, c in enumerate(cells):
        options = [(BACKGROUND, 0.0)] + [(p, deltas[i][p]) for p in PAIRS]
        nxt = {}
        for used, (d, ch) in states.items():
            for p, dp in options:
                u = used + half_bits(p) * c // unit
                if u <= cap and (u not in nxt or d + dp < nxt[u][0]):
                    nxt[u] = (d + dp, ch + (p,))
        states = nxt
    return min(states.values())


def main():
    kvtuner, model, sens_path, out_dir = sys.argv[1:5]
    os.makedirs(out_dir, exist_ok=True)
    _, cells = sens_table(sens_path)
    n = len(cells)
    header = profile_header(kvtuner, model, n)

    def run(tag, text, profiles):  # a run whose JSON is there is read back, not repeated
        js = os.path.join(out_dir, f"{tag}.json")
        if os.path.exists(js):
            return read_kld(js)
        return measure(kvtuner, model, text, profiles, out_dir, tag, header)

    base = run("background", "lee-calibration", [("bg", (BACKGROUND,) * n)])["profile bg"][0]
    deltas = [{} for _ in cells]
    for k, v in PAIRS:
        tag = f"{k}-{v}"
        profiles = [(f"L{i}-{tag}", tuple((k, v) if j == i else BACKGROUND for j in range(n))) for i in range(n)]
        res = run(tag, "lee-calibration", profiles)
        for i in range(n):
            deltas[i][(k, v)] = res[f"profile L{i}-{tag}"][0] - base

    lines = [f"background q8_0/q8_0 on the calibration half: KLD {base:.5f}", "",
             "| layer | cells | " + " | ".join(f"{k}/{v}" for k, v in PAIRS) + " |",
             "|---|---|" + "---|" * len(PAIRS)]
    for i, c in enumerate(cells):
        lines.append(f"| {i} | {c} | " + " | ".join(f"{deltas[i][p]:+.5f}" for p in PAIRS) + " |")
    picks = []
    for name, bpv in BUDGETS.items():
        d, choice = best_profile(deltas, cells, bpv)
        tag = "pick-" + name.replace("/", "-")
        write_profile(os.path.join(out_dir, f"{tag}.yaml"), tag, choice, header)
        picks.append((name, bpv, tag, choice, base + d))
    held = run("held-out", "lee-evaluation", [(t, ch) for _, _, t, ch, _ in picks])
    calib = run("picks-calibration", "lee-calibration", [(t, ch) for _, _, t, ch, _ in picks])
    lines += ["", "| size of | bits/value | predicted (calibration) | measured (calibration) | measured held-out | profile |",
              "|---|---|---|---|---|---|"]
    for name, bpv, tag, choice, pred in picks:
        real_bpv = bits(choice, cells) / (2 * sum(cells))
        k, se = held[f"profile {tag}"]
        lines.append(f"| {name} | {real_bpv:.2f} | {pred:.5f} | {calib[f'profile {tag}'][0]:.5f} | {k:.5f} ± {se:.5f} | "
                     + " ".join(f"{a}/{b}" for a, b in choice) + " |")
    with open(os.path.join(out_dir, "q8bg.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
