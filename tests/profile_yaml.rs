//! Cache profiles on disk: round trips, the exact YAML we write, and the errors people see.

use std::path::{Path, PathBuf};

use kvtuner::cache_type::CacheType;
use kvtuner::profile::{
    import_kvtuner, Calibration, ComparedUniform, ImportError, LayerTypes, Measured, ModelIdentity, Profile,
    ProfileInvalid, ProfileKeys, ProfileLoadError, ProfileWindow,
};
use proptest::prelude::*;

fn model(layers: usize) -> ModelIdentity {
    ModelIdentity {
        architecture: "gemma3".into(),
        layers,
        fingerprint: "0123456789abcdef".repeat(4),
        name: Some("gemma-3-270m-it".into()),
    }
}

fn sample() -> Profile {
    let mut p = Profile::uniform(&model(4), CacheType::Q8_0, CacheType::Q4_0, "tiny-mixed");
    p.description = Some("Two f16 layers where the KLD probe said so.".into());
    p.layers[0] = LayerTypes { k: CacheType::F16, v: CacheType::F16 };
    p.layers[3] = p.layers[0];
    p.window =
        Some(ProfileWindow { size: 128, k: CacheType::F16, v: CacheType::Q8_0, layers: Some(vec![1, 2]), sinks: 4 });
    p.keys = Some(ProfileKeys::shift_and_scale("lee-calibration"));
    p.measured = Some(Measured {
        bits_per_value: 6.52,
        kv_bytes: 12_345_678,
        context: 1024,
        kld_mean: Some(0.0123),
        kld_eval_text: Some("lee_background.cor, documents 151-300".into()),
        predicted_kld: Some(0.011),
        kld_calibration: None,
        compared_uniform: None,
        ..Default::default()
    });
    p.calibration = Some(Calibration {
        text: "lee_background.cor, documents 1-150".into(),
        context: 1024,
        chunks: 4,
        types: vec![CacheType::F16, CacheType::Q8_0, CacheType::Q5_0, CacheType::Q4_0],
        pairs: Some("cuda".into()),
    });
    p.tool_version = Some("0.1.0".into());
    p
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn load_err(text: &str) -> (ProfileLoadError, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.yaml", text);
    let err = Profile::load(&path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad.yaml"), "error does not name the file: {msg}");
    (err, msg)
}

const GOOD: &str = "schema: 1
name: t
model:
  architecture: gemma3
  layers: 2
  fingerprint: abcd
layers:
- { k: q8_0, v: q4_0 }
- { k: f16, v: f16 }
";

#[test]
fn save_then_load_is_equal_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    let p = sample();
    p.save(&path).unwrap();
    assert_eq!(Profile::load(&path).unwrap(), p);
    // Overwriting works too.
    let u = Profile::uniform(&model(4), CacheType::F16, CacheType::F16, "u");
    u.save(&path).unwrap();
    assert_eq!(Profile::load(&path).unwrap(), u);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn yaml_snapshot() {
    insta::assert_snapshot!(sample().to_yaml_string().unwrap());
}

#[test]
fn summary_of_sample() {
    // Equal counts keep first-appearance order.
    assert_eq!(
        sample().summary(),
        "2×f16/f16, 2×q8_0/q4_0; recent window w128+s4 f16/q8_0 on 2 of 4 layers; keys: shift + scale std^0.5"
    );
}

#[test]
fn hand_written_flow_and_block_styles_load() {
    let dir = tempfile::tempdir().unwrap();
    let p = Profile::load(write(dir.path(), "ok.yaml", GOOD)).unwrap();
    assert_eq!(p.summary(), "1×q8_0/q4_0, 1×f16/f16");
    let block = GOOD.replace("- { k: f16, v: f16 }", "- k: F16\n  v: f16");
    assert_eq!(Profile::load(write(dir.path(), "b.yaml", &block)).unwrap(), p);
}

#[test]
fn unknown_type_names_layer_and_value() {
    let (err, msg) = load_err(&GOOD.replace("{ k: f16, v: f16 }", "{ k: f16, v: q3_k }"));
    assert!(matches!(err, ProfileLoadError::Parse { line: Some(9), .. }), "{err:?}");
    assert!(msg.contains("layers[1]: v: unknown KV cache type `q3_k`"), "{msg}");
    assert!(msg.contains("q3_k"), "{msg}");
    assert!(msg.contains("bad.yaml:9:"), "{msg}");
}

#[test]
fn wrong_layer_count_is_named() {
    let (err, msg) = load_err(&GOOD.replace("layers: 2", "layers: 3"));
    assert!(matches!(
        err,
        ProfileLoadError::Invalid { source: ProfileInvalid::LayerCount { declared: 3, found: 2 }, .. }
    ));
    assert!(msg.contains("`model.layers` is 3 but `layers` lists 2"), "{msg}");
}

#[test]
fn unsupported_schema_is_reported_before_unknown_fields() {
    let text = GOOD.replace("schema: 1", "schema: 2\nfuture_field: x");
    let (err, msg) = load_err(&text);
    assert!(matches!(err, ProfileLoadError::Invalid { source: ProfileInvalid::UnsupportedSchema { .. }, .. }));
    assert!(msg.contains("unsupported profile schema 2"), "{msg}");
    let (_, msg) = load_err(&GOOD.replace("schema: 1", "schema: one"));
    assert!(msg.contains("unsupported profile schema one"), "{msg}");
}

#[test]
fn missing_duplicate_and_unknown_fields_are_clear() {
    let (_, msg) = load_err(&GOOD.replace("  fingerprint: abcd\n", ""));
    assert!(msg.contains("missing field `fingerprint`"), "{msg}");
    let (_, msg) = load_err(&GOOD.replace("{ k: f16, v: f16 }", "{ k: f16 }"));
    assert!(msg.contains("missing field `v`"), "{msg}");
    let (_, msg) = load_err(&GOOD.replace("name: t\n", "name: t\nname: u\n"));
    assert!(msg.contains("duplicate") && msg.contains("name"), "{msg}");
    let (_, msg) = load_err(&format!("{GOOD}mesured:\n  context: 3\n"));
    assert!(msg.contains("unknown field `mesured`"), "{msg}");
    let (_, msg) = load_err(&GOOD.replace("schema: 1\n", ""));
    assert!(msg.contains("missing field `schema`"), "{msg}");
    let (_, msg) = load_err("");
    assert!(msg.contains("empty"), "{msg}");
    let (_, msg) = load_err("schema: [1");
    assert!(msg.contains("bad.yaml:"), "{msg}");
    let (_, msg) = load_err(&GOOD.replace("abcd", "xyz!"));
    assert!(msg.contains("fingerprint") && msg.contains("xyz!"), "{msg}");
}

#[test]
fn missing_file_is_named() {
    let err = Profile::load("/nonexistent/kvtuner/p.yaml").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kvtuner/p.yaml"));
}

#[test]
fn save_refuses_invalid_profile() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = sample();
    p.layers.pop();
    let path = dir.path().join("p.yaml");
    let err = p.save(&path).unwrap_err();
    assert!(err.to_string().contains("p.yaml"), "{err}");
    assert!(!path.exists());
}

#[test]
fn windows_the_runtime_cannot_take_are_invalid_profiles() {
    let with = |w: ProfileWindow| Profile { window: Some(w), ..sample() };
    let base = ProfileWindow { size: 128, k: CacheType::F16, v: CacheType::F16, layers: None, sinks: 0 };
    let cases = [
        (ProfileWindow { size: 0, ..base.clone() }, "`window.size` is 0"),
        (ProfileWindow { k: CacheType::Q4_0, ..base.clone() }, "`window.k` is q4_0"),
        (ProfileWindow { v: CacheType::Kv3, ..base.clone() }, "`window.v` is kv3"),
        (ProfileWindow { layers: Some(vec![1, 4]), ..base.clone() }, "4 is out of order"),
        (ProfileWindow { layers: Some(vec![2, 1]), ..base.clone() }, "1 is out of order"),
        (ProfileWindow { layers: Some(vec![1, 1]), ..base.clone() }, "1 is out of order"),
    ];
    for (w, message) in cases {
        let err = with(w.clone()).validate().unwrap_err().to_string();
        assert!(err.contains(message), "{w:?}: {err}");
    }
    assert_eq!(with(base.clone()).validate(), Ok(()));
    assert_eq!(base.per_layer(3), vec![128; 3]);
    assert_eq!(ProfileWindow { layers: Some(vec![0, 2]), ..base }.per_layer(4), vec![128, 0, 128, 0]);
    // a typo in a window field is an error, not a window without it
    let text = sample().to_yaml_string().unwrap().replace("  size: 128", "  sise: 128");
    let (_, msg) = load_err(&text);
    assert!(msg.contains("sise"), "{msg}");
}

#[test]
fn key_treatments_the_runtime_cannot_take_are_invalid_profiles() {
    let with = |k: ProfileKeys| Profile { keys: Some(k), ..sample() };
    let base = ProfileKeys::shift_and_scale("lee-calibration");
    for (k, message) in [
        (ProfileKeys { shift: false, scale: None, ..base.clone() }, "neither `shift` nor `scale`"),
        (ProfileKeys { scale: Some(0.0), ..base.clone() }, "`keys.scale` is 0"),
        (ProfileKeys { scale: Some(3.0), ..base.clone() }, "`keys.scale` is 3"),
        (ProfileKeys { scale: Some(f32::NAN), ..base.clone() }, "`keys.scale` is NaN"),
    ] {
        let err = with(k.clone()).validate().unwrap_err().to_string();
        assert!(err.contains(message), "{k:?}: {err}");
    }
    assert_eq!(with(ProfileKeys { scale: None, ..base.clone() }).validate(), Ok(()));
    // the text defaults to the calibration half of the Lee corpus; a typo is an error
    let text = sample().to_yaml_string().unwrap().replace("  text: lee-calibration\n", "");
    assert_eq!(Profile::from_yaml_str(&text, Path::new("p.yaml")).unwrap().keys, Some(base));
    let (_, msg) = load_err(&sample().to_yaml_string().unwrap().replace("  shift: true", "  shfit: true"));
    assert!(msg.contains("shfit"), "{msg}");
}

// --- KVTuner presets ------------------------------------------------------------------------

fn import(
    text: &str,
    name: &str,
    m: Option<&ModelIdentity>,
) -> Result<(Profile, Vec<kvtuner::profile::BitMapping>), ImportError> {
    let dir = tempfile::tempdir().unwrap();
    import_kvtuner(write(dir.path(), name, text), m)
}

#[test]
fn imports_yaml_preset_with_mapping_report() {
    let text = "0: {nbits_key: 8, nbits_value: 4}\n\
                1: {nbits_key: 16, nbits_value: 2}\n\
                '2': {nbits_key: 6, nbits_value: 4, residual_length: 32}\n\
                3: {nbits_key: 3, nbits_value: 1}\n";
    let (p, report) = import(text, "preset.yaml", None).unwrap();
    let types: Vec<(CacheType, CacheType)> = p.layers.iter().map(|l| (l.k, l.v)).collect();
    assert_eq!(
        types,
        [
            (CacheType::Q8_0, CacheType::Q4_0),
            (CacheType::F16, CacheType::Kv2),
            (CacheType::Q5_0, CacheType::Q4_0),
            (CacheType::Kv3, CacheType::Kv2)
        ]
    );
    let rows: Vec<_> = report.iter().map(|m| (m.from_bits, m.to_type, m.raised, m.k_layers, m.v_layers)).collect();
    assert_eq!(
        rows,
        [
            (16, CacheType::F16, false, 1, 0),
            (8, CacheType::Q8_0, false, 1, 0),
            (6, CacheType::Q5_0, false, 1, 0),
            (4, CacheType::Q4_0, false, 0, 2),
            (3, CacheType::Kv3, false, 1, 0),
            (2, CacheType::Kv2, false, 0, 1),
            (1, CacheType::Kv2, true, 0, 1),
        ]
    );
    assert_eq!(p.name, "preset");
    assert!(p.description.as_deref().unwrap().contains("raised"));
    assert_eq!(p.model.fingerprint, "");
    // An unbound import still saves and loads.
    let dir = tempfile::tempdir().unwrap();
    p.save(dir.path().join("i.yaml")).unwrap();
    assert_eq!(Profile::load(dir.path().join("i.yaml")).unwrap(), p);
    // ...but does not pass for a real model.
    assert!(p.check_model(&model(3)).is_err());
}

#[test]
fn imports_json_preset_bound_to_model() {
    let text = r#"{"0": {"nbits_key": 8, "nbits_value": 8}, "1": {"nbits_key": 4, "nbits_value": 4}}"#;
    let m = model(2);
    let (p, _) = import(text, "p.json", Some(&m)).unwrap();
    assert_eq!(p.model, m);
    assert!(p.check_model(&m).is_ok());
    let err = import(text, "p.json", Some(&model(3))).unwrap_err();
    assert!(matches!(err, ImportError::LayerCount { preset: 2, model: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("p.json"));
}

#[test]
fn preset_gap_names_missing_layer() {
    let text = "0: {nbits_key: 8, nbits_value: 8}\n2: {nbits_key: 8, nbits_value: 8}\n";
    let err = import(text, "gap.yaml", None).unwrap_err();
    assert!(matches!(err, ImportError::MissingLayer { missing: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("layer 1 is missing"), "{err}");
}

#[test]
fn preset_with_the_largest_layer_key_is_an_error_not_a_panic() {
    let text = "0: {nbits_key: 8, nbits_value: 8}\n18446744073709551615: {nbits_key: 8, nbits_value: 8}\n";
    let err = import(text, "huge.yaml", None).unwrap_err();
    assert!(matches!(err, ImportError::MissingLayer { missing: 1, .. }), "{err:?}");
    // the largest key + 1 saturates instead of wrapping to an empty range
    assert!(err.to_string().contains("0..18446744073709551615"), "{err}");
}

#[test]
fn preset_unsupported_bits_names_layer() {
    let text = "0: {nbits_key: 8, nbits_value: 8}\n1: {nbits_key: 7, nbits_value: 8}\n";
    let err = import(text, "seven.yaml", None).unwrap_err();
    assert!(matches!(err, ImportError::UnsupportedBits { layer: 1, tensor: 'K', bits: 7, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("seven.yaml") && msg.contains("layer 1 K: 7 bits"), "{msg}");
}

#[test]
fn preset_bad_shapes_are_clear() {
    let cases = [
        ("- 1\n- 2\n", "expected a map"),
        ("{}", "no layers"),
        ("x: {nbits_key: 8, nbits_value: 8}\n", "`x` is not a layer index"),
        ("0: {nbits_key: 8}\n", "layer 0: `nbits_value` is missing"),
        ("0: {nbits_key: eight, nbits_value: 8}\n", "`nbits_key` is `eight`"),
        ("0: 8\n", "layer 0: expected"),
        ("0: {nbits_key: 8, nbits_value: 8}\n'0': {nbits_key: 4, nbits_value: 4}\n", "layer 0 is listed twice"),
        ("0: [", "bad.yaml:"),
    ];
    for (text, needle) in cases {
        let err = import(text, "bad.yaml", None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(needle) && msg.contains("bad.yaml"), "{text:?}: {msg}");
    }
}

// --- property: any valid profile survives save + load ---------------------------------------

fn cache_type() -> impl Strategy<Value = CacheType> {
    proptest::sample::select(CacheType::ALL.to_vec())
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(6.52), -1e12..1e12f64, proptest::num::f64::NORMAL]
}

fn text() -> impl Strategy<Value = String> {
    // Include YAML-hostile characters and multi-line text.
    "[a-zA-Z0-9 :#'\"{}\\[\\],\\-_.\n\u{e9}\u{d7}]{1,40}".prop_filter("non-blank", |s| !s.trim().is_empty())
}

prop_compose! {
    fn profile()(
        layers in proptest::collection::vec((cache_type(), cache_type()), 1..40),
        name in text(),
        description in proptest::option::of(text()),
        arch in "[a-z][a-z0-9_]{0,12}",
        fingerprint in "[0-9a-f]{0,64}",
        model_name in proptest::option::of(text()),
        measured in proptest::option::of((finite(), any::<u64>(), any::<u32>(),
            proptest::option::of(finite()), proptest::option::of(text()), proptest::option::of(finite()),
            proptest::option::of(finite()), proptest::option::of((text(), finite())),
            proptest::option::of((text(), finite())), proptest::option::of(finite()), proptest::option::of(text()))),
        calibration in proptest::option::of((text(), any::<u32>(), any::<u32>(),
            proptest::collection::vec(cache_type(), 0..5), proptest::option::of(text()))),
        tool_version in proptest::option::of("[0-9]\\.[0-9]\\.[0-9]"),
        window in proptest::option::of((1u32..1_000_000, proptest::sample::select(ProfileWindow::TYPES.to_vec()),
            proptest::sample::select(ProfileWindow::TYPES.to_vec()),
            proptest::option::of(proptest::collection::btree_set(0usize..40, 0..6)), 0u32..16)),
        keys in proptest::option::of((any::<bool>(), proptest::option::of(0.01f32..2.0), "[a-z./-]{1,20}")),
    ) -> Profile {
        let n_layer = layers.len();
        Profile {
            schema: 1,
            name,
            description,
            model: ModelIdentity { architecture: arch, layers: layers.len(), fingerprint, name: model_name },
            layers: layers.into_iter().map(|(k, v)| LayerTypes { k, v }).collect(),
            // layers listed ascending and within the model (what validate asks)
            window: window.map(|(size, k, v, ls, sinks)| ProfileWindow {
                size, k, v, layers: ls.map(|s| s.into_iter().filter(|&l| l < n_layer).collect()), sinks,
            }),
            // a treatment asks for at least one of the two (what validate asks)
            keys: keys.map(|(shift, scale, text)| ProfileKeys { shift: shift || scale.is_none(), scale, text }),
            measured: measured.map(|(bits_per_value, kv_bytes, context, kld_mean, kld_eval_text, predicted_kld, kld_calibration, uniform, uniform_cal, kld_confirmed, measured_on)| Measured {
                bits_per_value, kv_bytes, context, kld_mean, kld_eval_text, predicted_kld, kld_calibration,
                compared_uniform: uniform.map(|(types, kld_mean)| ComparedUniform { types, kld_mean }),
                uniform_calibration: uniform_cal.map(|(types, kld_mean)| ComparedUniform { types, kld_mean }),
                kld_confirmed,
                measured_on,
            }),
            calibration: calibration.map(|(text, context, chunks, types, pairs)| Calibration { text, context, chunks, types, pairs }),
            tool_version,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn random_profiles_round_trip(p in profile()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        p.save(&path).unwrap();
        prop_assert_eq!(Profile::load(&path).unwrap(), p);
    }
}
