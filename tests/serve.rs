//! `kvtuner serve` on Gemma 3 270M (annotated with the shipped profile), started on a free port
//! of 127.0.0.1 and driven by real clients: the `openai` Python package, curl for raw
//! server-sent events and the bad-input matrix, signals for the drain, headless Chromium for the
//! page.

mod common;

use common::server::Server;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kvtuner");
const PROFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/gemma3-270m-6.5bpv.yaml");
const CTX: u32 = 512;

/// Gemma annotated with the shipped mixed profile, in `dir`.
fn annotated(dir: &Path) -> PathBuf {
    let out = dir.join("gemma-annotated.gguf");
    let st = Command::new(BIN)
        .args(["annotate", common::gemma_path().to_str().unwrap(), "--profile", PROFILE, "-o", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    out
}

fn model_id(server: &Server) -> String {
    server.get_json("/v1/models")["data"][0]["id"].as_str().unwrap().to_string()
}

fn chat_body(model: &str, question: &str, extra: &str) -> String {
    format!(
        r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "{question}"}}], "temperature": 0{extra}}}"#
    )
}

/// The `openai` package: models, chat and completions (plain and streamed, usage chunk), a
/// follow-up turn that reuses the cached prefix, stop strings, seeds, errors as the client's
/// exception classes, and 8 concurrent streams with correct answers (tests/serve/openai_client.py).
#[test]
fn openai_client_chat_completions_streaming_errors_and_8_concurrent_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&annotated(dir.path()), CTX, &["-np", "4"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve/openai_client.py");
    server.run_client_script(script, &[&server.url("/v1"), &model_id(&server), &CTX.to_string()]);
    // the queue never overflowed and every request ended
    assert_eq!(server.metric("kvtuner_slots_active"), 0.0);
    assert!(server.metric("kvtuner_prompt_tokens_cached_total") > 0.0);
}

