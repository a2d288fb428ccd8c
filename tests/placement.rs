//! Issue 24: memory per device read back from the runtime (patch 0002), and `kvtuner fit`, with
//! an `rpc-server` on 127.0.0.1 as the offload device (this machine has no GPU).

mod common;

use common::RpcServer;
use kvtuner::cache_type::CacheType;
use kvtuner::kv_layout::Sizer;
use kvtuner::llama::{rpc, Backend, BufferMemory, Context, ContextParams, FlashAttn, Model, ModelParams};
use kvtuner::placement;
use kvtuner::profile::Profile;

const N_LAYER: u32 = 4;
const N_CTX: u32 = 256;

/// llama.cpp's rule for the layers `-ngl ngl` offloads (negative: all): i_gpu_start =
/// max(n_layer + 1 - ngl, 0), the "+ 1" being the output layer. An oracle independent of the
/// devices kvtuner reads back.
fn offloaded_layers(n_layer: usize, ngl: i32) -> std::ops::Range<usize> {
    let ngl = if ngl < 0 { n_layer + 1 } else { ngl as usize };
    (n_layer + 1).saturating_sub(ngl).min(n_layer)..n_layer
}

fn ctx_params() -> ContextParams {
    ContextParams {
        n_ctx: N_CTX,
        n_batch: N_CTX,
        n_ubatch: N_CTX,
        n_threads: 1,
        flash_attn: FlashAttn::On,
        no_kv_profile: true,
        ..Default::default()
    }
}

/// The offload device's entry (not host memory).
fn offload(memory: &[BufferMemory]) -> BufferMemory {
    let off: Vec<_> = memory.iter().filter(|m| !m.is_host).cloned().collect();
    assert_eq!(off.len(), 1, "one offload buffer type: {memory:?}");
    off[0].clone()
}

#[test]
fn memory_per_device_is_what_a_real_context_allocates() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), N_LAYER, "synthetic-placement");
    let server = RpcServer::start();
    let backend = Backend::init();
    let devices = rpc::add_servers(backend, std::slice::from_ref(&server.endpoint)).unwrap();
    let mut previous = 0;
    for ngl in [1, 3, N_LAYER as i32 + 1] {
        let load = |metadata_only| {
            let params = ModelParams { n_gpu_layers: ngl, metadata_only, rpc: devices.clone(), ..Default::default() };
            Model::load(backend, &path, &params).unwrap()
        };
        let (meta, real) = (load(true), load(false));
        let sized = offload(&Context::new(&meta, &ctx_params()).unwrap().memory());
        let ctx = Context::new(&real, &ctx_params()).unwrap();
        let allocated = offload(&ctx.memory());
        assert!(allocated.device.starts_with("RPC"), "{allocated:?}");
        // what the metadata-only model says the runtime would allocate is what it allocates
        assert_eq!((sized.model, sized.context), (allocated.model, allocated.context), "-ngl {ngl}");
        assert!(allocated.model > previous, "-ngl {ngl}: more layers, more weights on the device");
        previous = allocated.model;
        // the KV bytes on the device are those of the layers llama.cpp put there, and those
        // layers are the ones llama.cpp's rule names (and the ones offload_costs reads back)
        let layers = ctx.layers();
        let on_device: Vec<usize> =
            (0..N_LAYER as usize).filter(|&il| layers[il].unwrap().device.as_str().starts_with("RPC")).collect();
        assert_eq!(on_device, offloaded_layers(N_LAYER as usize, ngl).collect::<Vec<_>>(), "-ngl {ngl}");
        let cost = placement::offload_costs(&path, &devices, &[ngl], N_CTX).unwrap().remove(0);
        let read_back: Vec<usize> = cost.per_device.iter().flat_map(|d| d.layers.clone()).collect();
        assert_eq!(read_back, on_device, "-ngl {ngl}: the layers offload_costs reads back");
        let kv: u64 = on_device.iter().map(|&il| layers[il].unwrap().bytes_k + layers[il].unwrap().bytes_v).sum();
        assert_eq!(allocated.context, kv, "-ngl {ngl}");
    }
}

