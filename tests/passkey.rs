//! Passkey retrieval (`ab --passkey`): the prompt is what it claims, and a real model finds the
//! key with an f16 cache.

mod common;

use kvtuner::assets::cache_dir;
use kvtuner::cache_type::CacheType;
use kvtuner::llama::{Backend, ContextParams, Model, ModelParams};
use kvtuner::passkey::{self, Case};

#[test]
fn the_needle_sits_at_its_depth_and_the_prompt_fills_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model =
        Model::load(Backend::init(), &common::tiny_model(dir.path(), 2, "passkey"), &ModelParams::default()).unwrap();
    let haystack = model.tokenize(&common::eval_text(), false, false).unwrap();
    let needle = |key: u32| {
        model
            .tokenize(&format!("\nThe pass key is {key}. Remember it. {key} is the pass key.\n"), false, false)
            .unwrap()
    };
    let find = |p: &[i32], n: &[i32]| p.windows(n.len()).position(|w| w == n);
    let mut at = Vec::new();
    for depth in [0.0, 0.5, 1.0] {
        let case = Case { n_ctx: 2048, depth, key: 12345 };
        let p = passkey::prompt(&model, &haystack, &case).unwrap();
        assert_eq!(p.len(), 2048 - 8, "room for the answer and nothing more");
        at.push(find(&p, &needle(12345)).expect("the needle is in the prompt"));
    }
    // depth 0: right after the instruction; depth 1: after the whole haystack; so depth 0.5 is
    // half the haystack after the first
    let hay_len = at[2] - at[0];
    let intro = model.tokenize(passkey::INTRO, false, false).unwrap().len() + usize::from(model.add_bos());
    assert_eq!(at[0], intro, "the instruction comes first ({at:?})");
    assert_eq!(at[1], at[0] + (hay_len as f64 * 0.5).round() as usize, "{at:?}");
    let question = model.tokenize(passkey::QUESTION, false, false).unwrap();
    assert_eq!(at[2] + needle(12345).len() + question.len(), 2048 - 8, "the question ends the prompt");
    let short = Case { n_ctx: 32, depth: 0.5, key: 12345 };
    assert!(matches!(passkey::prompt(&model, &haystack, &short), Err(passkey::PasskeyError::TooShort(32))));
}

#[test]
fn qwen_finds_the_key_with_an_f16_cache() {
    let path =
        kvtuner::assets::ensure(&cache_dir(), &kvtuner::assets::QWEN_CODER_MODEL).expect("fetching Qwen2.5-Coder-0.5B");
    let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
    let haystack = model.tokenize(&common::eval_text(), false, false).unwrap();
    let f16 = ContextParams { type_k: CacheType::F16, type_v: CacheType::F16, n_threads: 2, ..Default::default() };
    for case in passkey::cases(&[1024], &[0.25, 0.75], 42) {
        let o = passkey::answer(&model, &haystack, ("f16", &f16), &case).unwrap();
        assert!(o.correct, "key {} at depth {}: answered {:?}", case.key, case.depth, o.answer);
    }
}
