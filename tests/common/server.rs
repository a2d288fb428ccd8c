//! A running `kvtuner serve` for the serve tests: started on a free port of 127.0.0.1, its log
//! collected, driven with curl; killed when dropped.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::ChildStdout;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kvtuner");

/// A running `kvtuner serve`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    log: Arc<Mutex<String>>,
    /// `--api-key`, sent by [`Server::curl`].
    key: Option<String>,
}

impl Server {
    /// `kvtuner serve -m MODEL -c CTX -t 1 EXTRA…`.
    pub fn start(model: &Path, ctx: u32, extra: &[&str]) -> Server {
        let ctx = ctx.to_string();
        // one thread per server: several servers share CI's 2 cores, and llama.cpp's spinning
        // thread pool slows down many times when oversubscribed
        let mut child = Command::new(BIN)
            .args(["serve", "-m", model.to_str().unwrap(), "-c", &ctx, "--port", "0", "-t", "1"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            let stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addr) = line.split("listening on http://").nth(1) {
                        let _ = tx.send(addr.trim().to_string());
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the server did not start:\n{}", log.lock().unwrap()));
        let key = extra.iter().position(|a| *a == "--api-key").map(|i| extra[i + 1].to_string());
        Server { child, addr, log, key }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `curl` with `args` (and the server's key) against `path`; returns (status, headers + body).
    pub fn curl(&self, path: &str, args: &[&str]) -> (u16, String) {
        let auth = self.key.as_ref().map(|k| format!("authorization: Bearer {k}"));
        let mut with_key: Vec<&str> = args.to_vec();
        if let Some(auth) = &auth {
            with_key.extend(["-H", auth.as_str()]);
        }
        self.curl_without_key(path, &with_key)
    }

    pub fn curl_without_key(&self, path: &str, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            // no `Expect: 100-continue`: the status line read is the final one
            .args(["-s", "-i", "--max-time", "120", "-H", "Expect:"])
            .args(args)
            .arg(self.url(path))
            .output()
            .expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, text) = self.curl(path, &["-H", "content-type: application/json", "--data-binary", body]);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, text) = self.curl(path, &[]);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.curl("/metrics", &[]);
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    pub fn assert_healthy(&self, after: &str) {
        let (status, text) = self.curl("/health", &[]);
        assert_eq!(status, 200, "not healthy after {after}: {text}\n{}", self.log());
    }

    /// Waits until `metric` reaches `value`.
    pub fn wait_metric(&self, name: &str, value: f64) {
        let t = Instant::now();
        while self.metric(name) != value {
            assert!(t.elapsed() < Duration::from_secs(60), "{name} never reached {value}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    /// `path` streamed by `curl -N` with `body`: the process and its output, after its first line.
    pub fn stream(&self, path: &str, body: &str) -> (Child, BufReader<ChildStdout>, String) {
        let mut child = Command::new("curl")
            .args(["-s", "-N", "-H", "content-type: application/json", "--data-binary", body])
            .arg(self.url(path))
            .stdout(Stdio::piped())
            .spawn()
            .expect("running curl");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        (child, reader, first)
    }

    /// SIGTERM to the server.
    pub fn terminate(&self) {
        let st = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }

    /// Runs a Python client script (`ALL OK` on success) with `args`; fails with its output and
    /// the server's log.
    pub fn run_client_script(&self, script: &str, args: &[&str]) {
        let out = Command::new("python3").arg(script).args(args).output().expect("running python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("ALL OK"),
            "{stdout}\n{}\n--- server log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
