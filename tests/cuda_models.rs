//! The host-side models of the CUDA kernels (tests/cuda/), run without a GPU: the tensor-core
//! fragment layouts of patch 0009's V and K paths against plain dequantization (Python with
//! numpy), the warp-register FWHT of patch 0010 against ggml-cuda's own, bit for bit, and the
//! RoPE index mapping of patch 0010 against ggml's CPU RoPE (built against the patched tree's
//! ggml), and patch 0026's running softmax over the cache's tiles and the recent window's rows
//! against attention over both (numpy). Each model exits non-zero on a wrong lane, row, slot, order or sum. The op test against the
//! CPU (`tests/cuda/fattn-test.cpp`) needs a GPU: `tests/cuda/run.sh` runs it, on a developer's
//! machine or a lent device (`scripts/gpu/fattn-study.sh`).

mod common;

use common::ggml_program::{build_and_run, run};

const GPU_SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cuda");

#[test]
fn tensor_core_fragment_models_match_plain_dequantization() {
    for typ in ["q4_0", "q5_0", "q8_0"] {
        for d in ["64", "128", "256"] {
            run("python3", &[&format!("{GPU_SOURCES}/kfrag-model.py"), typ, d]);
            for g in ["2", "4", "8"] {
                run("python3", &[&format!("{GPU_SOURCES}/vfrag-model.py"), typ, d, g]);
            }
        }
    }
}

#[test]
fn warp_register_fwht_matches_ggml_cudas_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("fwht-order-check");
    run("g++", &["-O1", "-std=c++17", &format!("{GPU_SOURCES}/fwht-order-check.cpp"), "-o", exe.to_str().unwrap()]);
    let out = run(exe.to_str().unwrap(), &[]);
    assert!(out.contains("bit-identical"), "{out}");
}

#[test]
fn rope_index_mapping_matches_ggmls_cpu_rope() {
    let out = build_and_run(std::path::Path::new(&format!("{GPU_SOURCES}/rope-k-model.cpp")));
    assert!(out.contains(" 0 failed"), "{out}");
}

#[test]
fn window_rows_and_cache_tiles_merge_into_one_softmax() {
    let out = run("python3", &[&format!("{GPU_SOURCES}/window-merge-model.py")]);
    assert!(out.contains(" 0 failed"), "{out}");
}
