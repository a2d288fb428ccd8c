//! Profiles in GGUF metadata: byte-exact annotate/strip through the `kvtuner` binary, readers
//! that agree, and the patched runtime applying the embedded profile by itself (patch 0003).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kvtuner::cache_type::CacheType;
use kvtuner::gguf::{self, MetadataEdits, Value};
use kvtuner::llama::{Backend, Context, ContextParams, GgufCSummary, Model, ModelParams};
use kvtuner::profile::{LayerTypes, ModelIdentity, Profile};

use common::kvtuner;

fn ok(args: &[&str]) -> String {
    let out = kvtuner(args);
    assert!(out.status.success(), "kvtuner {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A mixed profile for the model at `path`: K q8_0 on even layers, q4_0 on odd; V q4_0 except layer 0.
fn mixed_profile(path: &Path, dir: &Path) -> (PathBuf, Profile) {
    let identity = ModelIdentity::from_header(&gguf::read_header(path).unwrap()).unwrap();
    let mut profile = Profile::uniform(&identity, CacheType::F16, CacheType::F16, "test-mixed");
    for (il, l) in profile.layers.iter_mut().enumerate() {
        *l = LayerTypes {
            k: if il % 2 == 0 { CacheType::Q8_0 } else { CacheType::Q4_0 },
            v: if il == 0 { CacheType::F16 } else { CacheType::Q4_0 },
        };
    }
    let out = dir.join("test-mixed.yaml");
    profile.save(&out).unwrap();
    (out, profile)
}

fn round_trip(model: &Path, dir: &Path) {
    let (profile_path, _) = mixed_profile(model, dir);
    let once = dir.join("once.gguf");
    let twice = dir.join("twice.gguf");
    let stripped = dir.join("stripped.gguf");
    ok(&["annotate", p(model), "--profile", p(&profile_path), "-o", p(&once)]);
    ok(&["annotate", p(&once), "--profile", p(&profile_path), "-o", p(&twice)]);
    ok(&["strip", p(&once), "-o", p(&stripped)]);
    let original = std::fs::read(model).unwrap();
    assert!(std::fs::read(&stripped).unwrap() == original, "strip(annotate(x)) differs from x");
    assert!(std::fs::read(&once).unwrap() == std::fs::read(&twice).unwrap(), "annotating twice differs from once");

    // Three readers agree on the annotated file: ours, ggml's, and gguf-rs.
    let ours_in = gguf::read_header(model).unwrap();
    let ours = gguf::read_header(&once).unwrap();
    let ggml = GgufCSummary::read(&once).unwrap();
    let ggml_in = GgufCSummary::read(model).unwrap();
    assert_eq!(ggml.keys, ours.keys().collect::<Vec<_>>());
    assert!(ggml.keys.starts_with(&ggml_in.keys), "original keys keep their order");
    assert!(ggml.keys.iter().any(|k| k == "kvtuner.cache.type_k"));
    assert_eq!(ggml.tensors.len(), ggml_in.tensors.len());
    for (a, b) in ggml.tensors.iter().zip(&ggml_in.tensors) {
        assert_eq!((&a.name, a.ggml_type, a.offset, a.size), (&b.name, b.ggml_type, b.offset, b.size));
    }
    assert_eq!(ours.tensor_fingerprint(), ours_in.tensor_fingerprint());
    let rs = gguf_rs::get_gguf_container_array_size(p(&once), u64::MAX).unwrap().decode().expect("gguf-rs reads it");
    assert_eq!(rs.num_tensor() as usize, ggml.tensors.len());
    assert_eq!(rs.num_kv() as usize, ggml.keys.len());
    assert!(rs.metadata().contains_key("kvtuner.cache.type_v"));
}

#[test]
fn annotate_strip_is_byte_exact_on_gemma() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    round_trip(&common::gemma_path(), dir.path());
}

#[test]
fn annotate_strip_is_byte_exact_on_synthetic() {
    let dir = tempfile::tempdir().unwrap();
    let spec = kvtuner::synth::SynthSpec {
        n_layer: 5,
        name: "synthetic-annotate".into(),
        ..kvtuner::synth::SynthSpec::tiny()
    };
    let model = common::synth_model(dir.path(), &spec);
    round_trip(&model, dir.path());
    // in place: annotate then strip gives the original bytes back
    let original = std::fs::read(&model).unwrap();
    let (profile, _) = mixed_profile(&model, dir.path());
    ok(&["annotate", p(&model), "--profile", p(&profile), "--in-place"]);
    assert!(std::fs::read(&model).unwrap() != original);
    ok(&["strip", p(&model), "--in-place"]);
    assert!(std::fs::read(&model).unwrap() == original);

    // in place through a symlink: the file it points to is rewritten, the link stays a link
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    ok(&["annotate", p(&link), "--profile", p(&profile), "--in-place"]);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(std::fs::read(&model).unwrap() != original, "the target was annotated");
    ok(&["strip", p(&link), "--in-place"]);
    assert!(std::fs::read(&model).unwrap() == original);
}

fn applied(model: &Model, params: &ContextParams) -> Vec<(CacheType, CacheType)> {
    let ctx = Context::new(model, params).unwrap();
    ctx.layers().into_iter().map(|i| i.map(|i| (i.type_k, i.type_v)).unwrap()).collect()
}

#[test]
fn runtime_applies_the_embedded_profile_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = common::tiny_model(dir.path(), 6, "synthetic-auto");
    let (profile_path, profile) = mixed_profile(&model_path, dir.path());
    let annotated = dir.path().join("annotated.gguf");
    let out = kvtuner(&["annotate", p(&model_path), "--profile", p(&profile_path), "-o", p(&annotated)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // layer 0 is q8_0/f16 (K quantized, V not): no CUDA flash-attention kernel, said once
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layers 0 use K-V pairs") && err.contains("q8_0/f16"), "{err}");

    let model = Model::load(Backend::init(), &annotated, &ModelParams::default()).unwrap();
    let base = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, ..Default::default() };
    let want: Vec<_> = profile.layers.iter().map(|l| (l.k, l.v)).collect();
    assert_eq!(applied(&model, &base), want, "no flags: the profile's types");
    let off = ContextParams { no_kv_profile: true, ..base.clone() };
    assert_eq!(applied(&model, &off), vec![(CacheType::F16, CacheType::F16); 6], "opt-out: uniform types");

    // The environment variable opts out for tools that cannot set parameters.
    let out = Command::new(env!("CARGO_BIN_EXE_kvtuner"))
        .args(["layers", "-m", p(&annotated), "-c", "256", "--json"])
        .env("LLAMA_KV_PROFILE", "off")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for layer in json["layers"].as_array().unwrap() {
        assert_eq!((layer["type_k"].as_str(), layer["type_v"].as_str()), (Some("f16"), Some("f16")));
    }
    // and without it the binary reports the profile's types
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["layers", "-m", p(&annotated), "-c", "256", "--json"])).unwrap();
    assert_eq!(json["layers"][1]["type_k"], "q4_0");
    assert!(json["profile"].as_str().unwrap().contains("test-mixed"));

    // explicit -ctk/-ctv win over the embedded profile, and the tool says so
    let out = kvtuner(&["layers", "-m", p(&annotated), "-c", "256", "-ctk", "q8_0", "-ctv", "q8_0", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not applied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for layer in json["layers"].as_array().unwrap() {
        assert_eq!((layer["type_k"].as_str(), layer["type_v"].as_str()), (Some("q8_0"), Some("q8_0")), "{layer}");
    }
    assert!(json["profile"].as_str().unwrap().contains("-ctk/-ctv given"), "{json}");
    // with a profile file they contradict each other: refused, saying how to choose
    let out = kvtuner(&["layers", "-m", p(&annotated), "--kv-profile", p(&profile_path), "-ctk", "q8_0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--kv-profile off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kvtuner's reader and the runtime (patch 0003) accept and refuse the same type names and
/// schema versions: one rule on both sides.
#[test]
fn type_names_and_schema_versions_get_the_same_verdict_in_rust_and_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = common::tiny_model(dir.path(), 4, "synthetic-names");
    let names = |n: [&str; 4]| Value::str_array(n);
    let schema = |v: Value| Some(v);
    let cases: Vec<(&str, Value, Option<Value>, bool)> = vec![
        ("lower", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::U32(1)), true),
        ("upper", names(["Q8_0", "q4_0", "F16", "IQ4_NL"]), schema(Value::U32(1)), true),
        ("wide types", names(["f32", "bf16", "q5_1", "q4_1"]), schema(Value::U32(1)), true),
        ("leading space", names([" q8_0", "q4_0", "f16", "q5_0"]), schema(Value::U32(1)), false),
        ("trailing newline", names(["q8_0\n", "q4_0", "f16", "q5_0"]), schema(Value::U32(1)), false),
        ("weight-only type", names(["q8_0", "q4_k", "f16", "q5_0"]), schema(Value::U32(1)), false),
        ("schema as u8", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::U8(1)), true),
        ("schema as i64", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::I64(1)), true),
        ("schema missing", names(["q8_0", "q4_0", "f16", "q5_0"]), None, false),
        ("schema 0", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::U32(0)), false),
        ("schema 2", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::U32(2)), false),
        ("schema -1", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::I32(-1)), false),
        ("schema as string", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::String("1".into())), false),
        ("schema as float", names(["q8_0", "q4_0", "f16", "q5_0"]), schema(Value::F32(1.0)), false),
    ];
    for (i, (case, type_k, version, accepted)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case-{i}.gguf"));
        let mut edits = MetadataEdits::new()
            .set("kvtuner.profile.name", Value::String(case.into()))
            .set("kvtuner.cache.type_k", type_k)
            .set("kvtuner.cache.type_v", Value::str_array(["q4_0"; 4]));
        if let Some(v) = version {
            edits = edits.set("kvtuner.schema_version", v);
        }
        gguf::rewrite(&model_path, &path, &edits, &mut |_, _| {}).unwrap();
        let embedded = kvtuner::profile::EmbeddedProfile::from_header(&gguf::read_header(&path).unwrap()).unwrap();
        let rust_accepts = embedded.problems.is_empty();
        let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
        let base = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, ..Default::default() };
        let got = applied(&model, &base);
        let runtime_accepts = got != vec![(CacheType::F16, CacheType::F16); 4];
        assert_eq!(rust_accepts, accepted, "{case}: kvtuner's reader ({:?})", embedded.problems);
        assert_eq!(runtime_accepts, accepted, "{case}: the runtime applied {got:?}");
        if accepted {
            let want: Vec<_> = embedded.layers.iter().map(|(k, v)| (k.unwrap(), v.unwrap())).collect();
            assert_eq!(got, want, "{case}: the same types on both sides");
        }
    }
}