#[test]
fn fit_puts_more_layers_on_the_device_than_f16_within_the_same_budget() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let (path, identity, sens) = common::calibrated_tiny(dir.path(), N_LAYER, "synthetic-fit");

    let server = RpcServer::start();
    let devices = rpc::add_servers(Backend::init(), std::slice::from_ref(&server.endpoint)).unwrap();
    // budget: everything but the KV cache at -ngl all, plus 60% of an all-f16 cache (q8_0 fits)
    let all = N_LAYER as i32 + 1;
    let cost = &placement::offload_costs(&path, &devices, &[all], N_CTX).unwrap()[0];
    let f16_kv =
        Sizer::new(&path).unwrap().kv(&vec![(CacheType::F16, CacheType::F16); N_LAYER as usize], N_CTX).unwrap();
    let budget = cost.model_bytes + cost.compute_bytes + f16_kv.tensor_bytes * 6 / 10;

    let out = dir.path().join("fit.yaml");
    let fit = |vram: &str, extra: &[&str]| {
        let ctx = N_CTX.to_string();
        let mut args = vec!["fit", sens.to_str().unwrap(), "-m", path.to_str().unwrap(), "--vram", vram, "-c", &ctx];
        args.extend(["--rpc", &server.endpoint]);
        args.extend(extra);
        common::kvtuner(&args)
    };
    let run = fit(&budget.to_string(), &["--json", "-o", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["chosen_ngl"], all, "{json}");
    let placements = json["placements"].as_array().unwrap();
    assert_eq!(placements.len(), N_LAYER as usize + 2, "-ngl 0 ..= n_layer + 1");
    let chosen = &placements[all as usize];
    assert_eq!(chosen["offloaded_cache_layers"], N_LAYER);
    // the device's share is within the budget: weights + compute (read back) + the chosen KV
    let used = chosen["cost"]["model_bytes"].as_u64().unwrap()
        + chosen["cost"]["compute_bytes"].as_u64().unwrap()
        + chosen["offloaded_kv_bytes"].as_u64().unwrap();
    assert!(used <= budget, "{used} > {budget}");
    // uniform f16 fits fewer layers on the device, in the same budget
    let f16 = json["uniform"].as_array().unwrap().iter().find(|u| u["k"] == "f16").unwrap();
    assert!(
        f16["placement"]["offloaded_cache_layers"].as_u64().unwrap() < N_LAYER as u64,
        "an all-f16 cache does not fit: {f16}"
    );
    // the written profile is the chosen assignment, for this model
    let profile = Profile::load(out.to_str().unwrap()).unwrap();
    profile.check_model(&identity).unwrap();
    let chosen_types: Vec<(String, String)> = chosen["assignment"]["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t[0].as_str().unwrap().to_string(), t[1].as_str().unwrap().to_string()))
        .collect();
    let written: Vec<(String, String)> = profile.layers.iter().map(|l| (l.k.to_string(), l.v.to_string())).collect();
    assert_eq!(written, chosen_types);
    assert!(
        profile.layers.iter().all(|l| l.k != CacheType::F16 || l.v != CacheType::F16),
        "f16 everywhere does not fit"
    );

    // --text: the pick measured against every GPU pair that, uniform on the device's layers, fits
    // the same budget at the same -ngl; the lowest measured KLD is kept and written, and the
    // held-out text only reports
    let measured_out = dir.path().join("fit-measured.yaml");
    let out_arg = measured_out.to_str().unwrap();
    let measure_args = ["--text", "lee-calibration", "--verify", "lee-evaluation", "--chunks", "1", "-t", "1"];
    let run = fit(&budget.to_string(), &[&["--json", "-o", out_arg][..], &measure_args[..]].concat());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let measured = &json["measured"];
    let considered = measured["considered"].as_array().unwrap();
    let kld = |c: &serde_json::Value| c["summary"]["kld_mean"].as_f64().unwrap();
    let kinds: Vec<&str> = considered.iter().map(|c| c["origin"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "frontier").count(), 1, "{kinds:?}");
    // q8_0/q8_0, q8_0/q4_0 and q4_0/q4_0 fit 60% of an f16 cache; f16/q4_0 (64%) does not
    assert_eq!(kinds.iter().filter(|k| **k == "uniform").count(), 3, "{kinds:?}");
    let best = considered.iter().map(kld).fold(f64::INFINITY, f64::min);
    assert_eq!(kld(&measured["chosen"]), best, "the lowest measured KLD is chosen");
    let types = |t: &serde_json::Value| -> Vec<(String, String)> {
        t.as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into())).collect()
    };
    let profile = Profile::load(out_arg).unwrap();
    let written: Vec<(String, String)> = profile.layers.iter().map(|l| (l.k.to_string(), l.v.to_string())).collect();
    assert_eq!(written, types(&measured["chosen"]["types"]), "the measured choice is written");
    let held = &json["held_out"][0];
    // with what it measured: KLD on the calibration text, and on held-out text beside the uniform
    let recorded = profile.measured.as_ref().expect("measured numbers in the profile");
    assert_eq!(recorded.kld_calibration, Some(kld(&measured["chosen"])));
    assert_eq!(recorded.kld_mean, Some(kld(&held["chosen"])));
    assert_eq!(recorded.compared_uniform.as_ref().map(|u| u.kld_mean), Some(kld(&held["uniform"])));
    assert_eq!(held["uniform"]["label"], measured["best_uniform"]["label"]);
    assert!(held["text"].as_str().unwrap().contains("lee"), "{held}");
    // ab measures the written choice on the same text alike
    let ab_json = dir.path().join("ab.json");
    let rpc_args = ["--rpc", server.endpoint.as_str(), "-ngl", "99"];
    let mut ab = vec!["ab", "-m", path.to_str().unwrap(), "--text", "lee-calibration", "-c", "64", "--chunks", "1"];
    ab.extend([
        "--no-speed",
        "-t",
        "1",
        "--profile",
        out_arg,
        "--against",
        "q4_0",
        "--json",
        ab_json.to_str().unwrap(),
    ]);
    ab.extend(rpc_args);
    let run = common::kvtuner(&ab);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&ab_json).unwrap()).unwrap();
    let ab_kld = rows.as_array().unwrap().last().unwrap()["kld_mean"].as_f64().unwrap();
    assert_eq!(ab_kld, kld(&measured["chosen"]), "ab's KLD of the written choice: {rows}");

    // a budget below the device's weights at -ngl 1 leaves only -ngl 0, which is chosen
    let run = fit("1KiB", &[]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("over") && stdout.contains("← chosen"), "{stdout}");
}

