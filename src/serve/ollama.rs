//! Ollama's API beside OpenAI's: `/api/chat` and `/api/generate` (NDJSON streams by default),
//! `/api/tags`, `/api/show`, `/api/ps`, `/api/version`, for clients that speak only Ollama
//! (Open WebUI's Ollama mode, Langflow, the `ollama` libraries). A request is translated to the
//! OpenAI request it means and runs through the same path (template, tools, grammar, engine);
//! errors come in Ollama's shape (`{"error": "…"}`) and name Ollama's fields.
//!
//! Ollama options that cannot apply per request (`num_ctx`, `num_gpu`, `num_thread`, …: the
//! server's context and devices are fixed at startup) are accepted and logged once each, since
//! Ollama clients send them with every request.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{json_object, ApiError, CompletionRequest, Endpoint};
use super::engine::{Event, FinishReason};
use super::http::{cut_error, finish_with_calls, next_event, read_body, submit, AppState, Step};
use super::reply::ReplyAssembler;

/// The Ollama API version clients see (features they check for, e.g. tools, exist here).
pub const OLLAMA_VERSION: &str = "0.9.0";

/// Ollama options and the OpenAI field each becomes.
const OPTIONS: &[(&str, &str)] = &[
    ("temperature", "temperature"),
    ("top_k", "top_k"),
    ("top_p", "top_p"),
    ("min_p", "min_p"),
    ("typical_p", "typical_p"),
    ("seed", "seed"),
    ("num_predict", "max_tokens"),
    ("stop", "stop"),
    ("repeat_penalty", "repeat_penalty"),
    ("repeat_last_n", "repeat_last_n"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
];

/// Options that describe the server, not a request: accepted, logged once.
const FIXED_OPTIONS: &[&str] = &[
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "numa",
    "use_mmap",
    "use_mlock",
    "low_vram",
    "vocab_only",
    "num_keep",
    "f16_kv",
    "logits_all",
];

/// What `/api/tags`, `/api/show` and `/api/ps` say about the served model.
pub struct OllamaModel {
    pub details: Value,
    pub size: u64,
    pub template: String,
    pub capabilities: Vec<&'static str>,
    pub model_info: Value,
    /// Fixed options already reported.
    pub warned: Mutex<BTreeSet<String>>,
}

fn ollama_error(status: u16, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// An OpenAI-shaped error re-said in Ollama's shape, with Ollama's field name.
fn from_api(e: ApiError) -> Response {
    let mut message = e.message.clone();
    if let Some(param) = &e.param {
        let ollama = OPTIONS
            .iter()
            .find(|(_, openai)| openai == param)
            .map(|(o, _)| format!("options.{o}"))
            .or_else(|| param.starts_with("response_format").then(|| "format".to_string()));
        let field = ollama.unwrap_or_else(|| param.clone());
        message = format!("{field}: {message}");
    }
    ollama_error(e.status, message)
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil-from-days (Howard Hinnant)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION }))
}

fn model_entry(state: &AppState) -> Value {
    let m = &state.ollama;
    json!({
        "name": state.model_id,
        "model": state.model_id,
        "modified_at": now_rfc3339(),
        "size": m.size,
        "digest": "",
        "details": m.details,
    })
}

pub async fn tags(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "models": [model_entry(&state)] }))
}

pub async fn ps(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut entry = model_entry(&state);
    entry["expires_at"] = json!("2318-01-01T00:00:00Z");
    entry["size_vram"] = json!(0);
    Json(json!({ "models": [entry] }))
}

pub async fn show(State(state): State<Arc<AppState>>, body: Body) -> Response {
    if let Err(e) = read_body(&state, body).await.and_then(|b| json_object(&b)) {
        return from_api(e);
    }
    let m = &state.ollama;
    Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": m.template,
        "details": m.details,
        "model_info": m.model_info,
        "capabilities": m.capabilities,
        "modified_at": now_rfc3339(),
        "kvtuner": state.props,
    }))
    .into_response()
}

/// Routes Ollama has that this server does not serve (model management, embeddings).
pub async fn not_served() -> Response {
    ollama_error(
        501,
        "this server serves one model: pulling, creating, copying, deleting and embedding are not supported",
    )
}

