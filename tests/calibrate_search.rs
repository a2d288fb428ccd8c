//! calibrate → search → verify on a small synthetic model, through the library and the binary.

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::calibrate::{self, CalibrateOptions};
use kvtuner::gguf;
use kvtuner::llama::{Backend, ContextParams, Model, ModelParams};
use kvtuner::profile::{ModelIdentity, Profile};
use kvtuner::search;
use kvtuner::sensitivity::Sensitivity;

use common::kvtuner;

#[test]
fn calibrate_yields_a_complete_table_and_search_a_verified_profile() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), 4, "synthetic-calib");
    let identity = ModelIdentity::from_header(&gguf::read_header(&path).unwrap()).unwrap();
    let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
    let text = common::eval_text();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let opts = CalibrateOptions {
        n_ctx: 64,
        chunks: 1,
        types: types.clone(),
        base: ContextParams { n_threads: 2, no_kv_profile: true, ..Default::default() },
        text_label: "lee (test)".into(),
    };
    let resume = dir.path().join("sens.partial");
    let mut calls = 0;
    let table =
        calibrate::calibrate(&model, &identity, &text, &opts, Some(&resume), &mut |_, _, _| calls += 1).unwrap();
    assert_eq!(table.forward_passes, calibrate::cost(4, &types, 1), "stated cost = passes run");
    assert_eq!(table.layers.len(), 4);
    for l in &table.layers {
        for t in &types {
            assert!(l.k[t].is_finite() && l.k[t] >= 0.0 && l.v[t].is_finite(), "layer {} {t}", l.layer);
        }
        assert_eq!(l.k[&CacheType::F16], 0.0);
        assert!(l.measured.contains_key("k:q4_0") && l.measured.contains_key("v:q4_0"));
    }
    assert_eq!(table.anchors.len(), 4, "K and V anchors for q8_0 and q4_0");

    // Deterministic, and a rerun resumes from the journal instead of recomputing.
    let again = calibrate::calibrate(&model, &identity, &text, &opts, Some(&resume), &mut |_, _, _| {}).unwrap();
    assert_eq!(again.forward_passes, 1, "only the baseline is recomputed");
    assert_eq!(again.layers, table.layers);

    let sens_path = dir.path().join("sens.yaml");
    table.save(&sens_path).unwrap();
    assert_eq!(Sensitivity::load(&sens_path).unwrap(), table);

    // The search frontier is monotone and spans all-q4_0 to all-f16.
    let pairs = search::parse_pairs("cpu", &table.types, "").unwrap();
    let frontier = search::frontier(&table.problem(64, pairs)).unwrap();
    assert!(frontier.windows(2).all(|w| w[0].bytes < w[1].bytes && w[0].predicted > w[1].predicted));
    assert!((frontier[0].bits_per_value - 4.5).abs() < 1e-9);
    assert_eq!(frontier.last().unwrap().predicted, 0.0);

    // The binary: search at a budget, verify on text, write a profile bound to the model.
    let out = dir.path().join("p.yaml");
    let text_file = common::eval_text_file(dir.path());
    let res = kvtuner(&[
        "search",
        sens_path.to_str().unwrap(),
        "--budget",
        "7",
        "--pairs",
        "cuda",
        "-o",
        out.to_str().unwrap(),
        "--verify",
        text_file.to_str().unwrap(),
        "-m",
        path.to_str().unwrap(),
        "--chunks",
        "1",
        "--json",
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let json: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert!(json["verified"]["measured"]["kld_mean"].is_number());
    let profile = Profile::load(&out).unwrap();
    profile.check_model(&identity).unwrap();
    let m = profile.measured.unwrap();
    assert!(m.bits_per_value <= 7.0 && m.kld_mean.is_some() && m.predicted_kld.is_some());
}

#[test]
fn search_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = kvtuner(&["search", dir.path().join("nope.yaml").to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.yaml"));
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "schema: 7\n").unwrap();
    let res = kvtuner(&["search", bad.to_str().unwrap()]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("bad.yaml"));
}
