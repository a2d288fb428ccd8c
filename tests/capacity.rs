//! `kvtuner capacity`: slots within a KV budget, checked against the runtime's own sizes, and the
//! decode measured with all of them.

mod common;

use common::kvtuner;
use kvtuner::cache_type::CacheType;
use kvtuner::kv_layout::Sizer;

const SLOT_CTX: u32 = 256;

/// KV tensor bytes of `n` slots of SLOT_CTX tokens with one type everywhere, as the runtime sizes
/// them (independently of the command under test).
fn sized(sizer: &Sizer, n_layer: usize, ty: CacheType, n: u32) -> u64 {
    sizer.kv_sequences(&vec![(ty, ty); n_layer], n * SLOT_CTX, n).unwrap().tensor_bytes
}

fn run_capacity(model: &std::path::Path, budget: u64, json: &std::path::Path) -> std::process::Output {
    kvtuner(&[
        "capacity",
        "-m",
        model.to_str().unwrap(),
        "--kv-budget",
        &budget.to_string(),
        "-c",
        &SLOT_CTX.to_string(),
        "--depth",
        "64",
        "--max-slots",
        "64",
        "--against",
        "f16,q8_0,q4_0",
        "-t",
        "1",
        "--json",
        json.to_str().unwrap(),
    ])
}

#[test]
fn capacity_fills_the_budget_with_as_many_slots_as_the_runtime_fits() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 4, "synthetic-capacity");
    let sizer = Sizer::new(&model).unwrap();
    // three and a half f16 slots
    let budget = sized(&sizer, 4, CacheType::F16, 1) * 7 / 2;
    let json = dir.path().join("capacity.json");
    let out = run_capacity(&model, budget, &json);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| config") && stdout.contains("slots vs base") && stdout.contains("q4_0"), "{stdout}");

    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let mut slots = Vec::new();
    for (r, ty) in rows.iter().zip([CacheType::F16, CacheType::Q8_0, CacheType::Q4_0]) {
        let cap = &r["capacity"];
        let n = cap["slots"].as_u64().unwrap() as u32;
        // the largest count within the budget, by the runtime's sizes: n fits, n + 1 does not
        assert!(n >= 1, "{r}");
        assert!(sized(&sizer, 4, ty, n) <= budget, "{ty}: {n} slots exceed the budget: {r}");
        assert!(sized(&sizer, 4, ty, n + 1) > budget, "{ty}: {} slots would fit too: {r}", n + 1);
        // what the real context allocated is read back and within the budget
        let allocated = cap["kv_bytes"].as_u64().unwrap();
        assert!(allocated > 0 && allocated <= budget, "{r}");
        // every slot decoded: one token per slot per timed step
        assert_eq!(cap["speed"]["n_seq"].as_u64().unwrap() as u32, n, "{r}");
        assert_eq!(cap["speed"]["generated_tokens"].as_u64().unwrap() as u32, n * 128, "{r}");
        assert!(r["aggregate"]["median"].as_f64().unwrap() > 0.0, "{r}");
        slots.push(n);
    }
    assert_eq!(slots[0], 3, "three and a half f16 slots hold three");
    assert!(slots[1] > slots[0] && slots[2] > slots[1], "narrower caches hold more slots: {slots:?}");
}

#[test]
fn capacity_reports_zero_slots_when_one_does_not_fit_and_rejects_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 4, "synthetic-capacity-small");
    let sizer = Sizer::new(&model).unwrap();
    // below one f16 slot, above one q4_0 slot
    let budget = sized(&sizer, 4, CacheType::F16, 1) / 2;
    let json = dir.path().join("capacity.json");
    let out = run_capacity(&model, budget, &json);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows[0]["capacity"]["slots"], 0, "{}", rows[0]);
    assert!(rows[0]["capacity"]["speed"].is_null() && rows[0]["aggregate"].is_null());
    assert!(rows[2]["capacity"]["slots"].as_u64().unwrap() >= 1, "{}", rows[2]);

    let out = kvtuner(&["capacity", "-m", model.to_str().unwrap(), "--kv-budget", "12 parsecs"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("12 parsecs") && stderr.contains("GiB"), "{stderr}");
}
