//! calibrate → search → verify on a small synthetic model, through the library and the binary.

mod common;

use kvtuner::cache_type::CacheType;
use kvtuner::calibrate::{self, CalibrateOptions};
use kvtuner::eval::Evaluator;
use kvtuner::gguf;
use kvtuner::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use kvtuner::llama::{Backend, ContextParams, LayerCacheTypes, Model, ModelParams};
use kvtuner::pipeline::{self, Budget, TuneOptions};
use kvtuner::profile::{ModelIdentity, Profile};
use kvtuner::runtime::Devices;
use kvtuner::search;
use kvtuner::select::{Measurer, Problems, SelectOptions};
use kvtuner::sensitivity::Sensitivity;

use common::kvtuner;

/// A tiny synthetic llama model: its path, identity and the loaded model.
fn synthetic(dir: &std::path::Path, n_layer: u32, name: &str) -> (std::path::PathBuf, ModelIdentity, Model) {
    let path = common::tiny_model(dir, n_layer, name);
    let identity = ModelIdentity::from_header(&gguf::read_header(&path).unwrap()).unwrap();
    let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
    (path, identity, model)
}

fn options(types: &[CacheType], chunks: usize, background: CacheType) -> CalibrateOptions {
    CalibrateOptions {
        n_ctx: 64,
        chunks,
        layer_chunks: 1,
        layer_stride: 1,
        layer_ctx: 0,
        background,
        types: types.to_vec(),
        base: ContextParams { n_threads: 2, no_kv_profile: true, ..Default::default() },
        text_label: "lee (test)".into(),
    }
}