#[test]
fn malformed_embedded_profiles_fall_back_to_uniform_types() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = common::tiny_model(dir.path(), 4, "synthetic-bad");
    let cases = [
        ("short", Value::str_array(["q8_0", "q8_0", "q8_0"]), "has 3 entries"),
        ("unknown", Value::str_array(["q8_0", "q3_k", "q8_0", "q8_0"]), "\"q3_k\" is not a KV cache type"),
        ("numbers", Value::i32_array([8, 8, 8, 8]), "not an array of strings"),
    ];
    for (name, value, problem) in cases {
        let bad = dir.path().join(format!("{name}.gguf"));
        let edits = MetadataEdits::new()
            .set("kvtuner.schema_version", Value::U32(1))
            .set("kvtuner.profile.name", Value::String(name.into()))
            .set("kvtuner.cache.type_k", value)
            .set("kvtuner.cache.type_v", Value::str_array(["q4_0"; 4]));
        gguf::rewrite(&model_path, &bad, &edits, &mut |_, _| {}).unwrap();
        let model = Model::load(Backend::init(), &bad, &ModelParams::default()).unwrap();
        let base = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, ..Default::default() };
        assert_eq!(applied(&model, &base), vec![(CacheType::F16, CacheType::F16); 4], "{name}: uniform fallback");
        let inspect = ok(&["inspect", p(&bad)]);
        assert!(inspect.contains(problem), "{name}: inspect should say `{problem}`:\n{inspect}");
        // what the runtime applied, read back from it, and said once
        let out = kvtuner(&["layers", "-m", p(&bad), "-c", "256", "--json"]);
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(json["profile"].as_str().unwrap().contains("was not applied"), "{name}: {json}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.matches("warning: the profile").count(), 1, "{name}: {err}");
        assert!(err.contains(problem), "{name}: {err}");
    }
}

