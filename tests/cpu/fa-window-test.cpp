// The recent-window segment of ggml's flash attention (ggml_flash_attn_ext_add_window) on the CPU:
// attention over K/V (the cache's type) followed by K_win/V_win (a wider type) in one softmax must
// equal attention over the two concatenated in f32, dequantized, under the same mask. Cases cover
// each CPU path: one query row against one key (decode), the KV-split decode path (f16, >= 512
// rows, several threads), the tiled path (prefill, quantized and f16), GQA, a window that carries
// all visible rows (main fully masked) and one that carries none. One more case runs without the
// window and must fail the comparison, so that the check can tell.
//
//   g++ -O2 -std=c++17 -I<patched tree>/ggml/include fa-window-test.cpp <libggml-cpu libggml-base> -lpthread
//   ./fa-window-test      (exit 0: every case's NMSE against the f32 reference below 1e-4, and the
//                          case without its window above it)
#include "ggml.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

struct fa_case {
    const char * name;
    ggml_type    type_k, type_v, type_kw, type_vw;
    int          D, n_q, n_head, n_head_kv, n_kv, n_win, threads;
    int          mask_mode; // 0: random holes, 1: main fully masked, 2: window fully masked
    bool         attach_window = true; // false: the check must fail
};

static void fill_rows(ggml_tensor * t, const std::vector<float> & src) {
    // t: [D, rows, heads] of type t->type, contiguous; src in f32
    const int64_t D = t->ne[0];
    const int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (t->type == GGML_TYPE_F32) {
        memcpy(t->data, src.data(), src.size() * sizeof(float));
        return;
    }
    const auto * traits = ggml_get_type_traits_cpu(t->type);
    for (int64_t r = 0; r < rows; ++r) {
        traits->from_float(src.data() + r * D, (char *) t->data + r * t->nb[1], D);
    }
}

static std::vector<float> dequant(const ggml_tensor * t) {
    const int64_t D = t->ne[0];
    const int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
    std::vector<float> out(D * rows);
    if (t->type == GGML_TYPE_F32) {
        memcpy(out.data(), t->data, out.size() * sizeof(float));
        return out;
    }
    const auto * traits = ggml_get_type_traits(t->type);
    for (int64_t r = 0; r < rows; ++r) {
        traits->to_float((const char *) t->data + r * t->nb[1], out.data() + r * D, D);
    }
    return out;
}

static double run_case(const fa_case & c, std::mt19937 & rng) {
    const size_t mem = 512u * 1024 * 1024;
    ggml_init_params ip = { mem, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    std::normal_distribution<float> nd(0.0f, 1.0f);

    const int n_mask_cols = GGML_PAD(c.n_kv + c.n_win, 64);
    // layouts as the graph passes them: [D, rows, heads, 1] after the permute
    ggml_tensor * q  = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.D, c.n_q, c.n_head, 1);
    ggml_tensor * k  = ggml_new_tensor_4d(ctx, c.type_k, c.D, c.n_kv, c.n_head_kv, 1);
    ggml_tensor * v  = ggml_new_tensor_4d(ctx, c.type_v, c.D, c.n_kv, c.n_head_kv, 1);
    ggml_tensor * kw = ggml_new_tensor_4d(ctx, c.type_kw, c.D, c.n_win, c.n_head_kv, 1);
    ggml_tensor * vw = ggml_new_tensor_4d(ctx, c.type_vw, c.D, c.n_win, c.n_head_kv, 1);
    ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_mask_cols, c.n_q, 1, 1);

    auto randv = [&](int64_t n, float scale) {
        std::vector<float> x(n);
        for (auto & e : x) e = nd(rng) * scale;
        return x;
    };
    memcpy(q->data, randv(ggml_nelements(q), 1.0f).data(), ggml_nbytes(q));
    fill_rows(k, randv(ggml_nelements(k), 1.0f));
    fill_rows(v, randv(ggml_nelements(v), 1.0f));
    fill_rows(kw, randv(ggml_nelements(kw), 1.0f));
    fill_rows(vw, randv(ggml_nelements(vw), 1.0f));

    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    auto * m = (ggml_fp16_t *) mask->data;
    for (int64_t r = 0; r < mask->ne[1]; ++r) {
        for (int col = 0; col < n_mask_cols; ++col) {
            const bool in_win = col >= c.n_kv && col < c.n_kv + c.n_win;
            const bool pad = col >= c.n_kv + c.n_win;
            bool masked = pad || ud(rng) < 0.3f;
            if (c.mask_mode == 1 && !in_win) masked = true;
            if (c.mask_mode == 2 && in_win) masked = true;
            // keep one visible row per query so that every softmax has mass
            if (!pad && ((c.mask_mode == 1 && col == c.n_kv) || (c.mask_mode != 1 && col == 0))) masked = false;
            m[r * n_mask_cols + col] = ggml_fp32_to_fp16(masked ? -INFINITY : 0.0f);
        }
    }

    const float scale = 1.0f / sqrtf((float) c.D);
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, 0.0f, 0.0f);
    ggml_prec_set_acc(out, GGML_PREC_F32);
    if (c.attach_window) {
        ggml_flash_attn_ext_add_window(out, kw, vw);
    }

    // reference: the two segments dequantized and concatenated in f32, same mask
    const int n_all = c.n_kv + c.n_win;
    ggml_tensor * kc = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.D, n_all, c.n_head_kv, 1);
    ggml_tensor * vc = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.D, n_all, c.n_head_kv, 1);
    {
        const auto km = dequant(k), vm = dequant(v), kwm = dequant(kw), vwm = dequant(vw);
        auto * kd = (float *) kc->data;
        auto * vd = (float *) vc->data;
        for (int h = 0; h < c.n_head_kv; ++h) {
            for (int r = 0; r < n_all; ++r) {
                const bool w = r >= c.n_kv;
                const int rr = w ? r - c.n_kv : r;
                const int rows = w ? c.n_win : c.n_kv;
                memcpy(kd + ((int64_t) h * n_all + r) * c.D, (w ? kwm : km).data() + ((int64_t) h * rows + rr) * c.D, c.D * sizeof(float));
                memcpy(vd + ((int64_t) h * n_all + r) * c.D, (w ? vwm : vm).data() + ((int64_t) h * rows + rr) * c.D, c.D * sizeof(float));
            }
        }
    }
    ggml_tensor * ref = ggml_flash_attn_ext(ctx, q, kc, vc, mask, scale, 0.0f, 0.0f);
    ggml_prec_set_acc(ref, GGML_PREC_F32);

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_build_forward_expand(gf, ref);
    ggml_graph_compute_with_ctx(ctx, gf, c.threads);

    const float * a = (const float *) out->data;
    const float * b = (const float *) ref->data;
    double num = 0, den = 0;
    bool finite = true;
    for (int64_t i = 0; i < ggml_nelements(out); ++i) {
        finite &= std::isfinite(a[i]);
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += (double) b[i] * b[i];
    }
    ggml_free(ctx);
    return finite ? num / den : INFINITY;
}