#[test]
fn calibrate_yields_a_complete_table_and_search_a_verified_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (path, identity, model) = synthetic(dir.path(), 4, "synthetic-calib");
    let text = common::eval_text();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let opts = options(&types, 2, CacheType::F16);
    let resume = dir.path().join("sens.partial");
    let mut calls = 0;
    let table =
        calibrate::calibrate(&model, &identity, &text, &opts, Some(&resume), &mut |_, _, _| calls += 1).unwrap();
    // 2 baseline passes, 4 uniform runs on 2 chunks, 8 single-layer runs on 1 chunk
    assert_eq!(calibrate::cost(4, &types, &opts), 2 + 8 + 8);
    assert_eq!(table.forward_passes, calibrate::cost(4, &types, &opts), "stated cost = passes run");
    assert_eq!(table.layers.len(), 4);
    for l in &table.layers {
        for t in &types {
            assert!(l.k[t].is_finite() && l.k[t] >= 0.0 && l.v[t].is_finite(), "layer {} {t}", l.layer);
        }
        assert_eq!(l.k[&CacheType::F16], 0.0);
        assert!(l.measured.contains_key("k:q4_0") && l.measured.contains_key("v:q4_0"));
    }
    assert_eq!(table.anchors.len(), 4, "K and V anchors for q8_0 and q4_0");
    assert_eq!(table.cells, runtime_cells(&model, 64, RUNTIME_UBATCH).unwrap(), "cells read from the runtime");
    // llama.cpp rounds the cache up to 256 cells: sizes come from it, not from -c.
    assert_eq!(table.cells, vec![Some(256); 4]);

    // Deterministic, and a rerun resumes from the journal instead of recomputing.
    let again = calibrate::calibrate(&model, &identity, &text, &opts, Some(&resume), &mut |_, _, _| {}).unwrap();
    assert_eq!(again.forward_passes, 2, "only the baseline is recomputed");
    assert_eq!(again.layers, table.layers);

    let sens_path = dir.path().join("sens.yaml");
    table.save(&sens_path).unwrap();
    assert_eq!(Sensitivity::load(&sens_path).unwrap(), table);

    // Every estimator gives a monotone frontier spanning all-q4_0 to all-f16.
    let pairs = search::parse_pairs("cpu", &table.types, "").unwrap();
    let problems = Problems::new(&table, &table.cells, &pairs).unwrap();
    assert_eq!(problems.by_estimator.len(), 3);
    for (est, problem) in &problems.by_estimator {
        let frontier = search::frontier(problem).unwrap();
        assert!(frontier.windows(2).all(|w| w[0].bytes < w[1].bytes && w[0].predicted > w[1].predicted), "{est:?}");
        assert!((frontier[0].bits_per_value - 4.5).abs() < 1e-9);
        assert_eq!(frontier.last().unwrap().predicted, 0.0);
    }

    // The binary: choose by measurement at a budget, check on held-out text, write a profile.
    let out = dir.path().join("p.yaml");
    let text_file = common::eval_text_file(dir.path());
    let cal_file = dir.path().join("cal.txt");
    std::fs::write(&cal_file, kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).unwrap().calibration).unwrap();
    let res = kvtuner(&[
        "search",
        sens_path.to_str().unwrap(),
        "--budget",
        "7",
        "--pairs",
        "cuda",
        "-o",
        out.to_str().unwrap(),
        "-m",
        path.to_str().unwrap(),
        "--text",
        cal_file.to_str().unwrap(),
        "--verify",
        text_file.to_str().unwrap(),
        "--chunks",
        "1",
        "--json",
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let json: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let sel = &json["selection"];
    let chosen = sel["chosen"]["summary"]["kld_mean"].as_f64().unwrap();
    let considered = sel["considered"].as_array().unwrap();
    let uniforms: Vec<f64> = considered
        .iter()
        .filter(|c| c["origin"]["kind"] == "uniform")
        .map(|c| c["summary"]["kld_mean"].as_f64().unwrap())
        .collect();
    assert_eq!(uniforms.len(), 2, "q8_0/q4_0 and q4_0, the uniform pairs within 7 bits: {uniforms:?}");
    assert!(uniforms.iter().all(|&u| chosen <= u), "chosen {chosen} vs uniform {uniforms:?}");
    assert!(sel["chosen"]["kv"]["tensor_bytes"].as_u64().unwrap() <= sel["max_bytes"].as_u64().unwrap());
    assert_eq!(json["held_out"].as_array().unwrap().len(), 1);
    let sizes = json["sizes"].as_array().unwrap();
    let names: Vec<&str> = sizes.iter().map(|s| s["uniform"]["label"].as_str().unwrap()).collect();
    assert_eq!(names, ["uniform q4_0", "uniform q8_0/q4_0", "uniform q8_0"]);
    let profile = Profile::load(&out).unwrap();
    profile.check_model(&identity).unwrap();
    let m = profile.measured.unwrap();
    assert!(m.bits_per_value <= 7.0 && m.kld_mean.is_some() && m.predicted_kld.is_some());
    assert_eq!(m.kld_calibration, Some(chosen));
    assert!(m.compared_uniform.is_some());
}

#[test]
fn single_layer_runs_on_shorter_chunks_measure_those_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (_, identity, model) = synthetic(dir.path(), 4, "synthetic-short");
    let text = common::eval_text();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let opts = CalibrateOptions { layer_ctx: 32, layer_chunks: 2, ..options(&types, 2, CacheType::F16) };
    let mut last = (0, 0);
    let table = calibrate::calibrate(&model, &identity, &text, &opts, None, &mut |d, t, _| last = (d, t)).unwrap();
    // 2 baseline passes, 4 uniform runs on 2 chunks of 64, 8 single-layer runs on 2 chunks of 32
    // and those chunks' own baseline
    assert_eq!(calibrate::cost(4, &types, &opts), 2 + 8 + 16 + 2);
    assert_eq!(table.forward_passes, calibrate::cost(4, &types, &opts), "stated cost = passes run");
    assert_eq!(last, (4 * 2 * 64 + 8 * 2 * 32, 4 * 2 * 64 + 8 * 2 * 32), "progress is counted in tokens");
    assert!(table.method.contains("2 chunk(s) of 32 tokens, each the start of one of 2 chunks"), "{}", table.method);
    // the same runs made by hand on the first 32 tokens of each 64-token chunk (tokens 0-31 and
    // 64-95: chunks 0 and 2 of 32) give the table's single-layer numbers
    let mut ev = Evaluator::new(&model, &text, 32, 3, &opts.base).unwrap();
    for layer in [0, 3] {
        let mut k = vec![CacheType::F16; 4];
        k[layer] = CacheType::Q4_0;
        let config =
            ContextParams { layer_types: Some(LayerCacheTypes { k, v: vec![CacheType::F16; 4] }), ..opts.base.clone() };
        let one = std::slice::from_ref(&config);
        let mut by_hand = ev.score_chunks(one, 0..1, 1).unwrap().remove(0);
        by_hand.append(ev.score_chunks(one, 2..3, 1).unwrap().remove(0));
        let in_table = table.layers[layer].measured["k:q4_0"].kld_mean;
        assert_eq!(by_hand.quality().kld_mean, in_table, "layer {layer}");
    }
    // the uniform runs still measure whole chunks
    let full = CalibrateOptions { layer_ctx: 0, ..opts.clone() };
    let whole = calibrate::calibrate(&model, &identity, &text, &full, None, &mut |_, _, _| {}).unwrap();
    assert_eq!(whole.anchors.len(), table.anchors.len());
    for (a, b) in whole.anchors.iter().zip(&table.anchors) {
        assert_eq!(a.quality.kld_mean, b.quality.kld_mean, "{}/{}", a.k, a.v);
    }
}

