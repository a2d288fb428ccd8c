# A CPU model of the tensor-core V path of patch 0003 (ggml-cuda/fattn-vec-gqa.cuh: fattn_gqa_V_frag,
# fattn_gqa_V_dim, the B operand with the block scales, the accumulator slots and the merge's
# decoding of them) for one 32-key tile, checked against plain dequantization. It follows the
# kernel's bit operations (byte-permutes, masks, half2 arithmetic in float16) and PTX's fragment
# layouts of mma.m16n8k16, so a wrong lane, row, dim or head mapping fails it.
#
#   python3 tests/cuda/vfrag-model.py q4_0|q5_0|q8_0 [D=64|128|256] [G=2|4|8]     (needs numpy)
# (q8_0: fattn_gqa_V_frag_q8_0, GGML_CUDA_FA_VEC_GQA_Q8_MMA)
import numpy as np, struct, sys
rng = np.random.default_rng(1)
D = int(sys.argv[2]) if len(sys.argv) > 2 else 128
G = int(sys.argv[3]) if len(sys.argv) > 3 else 4
typ = sys.argv[1]
bb = {'q4_0': 18, 'q5_0': 22, 'q8_0': 34}[typ]
row_bytes = D//32*bb
def u16(buf, off): return int(buf[off]) | (int(buf[off+1]) << 8)
def byte_perm(x, y, s):
    b = [(x >> (8*i)) & 0xFF for i in range(4)] + [(y >> (8*i)) & 0xFF for i in range(4)]
    r = 0
    for n in range(4):
        r |= b[(s >> (4*n)) & 7] << (8*n)
    return r
def h2(i):  # int -> two float16
    return np.array([i & 0xFFFF, (i >> 16) & 0xFFFF], dtype=np.uint16).view(np.float16)
def h2i(h): # two float16 -> int
    v = np.asarray(h, dtype=np.float16).view(np.uint16)
    return int(v[0]) | (int(v[1]) << 16)
