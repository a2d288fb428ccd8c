//! ggml's RPC backend (issue 24): layers, with their per-layer cache types, on `kvtuner
//! rpc-server` processes on 127.0.0.1.

mod common;

use common::RpcServer as Server;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvtuner::cache_type::CacheType;
use kvtuner::llama::{rpc, Backend, Batch, Context, ContextParams, FlashAttn, LayerCacheTypes, Model, ModelParams};

fn mixed(n: usize) -> LayerCacheTypes {
    let cycle =
        [(CacheType::Q8_0, CacheType::Kv2), (CacheType::F16, CacheType::F16), (CacheType::Kv3, CacheType::Q4_0)];
    LayerCacheTypes::from_pairs((0..n).map(|i| cycle[i % 3]))
}

fn logits(model: &Model) -> Vec<f32> {
    logits_and_devices(model).0
}

/// The logits of a prompt and one step after it, and each layer's (device, KV bytes).
fn logits_and_devices(model: &Model) -> (Vec<f32>, Vec<(String, u64)>) {
    let n = model.n_layer() as usize;
    let p = ContextParams {
        n_ctx: 256,
        flash_attn: FlashAttn::On,
        layer_types: Some(mixed(n)),
        n_threads: 1,
        ..ContextParams::default()
    };
    let mut ctx = Context::new(model, &p).unwrap();
    let tokens: Vec<i32> = (0..40).map(|i| 3 + (i * 37) % 400).collect();
    let mut batch = Batch::new(tokens.len());
    batch.add_sequence(&tokens, 0, 0, |i| i + 1 == tokens.len()).unwrap();
    ctx.decode(&batch).unwrap();
    let mut out = ctx.logits(tokens.len() as i32 - 1).unwrap().to_vec();
    // and one decode step after the prompt
    batch.clear();
    batch.add(7, tokens.len() as i32, 0, true).unwrap();
    ctx.decode(&batch).unwrap();
    out.extend_from_slice(ctx.logits(0).unwrap());
    let devices =
        ctx.layers().into_iter().map(|i| i.unwrap()).map(|i| (i.device.to_string(), i.bytes_k + i.bytes_v)).collect();
    (out, devices)
}

/// A mixed profile (q8_0/kv2, f16, kv3/q4_0 layers) with four of six layers on two RPC servers
/// gives the logits of the same profile in one process.
#[test]
fn layers_split_over_two_rpc_servers_give_the_single_process_logits() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), 6, "synthetic-rpc");
    let backend = Backend::init();
    let local = Model::load(backend, &path, &ModelParams::default()).unwrap();
    let want = logits(&local);

    let (a, b) = (Server::start(), Server::start());
    let mut devices = rpc::add_server(backend, &a.endpoint).unwrap();
    devices.extend(rpc::add_server(backend, &b.endpoint).unwrap());
    assert_eq!(devices.len(), 2, "one CPU device per server");
    // ggml numbers RPC devices process-wide (RPC0, RPC1, … in the order servers were added)
    let (a_name, b_name) = (devices[0].name(), devices[1].name());
    let split =
        Model::load(backend, &path, &ModelParams { n_gpu_layers: 4, rpc: devices, ..ModelParams::default() }).unwrap();
    let (got, devices) = logits_and_devices(&split);
    assert_eq!(got.len(), want.len());
    // llama.cpp offloads the last layers (n_gpu_layers counts the output layer too: 3 of 6 here),
    // split over the devices in order; each layer's cache lives on its layer's device
    eprintln!("layer devices: {devices:?}");
    let names: Vec<&str> = devices.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(names, ["CPU", "CPU", "CPU", &a_name, &a_name, &b_name], "layers' cache devices");
    let local_bytes: Vec<u64> = logits_and_devices(&local).1.iter().map(|d| d.1).collect();
    for (il, ((_, bytes), local)) in devices.iter().zip(&local_bytes).enumerate() {
        assert_eq!(bytes, local, "layer {il}: KV bytes on its device = the single-process layer's");
    }
    let diff = common::max_abs_diff(&got, &want);
    eprintln!("max |logit difference| split over two RPC servers: {diff}");
    assert!(diff <= 1e-4, "split logits differ by {diff}");
}

/// A bad endpoint or a port nobody serves is an error naming it, not a crash or a hang.
#[test]
fn unreachable_rpc_servers_are_named_errors() {
    let _rpc = common::rpc_lock();
    let backend = Backend::init();
    let e = rpc::add_server(backend, "no-port").unwrap_err().to_string();
    assert!(e.contains("no-port") && e.contains("HOST:PORT"), "{e}");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let e = rpc::add_server(backend, &endpoint).map(|d| d.len());
    assert!(start.elapsed() < Duration::from_secs(30), "add_server waited {:?}", start.elapsed());
    match e {
        Err(e) => assert!(e.to_string().contains(&endpoint), "{e}"),
        Ok(n) => panic!("{n} devices from a port nobody serves"),
    }
}

/// Killing the RPC server while a model runs layers on it ends the run with an error naming the
/// cause, within seconds (ggml's client aborts; kvtuner turns that into one line and status 1).
#[test]
fn a_killed_rpc_server_ends_the_run_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), 6, "synthetic-rpc-kill");
    let mut server = Server::start();
    let mut chat = Command::new(env!("CARGO_BIN_EXE_kvtuner"))
        .args([
            "chat",
            "-m",
            path.to_str().unwrap(),
            "-c",
            "4096",
            "-ngl",
            "3",
            "-t",
            "1",
            "-p",
            "hello",
            "-n",
            "4000",
            "--temp",
            "0",
        ])
        .args(["--rpc", &server.endpoint])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for generated text, then take the server away
    let mut stdout = chat.stdout.take().unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read(&mut stdout, &mut first).unwrap();
    server.kill();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = chat.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the run hangs after its RPC server died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut chat.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("RPC server stopped"), "{err}");
}

