// The flash-attention op on the GPU against ggml's CPU backend, in the style of llama.cpp's
// test-backend-ops: same inputs (K/V quantized once, identical bytes on both backends), output
// compared by normalised mean squared error. Covers every K-V pair kvtuner's CUDA build compiles,
// single-token decode with and without grouped-query attention, head sizes 128 and 256, short
// and long caches with a partly masked tail, logit softcapping and attention sinks.
//
//   fattn-test "f16-f16;q8_0-q4_0;..."     (the GGML_CUDA_FA_QUANTS list)
// Run it with GGML_CUDA_FA_VEC_GQA=0 and without to test upstream's and kvtuner's decode kernels.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "fattn-common.h"

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
};



struct fa_inputs {
    std::vector<float> q, sinks;
    std::vector<uint8_t> k, v;
    std::vector<ggml_fp16_t> mask;
};

static std::vector<float> run(ggml_backend_t backend, const fa_case & c, const fa_inputs & in) {
    ggml_init_params ip = { 16 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.d, 1, c.n_head, 1);
    ggml_tensor * k = ggml_new_tensor_4d(ctx, c.tk, c.d, c.n_kv, c.n_head_kv, 1);
    ggml_tensor * v = ggml_new_tensor_4d(ctx, c.tv, c.d, c.n_kv, c.n_head_kv, 1);
    ggml_tensor * m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.n_kv, 1, 1, 1);
    ggml_tensor * s = c.sinks ? ggml_new_tensor_1d(ctx, GGML_TYPE_F32, c.n_head) : nullptr;
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, k, v, m, 1.0f / std::sqrt((float) c.d), 0.0f, c.softcap);
    if (s) ggml_flash_attn_ext_add_sinks(out, s);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    ggml_backend_tensor_set(q, in.q.data(), 0, ggml_nbytes(q));
    ggml_backend_tensor_set(k, in.k.data(), 0, ggml_nbytes(k));
    ggml_backend_tensor_set(v, in.v.data(), 0, ggml_nbytes(v));
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

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s \"TK-TV;TK-TV;...\"\n", argv[0]);
        return 2;
    }
    ggml_backend_load_all();
    ggml_backend_t gpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!gpu || !cpu) { fprintf(stderr, "need a GPU and the CPU backend\n"); return 1; }

    const auto pairs = parse_pairs(argv[1]);
    struct heads { int h, hkv; };
    const heads shapes[] = { { 32, 8 }, { 16, 2 }, { 8, 4 }, { 4, 1 }, { 8, 8 } };

    std::vector<fa_case> cases;
    for (auto [tk, tv] : pairs) {
        for (int d : { 128, 256 }) {
            for (auto sh : shapes) {
                for (int n_kv : { 512, 8192 }) {
                    cases.push_back({ tk, tv, d, sh.h, sh.hkv, n_kv, 37, 0.0f, false });
                }
            }
            cases.push_back({ tk, tv, d, 16, 4, 2048, 300, 30.0f, false }); // softcap (Gemma 2 style)
            cases.push_back({ tk, tv, d, 16, 4, 2048, 0, 0.0f, true });     // attention sinks
        }
    }

    std::mt19937 rng(42);
    int failed = 0;
    double worst = 0;
    const double max_nmse = 5e-4; // test-backend-ops' bound for FLASH_ATTN_EXT
    for (const auto & c : cases) {
        fa_inputs in;
        std::normal_distribution<float> nd(0.0f, 1.0f);
        in.q.resize((size_t) c.d * c.n_head);
        for (auto & x : in.q) x = nd(rng);
        in.k = random_rows(c.tk, c.d, (int64_t) c.n_kv * c.n_head_kv, rng);
        in.v = random_rows(c.tv, c.d, (int64_t) c.n_kv * c.n_head_kv, rng);
        in.mask.resize(c.n_kv);
        for (int i = 0; i < c.n_kv; i++) in.mask[i] = ggml_fp32_to_fp16(i < c.n_kv - c.n_masked ? 0.0f : -INFINITY);
        in.sinks.resize(c.n_head);
        for (auto & x : in.sinks) x = nd(rng);

        const std::vector<float> a = run(gpu, c, in), b = run(cpu, c, in);
        double num = 0, den = 0;
        for (size_t i = 0; i < a.size(); i++) {
            num += (a[i] - b[i]) * (a[i] - b[i]);
            den += b[i] * b[i];
        }
        const double nmse = num / den;
        const bool ok = std::isfinite(nmse) && nmse <= max_nmse;
        worst = std::max(worst, std::isfinite(nmse) ? nmse : INFINITY);
        failed += !ok;
        printf("%s K=%-5s V=%-5s D=%3d heads=%2d/%d (gqa %d) n_kv=%5d masked=%3d softcap=%g sinks=%d  NMSE %.3e\n",
               ok ? "ok  " : "FAIL", ggml_type_name(c.tk), ggml_type_name(c.tv), c.d, c.n_head, c.n_head_kv,
               c.n_head / c.n_head_kv, c.n_kv, c.n_masked, c.softcap, c.sinks, nmse);
    }
    const char * gqa = getenv("GGML_CUDA_FA_VEC_GQA");
    printf("%zu cases, %d failed, worst NMSE %.3e (bound %.0e); GGML_CUDA_FA_VEC_GQA=%s\n", cases.size(), failed, worst,
           max_nmse, gqa ? gqa : "(unset: GQA decode kernel on)");
    ggml_backend_free(gpu);
    ggml_backend_free(cpu);
    return failed ? 1 : 0;
}