#[test]
fn a_profile_for_another_model_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::synth_model(
        dir.path(),
        &kvtuner::synth::SynthSpec { n_layer: 4, seed: 1, name: "model-a".into(), ..kvtuner::synth::SynthSpec::tiny() },
    );
    let b = common::synth_model(
        dir.path(),
        &kvtuner::synth::SynthSpec {
            n_layer: 4,
            n_ff: 320,
            seed: 2,
            name: "model-b".into(),
            ..kvtuner::synth::SynthSpec::tiny()
        },
    );
    let (profile, _) = mixed_profile(&a, dir.path());
    let out = dir.path().join("out.gguf");
    let res = kvtuner(&["annotate", p(&b), "--profile", p(&profile), "-o", p(&out)]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("does not match this model") && err.contains("fingerprint"), "{err}");
    assert!(!out.exists(), "no output on refusal");
    ok(&["annotate", p(&b), "--profile", p(&profile), "-o", p(&out), "--force"]);
    assert!(out.exists());

    let c = common::tiny_model(dir.path(), 3, "model-c");
    let res = kvtuner(&["annotate", p(&c), "--profile", p(&profile), "-o", p(&dir.path().join("c.gguf")), "--force"]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("4 layers but the model has 3"));
}

/// Each layer's recent window as the runtime reports it: (positions, K type, V type).
fn applied_windows(model: &Model, params: &ContextParams) -> Vec<(u32, Option<CacheType>, Option<CacheType>)> {
    let ctx = Context::new(model, params).unwrap();
    ctx.layers().into_iter().map(|i| i.map(|i| (i.window, i.type_k_window, i.type_v_window)).unwrap()).collect()
}

