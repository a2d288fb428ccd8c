# A CPU model of the tensor-core K path of patch 0014 (ggml-cuda/fattn-vec-gqa.cuh: fattn_gqa_K_frag,
# the A/B operands of mma.m16n8k32 (s8) in the score loop, the block scales, and the scores' way
# through the K tile to a lane per key) for one 32-key tile, checked against the dot products of
# the dequantized K rows with the q8_1 copies of Q. It follows the kernel's byte operations
# (aligned loads and funnel shifts, per-byte subtraction, the q5_0 bit spread) and PTX's fragment
# layouts of mma.m16n8k32 (coded here from the PTX ISA, not from ggml's tile types), so a wrong
# lane, row, int, column or slot fails it.
#
#   python3 tests/cuda/kfrag-model.py q4_0|q5_0|q8_0 [D=64|128|256]     (needs numpy)
import numpy as np, struct, sys
rng = np.random.default_rng(2)
typ = sys.argv[1]
D = int(sys.argv[2]) if len(sys.argv) > 2 else 128
G = 8
bb = {'q4_0': 18, 'q5_0': 22, 'q8_0': 34}[typ]
K_row = D//32*bb
M32 = 0xFFFFFFFF

def s8x4(w):  # int -> 4 signed bytes
    return [((w >> (8*t)) & 0xFF) - (256 if (w >> (8*t)) & 0x80 else 0) for t in range(4)]

def vsub4(a, b):  # __vsub4: per-byte subtraction, modulo 256
    return sum((((a >> (8*t)) - (b >> (8*t))) & 0xFF) << (8*t) for t in range(4))

def spread4(h):  # fattn_gqa_spread4: bit t (t < 4) of h to bit 4 of byte t
    return ((h << 4) & 0x10) | ((h << 11) & 0x1000) | ((h << 18) & 0x100000) | ((h << 25) & 0x10000000)

def load_words1(tile, row_off, off):  # fattn_gqa_load_words<1>: aligned loads, funnel shift
    base = row_off + (off & ~3)
    raw0 = struct.unpack_from('<I', tile, base)[0]
    raw1 = struct.unpack_from('<I', tile, base + 4)[0]
    sh = (off & 2)*8
    return ((raw1 << 32 | raw0) >> sh) & M32

def K_frag(tile, row_off, blk_off, i):
    d = float(np.frombuffer(tile[row_off + blk_off:row_off + blk_off + 2], dtype=np.float16)[0])
    if typ == 'q4_0':
        w = load_words1(tile, row_off, blk_off + 2 + 4*i)
        return vsub4(w & 0x0F0F0F0F, 0x08080808), vsub4((w >> 4) & 0x0F0F0F0F, 0x08080808), d
    if typ == 'q5_0':
        qh = load_words1(tile, row_off, blk_off + 2)
        w = load_words1(tile, row_off, blk_off + 6 + 4*i)
        lo = vsub4((w & 0x0F0F0F0F) | spread4((qh >> (4*i)) & M32), 0x10101010)
        hi = vsub4(((w >> 4) & 0x0F0F0F0F) | spread4((qh >> (16 + 4*i)) & M32), 0x10101010)
        return lo, hi, d
    return load_words1(tile, row_off, blk_off + 2 + 4*i), load_words1(tile, row_off, blk_off + 18 + 4*i), d

