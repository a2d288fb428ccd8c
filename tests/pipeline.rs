//! `tune`, `search -m` and `fit --text` share one pipeline: every profile any of them writes was
//! chosen against the uniform caches of its budget on the calibration text and measured again
//! before it was written, and says where it was measured. An `rpc-server` on 127.0.0.1 is the
//! offload device (this machine has no GPU).

mod common;

use std::path::Path;

use common::RpcServer;
use kvtuner::cache_type::CacheType;
use kvtuner::gguf;
use kvtuner::llama::Backend;
use kvtuner::placement;
use kvtuner::profile::Profile;

const N_LAYER: u32 = 4;

fn run(args: &[&str]) -> String {
    let out = common::kvtuner(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvtuner {}: {stderr}", args.join(" "));
    format!("{}{stderr}", String::from_utf8_lossy(&out.stdout))
}

/// The written profile was chosen by measurement against the best uniform cache of its budget
/// on the calibration text, and its own types were measured again and reproduced that KLD.
fn assert_chosen_by_measurement(path: &Path, command: &str, on: &str) -> Profile {
    let profile = Profile::load(path.to_str().unwrap()).unwrap();
    let m = profile.measured.as_ref().unwrap_or_else(|| panic!("{command}: no measurements recorded"));
    let kld = m.kld_calibration.unwrap_or_else(|| panic!("{command}: not measured on the calibration text"));
    assert_eq!(m.kld_confirmed, Some(kld), "{command}: the written types were not measured again");
    let uniform = m.uniform_calibration.as_ref().unwrap_or_else(|| panic!("{command}: no uniform comparison"));
    assert!(kld <= uniform.kld_mean, "{command}: {kld} is above the uniform cache {uniform:?}");
    let measured_on = m.measured_on.as_deref().unwrap_or_else(|| panic!("{command}: where it was measured"));
    assert!(measured_on.contains(on), "{command}: measured on {measured_on}, expected {on}");
    assert!(m.kld_mean.is_some() && m.compared_uniform.is_some(), "{command}: the held-out report is recorded");
    profile
}

#[test]
fn tune_search_and_fit_all_confirm_and_compare_with_uniform() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let (model, _, sens) = common::calibrated_tiny(dir.path(), N_LAYER, "synthetic-pipeline");
    let (m, s) = (model.to_str().unwrap(), sens.to_str().unwrap());
    let measure = ["--text", "lee-calibration", "--chunks", "1", "-t", "1"];

    // search -m, on the CPU
    let out = dir.path().join("search.yaml");
    let mut args = vec!["search", s, "-m", m, "--budget", "6.5", "--verify", "lee-evaluation", "-o"];
    args.push(out.to_str().unwrap());
    args.extend(measure);
    run(&args);
    assert_chosen_by_measurement(&out, "search", "CPU");

    // tune, on the CPU
    let tuned = dir.path().join("tuned.gguf");
    let mut args = vec!["tune", "-m", m, "--budget", "6.5", "--calib-ctx", "64", "--eval-chunks", "1", "-o"];
    args.push(tuned.to_str().unwrap());
    args.extend(measure);
    run(&args);
    let profile = assert_chosen_by_measurement(&dir.path().join("tuned.profile.yaml"), "tune", "CPU");
    let header = gguf::read_header(&tuned).unwrap();
    assert_eq!(header.get_str("kvtuner.profile.measured_on"), Some("CPU"), "the GGUF says where it was measured");
    assert_eq!(header.get_str("kvtuner.profile.name"), Some(profile.name.as_str()));

    // fit --text and tune --vram, with layers on an RPC device: a budget of everything but the
    // KV cache with every layer offloaded, plus 60% of an f16 cache at 256 tokens
    let server = RpcServer::start();
    let devices = kvtuner::llama::rpc::add_servers(Backend::init(), std::slice::from_ref(&server.endpoint)).unwrap();
    let cost = &placement::offload_costs(&model, &devices, &[N_LAYER as i32 + 1], 256).unwrap()[0];
    let f16_kv = cost.per_device[0].f16_kv_bytes;
    let budget = (cost.model_bytes + cost.compute_bytes + f16_kv * 6 / 10).to_string();
    let rpc = ["--rpc", server.endpoint.as_str(), "-c", "256", "--vram", &budget];

    let out = dir.path().join("fit.yaml");
    let mut args = vec!["fit", s, "-m", m, "--verify", "lee-evaluation", "-o", out.to_str().unwrap()];
    args.extend(measure);
    args.extend(rpc);
    run(&args);
    assert_chosen_by_measurement(&out, "fit", "RPC");

    let tuned = dir.path().join("tuned-vram.gguf");
    let mut args = vec!["tune", "-m", m, "--calib-ctx", "64", "--eval-chunks", "1", "-o", tuned.to_str().unwrap()];
    args.extend(measure);
    args.extend(rpc);
    let said = run(&args);
    let profile = assert_chosen_by_measurement(&dir.path().join("tuned-vram.profile.yaml"), "tune --vram", "RPC");
    assert!(said.contains(&format!("run it with -ngl {}", N_LAYER + 1)), "{said}");
    assert!(said.contains("cache layers on the GPU"), "the placement is reported: {said}");
    assert!(
        profile.layers.iter().all(|l| (l.k, l.v) != (CacheType::F16, CacheType::F16)),
        "an f16 cache does not fit the budget: {profile:?}"
    );
}
