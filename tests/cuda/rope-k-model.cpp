// A CPU model of kvtuner's patches 0017 and 0018 (K's RoPE done by the rotated cache write, Q's by
// the decode kernel): the index mapping of fattn_gqa_rope_value and the flat walk of
// fattn_gqa_rope_row (fattn-vec-gqa.cuh), which give each value of a head's row after
// RoPE from the RoPE's input, checked against ggml's CPU RoPE for NeoX and adjacent-pair modes,
// whole and partial rotary dims, with and without YaRN and frequency factors. The model repeats the
// CUDA function's steps in host code; bit-exactness against rope.cu is for fattn-test on a device.
//
//   g++ -O2 -std=c++17 -I<patched tree>/ggml/include rope-k-model.cpp <libggml-cpu.a libggml-base.a> -lpthread
//   ./rope-k-model          (exit 0: every case within 1e-3 of ggml's CPU RoPE; a wrong index is off by
//                            O(1); ggml's CPU computes the angles another way, so at position 1234
//                            the float rounding of a ~600-radian angle alone differs by ~1e-4)
#include "ggml.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

struct rope_params {
    const int32_t * pos;
    const float *   freq_factors;
    int             ne00, ne01, n_dims, n_offs;
    bool            neox;
    float           freq_scale, ext_factor, attn_factor, theta_scale;
    float           corr_dims[2];
};

// rope.cu's rope_yarn_ramp and rope_yarn (forward)
static float yarn_ramp(float low, float high, int i0) {
    const float y = (i0 / 2 - low) / std::max(0.001f, high - low);
    return 1.0f - std::min(1.0f, std::max(0.0f, y));
}
static void yarn(float theta_extrap, float freq_scale, const float * corr, int64_t i0, float ext_factor, float mscale, float & c, float & s) {
    const float theta_interp = freq_scale * theta_extrap;
    float theta = theta_interp;
    if (ext_factor != 0.0f) {
        const float ramp_mix = yarn_ramp(corr[0], corr[1], int(i0)) * ext_factor;
        theta = theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / freq_scale);
    }
    c = cosf(theta) * mscale;
    s = sinf(theta) * mscale;
}

// fattn_gqa_rope_value, step for step
static float rope_value(const rope_params & r, const float * x, int i, int64_t t) {
    if (i < r.n_offs || i >= r.n_offs + r.n_dims) {
        return x[i];
    }
    const int rel = i - r.n_offs;
    int iw, i0, i1;
    bool first;
    if (r.neox) {
        const int half = r.n_dims / 2;
        const int p = rel < half ? rel : rel - half;
        iw = 2 * p; first = rel < half; i0 = r.n_offs + p; i1 = i0 + half;
    } else {
        iw = rel & ~1; first = (rel & 1) == 0; i0 = r.n_offs + iw; i1 = i0 + 1;
    }
    const float theta_base = r.pos[t] * powf(r.theta_scale, iw / 2.0f);
    const float ff = r.freq_factors ? r.freq_factors[iw / 2] : 1.0f;
    float c, s;
    yarn(theta_base / ff, r.freq_scale, r.corr_dims, iw, r.ext_factor, r.attn_factor, c, s);
    const float x0 = x[i0], x1 = x[i1];
    return first ? x0 * c - x1 * s : x0 * s + x1 * c;
}

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int failed = 0, cases = 0;
    double overall = 0;
    for (int d : { 64, 128, 256 }) {
        for (int mode : { 0, GGML_ROPE_TYPE_NEOX }) {
            for (int n_dims : { d, d / 2 }) {
                for (float ext : { 0.0f, 1.0f }) {
                    for (bool ff : { false, true }) {
                        const int heads = 3, tokens = 2;
                        ggml_init_params ip = { 64 * 1024 * 1024, nullptr, false };
                        ggml_context * ctx = ggml_init(ip);
                        ggml_tensor * x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, heads, tokens);
                        ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, tokens);
                        ggml_tensor * fft = ff ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_dims / 2) : nullptr;
                        for (int64_t k = 0; k < ggml_nelements(x); k++) ((float *) x->data)[k] = nd(rng);
                        ((int32_t *) pos->data)[0] = 1234;
                        ((int32_t *) pos->data)[1] = 77;
                        if (fft) for (int k = 0; k < n_dims / 2; k++) ((float *) fft->data)[k] = 1.0f + 0.25f * (k % 5);
                        const float freq_base = 10000.0f, freq_scale = 0.5f, attn_factor = 1.0f, beta_fast = 32.0f, beta_slow = 1.0f;
                        const int n_ctx_orig = 4096;
                        ggml_tensor * y = ggml_rope_ext(ctx, x, pos, fft, n_dims, mode, n_ctx_orig, freq_base, freq_scale, ext,
                                                        attn_factor, beta_fast, beta_slow);
                        ggml_cgraph * gf = ggml_new_graph(ctx);
                        ggml_build_forward_expand(gf, y);
                        ggml_graph_compute_with_ctx(ctx, gf, 1);

                        rope_params r = {};
                        r.pos = (const int32_t *) pos->data;
                        r.freq_factors = fft ? (const float *) fft->data : nullptr;
                        r.ne00 = d; r.ne01 = heads; r.n_dims = n_dims; r.n_offs = 0;
                        r.neox = mode == GGML_ROPE_TYPE_NEOX;
                        r.freq_scale = freq_scale; r.ext_factor = ext; r.attn_factor = attn_factor;
                        r.theta_scale = powf(freq_base, -2.0f / n_dims);
                        ggml_rope_yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow, r.corr_dims);
                        double worst = 0;
                        // the CUDA kernel's flat walk over the result: value i of head h of token t
                        for (int64_t flat = 0; flat < ggml_nelements(y); flat++) {
                            const int64_t ht = flat / d, t = ht / heads, h = ht - t * heads;
                            const float * xr = (const float *) x->data + h * (x->nb[1] / 4) + t * (x->nb[2] / 4);
                            const float got = rope_value(r, xr, int(flat - ht * d), t);
                            const float want = ((const float *) y->data)[flat];
                            worst = std::max(worst, (double) std::fabs(got - want) / (1.0 + std::fabs(want)));
                        }
                        const bool ok = worst < 1e-3;
                        failed += !ok;
                        cases++;
                        overall = std::max(overall, worst);
                        if (!ok) {
                            printf("FAIL D=%d mode=%s n_dims=%d ext=%.0f ff=%d: worst relative error %.3e\n", d,
                                   mode ? "neox" : "norm", n_dims, ext, ff, worst);
                        }
                        ggml_free(ctx);
                    }
                }
            }
        }
    }
    printf("%d cases, %d failed, worst relative error %.2e\n", cases, failed, overall);
    return failed != 0;
}
