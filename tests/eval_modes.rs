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

/// Patch 0004: quantized and mixed K/V caches take the CPU's tiled flash-attention path
/// (`GGML_CPU_FA_TILED_QUANT=0` keeps the one-row path). f16 caches run exactly the code they ran
/// before; quantized ones differ only by the one-row path's rounding of Q to q8_0.
#[test]
fn tiled_cpu_flash_attention_keeps_f16_exact_and_quantized_close() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 4, "synthetic-tiled");
    let text = common::eval_text_file(dir.path());
    let run = |tiled: &str| -> Vec<serde_json::Value> {
        let json = dir.path().join(format!("ab-{tiled}.json"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvtuner"))
            .env("GGML_CPU_FA_TILED_QUANT", tiled)
            .args(["ab", "-m", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "-c", "256"])
            .args(["--chunks", "2", "--no-speed", "-fa", "on", "--against", "f16,q8_0/q4_0,q4_0,f16/q8_0,kv3,q8_0/kv2"])
            .args(["--json", json.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&json).unwrap())
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let (tiled, one_row) = (run("1"), run("0"));
    // 128-token ubatches: the prefill runs on 64-row tiles; f16 took the tiled path before too.
    assert_eq!(tiled[0]["ppl"], one_row[0]["ppl"], "f16 baseline must be bit-identical");
    // kv3 and kv2 (patch 0006): the one-row path's dot product of kv keys with q8_0 queries
    // against the tiled path's dequantized keys
    for i in 1..6 {
        let (a, b) = (tiled[i]["kld_mean"].as_f64().unwrap(), one_row[i]["kld_mean"].as_f64().unwrap());
        assert!(a > 0.0 && b > 0.0, "{}: {a} {b}", tiled[i]["name"]);
        assert!((a / b - 1.0).abs() < 0.25, "{}: tiled {a} vs one-row {b}", tiled[i]["name"]);
        assert_ne!(tiled[i]["ppl"], one_row[i]["ppl"], "{}: the quantized cache took the same path", tiled[i]["name"]);
    }
}
