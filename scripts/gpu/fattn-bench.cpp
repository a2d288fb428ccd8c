// Times the flash-attention op alone on the GPU for single-token decode, the way a model's
// decode step runs it: one op per layer, each layer with its own K/V cache in llama.cpp's
// layout (cells × KV heads × head dim, viewed per head), so no layer finds its cache in L2.
// Prints microseconds per layer and the bandwidth that implies (K + V bytes read once), per
// K-V pair and depth, so the decode kernels of two builds or two settings compare side by side.
//
//   fattn-bench "f16-f16;q8_0-q8_0;q4_0-q4_0" "256,16384,32768,65536" [layers=32] [reps=20]
//               [shape=32/8/128] [tokens=1]
// Shape: query heads / KV heads / head dim (default Llama-3.1-8B's); tokens: query tokens per op
// (a speculative draft: 2-8). Run it with GGML_CUDA_FA_VEC_GQA=0 and without to time upstream's
// and kvtuner's decode kernels.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "fattn-common.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>


// Valid rows of type t (random values, quantized once), repeated to fill n_bytes.
static std::vector<uint8_t> filler(ggml_type t, int d, size_t n_bytes, std::mt19937 & rng) {
    const std::vector<uint8_t> rows = random_rows(t, d, 4096, rng);
    std::vector<uint8_t> out(n_bytes);
    for (size_t o = 0; o < n_bytes; o += rows.size()) {
        memcpy(out.data() + o, rows.data(), std::min(rows.size(), n_bytes - o));
    }
    return out;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s \"TK-TV;...\" \"DEPTH,...\" [layers] [reps] [HEADS/KV_HEADS/D] [tokens]\n", argv[0]);
        return 2;
    }
    const int n_layer = argc > 3 ? atoi(argv[3]) : 32;
    const int reps    = argc > 4 ? atoi(argv[4]) : 20;
    int n_head = 32, n_head_kv = 8, d = 128;
    if (argc > 5 && sscanf(argv[5], "%d/%d/%d", &n_head, &n_head_kv, &d) != 3) {
        fprintf(stderr, "bad shape %s (HEADS/KV_HEADS/D)\n", argv[5]);
        return 2;
    }
    const int n_tok = argc > 6 ? atoi(argv[6]) : 1;

    ggml_backend_load_all();
    ggml_backend_t gpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
    if (!gpu) { fprintf(stderr, "need a GPU backend\n"); return 1; }

    const auto pairs = parse_pairs(argv[1]);
    std::vector<int> depths;
    std::stringstream ds(argv[2]);
    for (std::string s; std::getline(ds, s, ',');) depths.push_back(atoi(s.c_str()));

    const char * gqa = getenv("GGML_CUDA_FA_VEC_GQA");
    printf("# fattn-bench: %d layers, %d query heads, %d KV heads, D %d, %d token(s), reps %d, GGML_CUDA_FA_VEC_GQA=%s\n",
           n_layer, n_head, n_head_kv, d, n_tok, reps, gqa ? gqa : "(unset)");
    printf("%-10s %6s %10s %10s %10s %8s\n", "K-V", "depth", "us/layer", "min", "max", "GB/s");
    std::mt19937 rng(7);
    for (int n_kv : depths) {
        for (auto [tk, tv] : pairs) {
            ggml_init_params ip = { (size_t) (8 * n_layer + 16) * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
            ggml_context * ctx = ggml_init(ip);
            ggml_tensor * m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, n_tok, 1, 1);
            std::vector<ggml_tensor *> ks, vs, qs;
            ggml_cgraph * gf = ggml_new_graph(ctx);
            for (int il = 0; il < n_layer; il++) {
                // the cache as llama.cpp stores it: one row of all KV heads per cell
                ggml_tensor * k = ggml_new_tensor_3d(ctx, tk, d, n_head_kv, n_kv);
                ggml_tensor * v = ggml_new_tensor_3d(ctx, tv, d, n_head_kv, n_kv);
                ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d, n_tok, n_head, 1);
                ks.push_back(k), vs.push_back(v), qs.push_back(q);
                ggml_tensor * out = ggml_flash_attn_ext(ctx, q, ggml_permute(ctx, k, 0, 2, 1, 3),
                    ggml_permute(ctx, v, 0, 2, 1, 3), m, 1.0f / std::sqrt((float) d), 0.0f, 0.0f);
                ggml_build_forward_expand(gf, out);
            }
            ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, gpu);
            if (!buf) { fprintf(stderr, "out of GPU memory at depth %d\n", n_kv); return 1; }
            const std::vector<uint8_t> kb = filler(tk, d, ggml_nbytes(ks[0]), rng), vb = filler(tv, d, ggml_nbytes(vs[0]), rng);
            std::vector<float> qf((size_t) d * n_tok * n_head);
            std::normal_distribution<float> nd(0.0f, 1.0f);
            for (auto & x : qf) x = nd(rng);
            for (int il = 0; il < n_layer; il++) {
                ggml_backend_tensor_set(ks[il], kb.data(), 0, kb.size());
                ggml_backend_tensor_set(vs[il], vb.data(), 0, vb.size());
                ggml_backend_tensor_set(qs[il], qf.data(), 0, qf.size() * sizeof(float));
            }
            std::vector<ggml_fp16_t> mask((size_t) n_kv * n_tok, ggml_fp32_to_fp16(0.0f));
            ggml_backend_tensor_set(m, mask.data(), 0, ggml_nbytes(m));

            std::vector<double> us;
            for (int r = 0; r < reps + 3; r++) {
                ggml_backend_synchronize(gpu);
                const auto t0 = std::chrono::steady_clock::now();
                if (ggml_backend_graph_compute(gpu, gf) != GGML_STATUS_SUCCESS) { fprintf(stderr, "compute failed\n"); return 1; }
                ggml_backend_synchronize(gpu);
                const double t = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
                if (r >= 3) us.push_back(t / n_layer); // three warm-up passes
            }
            std::sort(us.begin(), us.end());
            const double med = us[us.size() / 2];
            const double bytes = (double) ggml_nbytes(ks[0]) + ggml_nbytes(vs[0]);
            printf("%-10s %6d %10.2f %10.2f %10.2f %8.0f\n",
                   (std::string(ggml_type_name(tk)) + "-" + ggml_type_name(tv)).c_str(), n_kv, med, us.front(), us.back(),
                   bytes / (med * 1e3));
            fflush(stdout);
            ggml_backend_buffer_free(buf);
            ggml_free(ctx);
        }
    }
    ggml_backend_free(gpu);
    return 0;
}