def hsub(a, b): return h2i((h2(a).astype(np.float32) - np.float32(b)).astype(np.float16))
def hfma(a, m, c): return h2i((h2(a).astype(np.float64)*m + c).astype(np.float16))
# random rows
rows = []
vals = np.zeros((32, D)); scales = np.zeros((32, D//32))
for k in range(32):
    buf = bytearray()
    for b in range(D//32):
        d = np.float16(rng.uniform(0.001, 0.1)); scales[k, b] = float(d)
        buf += np.array([d]).view(np.uint8).tobytes()
        if typ == 'q8_0':
            q = rng.integers(-128, 128, 32); buf += q.astype(np.int8).tobytes()
            vals[k, 32*b:32*b+32] = q
        elif typ == 'q4_0':
            q = rng.integers(0, 16, 32); qs = (q[:16] | (q[16:] << 4)).astype(np.uint8); buf += qs.tobytes()
            vals[k, 32*b:32*b+32] = q - 8
        else:
            q = rng.integers(0, 32, 32); qh = 0
            for j in range(32): qh |= ((int(q[j]) >> 4) & 1) << j
            buf += struct.pack('<I', qh); qs = ((q[:16] & 15) | ((q[16:] & 15) << 4)).astype(np.uint8); buf += qs.tobytes()
            vals[k, 32*b:32*b+32] = q - 16
    rows.append(bytes(buf))
P = rng.uniform(0, 1, (32, G)).astype(np.float16)
ref = np.einsum('kg,kd->gd', P.astype(np.float64), vals*np.repeat(scales, 32, axis=1))

def V_frag_q8_0(rs, blk_off, gq):
    a = [[0]*4 for _ in range(2)]
    for h in range(2):
        off = blk_off + 2 + 16*h + 2*gq
        for p in range(2):
            w = u16(rs[2*p], off) | (u16(rs[2*p+1], off) << 16)
            for r in range(2):
                z = byte_perm(w, 0x64646464, 0x4240 if r == 0 else 0x4341) ^ 0x00800080
                a[h][2*p+r] = hsub(z, 1152)
    return a

def V_frag(rs, blk_off, gq):
    if typ == 'q8_0':
        return V_frag_q8_0(rs, blk_off, gq)
    a = [[0]*4 for _ in range(2)]
    for p in range(2):
        r0, r1 = rs[2*p], rs[2*p+1]
        q5 = typ == 'q5_0'
        off = blk_off + (6 if q5 else 2) + 2*gq
        w0, w1 = u16(r0, off), u16(r1, off)
        z = [byte_perm(w0, w1, 0x0400), byte_perm(w0, w1, 0x0501)]
        hb = [0, 0]
        if q5:
            hb[0] = (byte_perm(u16(r0, blk_off+2), u16(r1, blk_off+2), 0x5410) >> (2*gq)) & 0xFFFFFFFF
            hb[1] = (byte_perm(u16(r0, blk_off+4), u16(r1, blk_off+4), 0x5410) >> (2*gq)) & 0xFFFFFFFF
        for r in range(2):
            lo = (z[r] & 0x000F000F) | 0x64006400
            hi = (z[r] & 0x00F000F0) | 0x64006400
            if q5:
                lo = (((hb[0] << (4 - r)) & 0xFFFFFFFF) & 0x00100010) | lo
                hi = (((hb[1] << (8 - r)) & 0xFFFFFFFF) & 0x01000100) | hi
            a[0][2*p+r] = hsub(lo, 1040 if q5 else 1032)
            a[1][2*p+r] = hfma(hi, 0.0625, -80 if q5 else -72)
    return a


def V_dim(h, r):
    return 16*h + 2*(r % 8) + r//8

acc = np.zeros(G*D)
for b in range(D//32):
    # per lane fragments
    A = {h: {ks: np.zeros((16, 16)) for ks in range(2)} for h in range(2)}
    B = {ks: np.zeros((16, 8)) for ks in range(2)}
    for lane in range(32):
        gq, tq = lane // 4, lane % 4
        for ks in range(2):
            rs = [rows[16*ks + 2*tq], rows[16*ks + 2*tq + 1], rows[16*ks + 2*tq + 8], rows[16*ks + 2*tq + 9]]
            a = V_frag(rs, b*bb, gq)
            pw0 = h2i([P[16*ks+2*tq, gq], P[16*ks+2*tq+1, gq]]) if gq < G else 0
            pw1 = h2i([P[16*ks+2*tq+8, gq], P[16*ks+2*tq+9, gq]]) if gq < G else 0
            d01 = np.array([np.frombuffer(rs[0][b*bb:b*bb+2], np.float16)[0], np.frombuffer(rs[1][b*bb:b*bb+2], np.float16)[0]])
            d89 = np.array([np.frombuffer(rs[2][b*bb:b*bb+2], np.float16)[0], np.frombuffer(rs[3][b*bb:b*bb+2], np.float16)[0]])
            b0 = h2i((h2(pw0) * d01).astype(np.float16)); b1 = h2i((h2(pw1) * d89).astype(np.float16))
            # PTX m16n8k16 layouts
            for h in range(2):
                for i, (row, col) in enumerate([(gq, 2*tq), (gq+8, 2*tq), (gq, 2*tq+8), (gq+8, 2*tq+8)]):
                    v = h2(a[h][i]); A[h][ks][row, col] = v[0]; A[h][ks][row, col+1] = v[1]
            for i, (k, n) in enumerate([(2*tq, gq), (2*tq+8, gq)]):
                v = h2([b0, b1][i]); B[ks][k, n] = v[0]; B[ks][k+1, n] = v[1]
    for h in range(2):
        C = A[h][0] @ B[0] + A[h][1] @ B[1]
        for lane in range(32):
            gq, tq = lane // 4, lane % 4
            c = [C[gq, 2*tq], C[gq, 2*tq+1], C[gq+8, 2*tq], C[gq+8, 2*tq+1]]
            if tq < G//2:
                base = (((2*b + h)*8 + gq)*(G//2) + tq)*4
                for e in range(4): acc[base + e] += c[e]
out = np.zeros((G, D)); seen = np.zeros((G, D), int)
for idx in range(G*D):
    e = idx % 4; slot = idx//4 % (8*G//2); m = idx // (4*8*G//2)
    g = 2*(slot % (G//2)) + e % 2
    i = 32*(m//2) + V_dim(m % 2, slot//(G//2) + 8*(e//2))
    out[g, i] = acc[idx]; seen[g, i] += 1
assert (seen == 1).all(), "mapping not a bijection"
err = np.abs(out - ref).max() / np.abs(ref).max()
print(typ, D, G, "max rel err", err)
assert err < 2e-3
