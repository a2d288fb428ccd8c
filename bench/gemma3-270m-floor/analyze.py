#!/usr/bin/env python3
"""How low can a per-layer profile's KLD go on Gemma 3 270M at a given size? A lower bound from
single-half measurements.

Input: the JSON of one `kvtuner ab` run (run.sh) that scored, on the held-out text, every
"single half" configuration: one layer's K (or V) at q8_0 or q4_0, everything else f16
(profiles named K8-L05, V4-L11, ...), plus uniform caches. Output: markdown on stdout.

The bound rests on one empirical property, checked below on every multi-half configuration the
run measured: a configuration's KLD is at least the largest single-half KLD among its quantized
halves ("adding quantization never helps"). Under it, a profile whose halves all have
single-half KLD <= tau exists at a size only if choosing, for every half, the smallest type
allowed by tau fits the size; the smallest such tau bounds every profile of that size from
below. q5_0 halves (not measured) are given their q8_0 value, which can only lower the bound.

  analyze.py single.json inspect.json [CTX] [PRESET_DIR]

With PRESET_DIR, also writes the profile that attains each bound (as KVTuner presets, for
`kvtuner profile import-kvtuner`): an oracle chosen with the evaluation text itself, to be
measured as a feasibility probe only (never reported as a tuned result).
"""
import os
import json
import sys

BITS = {"f16": 16.0, "q8_0": 8.5, "q5_0": 5.5, "q4_0": 4.5}

ab = {c["name"]: c for c in json.load(open(sys.argv[1]))}
shape = json.load(open(sys.argv[2]))
ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
preset_dir = sys.argv[4] if len(sys.argv) > 4 else None
PRESET_BITS = {"f16": 16, "q8_0": 8, "q5_0": 5, "q4_0": 4}
n_layer = shape["layers"]
sliding = set(shape["sliding_layers"])
window = shape["sliding_window"]
cells = [min(ctx, window) if il in sliding else ctx for il in range(n_layer)]
k_dim = shape["n_head_kv"] * shape["key_length"]
v_dim = shape["n_head_kv"] * shape["value_length"]
values = {(il, h): cells[il] * (k_dim if h == "K" else v_dim) for il in range(n_layer) for h in "KV"}
total_values = sum(values.values())


def single(h, bits, il):
    return ab[f"profile {h}{bits}-L{il:02d}"]["kld_mean"]


s = {}  # (layer, half, type) -> single-half KLD
for il in range(n_layer):
    for h in "KV":
        s[(il, h, "f16")] = 0.0
        s[(il, h, "q8_0")] = single(h, 8, il)
        s[(il, h, "q4_0")] = single(h, 4, il)
        s[(il, h, "q5_0")] = s[(il, h, "q8_0")]  # optimistic: q5_0 is at least as lossy as q8_0


def bpv(types):
    return sum(BITS[types[k]] * values[k] for k in values) / total_values


def bound(budget):
    """Smallest tau such that the cheapest types with single-half KLD <= tau fit the budget."""
    for tau in sorted(set(s.values())):
        pick = {}
        for k in values:
            allowed = [t for t in BITS if s[(k[0], k[1], t)] <= tau]
            pick[k] = min(allowed, key=lambda t: BITS[t])
        if bpv(pick) <= budget + 1e-9:
            return tau, pick
    return None, None


print(f"Single-half KLD on the held-out text (ctx {ctx}; each row: that layer's K or V quantized, all else f16)\n")
print("| layer | cells | K q8_0 | K q4_0 | V q8_0 | V q4_0 |")
print("|---|---|---|---|---|---|")
for il in range(n_layer):
    print(f"| {il}{' (global)' if il not in sliding else ''} | {cells[il]} | {s[(il,'K','q8_0')]:.5f} | {s[(il,'K','q4_0')]:.5f} | {s[(il,'V','q8_0')]:.5f} | {s[(il,'V','q4_0')]:.5f} |")

print("\nThe property the bound needs, on every uniform configuration measured in the same run:\n")
print("| configuration | measured KLD | largest single-half KLD in it | holds |")
print("|---|---|---|---|")
ok_all = True
for name, c in ab.items():
    if c["is_profile"]:
        continue
    types = {(il, "K"): c["type_k"][il] for il in range(n_layer)} | {(il, "V"): c["type_v"][il] for il in range(n_layer)}
    if any(t not in BITS or (t == "q5_0") for t in types.values()):
        continue  # q5_0 halves were not measured one by one
    worst = max(s[(k[0], k[1], t)] for k, t in types.items())
    holds = c["kld_mean"] + 2 * c["kld_stderr"] >= worst
    ok_all &= holds
    print(f"| {name} | {c['kld_mean']:.5f} ± {c['kld_stderr']:.5f} | {worst:.5f} | {'yes' if holds else 'NO'} |")

print("\nLower bound on any profile's KLD at the size of each uniform configuration between q4_0 and q8_0:\n")
print("| size of | bits/value | uniform KLD | 0.7 × uniform | lower bound on a profile | 0.7× reachable? |")
print("|---|---|---|---|---|---|")
for name in ["q8_0/q5_0", "q8_0/q4_0", "q5_0"]:
    c = ab.get(name)
    if c is None:
        continue
    budget = c["bits_per_value"]
    tau, pick = bound(budget)
    target = 0.7 * c["kld_mean"]
    reach = "no" if tau is not None and tau > target else "not excluded"
    print(f"| {name} | {budget:.2f} | {c['kld_mean']:.5f} | {target:.5f} | {tau:.5f} | {reach} |")
    if preset_dir and pick:
        with open(os.path.join(preset_dir, f"oracle-{name.replace('/', '-')}.preset.yaml"), "w") as f:
            for il in range(n_layer):
                f.write(f"{il}: {{nbits_key: {PRESET_BITS[pick[(il, 'K')]]}, nbits_value: {PRESET_BITS[pick[(il, 'V')]]}}}\n")
print(f"\nproperty held on every checked configuration: {'yes' if ok_all else 'NO'}")
