#!/usr/bin/env python3
"""Measured greedy refinement of a profile at a fixed size, on the calibration text only.

The search ranks profiles with an additive model; near 7 bits per value on Gemma 3 270M that model
is off (errors saturate and a lone quantized half in the first layers costs ~0.006), so this asks
how far *measured* steps get: each round proposes moves that keep the size (raise one half one
level and pay with the cheapest downgrades by predicted cost per saved bit), ranks them with the
calibrated model, measures the best N not measured before end to end on the calibration half
with `kvtuner ab`, and keeps the best if it beats the current profile there. The final profile is then measured once on
the held-out half.

    refine.py KVTUNER MODEL SENS.yaml START(f16|q8_0/q5_0|PROFILE.yaml) BUDGET_CONFIG OUT_DIR [ROUNDS] [N]

BUDGET_CONFIG is the uniform configuration whose size the profile may not exceed (e.g. q8_0/q5_0).
"""
import json
import os
import re
import subprocess
import sys

BITS = {"f16": 16.0, "q8_0": 8.5, "q5_0": 5.5, "q4_0": 4.5}
LADDER = ["q4_0", "q5_0", "q8_0", "f16"]  # the `cuda` pairs keep K at least as precise as V


def sens_table(path):
    """Per layer: predicted cost of each K and V type, and the cells the layer caches at ctx 1024."""
    text = open(path).read()  # small and regular: read with regexes, no PyYAML needed
    window = int(re.search(r"\n  window: (\d+)", text).group(1))
    sliding = [s == "true" for s in re.findall(r"\n    sliding: (\w+)", text)]
    layers = []
    for block in text.split("\n- layer: ")[1:]:
        def costs(half):
            part = block.split(f"\n  {half}:\n", 1)[1]
            return {t: float(re.search(rf"\n    {t}: ([-0-9.e]+)", "\n" + part).group(1)) for t in BITS}
        layers.append({"k": costs("k"), "v": costs("v")})
    cells = [min(window, 1024) if s else 1024 for s in sliding]
    return layers, cells


def bits(profile, cells):
    return sum(c * (BITS[k] + BITS[v]) for (k, v), c in zip(profile, cells))


def predicted(profile, sens):
    return sum(sens[i]["k"][k] + sens[i]["v"][v] for i, (k, v) in enumerate(profile))


def valid(profile):
    return all(LADDER.index(k) >= LADDER.index(v) for k, v in profile)


def moves(profile, sens, cells, budget):
    """Profiles of at most `budget` bits: one half one level up, paid by greedy downgrades."""
    out = []
    for i in range(len(profile)):
        for h in (0, 1):
            t = profile[i][h]
            if t == "f16":
                continue
            cand = [list(p) for p in profile]
            cand[i][h] = LADDER[LADDER.index(t) + 1]
            if not valid(cand):
                continue
            while bits(cand, cells) > budget:
                best = None
                for j in range(len(cand)):
                    for g in (0, 1):
                        if (j, g) == (i, h) or cand[j][g] == "q4_0":
                            continue
                        down = [list(p) for p in cand]
                        down[j][g] = LADDER[LADDER.index(cand[j][g]) - 1]
                        if not valid(down):
                            continue
                        saved = bits(cand, cells) - bits(down, cells)
                        cost = (predicted(down, sens) - predicted(cand, sens)) / saved
                        if best is None or cost < best[0]:
                            best = (cost, down)
                if best is None:
                    break
                cand = best[1]
            if bits(cand, cells) <= budget:
                out.append(tuple(tuple(p) for p in cand))
    return sorted(set(out), key=lambda p: predicted(p, sens))


def profile_header(kvtuner, model, n_layers):
    """A profile file's lines before its layers, for `write_profile` (NAME stands for the name)."""
    info = json.loads(subprocess.run([kvtuner, "inspect", "--json", model], capture_output=True, text=True, check=True).stdout)
    return ("schema: 1\nname: NAME\nmodel:\n  architecture: gemma3\n  layers: %d\n  fingerprint: %s\n"
            "  name: Gemma 3 270m\nlayers:\n") % (n_layers, info["fingerprint"])


def write_profile(path, name, profile, header):
    with open(path, "w") as f:
        f.write(header.replace("NAME", name))
        for k, v in profile:
            f.write(f"- {{ k: {k}, v: {v} }}\n")


def measure(kvtuner, model, text, profiles, out_dir, tag, header):
    args = []
    for n, p in profiles:
        path = os.path.join(out_dir, f"{n}.yaml")
        write_profile(path, n, p, header)
        args += ["--profile", path]
    js = os.path.join(out_dir, f"{tag}.json")
    subprocess.run([kvtuner, "ab", "-m", model, "--text", text, "--no-speed", "-t", "2", "--against", "f16",
                    *args, "--json", js], check=True, stdout=open(os.path.join(out_dir, f"{tag}.md"), "w"))
    return read_kld(js)


def read_kld(path):
    """An `ab --json` file's configs: name -> (KLD mean, its standard error)."""
    with open(path) as f:
        return {c["name"]: (c["kld_mean"], c["kld_stderr"]) for c in json.load(f)}


def main():
    kvtuner, model, sens_path, start, budget_cfg, out_dir = sys.argv[1:7]
    rounds = int(sys.argv[7]) if len(sys.argv) > 7 else 3
    n_best = int(sys.argv[8]) if len(sys.argv) > 8 else 8
    os.makedirs(out_dir, exist_ok=True)
    sens, cells = sens_table(sens_path)
    header = profile_header(kvtuner, model, len(sens))
    bk, bv = (budget_cfg.split("/") + [budget_cfg])[:2]
    budget = bits([(bk, bv)] * len(sens), cells)
    if start.endswith(".yaml"):
        current = tuple(tuple(m) for m in re.findall(r"\{ k: (\w+), +v: (\w+) +\}", open(start).read()))
    else:
        sk, sv = (start.split("/") + [start])[:2]
        current = tuple((sk, sv) for _ in sens)
    log = open(os.path.join(out_dir, "refine.log"), "w")
    seen = {current}  # every profile measured so far: a round proposes only new ones
    res = measure(kvtuner, model, "lee-calibration", [("start", current)], out_dir, "round0", header)
    cur_kld = res["profile start"][0]
    print(f"start: {bits(current, cells) / (2 * sum(cells)):.2f} bpv, calibration KLD {cur_kld:.5f}", file=log, flush=True)
    for r in range(1, rounds + 1):
        cands = [c for c in moves(current, sens, cells, budget) if c not in seen][:n_best]
        if not cands:
            break
        seen.update(cands)
        names = [(f"r{r}c{i}", c) for i, c in enumerate(cands)]
        res = measure(kvtuner, model, "lee-calibration", names, out_dir, f"round{r}", header)
        best = min(names, key=lambda nc: res[f"profile {nc[0]}"][0])
        kld = res[f"profile {best[0]}"][0]
        print(f"round {r}: {len(cands)} measured, best {best[0]} {kld:.5f} (current {cur_kld:.5f})", file=log, flush=True)
        if kld >= cur_kld:
            break
        current, cur_kld = best[1], kld
    write_profile(os.path.join(out_dir, "refined.yaml"), "refined", current, header)
    res = measure(kvtuner, model, "lee-evaluation", [("refined", current)], out_dir, "held-out",
                  header)
    kld, se = res["profile refined"]
    print(f"final: {bits(current, cells) / (2 * sum(cells)):.2f} bpv, calibration {cur_kld:.5f}, "
          f"held-out {kld:.5f} ± {se:.5f}", file=log, flush=True)


if __name__ == "__main__":
    main()
