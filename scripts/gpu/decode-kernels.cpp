// The kernels of a few decode steps, for Nsight Compute: loads a model with every layer on the
// GPU, decodes a prompt and a few warm-up tokens, then decodes N tokens one at a time between
// cuProfilerStart and cuProfilerStop, so that
//
//   ncu --profile-from-start off --metrics gpu__time_duration.sum --csv decode-kernels MODEL TK TV
//
// lists each kernel of exactly those tokens with its time. Comparing an f16 cache with a
// quantized one shows which kernels a quantized layer adds or slows at a short context (issue 22:
// depth 0 loses 5-15% against f16). Run with GGML_CUDA_DISABLE_GRAPHS=1 so that each kernel is
// launched on its own.
//
//   decode-kernels MODEL TYPE_K TYPE_V [N_PROMPT=64] [N_TOKENS=2]
//
// WINDOW=W (and WINDOW_SINKS=S, WINDOW_TYPE=f16|q8_0) gives every layer a recent window of W
// positions (patch 0014, with 0021's sinks), to see what the window's kernels add (patch 0023).
// KEYS=1 gives every layer a key shift (zeros) and a key scale (ones) (patches 0018-0019): the
// ops of issue 35's +ks+kc caches, whose values do not change a kernel's time.
//
// Built on the device against the patched tree's headers and libraries (libcuda is opened at run
// time: without it the tokens are simply decoded).
#include "llama.h"

#include <dlfcn.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static ggml_type type_named(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((ggml_type) t);
        if (n != nullptr && strcmp(n, name) == 0) {
            return (ggml_type) t;
        }
    }
    fprintf(stderr, "unknown cache type %s\n", name);
    exit(2);
}

static void quiet(ggml_log_level, const char *, void *) {}

// Decodes tokens [pos, pos + n) one batch of `per_batch` at a time.
static bool decode(llama_context * ctx, llama_batch & batch, int n_vocab, int pos, int n, int per_batch) {
    for (int i0 = 0; i0 < n; i0 += per_batch) {
        batch.n_tokens = std::min(per_batch, n - i0);
        for (int i = 0; i < batch.n_tokens; ++i) {
            batch.token[i]     = (llama_token) (((pos + i0 + i) * 7919 + 13) % n_vocab);
            batch.pos[i]       = pos + i0 + i;
            batch.n_seq_id[i]  = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i]    = i == batch.n_tokens - 1;
        }
        if (llama_decode(ctx, batch) != 0) {
            return false;
        }
    }
    llama_synchronize(ctx);
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL TYPE_K TYPE_V [N_PROMPT=64] [N_TOKENS=2]\n", argv[0]);
        return 2;
    }
    const int n_prompt = argc > 4 ? atoi(argv[4]) : 64;
    const int n_tokens = argc > 5 ? atoi(argv[5]) : 2;
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 999;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = n_prompt + n_tokens + 64;
    cp.n_batch         = n_prompt;
    cp.n_ubatch        = n_prompt;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cp.type_k          = type_named(argv[2]);
    cp.type_v          = type_named(argv[3]);
    std::vector<uint32_t> window;
    std::vector<float> key_shift, key_scale;
    if (const char * k = getenv("KEYS"); k != nullptr && atoi(k) != 0) {
        // n_embd_k_gqa floats per layer: the synthetic models' head size is n_embd / n_head
        const int n_layer = llama_model_n_layer(model);
        const size_t per_layer = (size_t) llama_model_n_embd(model) / llama_model_n_head(model) * llama_model_n_head_kv(model);
        key_shift.assign(per_layer * n_layer, 0.0f);
        key_scale.assign(per_layer * n_layer, 1.0f);
        cp.n_type_layers = (uint32_t) n_layer;
        cp.kv_k_shift    = key_shift.data();
        cp.n_kv_k_shift  = key_shift.size();
        cp.kv_k_scale    = key_scale.data();
        cp.n_kv_k_scale  = key_scale.size();
    }
    if (const char * w = getenv("WINDOW"); w != nullptr && atoi(w) > 0) {
        const char * ty = getenv("WINDOW_TYPE");
        const char * sinks = getenv("WINDOW_SINKS");
        window.assign(llama_model_n_layer(model), (uint32_t) atoi(w));
        cp.n_type_layers    = (uint32_t) window.size();
        cp.kv_window_layers = window.data();
        cp.type_k_window    = type_named(ty ? ty : "f16");
        cp.type_v_window    = cp.type_k_window;
        cp.kv_window_sinks  = sinks ? (uint32_t) atoi(sinks) : 0;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fprintf(stderr, "cannot create a context with K %s, V %s\n", argv[2], argv[3]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch batch = llama_batch_init(n_prompt, 0, 1);

    // the driver API's profiler range (what ncu --profile-from-start off waits for)
    void * cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    using range_fn = int (*)();
    const auto start = cuda ? (range_fn) dlsym(cuda, "cuProfilerStart") : nullptr;
    const auto stop  = cuda ? (range_fn) dlsym(cuda, "cuProfilerStop") : nullptr;

    const int warm = 4;
    if (!decode(ctx, batch, n_vocab, 0, n_prompt, n_prompt) || !decode(ctx, batch, n_vocab, n_prompt, warm, 1)) {
        fprintf(stderr, "decode failed\n");
        return 1;
    }
    if (start) start();
    const bool ok = decode(ctx, batch, n_vocab, n_prompt + warm, n_tokens, 1);
    if (stop) stop();
    printf("%s: K %s, V %s%s%s: %d token(s) profiled after %d%s\n", argv[1], argv[2], argv[3],
           key_shift.empty() ? "" : ", key shift and scale",
           window.empty() ? "" : (", window " + std::to_string(window[0]) + "+" + std::to_string(cp.kv_window_sinks)).c_str(),
           n_tokens, n_prompt + warm, start ? "" : " (no libcuda: no profiler range)");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return ok ? 0 : 1;
}
