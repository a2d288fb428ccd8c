// The flash-attention op on the GPU against ggml's CPU backend, in the style of llama.cpp's
// test-backend-ops: same inputs (K/V quantized once, identical bytes on both backends), output
// compared by normalised mean squared error. Covers every K-V pair kvtuner's CUDA build compiles,
// single-token decode with and without grouped-query attention (ratios 1-8 and 16), head sizes
// 64, 96 (q4_0/q5_0/q8_0 caches), 128 and 256, short and long caches with a partly masked tail, logit softcapping, attention
// sinks, 4 or 16 sequences at once in cache streams of their own, drafts of 2-8 query tokens, and a
// recent window of f16 or q8_0 rows after the cache (decode, drafts, batches). Then whole
// decode steps of a layer with RoPE and llama.cpp's Hadamard rotations (run_layer).
//
//   fattn-test "f16-f16;q8_0-q4_0;..."     (pairs of the GGML_CUDA_FA_QUANTS list; with
//                                           FA_BUILT_PAIRS set to that list, others are refused)
// Run it with GGML_CUDA_FA_VEC_GQA=0 and without to test upstream's and kvtuner's decode kernels.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "fattn-common.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

struct fa_case {
    ggml_type tk, tv;
    int d, n_head, n_head_kv, n_kv, n_masked;
    float softcap;
    bool sinks;
    int n_seq = 1; // sequences decoded at once, each with its own cache (llama.cpp's KV streams)
    int n_tok = 1; // query tokens per sequence (a speculative draft: causal among themselves)
    // a recent window (ggml_flash_attn_ext_add_window, kvtuner's patches 0013/0023): n_win rows of
    // type tw after the cache, the first win_used visible; then every K/V tensor is a view of a
    // cache's layout (each cell every head's row side by side), as the runtime passes them
    int n_win = 0, win_used = 0;
    ggml_type tw = GGML_TYPE_F16;
};



// A mask of n_kv cells whose last n_masked are hidden, per sequence (sequence s hides 61*s more:
// sequences at different depths) and token (token t of n_tok, a draft, sees the cells of the
// tokens before it: n_tok - 1 - t fewer).
static std::vector<ggml_fp16_t> masked_tail(int n_kv, int n_masked, int n_seq = 1, int n_tok = 1) {
    std::vector<ggml_fp16_t> m((size_t) n_kv * n_tok * n_seq);
    for (int s = 0; s < n_seq; s++)
        for (int t = 0; t < n_tok; t++)
            for (int i = 0; i < n_kv; i++)
                m[((size_t) s * n_tok + t) * n_kv + i] =
                    ggml_fp32_to_fp16(i < n_kv - n_masked - 61 * s - (n_tok - 1 - t) ? 0.0f : -INFINITY);
    return m;
}

// Normalised mean squared error of the first n values of a against reference b.
static double nmse(const std::vector<float> & a, const std::vector<float> & b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return num / den;
}

struct fa_inputs {
    std::vector<float> q, sinks;
    std::vector<uint8_t> k, v, k_win, v_win;
    std::vector<ggml_fp16_t> mask;
};

// masked_tail's mask for the cache's n_kv columns, then n_win window columns of which the first
// used are visible
static std::vector<ggml_fp16_t> with_window(const std::vector<ggml_fp16_t> & cache, int n_kv, int n_win, int used, int rows) {
    std::vector<ggml_fp16_t> m;
    m.reserve((size_t) (n_kv + n_win) * rows);
    for (int r = 0; r < rows; r++) {
        m.insert(m.end(), cache.begin() + (size_t) r * n_kv, cache.begin() + (size_t) (r + 1) * n_kv);
        for (int j = 0; j < n_win; j++) m.push_back(ggml_fp32_to_fp16(j < used ? 0.0f : -INFINITY));
    }
    return m;
}

// K or V rows [d, n, heads, seqs] as the op reads them: a plain tensor, or (a case with a window)
// a view of the cache's layout [d, heads, n, seqs]; *data is where the bytes go
static ggml_tensor * kv_rows(ggml_context * ctx, ggml_type t, const fa_case & c, int n, ggml_tensor ** data) {
    if (c.n_win == 0) {
        return *data = ggml_new_tensor_4d(ctx, t, c.d, n, c.n_head_kv, c.n_seq);
    }
    *data = ggml_new_tensor_4d(ctx, t, c.d, c.n_head_kv, n, c.n_seq);
    return ggml_permute(ctx, *data, 0, 2, 1, 3);
}

