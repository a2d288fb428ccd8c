//! Next-line exact match (`ab --next-line`): one pass over the text answers every cut as a fresh
//! context would (the answer's tokens leave the cache before the text goes on), and a real model
//! writes lines it has seen before with an f16 cache.

use kvtuner::assets::{cache_dir, NamedText};
use kvtuner::cache_type::CacheType;
use kvtuner::llama::{Backend, ContextParams, Model, ModelParams};
use kvtuner::next_line;

#[test]
fn one_pass_answers_each_cut_as_a_fresh_context_does_and_qwen_writes_seen_lines() {
    let path =
        kvtuner::assets::ensure(&cache_dir(), &kvtuner::assets::QWEN_CODER_MODEL).expect("fetching Qwen2.5-Coder-0.5B");
    let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
    let (code, _) = NamedText::CodeEvaluation.load(&cache_dir()).expect("the held-out code");
    let tokens = model.tokenize(&code, false, false).unwrap();
    let cases = next_line::cases(&model, &tokens, 1024, 3).unwrap();
    assert!(cases.len() >= 2, "{cases:?}");
    for c in &cases {
        assert!((448..1024).contains(&c.at), "a cut in the second half: {c:?}");
        let before = String::from_utf8_lossy(
            &tokens[..c.at].iter().flat_map(|&t| model.token_piece_bytes(t, false)).collect::<Vec<u8>>(),
        )
        .into_owned();
        assert!(before.contains(c.line.trim()), "the line occurs before its cut: {c:?}");
    }
    let f16 = ContextParams { type_k: CacheType::F16, type_v: CacheType::F16, n_threads: 2, ..Default::default() };
    let together = next_line::answer_all(&model, &tokens, ("f16", &f16), &cases).unwrap();
    for (case, o) in cases.iter().zip(&together) {
        let alone = next_line::answer_all(&model, &tokens, ("f16", &f16), std::slice::from_ref(case)).unwrap();
        assert_eq!(alone[0].answer, o.answer, "cut at {}: one pass and a fresh context differ", case.at);
    }
    assert!(together.iter().any(|o| o.correct), "no line written exactly: {together:?}");
}
