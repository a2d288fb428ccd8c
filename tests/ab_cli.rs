//! `kvtuner ab` end to end on a small synthetic model.

mod common;

use common::kvtuner;

#[test]
fn ab_prints_a_table_writes_json_and_svg_and_repeats_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 4, "synthetic-ab");
    let text = common::eval_text_file(dir.path());
    let (json, svg) = (dir.path().join("ab.json"), dir.path().join("ab.svg"));
    let args = |json: &std::path::Path| {
        vec![
            "ab".to_string(),
            "-m".into(),
            model.to_str().unwrap().into(),
            "--text".into(),
            text.to_str().unwrap().into(),
            "-c".into(),
            "128".into(),
            "--chunks".into(),
            "2".into(),
            "--reps".into(),
            "1".into(),
            "--against".into(),
            "f16,q8_0,q4_0,q8_0/q4_0".into(),
            "--json".into(),
            json.to_str().unwrap().into(),
            "--plot".into(),
            svg.to_str().unwrap().into(),
        ]
    };
    let a: Vec<String> = args(&json);
    let out = kvtuner(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| config") && stdout.contains("q8_0/q4_0") && stdout.contains("pp512 @ d0"), "{stdout}");

    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        for field in
            ["name", "type_k", "type_v", "bits_per_value", "kv_bytes", "kld_mean", "kld_p99", "top1", "ppl", "speed"]
        {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
        assert_eq!(r["type_k"].as_array().unwrap().len(), 4);
    }
    assert_eq!(rows[0]["name"], "f16");
    // the baseline against itself: the noise floor (f32 probabilities leave ~1e-9)
    assert!(rows[0]["kld_mean"].as_f64().unwrap() < 1e-6, "{}", rows[0]);
    assert_eq!(rows[0]["top1"], 1.0);
    assert!(rows[3]["bits_per_value"].as_f64().unwrap() == 6.5);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("q8_0/q4_0"));

    // Same command again: identical quality numbers.
    let json2 = dir.path().join("ab2.json");
    let a2: Vec<String> = args(&json2);
    assert!(kvtuner(&a2.iter().map(String::as_str).collect::<Vec<_>>()).status.success());
    let rows2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json2).unwrap()).unwrap();
    for (x, y) in rows.iter().zip(rows2.as_array().unwrap()) {
        for field in ["kld_mean", "kld_p99", "top1", "ppl"] {
            assert_eq!(x[field], y[field], "{field} of {}", x["name"]);
        }
    }
}

#[test]
fn ab_rejects_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 4, "synthetic-ab-bad");
    let m = model.to_str().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let err = |args: &[&str]| {
        let out = kvtuner(args);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&["ab", "-m", m, "--text", short.to_str().unwrap(), "-c", "128", "--no-speed"]);
    assert!(e.contains("fewer than one chunk"), "{e}");
    let e = err(&["ab", "-m", m, "--text", short.to_str().unwrap(), "--against", "q3_k", "--no-speed"]);
    assert!(e.contains("q3_k"), "{e}");

    let other = common::synth_model(
        dir.path(),
        &kvtuner::synth::SynthSpec {
            n_layer: 4,
            seed: 9,
            n_ff: 320,
            name: "other".into(),
            ..kvtuner::synth::SynthSpec::tiny()
        },
    );
    let identity = kvtuner::profile::ModelIdentity::from_header(&kvtuner::gguf::read_header(&other).unwrap()).unwrap();
    let profile = kvtuner::profile::Profile::uniform(
        &identity,
        kvtuner::cache_type::CacheType::Q8_0,
        kvtuner::cache_type::CacheType::Q4_0,
        "for-other",
    );
    let p = dir.path().join("other.yaml");
    profile.save(&p).unwrap();
    let text = common::eval_text_file(dir.path());
    let e = err(&["ab", "-m", m, "--text", text.to_str().unwrap(), "--profile", p.to_str().unwrap(), "--no-speed"]);
    assert!(e.contains("does not fit") && e.contains("fingerprint"), "{e}");
}

/// `--eval-ubatch 1` scores every position through single-token decodes: the same positions and
/// baseline as a whole-chunk batch, with KLDs of the same size (the kernels differ, so the values
/// are close, not equal); 0 is refused.
#[test]
fn ab_eval_ubatch_one_scores_token_by_token() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 2, "synthetic-ub");
    let text = common::eval_text_file(dir.path());
    let run = |ubatch: &str, json: &std::path::Path| {
        kvtuner(&[
            "ab",
            "-m",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "-c",
            "128",
            "--chunks",
            "1",
            "--no-speed",
            "--against",
            "f16,q4_0",
            "--eval-ubatch",
            ubatch,
            "--json",
            json.to_str().unwrap(),
        ])
    };
    let kld = |json: &std::path::Path| -> Vec<f64> {
        let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        rows.as_array().unwrap().iter().map(|r| r["kld_mean"].as_f64().unwrap()).collect()
    };
    let (batched, single) = (dir.path().join("b.json"), dir.path().join("s.json"));
    assert!(run("512", &batched).status.success());
    let out = run("1", &single);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (b, s) = (kld(&batched), kld(&single));
    assert!(b[0] < 1e-6 && s[0] < 1e-6, "baselines against themselves: {b:?} {s:?}");
    assert!(s[1] > 0.0 && (s[1] / b[1] - 1.0).abs() < 0.25, "q4_0 KLD batched {} vs token by token {}", b[1], s[1]);
    let out = run("0", &single);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("eval-ubatch"));
}

/// `--parallel N` adds tg128 with N sequences decoding at once, per depth: aggregate and
/// per-sequence rates (aggregate = N × per-sequence), in the table and the JSON; `--draft N` adds
/// drafts of N tokens of one sequence per step. Sizes are read at the speed runs' context.
#[test]
fn ab_parallel_and_draft_report_their_rates() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 2, "synthetic-np");
    let json = dir.path().join("np.json");
    let out = kvtuner(&[
        "ab",
        "-m",
        model.to_str().unwrap(),
        "--no-quality",
        "--depths",
        "0,64",
        "-np",
        "2,4",
        "--draft",
        "3,8",
        "--reps",
        "1",
        "-t",
        "1",
        "--against",
        "f16,q8_0/kv2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tg128 ×4 @ d64 (all / each)") && stdout.contains("draft 8 @ d64 (tok/s)"), "{stdout}");
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for row in rows.as_array().unwrap() {
        // without quality runs the sizes are the speed runs' (64 deep + 33 draft steps of 8,
        // rounded to 256 cells), not -c's
        assert_eq!(row["size_cells"].as_u64(), Some(768), "{row}");
        for speed in row["speed"].as_array().unwrap() {
            let par = speed["parallel"].as_array().unwrap();
            assert_eq!(par.len(), 2, "{speed}");
            for (p, n) in par.iter().zip([2.0, 4.0]) {
                assert_eq!(p["n_seq"].as_f64(), Some(n));
                let (all, each) =
                    (p["aggregate"]["median"].as_f64().unwrap(), p["per_sequence"]["median"].as_f64().unwrap());
                assert!(all > 0.0 && (all - n * each).abs() < 1e-6 * all, "{p}");
            }
            let drafts = speed["draft"].as_array().unwrap();
            assert_eq!(drafts.iter().map(|d| d["n_draft"].as_u64().unwrap()).collect::<Vec<_>>(), [3, 8], "{speed}");
            assert!(drafts.iter().all(|d| d["tokens_per_s"]["median"].as_f64().unwrap() > 0.0), "{speed}");
        }
    }
}