/// A profile's recent window travels in the GGUF (kvtuner.cache.window…) and the runtime applies it
/// with the types (patch 0017); a window of the caller's wins; a malformed or unusable one makes the
/// runtime ignore the whole profile, with the verdict kvtuner's reader gives too.
#[test]
fn an_embedded_recent_window_is_applied_with_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = common::tiny_model(dir.path(), 6, "synthetic-window");
    let (_, mut profile) = mixed_profile(&model_path, dir.path());
    profile.window = Some(kvtuner::profile::ProfileWindow {
        size: 32,
        k: CacheType::F16,
        v: CacheType::Q8_0,
        layers: Some(vec![0, 2, 3]),
        sinks: 4,
    });
    let profile_path = dir.path().join("window.yaml");
    profile.save(&profile_path).unwrap();
    assert_eq!(Profile::load(&profile_path).unwrap(), profile, "the window survives the YAML");
    let annotated = dir.path().join("annotated.gguf");
    ok(&["annotate", p(&model_path), "--profile", p(&profile_path), "-o", p(&annotated)]);

    let header = gguf::read_header(&annotated).unwrap();
    let embedded = kvtuner::profile::EmbeddedProfile::from_header(&header).unwrap();
    assert!(embedded.problems.is_empty(), "{:?}", embedded.problems);
    let window = embedded.window.as_ref().expect("the reader sees the window");
    assert_eq!(
        (window.layers.as_slice(), window.k, window.v, window.sinks),
        (&[32, 0, 32, 32, 0, 0][..], Some(CacheType::F16), Some(CacheType::Q8_0), 4)
    );

    let model = Model::load(Backend::init(), &annotated, &ModelParams::default()).unwrap();
    let base = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, ..Default::default() };
    let want: Vec<_> = profile.layers.iter().map(|l| (l.k, l.v)).collect();
    assert_eq!(applied(&model, &base), want, "the profile's types");
    let with = (32, Some(CacheType::F16), Some(CacheType::Q8_0));
    assert_eq!(
        applied_windows(&model, &base),
        vec![with, (0, None, None), with, with, (0, None, None), (0, None, None)]
    );
    // with its sinks (patch 0022)
    let ctx = Context::new(&model, &base).unwrap();
    let sinks: Vec<u32> = ctx.layers().into_iter().map(|i| i.unwrap().window_sinks).collect();
    assert_eq!(sinks, [4, 0, 4, 4, 0, 0]);
    drop(ctx);
    // a window of the caller's wins over the profile's (its types stay)
    let own =
        ContextParams { window: Some(kvtuner::llama::RecentWindow::uniform(6, 16, CacheType::F16)), ..base.clone() };
    assert_eq!(applied(&model, &own), want);
    assert!(applied_windows(&model, &own).iter().all(|w| *w == (16, Some(CacheType::F16), Some(CacheType::F16))));
    // flash attention off: the window cannot be honoured, so the profile is not applied at all
    let fa_off = ContextParams { flash_attn: kvtuner::llama::FlashAttn::Off, ..base.clone() };
    assert_eq!(applied(&model, &fa_off), vec![(CacheType::F16, CacheType::F16); 6]);
    assert!(applied_windows(&model, &fa_off).iter().all(|w| w.0 == 0));

    // the binary reports it: per layer (layers), as the profile's (inspect), with its bytes
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["layers", "-m", p(&annotated), "-c", "256", "--json"])).unwrap();
    assert_eq!(json["layers"][2]["window"], 32);
    assert_eq!(json["layers"][1]["window"], 0);
    assert!(json["layers"][0]["bytes_window"].as_u64().unwrap() > 0);
    let text = ok(&["inspect", p(&annotated)]);
    assert!(text.contains("recent window  w32+s4 f16/q8_0 on 3 of 6 layers"), "{text}");

    // malformed windows: kvtuner's reader and the runtime give the same verdict
    let cases = [
        ("short", "kvtuner.cache.window", Value::u32_array([32, 32]), "has 2 entries"),
        ("negative", "kvtuner.cache.window", Value::i32_array([32, -1, 0, 0, 0, 0]), "non-negative"),
        ("two sizes", "kvtuner.cache.window", Value::u32_array([32, 64, 0, 0, 0, 0]), "several sizes"),
        ("narrow", "kvtuner.cache.window_type_k", Value::String("q4_0".into()), "not a window type"),
        ("unknown", "kvtuner.cache.window_type_v", Value::String("f8".into()), "not a window type"),
        ("sinks", "kvtuner.cache.window_sinks", Value::I32(-4), "window_sinks is not a non-negative"),
    ];
    for (name, key, value, problem) in cases {
        let bad = dir.path().join(format!("bad-{name}.gguf"));
        let edits = MetadataEdits::new().set(key, value);
        gguf::rewrite(&annotated, &bad, &edits, &mut |_, _| {}).unwrap();
        let embedded = kvtuner::profile::EmbeddedProfile::from_header(&gguf::read_header(&bad).unwrap()).unwrap();
        assert!(embedded.problems.iter().any(|e| e.contains(problem)), "{name}: {:?}", embedded.problems);
        let model = Model::load(Backend::init(), &bad, &ModelParams::default()).unwrap();
        assert_eq!(applied(&model, &base), vec![(CacheType::F16, CacheType::F16); 6], "{name}: uniform fallback");
        assert!(applied_windows(&model, &base).iter().all(|w| w.0 == 0), "{name}: no window");
    }
    // a type key removed
    let bad = dir.path().join("bad-missing.gguf");
    gguf::rewrite(&annotated, &bad, &MetadataEdits::new().remove_key("kvtuner.cache.window_type_v"), &mut |_, _| {})
        .unwrap();
    let embedded = kvtuner::profile::EmbeddedProfile::from_header(&gguf::read_header(&bad).unwrap()).unwrap();
    assert!(embedded.problems.iter().any(|e| e.contains("window_type_v is missing")), "{:?}", embedded.problems);
    let model = Model::load(Backend::init(), &bad, &ModelParams::default()).unwrap();
    assert_eq!(applied(&model, &base), vec![(CacheType::F16, CacheType::F16); 6], "missing type: uniform fallback");
}