/// Ollama's chat or generate body → the OpenAI request it means.
fn translate(state: &AppState, obj: &Map<String, Value>, chat: bool) -> Result<(CompletionRequest, bool), ApiError> {
    let mut openai = Map::new();
    openai.insert("model".into(), obj.get("model").cloned().unwrap_or_else(|| json!(state.model_id)));
    if chat {
        let messages = match obj.get("messages") {
            Some(Value::Array(ms)) => ms.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err(ApiError::invalid("messages", "`messages` must be an array")),
        };
        for (i, m) in messages.iter().enumerate() {
            if m.get("images").is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(ApiError::invalid(&format!("messages[{i}].images"), "this server reads text only"));
            }
        }
        openai.insert("messages".into(), Value::Array(messages));
        if let Some(tools) = obj.get("tools") {
            openai.insert("tools".into(), tools.clone());
        }
    } else {
        if obj.get("images").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid("images", "this server reads text only"));
        }
        for field in ["context", "suffix"] {
            let given = obj.get(field).is_some_and(|v| match v {
                Value::Null => false,
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                _ => true,
            });
            if given {
                return Err(ApiError::invalid(field, format!("`{field}` is not supported (send the whole prompt)")));
            }
        }
        if obj.get("template").is_some_and(|v| v.as_str().is_some_and(|t| !t.is_empty())) {
            return Err(ApiError::invalid("template", "a per-request template is not supported"));
        }
        let prompt = match obj.get("prompt") {
            Some(Value::String(p)) => p.clone(),
            None | Some(Value::Null) => String::new(),
            Some(_) => return Err(ApiError::invalid("prompt", "`prompt` must be a string")),
        };
        let raw = matches!(obj.get("raw"), Some(Value::Bool(true)));
        if raw {
            openai.insert("prompt".into(), json!(prompt));
        } else {
            let mut messages = Vec::new();
            if let Some(Value::String(system)) = obj.get("system") {
                messages.push(json!({ "role": "system", "content": system }));
            }
            messages.push(json!({ "role": "user", "content": prompt }));
            openai.insert("messages".into(), Value::Array(messages));
        }
    }
    // a thinking model's template switch (the templates read `enable_thinking`)
    match obj.get("think") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => {
            openai.insert("chat_template_kwargs".into(), json!({ "enable_thinking": b }));
        }
        Some(_) => return Err(ApiError::invalid("think", "`think` must be true or false")),
    }
    match obj.get("format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f.is_empty() => {}
        Some(Value::String(f)) if f == "json" => {
            openai.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        Some(schema @ Value::Object(_)) => {
            openai.insert(
                "response_format".into(),
                json!({ "type": "json_schema", "json_schema": { "name": "format", "schema": schema } }),
            );
        }
        Some(_) => return Err(ApiError::invalid("format", "`format` must be \"json\" or a JSON schema")),
    }
    match obj.get("options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(options)) => {
            for (name, value) in options {
                if let Some((_, field)) = OPTIONS.iter().find(|(o, _)| o == name) {
                    openai.insert(field.to_string(), value.clone());
                } else if FIXED_OPTIONS.contains(&name.as_str()) {
                    if state.ollama.warned.lock().expect("not poisoned").insert(name.clone()) {
                        tracing::warn!(
                            "Ollama option `{name}` is ignored: the server's context, batch and devices are set at startup"
                        );
                    }
                } else {
                    return Err(ApiError::invalid(
                        &format!("options.{name}"),
                        format!("the Ollama option `{name}` is not supported"),
                    ));
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("options", "`options` must be an object")),
    }
    let stream = !matches!(obj.get("stream"), Some(Value::Bool(false)));
    let endpoint = if openai.contains_key("prompt") { Endpoint::Completions } else { Endpoint::Chat };
    let mut request = CompletionRequest::parse(Value::Object(openai).to_string().as_bytes(), endpoint)?;
    request.stream = stream;
    Ok((request, chat))
}

/// Ollama's message of a reply: content, and tool calls with arguments as objects.
fn message_json(content: &str, thinking: &str, calls: &[crate::llama::ToolCall]) -> Value {
    let mut m = json!({ "role": "assistant", "content": content });
    if !thinking.is_empty() {
        m["thinking"] = json!(thinking);
    }
    if !calls.is_empty() {
        m["tool_calls"] = calls
            .iter()
            .map(|c| {
                let args: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!(c.arguments));
                json!({ "function": { "name": c.name, "arguments": args } })
            })
            .collect();
    }
    m
}

pub async fn chat(State(state): State<Arc<AppState>>, body: Body) -> Response {
    run(state, body, true).await
}

pub async fn generate(State(state): State<Arc<AppState>>, body: Body) -> Response {
    run(state, body, false).await
}