static std::vector<float> run(ggml_backend_t backend, const fa_case & c, const fa_inputs & in) {
    ggml_init_params ip = { 24 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.d, c.n_tok, c.n_head, c.n_seq);
    ggml_tensor *k_data, *v_data, *kw_data = nullptr, *vw_data = nullptr;
    ggml_tensor * k = kv_rows(ctx, c.tk, c, c.n_kv, &k_data);
    ggml_tensor * v = kv_rows(ctx, c.tv, c, c.n_kv, &v_data);
    ggml_tensor * m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.n_kv + c.n_win, c.n_tok, 1, c.n_seq);
    ggml_tensor * s = c.sinks ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.n_head) : nullptr;
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, m, 1.0f / std::sqrt((float) c.d), 0.0f, c.softcap);
    if (s) ggml_flash_attn_ext_add_sinks(out, s);
    if (c.n_win) {
        ggml_flash_attn_ext_add_window(out, kv_rows(ctx, c.tw, c, c.n_win, &kw_data), kv_rows(ctx, c.tw, c, c.n_win, &vw_data));
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    ggml_backend_tensor_set(q, in.q.data(), 0, ggml_nbytes(q));
    ggml_backend_tensor_set(k_data, in.k.data(), 0, ggml_nbytes(k_data));
    ggml_backend_tensor_set(v_data, in.v.data(), 0, ggml_nbytes(v_data));
    if (c.n_win) {
        ggml_backend_tensor_set(kw_data, in.k_win.data(), 0, ggml_nbytes(kw_data));
        ggml_backend_tensor_set(vw_data, in.v_win.data(), 0, ggml_nbytes(vw_data));
    }
    ggml_backend_tensor_set(m, in.mask.data(), 0, ggml_nbytes(m));
    if (s) ggml_backend_tensor_set(s, in.sinks.data(), 0, ggml_nbytes(s));
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed on %s\n", ggml_backend_name(backend));
        exit(1);
    }
    std::vector<float> r(ggml_nelements(out));
    ggml_backend_tensor_get(out, r.data(), 0, ggml_nbytes(out));
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return r;
}

// ---- one decode step of a layer as llama.cpp builds it for quantized caches ----
// Q and the new K row rotated by a Hadamard transform of n_k (K quantized), the new V row and the
// attention output by one of 64 (V quantized), K/V rows written into the caches with set_rows,
// then flash attention over the caches. kvtuner's CUDA build folds the rotations into other
// kernels; `unfused` marks the rotated tensors as outputs, which keeps every rotation a kernel of
// its own, so the two runs on the GPU must agree bit for bit.
struct layer_inputs {
    std::vector<float> q, k_new, v_new;
    std::vector<uint8_t> k_cache, v_cache;
    std::vector<ggml_fp16_t> mask;
    int64_t cell;
    // a key treatment (kvtuner's patches 0018/0019/0027; empty: none): queries multiplied by
    // q_scale [d, n_head], keys by k_inv [d, n_head_kv] and less k_shift [d, n_head_kv], before the
    // rotation, as llama.cpp's build_attn does it
    std::vector<float> q_scale, k_inv, k_shift;
};

// A switch from the environment: name=0 off, any other number on, unset: dflt (as the patches read theirs).
static bool env_flag(const char * name, bool dflt) {
    const char * e = getenv(name);
    return e == nullptr ? dflt : atoi(e) != 0;
}

static std::vector<float> hadamard(int n) {
    std::vector<float> h((size_t) n * n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) h[(size_t) i * n + j] = (__builtin_popcount(i & j) % 2 ? -1.0f : 1.0f) / std::sqrt((float) n);
    return h;
}

static ggml_tensor * rotate(ggml_context * ctx, ggml_tensor * x, ggml_tensor * h) {
    ggml_tensor * r = ggml_mul_mat(ctx, h, ggml_reshape_2d(ctx, x, h->ne[0], ggml_nelements(x) / h->ne[0]));
    ggml_mul_mat_set_hint(r, GGML_HINT_SRC0_IS_HADAMARD);
    return r;
}