#[test]
fn q8_0_background_measures_changes_from_uniform_q8_0() {
    let dir = tempfile::tempdir().unwrap();
    let (_, identity, model) = synthetic(dir.path(), 3, "synthetic-bg");
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let opts = options(&types, 1, CacheType::Q8_0);
    let table = calibrate::calibrate(&model, &identity, &common::eval_text(), &opts, None, &mut |_, _, _| {}).unwrap();
    assert_eq!(table.forward_passes, calibrate::cost(3, &types, &opts));
    assert_eq!(calibrate::cost(3, &types, &opts), 1 + 1 + 4 + 6, "baseline, background, anchors, layers");
    let bg = table.background.as_ref().expect("the all-q8_0 run is recorded");
    assert_eq!((bg.k, bg.v), (CacheType::Q8_0, CacheType::Q8_0));
    // A single-layer run holds the other layers at q8_0, so it is never below the all-q8_0
    // floor by much, and each layer's share comes from its change from that floor.
    for l in &table.layers {
        assert!(l.measured["k:q4_0"].kld_mean > 0.5 * bg.quality.kld_mean, "layer {}", l.layer);
    }
    let bad = CalibrateOptions { background: CacheType::Q4_0, ..opts };
    let err = calibrate::calibrate(&model, &identity, &common::eval_text(), &bad, None, &mut |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("background"), "{err}");
}

/// `tune`'s options for the synthetic models: 6.5 bits, a 64-token context, two CPU threads.
fn tune_options(types: &[CacheType], chunks: usize, keys: Option<kvtuner::profile::ProfileKeys>) -> TuneOptions {
    TuneOptions {
        calibrate: options(types, chunks, CacheType::F16),
        pairs: "cuda".into(),
        budget: Budget::Bits(6.5),
        target_ctx: 64,
        eval_chunks: 1,
        select: SelectOptions::default(),
        name: None,
        sensitivity: None,
        sensitivity_window: None,
        devices: Devices { threads: 2, ..Default::default() },
        keys,
        window: None,
        window_per_layer: false,
        select_ctx: None,
        passkey_depths: Vec::new(),
    }
}

