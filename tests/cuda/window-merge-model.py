#!/usr/bin/env python3
"""Host model of patch 0023's window path: the cache's split-K shares, the window's shares
(flash_attn_window_shares: shares of 32 rows, the last one's missing rows scored -inf) and
flash_attn_combine_gqa's merge, in float32 with the kernels' sentinels (a running max starts at
-FLT_MAX/2, a masked score is -inf, rows past the window score -inf), against softmax attention
over the cache and the window concatenated, in float64. Cases: windows of 1-1028 rows, masked
tails in the cache, windows with none, some or all rows visible, a share wholly masked, a cache
share wholly masked. Exits 1 on a case off by more than 1e-5 (relative) or not finite.

    python3 tests/cuda/window-merge-model.py
"""
import sys

import numpy as np

F32 = np.float32
NEG_HALF_MAX = F32(-np.finfo(np.float32).max / 2)
SHARE = 32  # FATTN_WINDOW_SHARE


def share(q, k, v, mask, scale):
    """One block's share over rows k/v: (max, sum, undivided output), as the kernels leave it."""
    s = (k @ q).astype(F32) * F32(scale) + mask.astype(F32)
    m = max(NEG_HALF_MAX, F32(s.max(initial=-np.inf)))
    p = np.exp((s - m).astype(F32)).astype(F32)
    return m, F32(p.sum(dtype=F32)), (p[:, None] * v).sum(axis=0, dtype=F32)


def combine(parts):
    """flash_attn_combine_gqa: the max over every share, each rescaled to it, divided by the sum."""
    m = max(p[0] for p in parts)
    s = F32(0)
    acc = np.zeros_like(parts[0][2])
    for pm, pl, pa in parts:
        f = F32(np.exp(F32(pm - m)))
        s += f * pl
        acc += f * pa
    return acc / s


def reference(q, k, v, mask, scale):
    s = (k.astype(np.float64) @ q.astype(np.float64)) * scale + mask.astype(np.float64)
    w = np.exp(s - s.max())
    return (w[:, None] * v.astype(np.float64)).sum(axis=0) / w.sum()


def run_case(rng, d, n_kv, n_win, cache_masked, win_seen, pb):
    q = rng.standard_normal(d).astype(F32)
    k = rng.standard_normal((n_kv + n_win, d)).astype(F32)
    v = rng.standard_normal((n_kv + n_win, d)).astype(F32)
    mask = np.zeros(n_kv + n_win, dtype=F32)
    mask[n_kv - cache_masked:n_kv] = -np.inf
    mask[n_kv + win_seen:] = -np.inf
    scale = 1 / np.sqrt(d)
    # the cache in pb shares of whole 128-cell tiles, as the decode kernel's blocks take them
    tiles = np.array_split(np.arange(n_kv), pb)
    parts = [share(q, k[t], v[t], mask[t], scale) for t in tiles]
    w = np.arange(n_kv, n_kv + n_win)
    for s0 in range(0, max(n_win, 1), SHARE):
        rows = w[s0:s0 + SHARE]
        # rows past the window score -inf (the kernel's k >= n_win)
        pad = SHARE - len(rows)
        kk = np.vstack([k[rows], np.zeros((pad, d), F32)])
        vv = np.vstack([v[rows], np.zeros((pad, d), F32)])
        mm = np.concatenate([mask[rows], np.full(pad, -np.inf, F32)])
        parts.append(share(q, kk, vv, mm, scale))
    got = combine(parts)
    want = reference(q, k, v, mask, scale)
    err = np.abs(got - want).max() / np.abs(want).max()
    return np.all(np.isfinite(got)) and err < 1e-5, err


def main():
    rng = np.random.default_rng(42)
    failed = n = 0
    for d in (64, 128):
        for n_kv, pb in ((256, 2), (512, 4), (2048, 16)):
            for n_win, seen in ((1, 1), (36, 36), (36, 0), (36, 20), (132, 129), (132, 31), (1028, 1000)):
                for cache_masked in (0, 37, 128):  # 128 on 2 shares of 256: one share wholly masked
                    ok, err = run_case(rng, d, n_kv, n_win, cache_masked, seen, pb)
                    n += 1
                    if not ok:
                        failed += 1
                        print(f"FAIL D={d} n_kv={n_kv} pb={pb} window={n_win} seen={seen} "
                              f"cache masked={cache_masked}: relative error {err:.3e}")
    print(f"{n} cases, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
