// Shared by fattn-test.cpp and fattn-bench.cpp: K-V pair lists and cache rows of a given type.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

static ggml_type type_by_name(const std::string & n) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * tn = ggml_type_name((ggml_type) t);
        if (tn && n == tn) return (ggml_type) t;
    }
    fprintf(stderr, "unknown type %s\n", n.c_str());
    exit(2);
}

// "TK-TV;TK-TV;..." (the GGML_CUDA_FA_QUANTS list) as type pairs.
static std::vector<std::pair<ggml_type, ggml_type>> parse_pairs(const char * list) {
    std::vector<std::pair<ggml_type, ggml_type>> pairs;
    std::stringstream ss(list);
    for (std::string p; std::getline(ss, p, ';');) {
        const size_t dash = p.find('-');
        pairs.emplace_back(type_by_name(p.substr(0, dash)), type_by_name(p.substr(dash + 1)));
    }
    return pairs;
}

// Raw bytes of n_rows rows of d random values stored as type t.
static std::vector<uint8_t> random_rows(ggml_type t, int d, int64_t n_rows, std::mt19937 & rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> f(d * n_rows);
    for (auto & x : f) x = nd(rng);
    std::vector<uint8_t> out(ggml_row_size(t, d) * n_rows);
    if (t == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(f.data(), (ggml_fp16_t *) out.data(), f.size());
    } else {
        ggml_quantize_chunk(t, f.data(), out.data(), 0, n_rows, d, nullptr);
    }
    return out;
}