fn applied_keys(model: &Model, params: &ContextParams) -> Vec<(bool, bool)> {
    let ctx = Context::new(model, params).unwrap();
    ctx.layers().into_iter().map(|i| i.map(|i| (i.k_shifted, i.k_scaled)).unwrap()).collect()
}

/// A profile's key treatment: `annotate` measures the keys on the profile's text and writes the
/// shift and scale (kvtuner.cache.key_shift / key_scale); the runtime applies them with the types
/// (patch 0020); malformed or unusable arrays make it ignore the whole profile, and `applied_profile`
/// says so.
#[test]
fn an_embedded_key_shift_and_scale_are_applied_with_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = common::tiny_model(dir.path(), 6, "synthetic-keys");
    let (_, mut profile) = mixed_profile(&model_path, dir.path());
    let text = dir.path().join("keys.txt");
    std::fs::write(&text, "The keys are measured on this text, which is long enough to hold many tokens. ".repeat(40))
        .unwrap();
    profile.keys = Some(kvtuner::profile::ProfileKeys::shift_and_scale(p(&text)));
    let profile_path = dir.path().join("keys.yaml");
    profile.save(&profile_path).unwrap();
    assert_eq!(Profile::load(&profile_path).unwrap(), profile, "the keys survive the YAML");
    assert!(profile.summary().contains("keys: shift + scale std^0.5"), "{}", profile.summary());
    let annotated = dir.path().join("annotated.gguf");
    ok(&["annotate", p(&model_path), "--profile", p(&profile_path), "-o", p(&annotated)]);

    let header = gguf::read_header(&annotated).unwrap();
    let embedded = kvtuner::profile::EmbeddedProfile::from_header(&header).unwrap();
    assert!(embedded.problems.is_empty(), "{:?}", embedded.problems);
    let keys = embedded.keys.as_ref().expect("the reader sees the keys");
    assert!(keys.shift && keys.scale && keys.text.as_deref().is_some_and(|t| t.contains("keys.txt")), "{keys:?}");
    let Some(Value::Array(_, scale)) = header.get("kvtuner.cache.key_scale") else { panic!("no key scale array") };
    assert!(scale.iter().all(|v| matches!(v, Value::F32(x) if *x > 0.0)));

    let model = Model::load(Backend::init(), &annotated, &ModelParams::default()).unwrap();
    let base = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, ..Default::default() };
    let want: Vec<_> = profile.layers.iter().map(|l| (l.k, l.v)).collect();
    assert_eq!(applied(&model, &base), want, "the profile's types");
    assert_eq!(applied_keys(&model, &base), vec![(true, true); 6], "the profile's shift and scale");
    let off = ContextParams { no_kv_profile: true, ..base.clone() };
    assert_eq!(applied_keys(&model, &off), vec![(false, false); 6], "no profile, no keys");
    // the binary reports them: per layer (layers) and as the profile's (inspect)
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["layers", "-m", p(&annotated), "-c", "256", "--json"])).unwrap();
    assert_eq!((&json["layers"][3]["k_shifted"], &json["layers"][3]["k_scaled"]), (&true.into(), &true.into()));
    let text = ok(&["inspect", p(&annotated)]);
    assert!(text.contains("keys           shift + scale per layer (measured on"), "{text}");

    // malformed or unusable arrays: the runtime ignores the whole profile (uniform, no keys); the
    // reader names the malformed ones, the runtime the ones it cannot use (wrong length)
    let n = scale.len();
    let cases = [
        ("not floats", "kvtuner.cache.key_shift", Value::u32_array(vec![0; n]), Some("not an array of 32-bit floats")),
        ("zero scale", "kvtuner.cache.key_scale", Value::f32_array(vec![0.0; n]), Some("not a finite positive number")),
        ("nan shift", "kvtuner.cache.key_shift", Value::f32_array(vec![f32::NAN; n]), Some("is not finite")),
        ("short", "kvtuner.cache.key_scale", Value::f32_array(vec![1.0; n - 1]), None),
    ];
    for (name, key, value, problem) in cases {
        let bad = dir.path().join(format!("bad-keys-{}.gguf", name.replace(' ', "-")));
        gguf::rewrite(&annotated, &bad, &MetadataEdits::new().set(key, value), &mut |_, _| {}).unwrap();
        let embedded = kvtuner::profile::EmbeddedProfile::from_header(&gguf::read_header(&bad).unwrap()).unwrap();
        match problem {
            Some(problem) => {
                assert!(embedded.problems.iter().any(|e| e.contains(problem)), "{name}: {:?}", embedded.problems)
            }
            None => assert!(embedded.problems.is_empty(), "{name}: {:?}", embedded.problems),
        }
        let model = Model::load(Backend::init(), &bad, &ModelParams::default()).unwrap();
        assert_eq!(applied(&model, &base), vec![(CacheType::F16, CacheType::F16); 6], "{name}: uniform fallback");
        assert_eq!(applied_keys(&model, &base), vec![(false, false); 6], "{name}: no keys");
    }
}
