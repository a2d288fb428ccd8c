// One llama.cpp build behind a tiny C interface of plain types, so a driver can load the
// patched and the unpatched build side by side (dlmopen, one link namespace each) even though
// their llama.h structs differ. Built once per tree against that tree's llama.h.
#include "llama.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct step {
    struct llama_model * model;
    struct llama_context * ctx;
    struct llama_batch batch;
    int n_vocab;
    int n_past;
    uint64_t hash; // FNV-1a over the bytes of every logits row read so far
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void quiet(enum ggml_log_level level, const char * text, void * ud) {
    (void) level; (void) text; (void) ud;
}

static void hash_row(struct step * s, const float * row) {
    const unsigned char * p = (const unsigned char *) row;
    for (size_t i = 0; i < (size_t) s->n_vocab * sizeof(float); i++) {
        s->hash = (s->hash ^ p[i]) * 1099511628211ull;
    }
}

struct step * step_open(const char * model_path, int n_threads, int n_ctx, int n_batch) {
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct step * s = calloc(1, sizeof *s);
    struct llama_model_params mp = llama_model_default_params();
    s->model = llama_model_load_from_file(model_path, mp);
    if (!s->model) return NULL;
    s->n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(s->model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    s->ctx = llama_init_from_model(s->model, cp);
    if (!s->ctx) return NULL;
    s->batch = llama_batch_init(n_batch, 0, 1);
    s->hash = 1469598103934665603ull;
    return s;
}

// Clears the cache and decodes n prompt tokens in one batch; returns seconds.
double step_pp(struct step * s, int n, int hash) {
    llama_memory_clear(llama_get_memory(s->ctx), true);
    s->batch.n_tokens = n;
    for (int i = 0; i < n; i++) {
        s->batch.token[i] = (llama_token) ((i * 7919 + 13) % s->n_vocab);
        s->batch.pos[i] = i;
        s->batch.n_seq_id[i] = 1;
        s->batch.seq_id[i][0] = 0;
        s->batch.logits[i] = i == n - 1;
    }
    double t0 = now_s();
    if (llama_decode(s->ctx, s->batch)) return -1;
    llama_synchronize(s->ctx);
    double t = now_s() - t0;
    if (hash) hash_row(s, llama_get_logits_ith(s->ctx, n - 1));
    s->n_past = n;
    return t;
}

// Decodes n tokens one at a time after what is in the cache; returns seconds.
double step_tg(struct step * s, int n, int hash) {
    double t = 0;
    for (int i = 0; i < n; i++) {
        s->batch.n_tokens = 1;
        s->batch.token[0] = (llama_token) ((i * 104729 + 7) % s->n_vocab);
        s->batch.pos[0] = s->n_past++;
        s->batch.n_seq_id[0] = 1;
        s->batch.seq_id[0][0] = 0;
        s->batch.logits[0] = 1;
        double t0 = now_s();
        if (llama_decode(s->ctx, s->batch)) return -1;
        llama_synchronize(s->ctx);
        t += now_s() - t0;
        if (hash) hash_row(s, llama_get_logits_ith(s->ctx, 0)); // outside the timed part
    }
    return t;
}

uint64_t step_hash(const struct step * s) {
    return s->hash;
}