#[test]
fn tune_never_keeps_a_profile_that_measures_worse_than_uniform() {
    let dir = tempfile::tempdir().unwrap();
    let (path, identity, model) = synthetic(dir.path(), 4, "synthetic-tune");
    let split = kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).unwrap();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q5_0, CacheType::Q4_0];
    let mut opts = tune_options(&types, 2, None);
    let held = vec![(split.evaluation.clone(), "held out".to_string())];
    let tuned = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    let sel = &tuned.choice.selection;
    let best_uniform = sel.best_uniform.as_ref().unwrap();
    assert!(sel.chosen.kld() <= best_uniform.kld());
    for c in &sel.considered {
        assert!(c.kv.tensor_bytes <= sel.max_bytes, "{} is over the budget", c.candidate.label);
        assert_eq!(c.kv.tensor_bytes, c.candidate.expected_bytes, "runtime bytes = search bytes");
        assert!(sel.chosen.kld() <= c.kld() || !c.is_uniform());
    }
    assert!(sel.considered.iter().any(|c| !c.is_uniform()), "profiles were candidates");
    // profiles were screened on the first chunk: only the two best were measured on both chunks,
    // beside every uniform cache, and the choice was made among those alone
    assert!(sel.considered.iter().filter(|c| !c.is_uniform()).count() <= 2, "only finalists measured whole");
    assert!(!sel.screened_out.is_empty(), "more than two profiles were candidates");
    for s in &sel.screened_out {
        assert_eq!(s.chunks, 1);
        assert!(sel.considered.iter().all(|c| c.candidate.label != s.label), "{} was screened out", s.label);
    }
    assert_eq!(sel.profile_wins, !sel.chosen.is_uniform());
    assert_eq!(tuned.held_out.len(), 1);
    assert_eq!(tuned.held_out[0].uniform.candidate.types, best_uniform.candidate.types);
    let m = tuned.choice.profile.measured.as_ref().unwrap();
    assert_eq!(m.kv_bytes, sel.chosen.kv.tensor_bytes);
    assert_eq!(m.kld_mean, Some(tuned.held_out[0].chosen.kld()));
    assert_eq!(m.kld_confirmed, Some(sel.chosen.kld()), "the written types were measured again");
    assert_eq!(m.uniform_calibration.as_ref().unwrap().kld_mean, best_uniform.kld());
    assert_eq!(m.measured_on.as_deref(), Some("CPU"));

    // The bound is checked by measuring again: the chosen types reproduce the recorded KLD;
    // a configuration other than the one recorded (here one layer lowered to q4_0) does not.
    let mut ev = kvtuner::eval::Evaluator::new(&model, &split.calibration, 64, 2, &opts.calibrate.base).unwrap();
    let mut cal = kvtuner::select::Measurer::new(&mut ev, opts.calibrate.base.clone(), 64, "cal");
    let chosen = sel.chosen.candidate.types.clone();
    assert_eq!(cal.confirm(&chosen, sel).unwrap(), sel.chosen.kld());
    let mut other = chosen.clone();
    let lowered = other.iter().position(|&(k, _)| k != CacheType::Q4_0).expect("a layer above q4_0");
    other[lowered] = (CacheType::Q4_0, CacheType::Q4_0);
    let err = cal.confirm(&other, sel).unwrap_err().to_string();
    assert!(err.contains("measured again") && err.contains("recorded"), "{err}");
    // a configuration that measures *better* than recorded (all f16) is refused too: the file
    // must be what was measured, not merely below the uniform cache
    let f16 = vec![(CacheType::F16, CacheType::F16); chosen.len()];
    assert!(cal.confirm(&f16, sel).is_err(), "a configuration other than the recorded one was confirmed");

    // At exactly all-q4_0's size nothing but uniform q4_0 fits: the tool keeps it and says so.
    opts.budget = Budget::Bits(4.5);
    let tuned = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    let sel = &tuned.choice.selection;
    assert!(!sel.profile_wins);
    assert_eq!(sel.chosen.candidate.types, vec![(CacheType::Q4_0, CacheType::Q4_0); 4]);
    assert!(sel.verdict().contains("keeping the uniform cache"), "{}", sel.verdict());
    assert!(tuned.choice.profile.name.contains("uniform-q4_0-q4_0"), "{}", tuned.choice.profile.name);
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

#[test]
fn a_screened_candidate_completed_later_measures_as_one_measured_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (_, identity, model) = synthetic(dir.path(), 3, "synthetic-screen");
    let text = common::eval_text();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let opts = options(&types, 1, CacheType::F16);
    let table = calibrate::calibrate(&model, &identity, &text, &opts, None, &mut |_, _, _| {}).unwrap();
    let pairs = search::parse_pairs("cpu", &table.types, "").unwrap();
    let problems = Problems::new(&table, &table.cells, &pairs).unwrap();
    let cand = problems.uniform(CacheType::Q8_0, CacheType::Q4_0).unwrap();
    let mut ev = Evaluator::new(&model, &text, 64, 3, &opts.base).unwrap();
    assert_eq!(ev.chunks(), 3);
    let whole = {
        let mut m = Measurer::new(&mut ev, opts.base.clone(), 64, "whole");
        m.measure(std::slice::from_ref(&cand)).unwrap()[0].summary.clone()
    };
    let before = ev.forward_passes;
    let mut m = Measurer::new(&mut ev, opts.base.clone(), 64, "screened");
    let screened = m.screen(&[&cand], 1).unwrap()[0];
    assert_eq!(screened, whole.kld_chunk_means[0]);
    let completed = m.measure(std::slice::from_ref(&cand)).unwrap()[0].summary.clone();
    assert_eq!(completed, whole, "screening chunk + the rest = the whole text");
    assert_eq!(m.evaluator().forward_passes - before, 3, "the screened chunk is not run again");
}