// A rotation (or the attention op before the output rotation) that a folded kernel took over is
// never run: its tensor keeps the NaNs written into it before the graph runs. `skipped` gets, for
// Q, K, V and the attention output, whether that happened (false where the tensor does not exist).
struct layer_skips {
    bool q = false, k = false, v = false, out = false, rope_q = false, rope_k = false;
    bool key_q = false, key_k = false; // Q's key-scale multiplication; K's multiplication and shift's subtraction
};

static bool untouched(ggml_tensor * t) {
    std::vector<float> x(ggml_nelements(t));
    ggml_backend_tensor_get(t, x.data(), 0, ggml_nbytes(t));
    for (float v : x) if (!std::isnan(v)) return false;
    return true;
}

// ring: a recent window's type (f16 or q8_0; GGML_TYPE_COUNT: no window): the rotated K/V rows are
// also written into a ring row, as kvtuner's patch 0014 does in a window layer (patch 0024 folds
// that write into the cache write too).
static constexpr int64_t RING_ROWS = 16, RING_ROW = 5;

static std::vector<float> run_layer(ggml_backend_t backend, const fa_case & c, const layer_inputs & in, bool unfused,
                                    ggml_type ring, layer_skips * skipped = nullptr) {
    const bool rot_k = ggml_is_quantized(c.tk), rot_v = ggml_is_quantized(c.tv);
    const int n_k = c.d; // llama.cpp: the largest power of two dividing the head size
    const int kv_row = c.d * c.n_head_kv;
    ggml_init_params ip = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * hk = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_k, n_k);
    ggml_tensor * hv = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 64);
    ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c.d, c.n_head, 1);
    ggml_tensor * kn = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kv_row, 1);
    ggml_tensor * vn = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kv_row, 1);
    ggml_tensor * kc = ggml_new_tensor_2d(ctx, c.tk, kv_row, c.n_kv);
    ggml_tensor * vc = ggml_new_tensor_2d(ctx, c.tv, kv_row, c.n_kv);
    ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, 1);
    ggml_tensor * m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.n_kv, 1, 1, 1);
    ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
    const bool windowed = ring != GGML_TYPE_COUNT;
    ggml_tensor * kring = windowed ? ggml_new_tensor_2d(ctx, ring, kv_row, RING_ROWS) : nullptr;
    ggml_tensor * vring = windowed ? ggml_new_tensor_2d(ctx, ring, kv_row, RING_ROWS) : nullptr;
    ggml_tensor * ring_idx = windowed ? ggml_new_tensor_1d(ctx, GGML_TYPE_I64, 1) : nullptr;
    const bool keyed = !in.k_shift.empty();
    ggml_tensor * qs = keyed ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, c.n_head) : nullptr;
    ggml_tensor * ki = keyed ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, c.n_head_kv) : nullptr;
    ggml_tensor * ks = keyed ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.d, c.n_head_kv) : nullptr;

    ggml_cgraph * gf = ggml_new_graph(ctx);
    // RoPE on Q and K as llama.cpp's graphs have it (NeoX at head size 128, as Qwen; the adjacent
    // pairs at 256; a YaRN ext_factor at 256): kvtuner's patches 0017 and 0018 can do K's in its cache
    // write and Q's in the decode kernel
    const int rope_mode = c.d == 256 ? 0 : GGML_ROPE_TYPE_NEOX;
    const float ext_factor = c.d == 256 ? 1.0f : 0.0f;
    const auto rope = [&](ggml_tensor * x, int heads) {
        return ggml_rope_ext(ctx, ggml_reshape_3d(ctx, x, c.d, heads, 1), pos, nullptr, c.d, rope_mode, 4096, 10000.0f, 0.5f,
                             ext_factor, 1.0f, 32.0f, 1.0f);
    };
    ggml_tensor * qp0 = rope(q, c.n_head), * kp0 = rope(kn, c.n_head_kv);
    if (unfused) {
        ggml_set_output(qp0);
        ggml_set_output(kp0);
    }
    ggml_tensor * qr = qp0, * kr = kp0, * vr = vn;
    ggml_tensor * q_mul = nullptr, * k_mul = nullptr, * k_sub = nullptr;
    if (keyed) {
        qr = q_mul = ggml_mul(ctx, qr, qs);
        k_mul = ggml_mul(ctx, kr, ki);
        kr = k_sub = ggml_sub(ctx, k_mul, ks);
    }
    if (rot_k) {
        qr = rotate(ctx, qr, hk);
        kr = rotate(ctx, kr, hk);
    }
    if (rot_v) {
        vr = rotate(ctx, vn, hv);
    }
    for (ggml_tensor * t : { qr, kr, vr }) {
        if (unfused && t->op == GGML_OP_MUL_MAT) ggml_set_output(t);
    }
    ggml_build_forward_expand(gf, qr);
    ggml_build_forward_expand(gf, vr);
    ggml_build_forward_expand(gf, kr);
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, kc, ggml_reshape_2d(ctx, kr, kv_row, 1), idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, vc, ggml_reshape_2d(ctx, vr, kv_row, 1), idx));
    if (windowed) {
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, kring, ggml_reshape_2d(ctx, kr, kv_row, 1), ring_idx));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, vring, ggml_reshape_2d(ctx, vr, kv_row, 1), ring_idx));
    }
    ggml_tensor * kview = ggml_view_3d(ctx, kc, c.d, c.n_kv, c.n_head_kv, kc->nb[1], ggml_row_size(c.tk, c.d), 0);
    ggml_tensor * vview = ggml_view_3d(ctx, vc, c.d, c.n_kv, c.n_head_kv, vc->nb[1], ggml_row_size(c.tv, c.d), 0);
    ggml_tensor * qp = ggml_permute(ctx, ggml_reshape_3d(ctx, qr, c.d, c.n_head, 1), 0, 2, 1, 3);
    ggml_tensor * fa = ggml_flash_attn_ext(ctx, qp, kview, vview, m, 1.0f / std::sqrt((float) c.d), 0.0f, 0.0f);
    if (unfused) ggml_set_output(fa);
    ggml_tensor * out = rot_v ? rotate(ctx, fa, hv) : fa;
    ggml_build_forward_expand(gf, out);

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    const std::vector<float> h_k = hadamard(n_k), h_v = hadamard(64);
    ggml_backend_tensor_set(hk, h_k.data(), 0, ggml_nbytes(hk));
    ggml_backend_tensor_set(hv, h_v.data(), 0, ggml_nbytes(hv));
    ggml_backend_tensor_set(q, in.q.data(), 0, ggml_nbytes(q));
    ggml_backend_tensor_set(kn, in.k_new.data(), 0, ggml_nbytes(kn));
    ggml_backend_tensor_set(vn, in.v_new.data(), 0, ggml_nbytes(vn));
    ggml_backend_tensor_set(kc, in.k_cache.data(), 0, ggml_nbytes(kc));
    ggml_backend_tensor_set(vc, in.v_cache.data(), 0, ggml_nbytes(vc));
    ggml_backend_tensor_set(idx, &in.cell, 0, sizeof(int64_t));
    const int32_t p = int32_t(in.cell);
    ggml_backend_tensor_set(pos, &p, 0, sizeof(p));
    ggml_backend_tensor_set(m, in.mask.data(), 0, ggml_nbytes(m));
    if (keyed) {
        ggml_backend_tensor_set(qs, in.q_scale.data(), 0, ggml_nbytes(qs));
        ggml_backend_tensor_set(ki, in.k_inv.data(), 0, ggml_nbytes(ki));
        ggml_backend_tensor_set(ks, in.k_shift.data(), 0, ggml_nbytes(ks));
    }
    if (windowed) {
        const int64_t row = RING_ROW;
        ggml_backend_tensor_set(ring_idx, &row, 0, sizeof(row));
        const std::vector<uint8_t> zeros(ggml_nbytes(kring), 0);
        ggml_backend_tensor_set(kring, zeros.data(), 0, zeros.size());
        ggml_backend_tensor_set(vring, zeros.data(), 0, zeros.size());
    }
    std::vector<ggml_tensor *> watched; // the tensors a folded kernel may leave unwritten
    for (ggml_tensor * t : { qr, kr, vr }) watched.push_back(t->op == GGML_OP_MUL_MAT ? t : nullptr);
    watched.push_back(rot_v ? fa : nullptr);
    watched.push_back(qp0);
    watched.push_back(kp0);
    watched.push_back(q_mul);
    watched.push_back(k_mul);
    watched.push_back(k_sub);
    for (ggml_tensor * t : watched) {
        if (t) {
            const std::vector<float> nan(ggml_nelements(t), NAN);
            ggml_backend_tensor_set(t, nan.data(), 0, ggml_nbytes(t));
        }
    }
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed on %s\n", ggml_backend_name(backend));
        exit(1);
    }
    // the output, then both caches' bytes (as floats would lose nothing: compare them exactly)
    std::vector<float> r(ggml_nelements(out));
    ggml_backend_tensor_get(out, r.data(), 0, ggml_nbytes(out));
    for (ggml_tensor * cache : { kc, vc }) {
        std::vector<uint8_t> bytes(ggml_row_size(cache->type, kv_row));
        ggml_backend_tensor_get(cache, bytes.data(), in.cell * cache->nb[1], bytes.size());
        for (uint8_t b : bytes) r.push_back(b);
    }
    // and the whole rings: the written row, and every other row still zero
    for (ggml_tensor * t : { kring, vring }) {
        if (t) {
            std::vector<uint8_t> bytes(ggml_nbytes(t));
            ggml_backend_tensor_get(t, bytes.data(), 0, bytes.size());
            for (uint8_t b : bytes) r.push_back(b);
        }
    }
    if (skipped) {
        skipped->q   = watched[0] && untouched(watched[0]);
        skipped->k   = watched[1] && untouched(watched[1]);
        skipped->v   = watched[2] && untouched(watched[2]);
        skipped->out = watched[3] && untouched(watched[3]);
        skipped->rope_q = untouched(watched[4]);
        skipped->rope_k = untouched(watched[5]);
        skipped->key_q  = q_mul && untouched(q_mul);
        skipped->key_k  = k_mul && untouched(k_mul) && untouched(k_sub);
    }
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return r;
}

