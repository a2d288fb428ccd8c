//! The evaluator's two baselines (stored rows, and streamed in lock-step with the
//! configurations) score every position identically, and the streamed one keeps memory flat.

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::eval::{BaselineMode, Evaluator};
use kvtuner::llama::{ContextParams, LayerCacheTypes};

#[test]
fn streamed_and_stored_baselines_give_identical_scores() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_llama(dir.path());
    let text = common::eval_text();
    let base = ContextParams { n_threads: 2, n_ubatch: 48, no_kv_profile: true, ..Default::default() };
    let n_layer = model.n_layer() as usize;
    let mut mixed = vec![(CacheType::Q8_0, CacheType::Q4_0); n_layer];
    mixed[0] = (CacheType::F16, CacheType::F16);
    let configs: Vec<ContextParams> = [
        ContextParams { type_k: CacheType::Q8_0, type_v: CacheType::Q8_0, ..base.clone() },
        ContextParams { type_k: CacheType::Q4_0, type_v: CacheType::Q4_0, ..base.clone() },
        ContextParams { layer_types: Some(LayerCacheTypes::from_pairs(mixed)), ..base.clone() },
    ]
    .into();

    // 128-token chunks stepped 48 tokens at a time: steps straddle the scored half's start.
    let mut stored = Evaluator::with_limit(&model, &text, 128, 3, &base, u64::MAX).unwrap();
    let mut streamed = Evaluator::with_limit(&model, &text, 128, 3, &base, 0).unwrap();
    assert_eq!((stored.mode(), streamed.mode()), (BaselineMode::Stored, BaselineMode::Streamed));
    let a = stored.score_many(&configs).unwrap();
    let b = streamed.score_many(&configs).unwrap();
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.kld.len(), 3 * 63, "config {i}");
        assert_eq!(a.kld, b.kld, "config {i}: KLD per position");
        assert_eq!(a.nll, b.nll, "config {i}: NLL per position");
        assert_eq!(a.top1_same, b.top1_same, "config {i}");
        assert_eq!(a.chunk_sizes, vec![63; 3]);
        assert!(a.kv_bytes > 0 && a.kv_bytes == b.kv_bytes);
        assert!(a.summary().kld_mean > 0.0, "config {i} is quantized: KLD must be positive");
    }
    assert_eq!(stored.baseline_ppl(), streamed.baseline_ppl());
    // q4_0 everywhere is worse than q8_0 everywhere on any real text.
    assert!(a[1].summary().kld_mean > a[0].summary().kld_mean);
    // Stored: 3 baseline + 3×3 passes; streamed: the baseline runs beside each group.
    assert_eq!(stored.forward_passes, 12);
    assert_eq!(streamed.forward_passes, 12);
}
