// Prompt-processing and generation speed of one llama.cpp build, through the stock C API only,
// so the same source builds against the patched and the unpatched library.
//
//   speed MODEL REPS LOGITS_OUT
// prints one line per repetition: "pp512 <tok/s> tg128 <tok/s>", and writes the logits of the
// last prompt token and of every generated token (first repetition) to LOGITS_OUT.
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void quiet(enum ggml_log_level level, const char * text, void * ud) {
    (void) ud;
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL REPS LOGITS_OUT\n", argv[0]);
        return 2;
    }
    const int n_pp = 512, n_tg = 128, reps = atoi(argv[2]);
    llama_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }

    FILE * out = fopen(argv[3], "wb");
    if (!out) { perror(argv[3]); return 1; }

    struct llama_batch batch = llama_batch_init(n_pp, 0, 1);
    for (int rep = -1; rep < reps; rep++) { // rep -1 warms up
        llama_memory_clear(llama_get_memory(ctx), true);
        batch.n_tokens = n_pp;
        for (int i = 0; i < n_pp; i++) {
            batch.token[i] = (llama_token) ((i * 7919 + 13) % n_vocab);
            batch.pos[i] = i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = i == n_pp - 1;
        }
        double t0 = now_s();
        if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
        llama_synchronize(ctx);
        double t_pp = now_s() - t0;
        if (rep == 0) fwrite(llama_get_logits_ith(ctx, n_pp - 1), sizeof(float), n_vocab, out);

        t0 = now_s();
        for (int i = 0; i < n_tg; i++) {
            batch.n_tokens = 1;
            batch.token[0] = (llama_token) ((i * 104729 + 7) % n_vocab);
            batch.pos[0] = n_pp + i;
            batch.n_seq_id[0] = 1;
            batch.seq_id[0][0] = 0;
            batch.logits[0] = 1;
            if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
            if (rep == 0) fwrite(llama_get_logits_ith(ctx, 0), sizeof(float), n_vocab, out);
        }
        llama_synchronize(ctx);
        double t_tg = now_s() - t0;
        if (rep >= 0) printf("pp512 %.2f tg128 %.2f\n", n_pp / t_pp, n_tg / t_tg);
        fflush(stdout);
    }
    fclose(out);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
