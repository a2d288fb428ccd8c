// Patched vs unpatched llama.cpp in ONE process: each build's step.so is loaded into its own
// link namespace (dlmopen), and every round times both on the same work back to back, in a
// random order. Machine-wide drift (other tenants, frequency, page cache) then hits both alike
// and cancels in the per-round ratio, which a run of separate processes on a shared 2-core VM
// cannot achieve.
//
//   interleave STOCK_step.so PATCHED_step.so MODEL ROUNDS THREADS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef void * (*open_fn)(const char *, int, int, int);
typedef double (*run_fn)(void *, int, int);
typedef uint64_t (*hash_fn)(const void *);

struct build {
    const char * name;
    void * s;
    run_fn pp, tg;
    hash_fn hash;
};

static void load(struct build * b, const char * so, const char * model, int threads) {
    void * h = dlmopen(LM_ID_NEWLM, so, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); exit(1); }
    open_fn op = (open_fn) dlsym(h, "step_open");
    b->pp = (run_fn) dlsym(h, "step_pp");
    b->tg = (run_fn) dlsym(h, "step_tg");
    b->hash = (hash_fn) dlsym(h, "step_hash");
    if (!op || !b->pp || !b->tg || !b->hash) { fprintf(stderr, "%s: missing symbols\n", so); exit(1); }
    b->s = op(model, threads, 1024, 512);
    if (!b->s) { fprintf(stderr, "%s: cannot load %s\n", so, model); exit(1); }
}

static int cmp(const void * a, const void * b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// median and a distribution-free ~95% confidence interval for it (order statistics)
static void summarize(const char * what, double * r, int n) {
    qsort(r, n, sizeof *r, cmp);
    double med = n % 2 ? r[n / 2] : (r[n / 2 - 1] + r[n / 2]) / 2;
    int k = (int) floor(n / 2.0 - 0.98 * sqrt((double) n));
    if (k < 0) k = 0;
    printf("| %s | %.4f | %.4f – %.4f | %.4f – %.4f |\n", what, med, r[k], r[n - 1 - k], r[0], r[n - 1]);
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s STOCK_step.so PATCHED_step.so MODEL ROUNDS THREADS\n", argv[0]);
        return 2;
    }
    const int rounds = atoi(argv[4]), threads = atoi(argv[5]);
    const int n_pp = 512, n_tg = 64;
    struct build b[2] = { { .name = "unpatched" }, { .name = "patched" } };
    load(&b[0], argv[1], argv[3], threads);
    load(&b[1], argv[2], argv[3], threads);

    // untimed pass: warm-up, and hashes of the logits (last prompt token + every generated one)
    for (int i = 0; i < 2; i++) {
        b[i].pp(b[i].s, n_pp, 1);
        b[i].tg(b[i].s, n_tg, 1);
    }
    const int same = b[0].hash(b[0].s) == b[1].hash(b[1].s);

    // pp: each round times both builds' pp512 back to back (random order). tg: then both
    // generate n_tg tokens in lockstep, one token each in random order, so a pair of timed
    // decodes is ~2 tokens apart in time.
    double * pp = malloc(rounds * sizeof *pp), * tg = malloc(rounds * n_tg * sizeof *tg);
    double sum[2][2] = { { 0 } }, best[2][2] = { { 1e9, 1e9 }, { 1e9, 1e9 } };
    srand(12345);
    for (int r = 0; r < rounds; r++) {
        double t[2];
        const int first = rand() & 1;
        for (int j = 0; j < 2; j++) {
            const int i = j ? !first : first;
            usleep(20000); // let the other build's worker threads stop spinning
            t[i] = b[i].pp(b[i].s, n_pp, 0);
            if (t[i] < 0) { fprintf(stderr, "decode failed\n"); return 1; }
        }
        pp[r] = t[0] / t[1]; // speed ratio patched/unpatched = time unpatched / time patched
        double round_tg[2] = { 0, 0 };
        for (int k = 0; k < n_tg; k++) {
            double u[2];
            const int f = rand() & 1;
            for (int j = 0; j < 2; j++) {
                const int i = j ? !f : f;
                u[i] = b[i].tg(b[i].s, 1, 0);
                if (u[i] < 0) { fprintf(stderr, "decode failed\n"); return 1; }
            }
            tg[r * n_tg + k] = u[0] / u[1];
            for (int i = 0; i < 2; i++) { round_tg[i] += u[i]; if (u[i] < best[i][1]) best[i][1] = u[i]; }
        }
        for (int i = 0; i < 2; i++) {
            sum[i][0] += t[i]; sum[i][1] += round_tg[i];
            if (t[i] < best[i][0]) best[i][0] = t[i];
        }
        fprintf(stderr, "round %d/%d: pp %.4f tg %.4f\n", r + 1, rounds, pp[r], round_tg[0] / round_tg[1]);
    }
    printf("%d rounds in one process, %d thread(s), f16 cache, no profile; pp%d from an empty cache, then tg%d\n",
           rounds, threads, n_pp, n_tg);
    printf("| build | pp%d tok/s (mean) | tg%d tok/s (mean) |\n|---|---|---|\n", n_pp, n_tg);
    for (int i = 0; i < 2; i++) {
        printf("| %s | %.2f | %.2f |\n", b[i].name, n_pp * rounds / sum[i][0], n_tg * rounds / sum[i][1]);
    }
    printf("| fastest single run: unpatched | %.2f | %.2f |\n", n_pp / best[0][0], 1 / best[0][1]);
    printf("| fastest single run: patched | %.2f | %.2f |\n", n_pp / best[1][0], 1 / best[1][1]);
    printf("\n| speed ratio patched/unpatched | median | ~95%% CI of the median | min – max |\n|---|---|---|---|\n");
    summarize("prompt processing (one pair per round)", pp, rounds);
    char what[64];
    snprintf(what, sizeof what, "generation (%d token pairs)", rounds * n_tg);
    summarize(what, tg, rounds * n_tg);
    printf("| prompt processing, fastest run / fastest run | %.4f | | |\n", best[0][0] / best[1][0]);
    printf("| generation, fastest token / fastest token | %.4f | | |\n", best[0][1] / best[1][1]);
    printf("\nlogits (last prompt token + %d generated tokens): %s\n", n_tg, same ? "bit-identical" : "DIFFERENT");
    return 0;
}