def mma_m16n8k32_s8(A, B):
    """A[lane] = 4 regs, B[lane] = 2 regs -> C[lane] = 4 s32, by PTX's fragment layouts."""
    a = np.zeros((16, 32), dtype=np.int64); b = np.zeros((32, 8), dtype=np.int64)
    for l in range(32):
        gq, tq = l // 4, l % 4
        for reg, (r, k0) in enumerate([(gq, 4*tq), (gq + 8, 4*tq), (gq, 16 + 4*tq), (gq + 8, 16 + 4*tq)]):
            a[r, k0:k0 + 4] = s8x4(A[l][reg])
        b[4*tq:4*tq + 4, gq] = s8x4(B[l][0])
        b[16 + 4*tq:16 + 4*tq + 4, gq] = s8x4(B[l][1])
    c = a @ b
    return [[c[l//4, 2*(l % 4)], c[l//4, 2*(l % 4) + 1], c[l//4 + 8, 2*(l % 4)], c[l//4 + 8, 2*(l % 4) + 1]] for l in range(32)]

# a staged tile of 32 random K rows (packed row after row, as fattn_gqa_stage_tile leaves them),
# with 16 spare bytes as the allocation has
tile = bytearray(); vals = np.zeros((32, D)); scales = np.zeros((32, D//32))
for k in range(32):
    for blk in range(D//32):
        d = np.float16(rng.uniform(0.001, 0.1)); scales[k, blk] = float(d)
        tile += np.array([d]).view(np.uint8).tobytes()
        if typ == 'q8_0':
            q = rng.integers(-128, 128, 32); tile += q.astype(np.int8).tobytes(); vals[k, 32*blk:32*blk + 32] = q
        elif typ == 'q4_0':
            q = rng.integers(0, 16, 32); tile += (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
            vals[k, 32*blk:32*blk + 32] = q - 8
        else:
            q = rng.integers(0, 32, 32); qh = 0
            for j in range(32): qh |= ((int(q[j]) >> 4) & 1) << j
            tile += struct.pack('<I', qh) + ((q[:16] & 15) | ((q[16:] & 15) << 4)).astype(np.uint8).tobytes()
            vals[k, 32*blk:32*blk + 32] = q - 16
tile += bytes(16)
# Q's q8_1 copies: Q_q8[g][int i] holds values 4i..4i+3, Q_qds[g][b].x the block scale
Qv = rng.integers(-127, 128, (G, D)); Qd = rng.uniform(0.001, 0.05, (G, D//32))
Q_q8 = [[sum((int(Qv[g, 4*i + t]) & 0xFF) << (8*t) for t in range(4)) for i in range(D//4)] for g in range(G)]
ref = np.einsum('kd,gd->kg', vals*np.repeat(scales, 32, axis=1), Qv*np.repeat(Qd, 32, axis=1))

# the kernel's score loop, lane by lane
sk = [[[0.0]*4 for _ in range(2)] for _ in range(32)]
for blk in range(D//32):
    blk_off = blk*bb
    B = [[Q_q8[l//4][8*blk + l % 4], Q_q8[l//4][8*blk + 4 + l % 4]] for l in range(32)]
    for m in range(2):
        A, dk = [], []
        for l in range(32):
            gq, tq = l // 4, l % 4
            a0, a2, d0 = K_frag(tile, (16*m + gq)*K_row, blk_off, tq)
            a1, a3, d8 = K_frag(tile, (16*m + gq + 8)*K_row, blk_off, tq)
            A.append([a0, a1, a2, a3]); dk.append((d0, d8))
        C = mma_m16n8k32_s8(A, B)
        for l in range(32):
            tq = l % 4
            dq0, dq1 = Qd[2*tq, blk], Qd[2*tq + 1, blk]
            d0, d8 = dk[l]
            sk[l][m][0] += d0*dq0*C[l][0]; sk[l][m][1] += d0*dq1*C[l][1]
            sk[l][m][2] += d8*dq0*C[l][2]; sk[l][m][3] += d8*dq1*C[l][3]
# through the K tile: S[g*33 + key]
S = [None]*(G*33)
assert G*33*4 <= 32*K_row, "the scores do not fit in the K tile"
for l in range(32):
    gq, tq = l // 4, l % 4
    for m in range(2):
        for slot, idx in enumerate([(2*tq)*33 + 16*m + gq, (2*tq + 1)*33 + 16*m + gq,
                                    (2*tq)*33 + 16*m + gq + 8, (2*tq + 1)*33 + 16*m + gq + 8]):
            assert S[idx] is None, "two lanes write one slot"
            S[idx] = sk[l][m][slot]
s = np.array([[S[g*33 + lane] for g in range(G)] for lane in range(32)])
err = np.abs(s - ref).max() / np.abs(ref).max()
print(f"{typ} D={D} G={G}: max relative error {err:.2e}")
sys.exit(0 if err < 1e-9 else 1)
