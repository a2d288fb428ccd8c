//! `chat-calibration` / `chat-evaluation`: human-written conversations (chatterbot-corpus on
//! PyPI) rendered with the model's own chat template, as a served model reads them (a model
//! without one is refused, not given a made-up format); and the
//! plain corpora, which contain no control tokens, tokenize the same with control tokens parsed.

mod common;

use kvtuner::assets::{cache_dir, NamedText};
use kvtuner::llama::{Backend, Model, ModelParams};
use kvtuner::runtime::load_text;

fn qwen_path() -> std::path::PathBuf {
    kvtuner::assets::ensure(&cache_dir(), &kvtuner::assets::QWEN_CODER_MODEL).expect("fetching Qwen2.5-Coder-0.5B")
}

#[test]
fn conversations_split_into_disjoint_halves_and_render_with_the_models_template() {
    let (cal, cal_label) = NamedText::ChatCalibration.conversations(&cache_dir()).unwrap().unwrap();
    let (eval, eval_label) = NamedText::ChatEvaluation.conversations(&cache_dir()).unwrap().unwrap();
    assert_eq!(cal.len() + eval.len(), 566, "{cal_label} / {eval_label}");
    assert!(cal.len() > 200 && eval.len() > 200, "{cal_label} / {eval_label}");
    assert!(cal.iter().all(|c| !c.is_empty()) && eval.iter().all(|c| !c.is_empty()));
    assert!(!cal.iter().any(|c| eval.contains(c)) || cal.iter().filter(|c| eval.contains(c)).count() < 5);
    assert!(NamedText::LeeCalibration.conversations(&cache_dir()).is_none());

    let qwen = qwen_path();
    let (text, label) = load_text("chat-evaluation", &qwen).unwrap();
    assert!(label.contains("held out") && label.contains("chat template"), "{label}");
    // Qwen's template: every conversation opens with its default system prompt, turns are marked
    assert_eq!(text.matches("You are Qwen, created by Alibaba Cloud").count(), eval.len());
    assert_eq!(text.matches("<|im_start|>assistant\n").count(), eval.iter().map(|c| c.len() / 2).sum::<usize>());
    assert!(text.contains(&eval[0][0]));

    // its control tokens are tokens, not text, for the evaluator
    let model = Model::load(Backend::init(), &qwen, &ModelParams::default()).unwrap();
    let im_start = model.tokenize("<|im_start|>", false, true).unwrap();
    assert_eq!(im_start.len(), 1);
    let tokens = model.tokenize(&text, false, true).unwrap();
    assert!(tokens.iter().filter(|&&t| t == im_start[0]).count() >= 2 * eval.len());

    // a model without a chat template (this Gemma 3 270M file has none) is told so
    let err = load_text("chat-calibration", &common::gemma_path()).unwrap_err();
    assert!(format!("{err:#}").contains("has no chat template"), "{err:#}");
}

#[test]
fn plain_corpora_have_no_control_tokens() {
    for path in [qwen_path(), common::gemma_path()] {
        let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
        for spec in ["lee-calibration", "lee-evaluation", "code-calibration", "code-evaluation"] {
            let (text, _) = load_text(spec, &path).unwrap();
            assert_eq!(
                model.tokenize(&text, false, true).unwrap(),
                model.tokenize(&text, false, false).unwrap(),
                "{spec} on {}",
                path.display()
            );
        }
    }
}
