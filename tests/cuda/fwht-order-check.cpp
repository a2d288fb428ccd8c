// Host check that the warp-register FWHT in patch 0003 (fattn_gqa_fwht_row_n in
// fattn-vec-gqa.cuh, used for Q, the output and the K/V rows) performs the same float operations
// in the same order as ggml-cuda's own FWHT kernel, so that folding the rotation into other
// kernels changes no bit. Both are emulated lane by lane (32 lanes, value 32*r + lane in register
// r); results must match bit for bit and equal a plain Sylvester-Hadamard product.
//
//   g++ -O1 -std=c++17 tests/cuda/fwht-order-check.cpp -o /tmp/fwht-order-check && /tmp/fwht-order-check
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

constexpr int LANES = 32;

// ggml-cuda's order: lane strides with (lane & h) == 0 ? v + partner : partner - v, then register
// strides in blocks of 2*step.
template <int D, int N> static void upstream_order(const float * src, float scale, float * dst) {
    constexpr int nr = D / LANES;
    float v[LANES][nr];
    for (int l = 0; l < LANES; l++) for (int i = 0; i < nr; i++) v[l][i] = src[i * LANES + l] * scale;
    for (int h = 1; h < LANES; h *= 2) {
        float next[LANES][nr];
        for (int l = 0; l < LANES; l++)
            for (int j = 0; j < nr; j++) next[l][j] = (l & h) == 0 ? v[l][j] + v[l ^ h][j] : v[l ^ h][j] - v[l][j];
        std::memcpy(v, next, sizeof v);
    }
    for (int h = LANES; h < N; h *= 2) {
        const int step = h / LANES;
        for (int l = 0; l < LANES; l++)
            for (int j = 0; j < nr; j += 2 * step)
                for (int k = 0; k < step; k++) {
                    const float a = v[l][j + k], b = v[l][j + k + step];
                    v[l][j + k] = a + b;
                    v[l][j + k + step] = a - b;
                }
    }
    for (int l = 0; l < LANES; l++) for (int i = 0; i < nr; i++) dst[i * LANES + l] = v[l][i];
}

// fattn_gqa_fwht_row_n's order: the same lane stage written as upper ? other - mine : mine + other,
// then register strides s with pairs (r, r + s) where r & s == 0.
template <int D, int N> static void patch_order(const float * src, float scale, float * dst) {
    constexpr int nr = D / LANES;
    float x[LANES][nr];
    for (int l = 0; l < LANES; l++) for (int r = 0; r < nr; r++) x[l][r] = src[r * LANES + l] * scale;
    for (int s = 1; s < LANES; s <<= 1) {
        float next[LANES][nr];
        for (int l = 0; l < LANES; l++)
            for (int r = 0; r < nr; r++) next[l][r] = (l & s) != 0 ? x[l ^ s][r] - x[l][r] : x[l][r] + x[l ^ s][r];
        std::memcpy(x, next, sizeof x);
    }
    for (int s = 1; s < N / LANES; s <<= 1)
        for (int l = 0; l < LANES; l++)
            for (int r = 0; r < nr; r++)
                if ((r & s) == 0) {
                    const float lo = x[l][r], hi = x[l][r + s];
                    x[l][r] = lo + hi;
                    x[l][r + s] = lo - hi;
                }
    for (int l = 0; l < LANES; l++) for (int r = 0; r < nr; r++) dst[r * LANES + l] = x[l][r];
}

template <int D, int N> static int check(std::mt19937 & rng) {
    std::normal_distribution<float> nd;
    const float scale = 1 / std::sqrt((float) N);
    int bad = 0;
    for (int t = 0; t < 200; t++) {
        std::vector<float> src(D), a(D), b(D);
        for (auto & v : src) v = nd(rng);
        upstream_order<D, N>(src.data(), scale, a.data());
        patch_order<D, N>(src.data(), scale, b.data());
        bad += std::memcmp(a.data(), b.data(), sizeof(float) * D) != 0;
        for (int c = 0; c < D / N; c++)
            for (int i = 0; i < N; i++) {
                double want = 0;
                for (int j = 0; j < N; j++) want += (__builtin_popcount(i & j) % 2 ? -1.0 : 1.0) * src[c * N + j] * scale;
                bad += std::fabs(want - b[c * N + i]) > 1e-4;
            }
    }
    printf("D=%3d N=%3d: %s\n", D, N, bad ? "MISMATCH" : "bit-identical, equal to the Hadamard product");
    return bad;
}

int main() {
    std::mt19937 rng(1);
    const int bad = check<128, 64>(rng) + check<128, 128>(rng) + check<256, 64>(rng) + check<256, 128>(rng) + check<256, 256>(rng);
    return bad ? 1 : 0;
}