/// The profile is visible: /props and /v1/models name it with the runtime's per-layer types and
/// KV bytes against f16, and the startup log says the same.
#[test]
fn props_models_and_log_show_the_applied_profile() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&annotated(dir.path()), CTX, &["-np", "2"]);
    let profile = kvtuner::profile::Profile::load(PROFILE).unwrap();
    let props = server.get_json("/props");
    let p = &props["profile"];
    assert!(p["name"].as_str().unwrap().contains(&profile.name), "{props}");
    let k: Vec<&str> = p["type_k"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let v: Vec<&str> = p["type_v"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(k, profile.layers.iter().map(|l| l.k.name()).collect::<Vec<_>>());
    assert_eq!(v, profile.layers.iter().map(|l| l.v.name()).collect::<Vec<_>>());
    assert_eq!(props["slots"], 2);
    assert_eq!(props["ctx_per_slot"], CTX);
    let (full, f16) = (p["kv_bytes_full_load"].as_f64().unwrap(), p["kv_bytes_f16"].as_f64().unwrap());
    // 6.5 bits per value against 16
    assert!((full / f16 - 6.5 / 16.0).abs() < 0.01, "{full} / {f16}");
    assert_eq!(server.get_json("/v1/models")["data"][0]["kvtuner"], props);
    // /metrics' bytes per cache type add up to what the runtime allocated
    let (_, metrics) = server.curl("/metrics", &[]);
    let allocated: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("kvtuner_kv_bytes_allocated{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(allocated, full, "{metrics}");
    let log = server.log();
    assert!(log.contains(&format!("profile: {}", p["name"].as_str().unwrap())), "{log}");
    assert!(log.contains(&format!("K/V types per layer: {}/{}", k[0], v[0])), "{log}");

    // --kv-profile off: f16 everywhere, and the bytes say so
    let off = Server::start(&annotated(dir.path()), CTX, &["-np", "2", "--kv-profile", "off"]);
    let p = &off.get_json("/props")["profile"];
    assert!(p["type_k"].as_array().unwrap().iter().all(|t| t == "f16"), "{p}");
    assert_eq!(p["kv_bytes_full_load"], p["kv_bytes_f16"]);
}

/// Raw server-sent events through curl: `data:` lines of chunks, `[DONE]` last, and the
/// streamed text is the non-streamed answer.
#[test]
fn curl_raw_sse_stream_matches_the_plain_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&annotated(dir.path()), CTX, &["-np", "2"]);
    let model = model_id(&server);
    let (status, plain) = server.post("/v1/chat/completions", &chat_body(&model, "What is the capital of France?", ""));
    assert_eq!(status, 200, "{plain}");
    let answer = plain["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.contains("Paris"), "{plain}");

    let out = Command::new("curl")
        .args(["-s", "-N", "-H", "content-type: application/json", "--data-binary"])
        .arg(chat_body(&model, "What is the capital of France?", r#", "stream": true"#))
        .arg(server.url("/v1/chat/completions"))
        .output()
        .unwrap();
    let sse = String::from_utf8_lossy(&out.stdout);
    let data: Vec<&str> = sse.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{sse}");
    let mut text = String::new();
    for d in &data[..data.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        text.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(text, answer);
    assert!(sse.lines().filter(|l| !l.is_empty()).all(|l| l.starts_with("data: ") || l.starts_with(':')), "{sse}");
}

/// Bad input gets a clear 4xx in OpenAI's shape naming the field, and the server keeps serving:
/// invalid JSON, wrong types, unknown model, a prompt longer than the slot, max_tokens ≤ 0, a
/// huge body, a slow client, an abrupt disconnect (its slot is freed at once), a full queue
/// (503 with Retry-After), and the API key.
#[test]
fn bad_input_matrix_gets_4xx_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = annotated(dir.path());
    let server = Server::start(
        &model_path,
        CTX,
        &["-np", "1", "--queue", "1", "--body-limit", "65536", "--body-timeout", "2", "--api-key", "sesame"],
    );
    let post = |body: &str| -> (u16, serde_json::Value) {
        let (status, text) =
            server.curl("/v1/chat/completions", &["-H", "content-type: application/json", "--data-binary", body]);
        (status, serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap_or_default())
    };
    // the key: /health is open, the API is not
    server.assert_healthy("start");
    assert_eq!(server.curl_without_key("/v1/models", &[]).0, 401);
    assert_eq!(server.curl_without_key("/v1/chat/completions", &["--data-binary", "{}"]).0, 401);
    assert_eq!(server.curl_without_key("/v1/models", &["-H", "authorization: Bearer wrong"]).0, 401);
    let (status, models) = server.curl("/v1/models", &[]);
    assert_eq!(status, 200, "{models}");
    let model = "gemma-annotated";
    assert!(models.contains(model), "{models}");

    let long_prompt = "hello ".repeat(CTX as usize + 50);
    let cases: Vec<(&str, String, u16, Option<&str>, &str)> = vec![
        ("invalid JSON", "{\"model\": ".into(), 400, None, "invalid_json"),
        ("not an object", "[1, 2]".into(), 400, None, "invalid_json"),
        (
            "missing model",
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into(),
            400,
            Some("model"),
            "invalid_value",
        ),
        ("model of wrong type", r#"{"model": 5, "messages": []}"#.into(), 400, Some("model"), "invalid_value"),
        (
            "messages not an array",
            format!(r#"{{"model": "{model}", "messages": "hi"}}"#),
            400,
            Some("messages"),
            "invalid_value",
        ),
        (
            "content of wrong type",
            format!(r#"{{"model": "{model}", "messages": [{{"role": "user", "content": 3}}]}}"#),
            400,
            Some("messages[0].content"),
            "invalid_value",
        ),
        (
            "unknown role",
            format!(r#"{{"model": "{model}", "messages": [{{"role": "robot", "content": "x"}}]}}"#),
            400,
            Some("messages[0].role"),
            "invalid_value",
        ),
        ("max_tokens 0", chat_body(model, "hi", r#", "max_tokens": 0"#), 400, Some("max_tokens"), "invalid_value"),
        (
            "max_tokens negative",
            chat_body(model, "hi", r#", "max_tokens": -5"#),
            400,
            Some("max_tokens"),
            "invalid_value",
        ),
        (
            "max_tokens a string",
            chat_body(model, "hi", r#", "max_tokens": "10""#),
            400,
            Some("max_tokens"),
            "invalid_value",
        ),
        (
            "temperature a string",
            chat_body(model, "hi", r#", "temperature": "hot""#),
            400,
            Some("temperature"),
            "invalid_value",
        ),
        ("top_p out of range", chat_body(model, "hi", r#", "top_p": 3"#), 400, Some("top_p"), "invalid_value"),
        ("stop of wrong type", chat_body(model, "hi", r#", "stop": 7"#), 400, Some("stop"), "invalid_value"),
        (
            "a tool without a function",
            chat_body(model, "hi", r#", "tools": [{"type": "function"}]"#),
            400,
            Some("tools[0].function"),
            "invalid_value",
        ),
        (
            "a tool whose parameters are not a schema",
            chat_body(
                model,
                "hi",
                r#", "tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]"#,
            ),
            400,
            Some("tools[0].function.parameters"),
            "invalid_value",
        ),
        (
            "a tool_choice naming no tool",
            chat_body(
                model,
                "hi",
                r#", "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}"#,
            ),
            400,
            Some("tool_choice.function.name"),
            "invalid_value",
        ),
        (
            "tools for a template without tool calls",
            chat_body(model, "hi", r#", "tools": [{"type": "function", "function": {"name": "f"}}]"#),
            400,
            Some("tools"),
            "invalid_value",
        ),
        (
            "a response_format schema that is not an object",
            chat_body(
                model,
                "hi",
                r#", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "y"}}"#,
            ),
            400,
            Some("response_format.json_schema.schema"),
            "invalid_value",
        ),
        (
            "a schema the grammar converter refuses",
            chat_body(
                model,
                "hi",
                r##", "json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}"##,
            ),
            400,
            Some("json_schema"),
            "invalid_value",
        ),
        (
            "a grammar that does not parse",
            chat_body(model, "hi", r#", "grammar": "root ::= (((""#),
            400,
            Some("grammar"),
            "invalid_value",
        ),
        (
            "a field this server does not implement",
            chat_body(model, "hi", r#", "audio": {"voice": "alloy", "format": "wav"}"#),
            400,
            Some("audio"),
            "invalid_value",
        ),
        (
            "prompt longer than the slot",
            chat_body(model, &long_prompt, ""),
            400,
            Some("messages"),
            "context_length_exceeded",
        ),
    ];
    for (what, body, status, param, code) in &cases {
        let (got, json) = post(body);
        assert_eq!(got, *status, "{what}: {json}");
        let error = &json["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {json}");
        assert!(error["type"].is_string(), "{what}: {json}");
        assert_eq!(error["code"], *code, "{what}: {json}");
        if let Some(param) = param {
            assert_eq!(error["param"], *param, "{what}: {json}");
        }
        server.assert_healthy(what);
    }

    // a huge body: 413 without reading it all
    let huge = dir.path().join("huge.json");
    std::fs::write(
        &huge,
        format!(r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "{}"}}]}}"#, "x".repeat(1 << 20)),
    )
    .unwrap();
    let (status, text) = server.curl(
        "/v1/chat/completions",
        &["-H", "content-type: application/json", "--data-binary", &format!("@{}", huge.display())],
    );
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    server.assert_healthy("a huge body");

    // a slow client: announces a body and sends half of it, then stalls: 408 after the timeout
    let mut slow = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(slow, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sesame\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reply = [0u8; 512];
    let n = slow.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    server.assert_healthy("a slow client");

    // a client that never finishes its headers is disconnected after the same timeout
    let mut slow = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(slow, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    let mut reply = Vec::new();
    let _ = slow.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(started.elapsed() < Duration::from_secs(20), "still connected after {:?}", started.elapsed());
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply}");
    server.assert_healthy("a client that never finished its headers");

    // an abrupt disconnect mid-stream frees the slot at once
    // a reply that cannot end early: no template stop strings, end-of-generation tokens ignored
    let long = format!(
        r#"{{"model": "{model}", "prompt": "Once upon a time", "stream": true, "max_tokens": 400, "ignore_eos": true}}"#
    );
    let mut streaming = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(streaming, "POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sesame\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{long}", long.len()).unwrap();
    let mut first = [0u8; 256];
    let _ = streaming.read(&mut first).unwrap();
    server.wait_metric("kvtuner_slots_active", 1.0);
    let cancelled = server.metric("kvtuner_cancelled_total");
    drop(streaming);
    server.wait_metric("kvtuner_slots_active", 0.0);
    assert_eq!(server.metric("kvtuner_cancelled_total"), cancelled + 1.0);
    server.assert_healthy("a disconnect");

    // so does a client of a non-streamed reply that gives up waiting
    let cancelled = server.metric("kvtuner_cancelled_total");
    let body =
        format!(r#"{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true}}"#);
    let (status, _) = server.curl("/v1/completions", &["--max-time", "1", "--data-binary", &body]);
    assert_eq!(status, 0, "the reply cannot be done within a second");
    server.wait_metric("kvtuner_slots_active", 0.0);
    server.wait_metric("kvtuner_cancelled_total", cancelled + 1.0);
    server.assert_healthy("a client that gave up");

    // one slot busy, one request queued: the next one gets 503 with Retry-After
    let spawn_stream = || {
        Command::new("curl")
            .args([
                "-s",
                "-N",
                "-H",
                "authorization: Bearer sesame",
                "-H",
                "content-type: application/json",
                "--data-binary",
                &long,
            ])
            .arg(server.url("/v1/completions"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut busy = spawn_stream();
    server.wait_metric("kvtuner_slots_active", 1.0);
    let mut queued = spawn_stream();
    server.wait_metric("kvtuner_requests_queued", 1.0);
    let (status, text) = server.curl(
        "/v1/chat/completions",
        &["-H", "content-type: application/json", "--data-binary", &chat_body(model, "hi", "")],
    );
    assert_eq!(status, 503, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
    for c in [&mut busy, &mut queued] {
        let _ = c.kill();
        let _ = c.wait();
    }
    server.wait_metric("kvtuner_slots_active", 0.0);
    server.wait_metric("kvtuner_requests_queued", 0.0);

    // still answering, and /metrics counted the errors by route and status
    let (status, json) = post(&chat_body(model, "What is the capital of France?", r#", "max_tokens": 12"#));
    assert_eq!(status, 200, "{json}");
    assert!(json["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"), "{json}");
    let (_, metrics) = server.curl("/metrics", &[]);
    assert!(metrics.contains(r#"kvtuner_requests_total{route="/v1/chat/completions",status="400"}"#), "{metrics}");
    assert!(metrics.contains(r#"kvtuner_requests_total{route="/v1/chat/completions",status="503"}"#), "{metrics}");
    assert!(metrics.contains(r#"kvtuner_kv_bytes_in_use{cache_type="q8_0"}"#), "{metrics}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// SIGTERM lets a reply in flight finish (every token, then `[DONE]`), refuses new connections
/// and exits 0.
#[test]
fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&annotated(dir.path()), CTX, &["-np", "2"]);
    let model = model_id(&server);
    // 48 tokens whatever the model says: the reply cannot end on its own before the signal
    let body = format!(
        r#"{{"model": "{model}", "prompt": "Once upon a time", "stream": true, "max_tokens": 48, "ignore_eos": true, "stream_options": {{"include_usage": true}}}}"#
    );
    let (mut stream, mut reader, first) = server.stream("/v1/completions", &body);
    assert!(first.starts_with("data: "), "{first}");
    server.terminate();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"completion_tokens\":48,"), "every token was sent: {rest}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(std::net::TcpStream::connect(&server.addr).is_err());
    let log = server.log();
    assert!(log.contains("shutting down") && log.contains("stopped"), "{log}");
    let _ = stream.wait();
}

/// A drain timeout that cuts a reply: the stream ends with an error event (not a silent close)
/// and the process exits non-zero, naming how many replies it cut.
#[test]
fn a_drain_timeout_that_cuts_a_stream_sends_an_error_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&annotated(dir.path()), CTX, &["-np", "1", "--drain-timeout", "1"]);
    let model = model_id(&server);
    let body = format!(
        r#"{{"model": "{model}", "prompt": "Once upon a time", "stream": true, "max_tokens": 400, "ignore_eos": true}}"#
    );
    let (mut stream, mut reader, _) = server.stream("/v1/completions", &body);
    server.terminate();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("shutting_down") && !rest.contains("[DONE]"), "{rest}");
    let status = server.child.wait().unwrap();
    assert!(!status.success(), "{status:?}\n{}", server.log());
    assert!(server.log().contains("cut 1 replies"), "{}", server.log());
    let _ = stream.wait();
}

/// Headless Chromium (Debian's package) with a fresh profile and nothing reaching out.
fn chromium(user_data: &Path, args: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // virtual time waits for the page's requests (the streamed answer is an XHR)
            "--virtual-time-budget=60000",
        ])
        .arg(format!("--user-data-dir={}", user_data.display()))
        .args(args)
        .output()
        .expect("running chromium (Debian package `chromium`; .ci/run installs it)")
}

/// The chat page at `/` loads the profile from /props, streams an answer, and renders: the DOM
/// after the page asked its question holds the profile, every layer's types and the answer; the
/// screenshot is the page, not a blank image.
#[test]
fn chat_page_streams_an_answer_and_shows_the_profile_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&annotated(dir.path()), CTX, &["-np", "1"]);
    let profile = kvtuner::profile::Profile::load(PROFILE).unwrap();
    let page = server.url("/?ask=What%20is%20the%20capital%20of%20France%3F&temperature=0");

    let out = chromium(&dir.path().join("chromium-dom"), &["--dump-dom", &page]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains(r#"data-loaded="1""#) && dom.contains(r#"data-answered="1""#), "{dom}");
    assert!(dom.contains(&format!(r#"id="p-name">{} (embedded in the model)<"#, profile.name)), "{dom}");
    assert!(dom.contains(r#"id="p-bits">6.50<"#), "{dom}");
    assert_eq!(dom.matches("<tr><td>").count(), profile.layers.len(), "one row per layer: {dom}");
    let l0 = &profile.layers[0];
    assert!(dom.contains(&format!("<tr><td>0</td><td>{}</td><td>{}</td>", l0.k.name(), l0.v.name())), "{dom}");
    let answer = dom.split(r#"<div class="msg assistant"><b>assistant</b><span>"#).nth(1).unwrap_or_default();
    assert!(answer.split("</span>").next().unwrap().contains("Paris"), "{dom}");

    let shot = dir.path().join("page.png");
    let out = chromium(
        &dir.path().join("chromium-shot"),
        &[&format!("--screenshot={}", shot.display()), "--window-size=1200,800", &page],
    );
    assert!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((info.width, info.height), (1200, 800));
    let channels = info.color_type.samples();
    let mut counts = std::collections::HashMap::new();
    for px in pixels[..info.buffer_size()].chunks(channels) {
        *counts.entry(px[..3].to_vec()).or_insert(0usize) += 1;
    }
    let total = (info.width * info.height) as usize;
    let most = counts.values().max().copied().unwrap_or(0);
    // text and the dark header: many colours, and well over a tenth of the pixels off the
    // background (a blank or error page is one or two colours)
    assert!(counts.len() > 50, "{} colours", counts.len());
    assert!(total - most > total / 10, "{} of {total} pixels off the background", total - most);
    // the header bar (#1d2430) spans the top
    let at = |x: usize, y: usize| &pixels[(y * info.width as usize + x) * channels..][..3];
    assert_eq!(at(600, 5), [0x1d, 0x24, 0x30], "the header is not at the top");

    // answers render as Markdown, and a model's own markup stays text: the page's renderer,
    // taken from the served page, on a sample
    let (_, served) = server.curl("/", &[]);
    let start = served.find("function escapeHtml").expect("the page has its Markdown renderer");
    let end = served.find("function add(").unwrap();
    let sample = "# Title\n**bold** and `code` <b>raw</b>\n- one\n- two\n```py\nprint(1)\n```";
    let probe = dir.path().join("markdown.html");
    std::fs::write(
        &probe,
        format!(
            "<html><body><div id=out></div><script>{}\ndocument.getElementById('out').innerHTML = markdown({sample:?});</script></body></html>",
            &served[start..end]
        ),
    )
    .unwrap();
    let out = chromium(&dir.path().join("chromium-md"), &["--dump-dom", &format!("file://{}", probe.display())]);
    let dom = String::from_utf8_lossy(&out.stdout);
    for want in [
        "<h3>Title</h3>",
        "<strong>bold</strong>",
        "<code>code</code>",
        "&lt;b&gt;raw&lt;/b&gt;",
        "<ul><li>one</li><li>two</li></ul>",
        "<pre><code>print(1)\n</code></pre>",
    ] {
        assert!(dom.contains(want), "no {want} in {dom}");
    }
}

/// `--cors ORIGIN`: a browser's preflight from that origin is answered (before the API key is
/// checked, as browsers send none with it) and allowed; other origins get no allowance.
#[test]
fn cors_allows_the_listed_origins_only() {
    let server = Server::start(&common::gemma_path(), CTX, &["--cors", "http://app.example", "--api-key", "k1"]);
    let preflight = |origin: &str| {
        server.curl_without_key(
            "/v1/chat/completions",
            &[
                "-X",
                "OPTIONS",
                "-H",
                &format!("Origin: {origin}"),
                "-H",
                "Access-Control-Request-Method: POST",
                "-H",
                "Access-Control-Request-Headers: authorization, content-type",
            ],
        )
    };
    let (status, text) = preflight("http://app.example");
    assert_eq!(status, 200, "{text}");
    assert!(text.to_ascii_lowercase().contains("access-control-allow-origin: http://app.example"), "{text}");
    let (_, text) = preflight("http://other.example");
    assert!(!text.to_ascii_lowercase().contains("access-control-allow-origin"), "{text}");
    // the API itself still wants the key
    let (status, _) = server.curl_without_key("/v1/models", &["-H", "Origin: http://app.example"]);
    assert_eq!(status, 401);
    let (status, text) = server.curl("/v1/models", &["-H", "Origin: http://app.example"]);
    assert_eq!(status, 200, "{text}");
    assert!(text.to_ascii_lowercase().contains("access-control-allow-origin: http://app.example"), "{text}");
}