/// `kvtuner ab --rpc` measures the same quality with layers on an RPC server as without.
#[test]
fn ab_with_layers_on_an_rpc_server_measures_the_same_kld() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), 6, "synthetic-rpc-ab");
    let text = common::eval_text_file(dir.path());
    let server = Server::start();
    let run = |rpc: bool| -> Vec<f64> {
        let json = dir.path().join(format!("ab-{rpc}.json"));
        let mut args = vec!["ab", "-m", path.to_str().unwrap(), "--text", text.to_str().unwrap(), "-c", "128"];
        args.extend(["--chunks", "1", "--no-speed", "-fa", "on", "-t", "1", "--against", "q8_0/kv2,kv3/q4_0"]);
        args.extend(["--json", json.to_str().unwrap()]);
        if rpc {
            args.extend(["-ngl", "4", "--rpc", &server.endpoint]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_kvtuner")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        rows.as_array().unwrap().iter().map(|r| r["kld_mean"].as_f64().unwrap()).collect()
    };
    let local = run(false);
    let connections = server.log().matches("Accepted client connection").count();
    let split = run(true);
    assert!(
        server.log().matches("Accepted client connection").count() > connections,
        "ab --rpc never contacted the server:\n{}",
        server.log()
    );
    assert_eq!(local.len(), 2);
    assert_eq!(split, local, "KLD with layers on the RPC server");
}

/// ab's speed runs report the memory of each buffer type, read back: with layers on an
/// rpc-server, the server's share (weights, KV, compute) is in the JSON and the table.
#[test]
fn ab_reports_offloaded_memory_per_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), 4, "synthetic-rpc-memory");
    let server = Server::start();
    let json = dir.path().join("ab.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kvtuner"))
        .args(["ab", "-m", path.to_str().unwrap(), "--no-quality", "--depths", "0", "--reps", "1", "-t", "1"])
        .args(["--against", "f16,q4_0", "-ngl", "3", "--rpc", &server.endpoint, "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("offload MiB"));
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rpc_kv = |r: &serde_json::Value| -> (u64, u64) {
        let m = r["speed_memory"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["device"].as_str().unwrap().starts_with("RPC"))
            .unwrap();
        (m["model"].as_u64().unwrap(), m["context"].as_u64().unwrap())
    };
    let (f16, q4) = (rpc_kv(&rows[0]), rpc_kv(&rows[1]));
    assert!(f16.0 > 0 && f16.0 == q4.0, "the same weights on the server: {f16:?} {q4:?}");
    // two of four layers' caches are on the server: q4_0 takes 4.5/16 of f16's bytes there
    assert_eq!(q4.1 * 16, f16.1 * 9 / 2, "{f16:?} {q4:?}");
}

/// `rpc-server --device`: a device that does not exist is an error naming it and what exists;
/// a named device is served.
#[test]
fn rpc_server_serves_named_devices_only() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtuner"))
        .args(["rpc-server", "--port", "1", "--device", "NOPE0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NOPE0") && stderr.contains("CPU"), "{stderr}");

    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvtuner"))
        .args(["rpc-server", "--port", &port.to_string(), "--device", "CPU", "-t", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let backend = Backend::init();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "rpc-server --device CPU did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let devices = {
        let _rpc = common::rpc_lock();
        rpc::add_server(backend, &format!("127.0.0.1:{port}")).map(|d| d.len())
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(devices.unwrap(), 1, "one served device");
}

/// ggml's RPC sockets are close-on-exec (patch 0011): a child spawned while this process holds a
/// connection to an `rpc-server` does not get a copy of it. An inherited copy keeps the
/// connection open after the client closes its own, and the server, which serves one client at a
/// time, then never answers this process's next connection (that hung CI once: a test spawned
/// its own server while another test was connected).
#[cfg(target_os = "linux")]
#[test]
fn children_spawned_while_connected_do_not_inherit_rpc_connections() {
    let _rpc = common::rpc_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = common::tiny_model(dir.path(), 2, "synthetic-rpc-exec");
    let server = Server::start();
    let backend = Backend::init();
    let devices = rpc::add_server(backend, &server.endpoint).unwrap();
    let model =
        Model::load(backend, &path, &ModelParams { n_gpu_layers: 2, rpc: devices, ..ModelParams::default() }).unwrap();
    let port = server.endpoint.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let to_server = established_connections_to(port);
    let own = socket_inodes(std::process::id());
    assert!(own.iter().any(|i| to_server.contains(i)), "the client holds no connection to {}", server.endpoint);

    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let inherited = socket_inodes(child.id());
    let _ = child.kill();
    let _ = child.wait();
    drop(model);
    assert!(inherited.is_empty(), "a child inherited sockets {inherited:?} (to the server: {to_server:?})");
}

/// The inodes of the sockets process `pid` has open.
#[cfg(target_os = "linux")]
fn socket_inodes(pid: u32) -> Vec<u64> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let links = fds.filter_map(|e| std::fs::read_link(e.unwrap().path()).ok());
    let inode = |l: std::path::PathBuf| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok();
    links.filter_map(inode).collect()
}

/// The inodes of the established IPv4 TCP connections whose remote port is `port`.
#[cfg(target_os = "linux")]
fn established_connections_to(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!(":{port:04X}");
    let rows = table.lines().skip(1).map(|l| l.split_whitespace().collect::<Vec<_>>());
    rows.filter(|f| f[2].ends_with(&remote) && f[3] == "01").map(|f| f[9].parse().unwrap()).collect()
}