async fn run(state: Arc<AppState>, body: Body, chat: bool) -> Response {
    let started = Instant::now();
    let obj = match read_body(&state, body).await.and_then(|b| json_object(&b)) {
        Ok(o) => o,
        Err(e) => return from_api(e),
    };
    // an empty request loads the model (Ollama's warm-up): it is always loaded here
    let empty = if chat {
        obj.get("messages").is_none_or(|m| m.as_array().is_none_or(Vec::is_empty))
    } else {
        obj.get("prompt").is_none_or(|p| p.as_str().is_none_or(str::is_empty))
    };
    if empty {
        let mut done =
            json!({ "model": state.model_id, "created_at": now_rfc3339(), "done": true, "done_reason": "load" });
        if chat {
            done["message"] = json!({ "role": "assistant", "content": "" });
        } else {
            done["response"] = json!("");
        }
        return Json(done).into_response();
    }
    let (request, chat) = match translate(&state, &obj, chat) {
        Ok(r) => r,
        Err(e) => return from_api(e),
    };
    let submitted = match submit(&state, &request).await {
        Ok(s) => s,
        Err(e) => return from_api(e),
    };
    let model = state.model_id.clone();
    let prompt_tokens = submitted.prompt_tokens;
    let cut = state.cut.subscribe();
    let super::http::Submitted { rx, parser, guard, .. } = submitted;
    // one line per event; the last carries the counts and timings (nanoseconds, as Ollama)
    let line = move |piece: Value, done: Option<(FinishReason, usize)>| {
        let mut v = json!({ "model": model, "created_at": now_rfc3339(), "done": done.is_some() });
        let field = if chat { "message" } else { "response" };
        v[field] = if chat { piece } else { piece["content"].clone() };
        if let Some((finish, completion_tokens)) = done {
            let total = started.elapsed().as_nanos() as u64;
            v["done_reason"] = json!(match finish {
                FinishReason::Length => "length",
                _ => "stop",
            });
            v["total_duration"] = json!(total);
            v["load_duration"] = json!(0);
            v["prompt_eval_count"] = json!(prompt_tokens);
            v["eval_count"] = json!(completion_tokens);
            v["eval_duration"] = json!(total);
        }
        v
    };
    struct S<F> {
        rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
        cut: tokio::sync::watch::Receiver<bool>,
        assembler: ReplyAssembler,
        line: F,
        done: bool,
        _guard: super::http::InFlight,
    }
    let mut s = S { rx, cut, assembler: ReplyAssembler::new(parser), line, done: false, _guard: guard };
    if !request.stream {
        loop {
            match next_event(&mut s.rx, &mut s.cut).await {
                Step::Event(Event::Text(t)) => s.assembler.append(&t),
                Step::Event(Event::Done { finish_reason, completion_tokens, .. }) => {
                    let (_, m) = s.assembler.finish();
                    let finish = finish_with_calls(finish_reason, &m);
                    let piece = message_json(&m.content, &m.reasoning_content, &m.tool_calls);
                    return Json((s.line)(piece, Some((finish, completion_tokens)))).into_response();
                }
                Step::Event(Event::Failed(message)) => return ollama_error(500, message),
                Step::Cut => return from_api(cut_error()),
                Step::Event(_) => {}
                Step::EngineGone => return ollama_error(500, "the engine stopped mid-reply"),
            }
        }
    }
    let lines = futures_util::stream::unfold(s, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            let out = match next_event(&mut s.rx, &mut s.cut).await {
                Step::Event(Event::Text(t)) => {
                    let d = s.assembler.push(&t);
                    if d.content.is_empty() && d.reasoning_content.is_empty() {
                        continue;
                    }
                    (s.line)(message_json(&d.content, &d.reasoning_content, &[]), None)
                }
                Step::Event(Event::Done { finish_reason, completion_tokens, .. }) => {
                    s.done = true;
                    let (d, m) = s.assembler.finish();
                    let finish = finish_with_calls(finish_reason, &m);
                    // Ollama sends a reply's tool calls whole, with the last pieces of text
                    (s.line)(
                        message_json(&d.content, &d.reasoning_content, &m.tool_calls),
                        Some((finish, completion_tokens)),
                    )
                }
                Step::Event(Event::Failed(message)) => {
                    s.done = true;
                    json!({ "error": message })
                }
                Step::Cut => {
                    s.done = true;
                    json!({ "error": cut_error().message })
                }
                Step::EngineGone => {
                    s.done = true;
                    json!({ "error": "the engine stopped mid-reply" })
                }
                Step::Event(_) => continue,
            };
            let mut text = out.to_string();
            text.push('\n');
            return Some((Ok::<_, std::convert::Infallible>(text), s));
        }
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}
