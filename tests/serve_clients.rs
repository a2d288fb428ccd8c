//! `kvtuner serve` on Qwen2.5-Coder-0.5B-Instruct (its own Jinja template, with tool calls)
//! driven by the client libraries agent users run: OpenAI's, LangChain's and Ollama's
//! (tests/serve/agent_clients.py), plus what those clients cannot see: that a logit bias bans a
//! token, that the template's default system prompt is rendered, and that malformed tool
//! results and schemas get 400s naming the field.

mod common;

use common::server::Server;
use kvtuner::llama::{Backend, Model, ModelParams};

fn qwen() -> std::path::PathBuf {
    kvtuner::assets::ensure(&kvtuner::assets::cache_dir(), &kvtuner::assets::QWEN_CODER_MODEL)
        .expect("fetching Qwen2.5-Coder-0.5B-Instruct (kvtuner fetch --model qwen2.5-coder-0.5b)")
}

#[test]
fn openai_langchain_and_ollama_clients_call_tools_parse_schemas_and_stream() {
    let server = Server::start(&qwen(), 4096, &["-np", "2"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve/agent_clients.py");
    server.run_client_script(script, &[&server.url("")]);
    // Ollama's per-request context option is reported once, not applied silently
    assert_eq!(server.log().matches("`num_ctx` is ignored").count(), 1, "{}", server.log());
}

#[test]
fn template_system_prompt_logit_bias_and_malformed_agent_input() {
    let path = qwen();
    let server = Server::start(&path, 2048, &["-np", "1"]);
    let chat = |extra: &str| {
        server.post(
            "/v1/chat/completions",
            &format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "What is the capital of France? One word."}}], "temperature": 0, "max_tokens": 8{extra}}}"#
            ),
        )
    };
    let (status, plain) = chat("");
    assert_eq!(status, 200, "{plain}");
    let answer = plain["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.contains("Paris"), "{plain}");
    // the template's default system prompt ("You are Qwen, created by Alibaba Cloud…") is in
    // the prompt: 20 tokens of the user's question and chat markers alone
    assert!(plain["usage"]["prompt_tokens"].as_u64().unwrap() > 28, "{plain}");

    // a logit bias of -100 on the answer's first token bans it
    let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
    let first = model.tokenize(&answer, false, false).unwrap()[0];
    let (status, biased) = chat(&format!(r#", "logit_bias": {{"{first}": -100}}"#));
    assert_eq!(status, 200, "{biased}");
    let other = biased["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!other.starts_with(&answer[..answer.len().min(3)]), "banned token still first: {other}");
    // penalties are taken (and a reply comes)
    let (status, penalised) = chat(r#", "presence_penalty": 1.5, "frequency_penalty": 1.0, "repeat_penalty": 1.2"#);
    assert_eq!(status, 200, "{penalised}");

    let cases = [
        (
            r#", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]"#,
            "messages[0].tool_calls[0].function.arguments",
        ),
        (r#", "tools": [{"type": "function", "function": {"name": ""}}]"#, "tools[0].function.name"),
        (r#", "tools": [{"type": "retrieval"}]"#, "tools[0].type"),
        (r#", "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes""#, "tool_choice"),
        (
            r#", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}"#,
            "response_format.json_schema.schema",
        ),
        (r#", "logprobs": true, "top_logprobs": 50"#, "top_logprobs"),
    ];
    for (extra, param) in cases {
        // later keys win in serde_json: `messages` here replaces the default one
        let (status, json) = chat(extra);
        assert_eq!(status, 400, "{extra}: {json}");
        assert_eq!(json["error"]["param"], param, "{extra}: {json}");
        server.assert_healthy(extra);
    }
    // Ollama errors come in Ollama's shape, naming Ollama's field
    let (status, json) = server.post(
        "/api/chat",
        r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "hot"}}"#,
    );
    assert_eq!(status, 400, "{json}");
    assert!(json["error"].as_str().unwrap().starts_with("options.temperature"), "{json}");
}

/// Agents resend one long system prompt: a request arriving while the slot that holds it is busy
/// takes the prefix from that slot (its sequence copied into the free one) instead of decoding it
/// again, and answers as it does without any reuse.
#[test]
fn a_new_request_takes_a_shared_prefix_from_a_busy_slot() {
    let server = Server::start(&qwen(), 2048, &["-np", "2"]);
    let system: String = common::eval_text().chars().take(3000).collect();
    let body = |question: &str, extra: &str| {
        serde_json::json!({
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 12,
        })
        .to_string()
        .replace("\"max_tokens\":12", &format!("\"max_tokens\":12{extra}"))
    };
    // a long streamed reply keeps the first slot busy
    let long = body("Retell the text above in detail.", r#","max_tokens":400,"ignore_eos":true,"stream":true"#);
    // its second event is its first token: by then its whole prompt is in its slot's cache
    let (mut streaming, mut reader, _) = server.stream("/v1/chat/completions", &long);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0, "the stream ended");
    }
    server.wait_metric("kvtuner_slots_active", 1.0);

    let (status, reused) = server.post("/v1/chat/completions", &body("What is 2+3? Reply with the number only.", ""));
    assert_eq!(status, 200, "{reused}");
    let prompt = reused["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = reused["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(prompt > 500 && cached + 40 > prompt, "the system prompt was decoded again: {reused}");
    assert_eq!(server.metric("kvtuner_prefix_copies_total"), 1.0);
    let _ = streaming.kill();
    let _ = streaming.wait();
    server.wait_metric("kvtuner_slots_active", 0.0);

    let (status, fresh) = server
        .post("/v1/chat/completions", &body("What is 2+3? Reply with the number only.", r#","cache_prompt":false"#));
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{fresh}");
    let text = |v: &serde_json::Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text(&reused).contains('5'), "{reused}");
    assert_eq!(text(&reused), text(&fresh), "the copied prefix answers as a decoded one");
}