/// `tune` with a key treatment: every measurement runs with the keys shifted and scaled, the
/// profile carries the treatment, and a sensitivity table measured without it is not taken for
/// one measured with it.
#[test]
fn tune_with_keys_measures_with_them_and_the_profile_carries_them() {
    let dir = tempfile::tempdir().unwrap();
    let (path, identity, _) = synthetic(dir.path(), 4, "synthetic-tune-keys");
    let split = kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).unwrap();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let keys = kvtuner::profile::ProfileKeys::shift_and_scale("lee-calibration");
    let mut opts = tune_options(&types, 1, Some(keys.clone()));
    let held = vec![(split.evaluation.clone(), "held out".to_string())];
    let tuned = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    assert_eq!(tuned.choice.profile.keys, Some(keys.clone()));
    assert_eq!(tuned.sensitivity.text, "cal (keys: shift + scale std^0.5)");
    assert!(tuned.choice.profile.calibration.as_ref().unwrap().text.contains("keys"));
    // the keys were measured with the treatment: narrow keys cost another KLD than without it
    opts.keys = None;
    let plain = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    let k_q4 =
        |s: &kvtuner::sensitivity::Sensitivity| s.layers.iter().map(|l| l.k[&CacheType::Q4_0]).collect::<Vec<_>>();
    let (with, without) = (k_q4(&tuned.sensitivity), k_q4(&plain.sensitivity));
    assert!(with.iter().zip(&without).all(|(a, b)| a != b), "q4_0 keys with {with:?}, without {without:?}");
    // the same table without the treatment is refused: it was measured with it
    opts.sensitivity = Some(tuned.sensitivity.clone());
    let err = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {});
    assert!(matches!(err, Err(pipeline::TuneError::ForeignTable { .. })), "{:?}", err.err());

    // a recent window with sinks on top: measured with it (narrow keys cost less where recent and
    // first positions are read wide), labelled with it, carried by the profile
    let window =
        kvtuner::profile::ProfileWindow { size: 16, k: CacheType::F16, v: CacheType::F16, layers: None, sinks: 4 };
    opts.sensitivity = None;
    opts.keys = Some(keys.clone());
    opts.window = Some(window.clone());
    let windowed =
        pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    assert_eq!(windowed.choice.profile.window, Some(window));
    assert_eq!(windowed.sensitivity.text, "cal (keys: shift + scale std^0.5) (window: w16+s4 f16)");
    // every candidate was measured and sized with the window (the runtime's bytes include it)
    let sel = &windowed.choice.selection;
    for m in sel.considered.iter().chain(&sel.best_uniform) {
        assert!(m.kv.window_bytes > 0, "{} measured without the window: {:?}", m.candidate.label, m.kv);
        assert_eq!(m.kv.tensor_bytes, m.candidate.expected_bytes + m.kv.window_bytes, "{}", m.candidate.label);
    }
}