int main() {
    const ggml_type F16 = GGML_TYPE_F16, Q8 = GGML_TYPE_Q8_0, Q4 = GGML_TYPE_Q4_0;
    const std::vector<fa_case> cases = {
        // decode: one query row per head (one_chunk), GQA 4
        {"decode q4_0 + f16 window",          Q4,  Q4,  F16, F16, 128, 1,  8, 2, 256, 32,  1, 0},
        {"decode q8_0/q4_0 + q8_0 window",    Q8,  Q4,  Q8,  Q8,  128, 1,  8, 2, 256, 32,  2, 0},
        {"decode q4_0, window only visible",  Q4,  Q4,  F16, F16, 64,  1,  4, 4, 128, 16,  1, 1},
        {"decode q4_0, window fully masked",  Q4,  Q4,  F16, F16, 64,  1,  4, 4, 128, 16,  1, 2},
        // decode, f16 everywhere, >= 512 rows, 4 threads: the KV-split path with its reduction
        {"decode split f16 + f16 window",     F16, F16, F16, F16, 128, 1,  8, 2, 700, 100, 4, 0},
        {"decode split f16, window only",     F16, F16, F16, F16, 64,  1,  4, 1, 600, 64,  4, 1},
        // a whole KV chunk of the split path inside the window (the reduction must take it)
        {"decode split f16, chunk in window", F16, F16, F16, F16, 64,  1,  4, 2, 512, 256, 4, 0},
        // prefill: tiled path (quantized and f16), several threads
        {"prefill q4_0 + f16 window",         Q4,  Q4,  F16, F16, 128, 96, 8, 2, 320, 48,  3, 0},
        {"prefill q8_0/q4_0 + q8_0 window",   Q8,  Q4,  Q8,  Q8,  64,  70, 4, 4, 200, 40,  2, 0},
        {"prefill f16 + f16 window",          F16, F16, F16, F16, 64,  80, 4, 2, 256, 64,  2, 0},
        {"prefill q4_0, window only visible", Q4,  Q4,  F16, F16, 128, 64, 4, 2, 128, 64,  2, 1},
    };
    std::mt19937 rng(42);
    int failed = 0;
    for (const auto & c : cases) {
        const double nmse = run_case(c, rng);
        const bool ok = nmse < 1e-4;
        failed += !ok;
        printf("%-36s NMSE %.3e  %s\n", c.name, nmse, ok ? "ok" : "FAILED");
    }
    // the same check without attaching the window must fail (it attends over the main rows only)
    fa_case broken = cases[0];
    broken.name = "decode without its window (must differ)";
    broken.attach_window = false;
    const double nmse = run_case(broken, rng);
    const bool detected = !(nmse < 1e-4);
    failed += !detected;
    printf("%-36s NMSE %.3e  %s\n", broken.name, nmse, detected ? "ok (differs)" : "FAILED (the check cannot tell)");
    printf("%zu cases, %d failed\n", cases.size() + 1, failed);
    return failed ? 1 : 0;
}
