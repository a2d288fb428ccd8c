#!/usr/bin/env python3
"""Host model of the GQA decode kernel's attention over the cache and a recent window (patch
0026), in float32 with the kernel's sentinels (a running max starts at -FLT_MAX/2, a masked score
is -inf), against softmax attention over the cache and the window concatenated, in float64: each
warp of each block keeps one running softmax (each new max raised by FATTN_KQ_MAX_OFFSET) over its
32-key cache tiles (keys y*128 + warp*32 + t*pb*128, as the kernel strides them) and then its
window rows (row r: warp r % (pb * warps)); the block's warps merge, then the combine merges the
blocks (one block divides alone).
Cases: windows of 1-1028 rows, masked tails in the cache, windows with none, some or all rows
visible, a warp or block whose every key is masked, one block alone. Exits 1 on a case off by more
than 1e-5 (relative) or not finite.

    python3 tests/cuda/window-merge-model.py
"""
import sys

import numpy as np

F32 = np.float32
NEG_HALF_MAX = F32(-np.finfo(np.float32).max / 2)
KQ_MAX_OFFSET = F32(3.0 * 0.6931)  # FATTN_KQ_MAX_OFFSET
NWARPS = 4  # fattn_gqa_nwarps
TILE = 32  # keys per warp tile


class Running:
    """One warp's softmax state, updated key group by key group as the kernel does."""

    def __init__(self, d):
        self.m = NEG_HALF_MAX
        self.s = F32(0)
        self.acc = np.zeros(d, F32)

    def add(self, scores, values):
        m_new = max(self.m, F32(scores.max(initial=-np.inf)) + KQ_MAX_OFFSET)
        rescale = F32(np.exp(F32(self.m - m_new)))
        p = np.exp((scores - m_new).astype(F32)).astype(F32)
        self.m = m_new
        self.s = self.s * rescale + p.sum(dtype=F32)
        self.acc = self.acc * rescale + (p[:, None] * values).sum(axis=0, dtype=F32)


def merge(states):
    """The block's warps (and the combine's blocks): rescaled to the largest max, summed."""
    m = max(st[0] for st in states)
    s = F32(0)
    acc = np.zeros_like(states[0][2])
    for sm, sl, sa in states:
        f = F32(np.exp(F32(sm - m)))
        s += f * sl
        acc += f * sa
    return m, s, acc


def reference(q, k, v, mask, scale):
    s = (k.astype(np.float64) @ q.astype(np.float64)) * scale + mask.astype(np.float64)
    w = np.exp(s - s.max())
    return (w[:, None] * v.astype(np.float64)).sum(axis=0) / w.sum()


def in_decode(q, k, v, scores, n_kv, n_win, pb):
    """Patch 0026: the warps' running softmax over their cache tiles, then their window rows."""
    blocks = []
    for y in range(pb):
        warps = []
        for w in range(NWARPS):
            st = Running(q.shape[0])
            for k0 in range(y * 128 + w * TILE, n_kv, pb * 128):
                keys = np.arange(k0, k0 + TILE)
                st.add(scores[keys], v[keys])
            for r in range(y * NWARPS + w, n_win, pb * NWARPS):
                st.add(scores[n_kv + r:n_kv + r + 1], v[n_kv + r:n_kv + r + 1])
            warps.append((st.m, st.s, st.acc))
        blocks.append(merge(warps))
    _, s, acc = merge(blocks)
    return acc / s


def run_case(rng, d, n_kv, n_win, cache_masked, win_seen, pb):
    q = rng.standard_normal(d).astype(F32)
    k = rng.standard_normal((n_kv + n_win, d)).astype(F32)
    v = rng.standard_normal((n_kv + n_win, d)).astype(F32)
    mask = np.zeros(n_kv + n_win, dtype=F32)
    mask[n_kv - cache_masked:n_kv] = -np.inf
    mask[n_kv + win_seen:] = -np.inf
    scale = F32(1 / np.sqrt(d))
    got = in_decode(q, k, v, (k @ q).astype(F32) * scale + mask, n_kv, n_win, pb)
    want = reference(q, k, v, mask, scale)
    err = np.abs(got - want).max() / np.abs(want).max()
    return np.all(np.isfinite(got)) and err < 1e-5, err


def main():
    rng = np.random.default_rng(42)
    failed = n = 0
    for d in (64, 128):
        for n_kv, pb in ((256, 1), (256, 2), (512, 4), (2048, 16)):
            for n_win, seen in ((1, 1), (36, 36), (36, 0), (36, 20), (132, 129), (132, 31), (1028, 1000)):
                for cache_masked in (0, 37, 128):  # 128 on 2 blocks of 256: one block's cache wholly masked
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
