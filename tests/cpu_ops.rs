//! ggml CPU ops that the patch series adds, checked outside a model as C++ programs built against
//! the patched tree's ggml (tests/cpu/).

mod common;

use std::path::Path;

use common::ggml_program::build_and_run;

#[test]
fn flash_attention_over_a_recent_window_equals_attention_over_both_parts_concatenated() {
    let out = build_and_run(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cpu/fa-window-test.cpp")));
    assert!(out.contains(" 0 failed"), "{out}");
}