// Layer cases: GPU fused == GPU unfused exactly; GPU vs CPU within the op bound; and the fused run
// skipped exactly the rotations kvtuner's patch 0004 folds (none with GGML_CUDA_FA_VEC_GQA=0), so
// the equality is not that of two unfolded runs.
static int test_layers(ggml_backend_t gpu, ggml_backend_t cpu, const std::vector<std::pair<ggml_type, ggml_type>> & pairs,
                       std::mt19937 & rng, double max_nmse, bool folding, size_t & n_cases) {
    int failed = 0;
    for (auto [tk, tv] : pairs) {
        for (int d : { 128, 256 }) for (ggml_type ring : { GGML_TYPE_COUNT, GGML_TYPE_F16, GGML_TYPE_Q8_0 }) for (bool keyed : { false, true }) {
            const fa_case c = { tk, tv, d, 32, 8, 8192, 37, 0.0f, false };
            std::normal_distribution<float> nd(0.0f, 1.0f);
            layer_inputs in;
            in.q.resize((size_t) d * c.n_head);
            in.k_new.resize((size_t) d * c.n_head_kv);
            in.v_new.resize((size_t) d * c.n_head_kv);
            for (auto * v : { &in.q, &in.k_new, &in.v_new }) for (auto & x : *v) x = nd(rng);
            in.k_cache = random_rows(tk, d * c.n_head_kv, c.n_kv, rng);
            in.v_cache = random_rows(tv, d * c.n_head_kv, c.n_kv, rng);
            in.cell = c.n_kv - c.n_masked - 1;
            in.mask = masked_tail(c.n_kv, c.n_masked);
            if (keyed) { // factors 1/2..2 per K/V head channel (its query heads' too), shifts ~N(0, 1/4)
                std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
                std::vector<float> sc((size_t) d * c.n_head_kv);
                for (auto & x : sc) x = std::exp2(ud(rng));
                for (int h = 0; h < c.n_head; h++)
                    for (int i = 0; i < d; i++) in.q_scale.push_back(sc[(size_t) (h / (c.n_head / c.n_head_kv)) * d + i]);
                for (float x : sc) in.k_inv.push_back(1.0f / x);
                for (size_t i = 0; i < sc.size(); i++) in.k_shift.push_back(0.5f * nd(rng));
            }

            layer_skips skipped;
            const std::vector<float> fused = run_layer(gpu, c, in, false, ring, &skipped),
                                     plain = run_layer(gpu, c, in, true, ring);
            const std::vector<float> ref = run_layer(cpu, c, in, true, ring);
            size_t n_diff = 0;
            for (size_t i = 0; i < fused.size(); i++) n_diff += fused[i] != plain[i];
            const double err = nmse(fused, ref, (size_t) d * c.n_head); // the output; caches follow
            // what patch 0004 folds here: K/V rotations into the cache write (q4_0/q5_0/q8_0, and
            // kv2/kv3 since patch 0009), Q's and the output's into the GQA decode kernel (patch
            // 0003), which takes K f16 or quantized with V quantized (kv2/kv3 since patch 0009)
            const auto quantized = [](ggml_type t) {
                return t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q5_0 || t == GGML_TYPE_Q8_0 || t == GGML_TYPE_KV2 || t == GGML_TYPE_KV3;
            };
            const bool rk = quantized(tk), rv = quantized(tv), pair = (tk == GGML_TYPE_F16 || rk) && rv;
            // and, switched on, Q's RoPE into the decode kernel with Q's rotation (patch 0018) and K's
            // into a q4_0/q5_0/q8_0 cache write (patch 0017)
            // (not with a key treatment: its multiplications stand between the RoPEs and the rotations)
            const bool rope_q = env_flag("GGML_CUDA_FA_VEC_GQA_ROPE_Q", false) && !keyed;
            const bool rope_k = env_flag("GGML_CUDA_FA_VEC_GQA_ROPE_K", false) && !keyed &&
                (tk == GGML_TYPE_Q4_0 || tk == GGML_TYPE_Q5_0 || tk == GGML_TYPE_Q8_0);
            // and, unless switched off, the key transform into K's cache write and Q's into the decode
            // kernel (patch 0029)
            const bool key_fold = env_flag("GGML_CUDA_FA_VEC_GQA_KEY_FOLD", true) && keyed;
            const layer_skips want = { folding && rk && pair, folding && rk, folding && rv, folding && pair,
                                       folding && rk && pair && rope_q, folding && rope_k,
                                       folding && rk && pair && key_fold, folding && rk && key_fold };
            const bool skips_ok = skipped.q == want.q && skipped.k == want.k && skipped.v == want.v && skipped.out == want.out &&
                skipped.rope_q == want.rope_q && skipped.rope_k == want.rope_k && skipped.key_q == want.key_q &&
                skipped.key_k == want.key_k;
            const bool ok = n_diff == 0 && std::isfinite(err) && err <= max_nmse && skips_ok;
            failed += !ok;
            ++n_cases;
            printf("%s layer K=%-5s V=%-5s D=%3d heads=32/8 n_kv=8192 ring=%-4s keys=%-13s: fused vs unfused %zu of %zu values differ, "
                   "NMSE vs CPU %.3e, folded Q%d K%d V%d out%d ropeQ%d ropeK%d keyQ%d keyK%d (expected %d%d%d%d%d%d%d%d)\n", ok ? "ok  " : "FAIL",
                   ggml_type_name(tk), ggml_type_name(tv), d, ring == GGML_TYPE_COUNT ? "none" : ggml_type_name(ring),
                   keyed ? "scaled+shifted" : "as they are", n_diff, fused.size(), err, skipped.q, skipped.k,
                   skipped.v, skipped.out, skipped.rope_q, skipped.rope_k, skipped.key_q, skipped.key_k, want.q, want.k, want.v,
                   want.out, want.rope_q, want.rope_k, want.key_q, want.key_k);
        }
    }
    return failed;
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s \"TK-TV;TK-TV;...\"\n", argv[0]);
        return 2;
    }

    const auto pairs = parse_pairs(argv[1]);
    // FA_BUILT_PAIRS (the build's GGML_CUDA_FA_QUANTS list, the carry's fa_pairs.txt): a pair outside
    // it has no decode kernel, so the layer checks' expectations (folded rotations) cannot hold;
    // refuse it rather than report a failure that is the caller's (bench/gpu-kernel-correctness.md, call 43)
    if (const char * built = getenv("FA_BUILT_PAIRS")) {
        const auto known = parse_pairs(built);
        for (auto p : pairs) {
            if (std::find(known.begin(), known.end(), p) == known.end()) {
                fprintf(stderr, "pair %s-%s is not in FA_BUILT_PAIRS: this build has no kernel for it\n",
                        ggml_type_name(p.first), ggml_type_name(p.second));
                return 2;
            }
        }
    }
    ggml_backend_load_all();
    ggml_backend_t gpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!gpu || !cpu) { fprintf(stderr, "need a GPU and the CPU backend\n"); return 1; }

    struct heads { int h, hkv; };
    // GQA 4 (Llama-3.1-8B), 8 (Llama-3.x-70B), 2, 4 with one K/V head, 1 (Phi-3), 7 (Qwen2.5-7B),
    // 3 (SmolLM2-360M), 5 (Qwen2.5-14B), 6 (Qwen2.5-1.5B), 16
    const heads shapes[] = { { 32, 8 }, { 16, 2 }, { 8, 4 }, { 4, 1 }, { 8, 8 }, { 28, 4 },
                             { 15, 5 }, { 40, 8 }, { 12, 2 }, { 32, 2 } };

    std::vector<fa_case> cases;
    for (auto [tk, tv] : pairs) {
        // 96: Phi-3, on the GQA decode kernel for q4_0/q5_0/q8_0 caches (kvtuner's patch 0016); an f16 K
        // there goes to upstream's MMA kernel and kv rows are 64-value blocks
        const auto q_only = [](ggml_type t) { return t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q5_0 || t == GGML_TYPE_Q8_0; };
        for (int d : { 64, 96, 128, 256 }) { // 64: Qwen2.5-0.5B, SmolLM2, Llama-3.2-1B
            if (d == 96 && !(q_only(tk) && q_only(tv))) {
                continue;
            }
            for (auto sh : shapes) {
                // 256 cells: one token takes 2 columns per block there (kvtuner's patch 0015)
                for (int n_kv : { 256, 512, 8192 }) {
                    cases.push_back({ tk, tv, d, sh.h, sh.hkv, n_kv, 37, 0.0f, false });
                }
            }
            // upstream's vector kernel has softcap code for 128 and 256 only (test-backend-ops skips it too), and its
            // MMA kernel, where a head-96 softcap case lands, none for 96 (it aborts there, with upstream's kernels too)
            if (d == 128 || d == 256) {
                cases.push_back({ tk, tv, d, 16, 4, 2048, 300, 30.0f, false }); // softcap (Gemma 2 style)
            }
            cases.push_back({ tk, tv, d, 16, 4, 2048, 0, 0.0f, true });     // attention sinks
            // several sequences per step, each in its own cache stream (a server's slots)
            cases.push_back({ tk, tv, d, 28, 4, 1024, 5, 0.0f, false, 4 });
            cases.push_back({ tk, tv, d, 32, 8, 512, 5, 0.0f, true, 16 });
            // a draft of 2-8 tokens of one sequence (speculative decoding), and 2 tokens of 4
            for (int n_tok : { 2, 3, 4, 5, 8 }) {
                cases.push_back({ tk, tv, d, 32, 8, 4096, 7, 0.0f, n_tok == 3, 1, n_tok });
            }
            cases.push_back({ tk, tv, d, 28, 4, 2048, 7, 0.0f, false, 1, 2 });
            cases.push_back({ tk, tv, d, 16, 16, 2048, 7, 0.0f, false, 1, 4 });
            cases.push_back({ tk, tv, d, 8, 2, 1024, 3, 0.0f, false, 4, 2 });
            // a recent window after the cache (kvtuner's patches 0023/0026), f16 and q8_0 rows: decode
            // on the GQA kernel's path (its warps attend over the window's rows too), drafts and
            // sequences, a window with no visible row; a batch of 32 tokens and short caches take
            // the joined f16 path. 36 = a window of 32 and 4 sinks, 132 = 128 and 4; windows of growing
            // length one after the other (a launch sized by the first once failed the next)
            for (ggml_type tw : { GGML_TYPE_F16, GGML_TYPE_Q8_0 }) {
                cases.push_back({ tk, tv, d, 28, 4, 4096, 5, 0.0f, false, 1, 1, 36, 36, tw });
                cases.push_back({ tk, tv, d, 28, 4, 4096, 5, 0.0f, false, 1, 1, 36, 0, tw });
                for (heads sh : { heads{ 28, 4 }, heads{ 32, 8 }, heads{ 16, 2 }, heads{ 8, 8 } }) {
                    for (int n_kv : { 256, 8192 }) {
                        cases.push_back({ tk, tv, d, sh.h, sh.hkv, n_kv, 37, 0.0f, false, 1, 1, 132, 129, tw });
                    }
                }
                cases.push_back({ tk, tv, d, 32, 8, 8192, 5, 0.0f, false, 1, 1, 1028, 1000, tw });
                cases.push_back({ tk, tv, d, 28, 4, 1024, 5, 0.0f, false, 4, 1, 36, 30, tw });
                cases.push_back({ tk, tv, d, 32, 8, 4096, 7, 0.0f, false, 1, 4, 132, 100, tw });
                cases.push_back({ tk, tv, d, 32, 8, 2048, 7, 0.0f, false, 1, 32, 132, 120, tw });
                cases.push_back({ tk, tv, d, 16, 4, 2048, 0, 0.0f, true, 1, 1, 36, 20, tw }); // attention sinks
                if (d == 128 || d == 256) {
                    cases.push_back({ tk, tv, d, 16, 4, 2048, 300, 30.0f, false, 1, 1, 132, 64, tw }); // softcap
                }
            }
        }
    }

    // FA_WINDOW_ONLY=1: the recent-window cases alone (no layer cases)
    const bool window_only = env_flag("FA_WINDOW_ONLY", false);
    if (window_only) {
        cases.erase(std::remove_if(cases.begin(), cases.end(), [](const fa_case & c) { return c.n_win == 0; }), cases.end());
    }
    // FA_LAYER_ONLY=1: the layer cases alone (a graph-level change checked without the op cases)
    const bool layer_only = env_flag("FA_LAYER_ONLY", false);
    if (layer_only) {
        cases.clear();
    }

    std::mt19937 rng(42);
    int failed = 0;
    double worst = 0;
    const double max_nmse = 5e-4; // test-backend-ops' bound for FLASH_ATTN_EXT
    for (const auto & c : cases) {
        fa_inputs in;
        std::normal_distribution<float> nd(0.0f, 1.0f);
        in.q.resize((size_t) c.d * c.n_tok * c.n_head * c.n_seq);
        for (auto & x : in.q) x = nd(rng);
        in.k = random_rows(c.tk, c.d, (int64_t) c.n_kv * c.n_head_kv * c.n_seq, rng);
        in.v = random_rows(c.tv, c.d, (int64_t) c.n_kv * c.n_head_kv * c.n_seq, rng);
        in.mask = masked_tail(c.n_kv, c.n_masked, c.n_seq, c.n_tok);
        if (c.n_win) {
            in.k_win = random_rows(c.tw, c.d, (int64_t) c.n_win * c.n_head_kv * c.n_seq, rng);
            in.v_win = random_rows(c.tw, c.d, (int64_t) c.n_win * c.n_head_kv * c.n_seq, rng);
            in.mask  = with_window(in.mask, c.n_kv, c.n_win, c.win_used, c.n_tok * c.n_seq);
        }
        in.sinks.resize(c.n_head);
        for (auto & x : in.sinks) x = nd(rng);

        const std::vector<float> a = run(gpu, c, in), b = run(cpu, c, in);
        const double err = nmse(a, b, a.size());
        const bool ok = std::isfinite(err) && err <= max_nmse;
        worst = std::max(worst, std::isfinite(err) ? err : INFINITY);
        failed += !ok;
        char win[48] = "";
        if (c.n_win) snprintf(win, sizeof(win), " window=%d(%d seen) %s", c.n_win, c.win_used, ggml_type_name(c.tw));
        printf("%s K=%-5s V=%-5s D=%3d heads=%2d/%d (gqa %d) n_kv=%5d masked=%3d softcap=%g sinks=%d seqs=%d tokens=%d%s  NMSE %.3e\n",
               ok ? "ok  " : "FAIL", ggml_type_name(c.tk), ggml_type_name(c.tv), c.d, c.n_head, c.n_head_kv,
               c.n_head / c.n_head_kv, c.n_kv, c.n_masked, c.softcap, c.sinks, c.n_seq, c.n_tok, win, err);
    }
    const char * gqa = getenv("GGML_CUDA_FA_VEC_GQA"); // named in the summary line
    size_t n_layer_cases = 0;
    const int layer_failed = window_only ? 0 : test_layers(gpu, cpu, pairs, rng, max_nmse, env_flag("GGML_CUDA_FA_VEC_GQA", true), n_layer_cases);
    printf("%zu op cases, %d failed, worst NMSE %.3e (bound %.0e); %zu layer cases, %d failed; GGML_CUDA_FA_VEC_GQA=%s\n",
           cases.size(), failed, worst, max_nmse, n_layer_cases, layer_failed, gqa ? gqa : "(unset: GQA decode kernel on)");
    failed += layer_failed;
    ggml_backend_free(gpu);
    ggml_backend_free(cpu);
    return failed ? 1 : 0;
}