/// `search --cpu-pairs`: the layers the runtime keeps on the CPU at -ngl take the CPU's pairs, the
/// offloaded ones (here on an rpc-server) `--pairs`.
#[test]
fn search_gives_cpu_layers_the_cpu_pairs() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let (path, _, sens) = common::calibrated_tiny(dir.path(), N_LAYER, "synthetic-search-devices");
    let text = common::eval_text_file(dir.path());
    let server = RpcServer::start();
    let out = dir.path().join("p.yaml");
    // -ngl 3 of 4 layers: layers 2 and 3 on the device (llama.cpp counts the output layer)
    let run = common::kvtuner(&[
        "search",
        sens.to_str().unwrap(),
        "-m",
        path.to_str().unwrap(),
        "-ngl",
        "3",
        "--rpc",
        &server.endpoint,
        "--pairs",
        "q4_0/q4_0",
        "--cpu-pairs",
        "f16/f16",
        "--budget",
        "16",
        "--text",
        text.to_str().unwrap(),
        "--chunks",
        "1",
        "-t",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("2 layer(s) on the CPU"), "{stderr}");
    let profile = Profile::load(out.to_str().unwrap()).unwrap();
    let types: Vec<(CacheType, CacheType)> = profile.layers.iter().map(|l| (l.k, l.v)).collect();
    let expected: Vec<(CacheType, CacheType)> = offloaded_layers(N_LAYER as usize, 3).fold(
        vec![(CacheType::F16, CacheType::F16); N_LAYER as usize],
        |mut t, il| {
            t[il] = (CacheType::Q4_0, CacheType::Q4_0);
            t
        },
    );
    // unless uniform f16 measured better (then the tool keeps uniform: also CPU-legal)
    assert!(types == expected || types.iter().all(|&t| t == (CacheType::F16, CacheType::F16)), "{types:?}");
}