/// `tune --window-per-layer`: the layers are calibrated without and with the window, the budget
/// counts the window's bytes, uniform caches compete with and without it, every candidate is
/// measured with the windows it names and sized by the runtime to what the search expected, and
/// the profile keeps the window on the chosen layers only.
#[test]
fn tune_searches_the_window_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (path, identity, _) = synthetic(dir.path(), 4, "synthetic-tune-window-layers");
    let split = kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).unwrap();
    let types = vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0];
    let mut opts = tune_options(&types, 1, None);
    // at 512 tokens a window of 16 + 4 f16 positions costs 0.6 bits: q4_0 with it fits 5.5 bits
    opts.target_ctx = 512;
    opts.budget = Budget::Bits(5.5);
    let window =
        kvtuner::profile::ProfileWindow { size: 16, k: CacheType::F16, v: CacheType::F16, layers: None, sinks: 4 };
    opts.window = Some(window.clone());
    opts.window_per_layer = true;
    opts.passkey_depths = vec![0.5];
    let held = vec![(split.evaluation.clone(), "held out".to_string())];
    let tuned = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    // two tables: narrow types cost less with the window
    let with = tuned.sensitivity_window.as_ref().expect("a second calibration with the window");
    assert_eq!(with.text, "cal (window: w16+s4 f16)");
    assert_eq!(tuned.sensitivity.text, "cal (window per layer: w16+s4 f16; measured without)");
    let k_q4 = |s: &kvtuner::sensitivity::Sensitivity| s.layers.iter().map(|l| l.k[&CacheType::Q4_0]).sum::<f64>();
    assert!(k_q4(with) < k_q4(&tuned.sensitivity), "{} vs {}", k_q4(with), k_q4(&tuned.sensitivity));
    let sel = &tuned.choice.selection;
    eprintln!("{}; windows on {:?}", sel.verdict(), sel.chosen.candidate.windowed);
    let labels: Vec<&str> = sel.considered.iter().map(|m| m.candidate.label.as_str()).collect();
    assert!(labels.contains(&"uniform q4_0") && labels.contains(&"uniform q4_0 + window"), "{labels:?}");
    for m in &sel.considered {
        // the runtime's bytes, windows included, are the search's
        assert_eq!(m.kv.tensor_bytes, m.candidate.expected_bytes, "{}", m.candidate.label);
        assert!(m.kv.tensor_bytes <= sel.max_bytes, "{} is over the budget", m.candidate.label);
        assert_eq!(m.kv.window_bytes > 0, !m.candidate.windowed.is_empty(), "{}", m.candidate.label);
        assert!(sel.chosen.kld() <= m.kld() || !m.is_uniform());
    }
    // the profile keeps the window where the choice has it
    let on = &sel.chosen.candidate.windowed;
    let expected = (!on.is_empty()).then(|| kvtuner::profile::ProfileWindow {
        layers: (on.len() < identity.layers).then(|| on.clone()),
        ..window.clone()
    });
    assert_eq!(tuned.choice.profile.window, expected);
    // the held-out check measured the choice with its windows too
    assert_eq!(tuned.held_out[0].chosen.kv.tensor_bytes, sel.chosen.kv.tensor_bytes);
    // the passkey veto ran at the target context: the uniform cache's score is the bar (random
    // weights find no key, so it vetoes nothing)
    let bar = sel.passkey.last().expect("passkeys asked");
    assert_eq!(
        (bar.label.as_str(), bar.n_ctx, bar.cases),
        (sel.best_uniform.as_ref().unwrap().candidate.label.as_str(), 512, 1)
    );
    assert!(sel.vetoed.is_empty());
    // chosen and checked on chunks of the target context (512), not the calibration's 64: there
    // a window is the share of each layer it will be
    assert!(sel.text.ends_with("in 512-token chunks"), "{}", sel.text);
    for s in [&sel.chosen.summary, &tuned.held_out[0].chosen.summary] {
        let per_chunk = s.positions / s.kld_chunk_means.len();
        assert!(per_chunk > 64, "{per_chunk} positions scored per chunk: not 512-token chunks");
    }

    // one table cannot stand for the two calibrations
    opts.sensitivity = Some(tuned.sensitivity.clone());
    let err = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {});
    assert!(matches!(err, Err(pipeline::TuneError::WindowSearch(_))), "{:?}", err.err());
    // nor the table without the window for the one with it
    opts.sensitivity_window = Some(tuned.sensitivity.clone());
    let err = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {});
    assert!(matches!(err, Err(pipeline::TuneError::ForeignTable { .. })), "{:?}", err.err());
    // both tables: nothing calibrated again, the same choice
    opts.sensitivity_window = tuned.sensitivity_window.clone();
    let again = pipeline::tune(&path, &identity, (&split.calibration, "cal"), &held, &opts, None, &mut |_| {}).unwrap();
    assert_eq!(again.choice.selection.chosen.candidate, sel.chosen.candidate);
    assert_eq!(again.sensitivity_window.as_ref(), Some(with));
}