/// Two offload devices (two rpc-servers): each device's layers must fit that device's own budget.
/// One device has room for f16 caches, the other for about 40% of them: the fit gives each its own
/// types, and a real context of the written profile allocates within each budget.
#[test]
fn fit_keeps_each_device_within_its_own_budget() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let (path, _, sens) = common::calibrated_tiny(dir.path(), N_LAYER, "synthetic-fit-2dev");
    let (a, b) = (RpcServer::start(), RpcServer::start());
    let endpoints = [a.endpoint.clone(), b.endpoint.clone()];
    let devices = rpc::add_servers(Backend::init(), &endpoints).unwrap();
    let all = N_LAYER as i32 + 1;
    let cost = placement::offload_costs(&path, &devices, &[all], N_CTX).unwrap().remove(0);
    assert_eq!(cost.per_device.len(), 2, "{cost:?}");
    let layers: Vec<usize> = cost.per_device.iter().flat_map(|d| d.layers.clone()).collect();
    assert_eq!(layers, (0..N_LAYER as usize).collect::<Vec<_>>(), "every layer on one of the devices, in order");
    let f16_layer = Sizer::new(&path)
        .unwrap()
        .kv(&vec![(CacheType::F16, CacheType::F16); N_LAYER as usize], N_CTX)
        .unwrap()
        .tensor_bytes
        / u64::from(N_LAYER);
    let fixed = |d: &placement::DeviceCost| d.model_bytes + d.compute_bytes;
    let (da, db) = (&cost.per_device[0], &cost.per_device[1]);
    let budget_a = fixed(da) + f16_layer * da.layers.len() as u64; // f16 fits
    let budget_b = fixed(db) + f16_layer * db.layers.len() as u64 * 4 / 10; // q4_0 fits, q8_0 does not
    let out = dir.path().join("fit-2dev.yaml");
    let vram = format!("{budget_a},{budget_b}");
    let ctx = N_CTX.to_string();
    let rpc_list = endpoints.join(",");
    let mut args = vec!["fit", sens.to_str().unwrap(), "-m", path.to_str().unwrap(), "-c", &ctx, "--rpc", &rpc_list];
    args.extend(["--vram", &vram, "--json", "-o", out.to_str().unwrap()]);
    let run = common::kvtuner(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["chosen_ngl"], all, "{json}");

    // each device's layers in types of their own: f16 where it fits, narrower where it does not
    let profile = Profile::load(out.to_str().unwrap()).unwrap();
    for &il in &da.layers {
        assert_eq!((profile.layers[il].k, profile.layers[il].v), (CacheType::F16, CacheType::F16), "layer {il}");
    }
    for &il in &db.layers {
        let l = &profile.layers[il];
        assert!(l.k.bits_per_value() + l.v.bits_per_value() <= 2.0 * 16.0 * 0.4, "layer {il}: {l:?}");
    }
    // a real context of the written profile allocates within each device's budget (in a block: an
    // rpc-server serves one client at a time, and the model's buffers keep this one connected)
    {
        let params = ModelParams { n_gpu_layers: all, rpc: devices, ..Default::default() };
        let model = Model::load(Backend::init(), &path, &params).unwrap();
        let types = kvtuner::llama::LayerCacheTypes::from_pairs(profile.layers.iter().map(|l| (l.k, l.v)));
        let real = Context::new(&model, &ContextParams { layer_types: Some(types), ..ctx_params() }).unwrap();
        let memory = real.memory();
        for (d, budget) in [(da, budget_a), (db, budget_b)] {
            let used: u64 = memory.iter().filter(|m| m.device == d.device).map(|m| m.total()).sum();
            assert!(used > 0 && used <= budget, "{}: {used} of {budget}", d.device);
        }
    }

    // one size is each device's; a count that is neither one nor the devices' is an error naming them
    let run = common::kvtuner(&[&args[..args.len() - 5], &["--vram", &budget_b.to_string(), "--json"][..]].concat());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let chosen = json["placements"].as_array().unwrap().iter().find(|p| p["ngl"] == json["chosen_ngl"]).unwrap();
    for d in chosen["per_device"].as_array().unwrap() {
        assert_eq!(d["budget"], budget_b, "{d}");
    }
    let run = common::kvtuner(&[&args[..args.len() - 5], &["--vram", "1GiB,2GiB,3GiB"][..]].concat());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("3 GPU memory sizes") && err.contains(&da.device), "{err}");
}
