//! OpenAI's request and response shapes: requests are read field by field from JSON so that an
//! error names the field, responses and errors are built as OpenAI's API returns them.

use serde_json::{json, Map, Value};

use crate::llama::{ChatMessage, SamplingParams};

use super::engine::{FinishReason, Prompt};

/// An error in OpenAI's shape (`{"error": {"message", "type", "code", "param"}}`) with its status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
}

impl ApiError {
    /// 400 for a bad value of `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some(param.to_string()),
        }
    }

    pub fn new(status: u16, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, code, param: None }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "code": self.code, "param": self.param } })
    }
}

/// A parsed `/v1/chat/completions` or `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// llama.cpp server's extension: generate `max_tokens` whatever end-of-generation tokens
    /// come (benchmarks, tests).
    pub ignore_eos: bool,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl CompletionRequest {
    /// Reads a request body; every error names the field.
    pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<CompletionRequest, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                400,
                "invalid_request_error",
                Some("invalid_json"),
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                Some("invalid_json"),
                "the body must be a JSON object",
            ));
        };
        let model = match obj.get("model") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
            None => return Err(ApiError::invalid("model", "`model` is required")),
        };
        let prompt = match endpoint {
            Endpoint::Chat => Prompt::Chat(parse_messages(obj.get("messages"))?),
            Endpoint::Completions => Prompt::Text(parse_prompt(obj.get("prompt"))?),
        };
        let max_tokens = match (opt_int(&obj, "max_completion_tokens")?, opt_int(&obj, "max_tokens")?) {
            (Some((field, n)), _) | (None, Some((field, n))) => {
                if n <= 0 {
                    return Err(ApiError::invalid(field, format!("`{field}` must be at least 1 (got {n})")));
                }
                Some(n.min(u32::MAX as i64) as u32)
            }
            (None, None) => None,
        };
        if let Some((_, n)) = opt_int(&obj, "n")? {
            if n != 1 {
                return Err(ApiError::invalid("n", "only `n`: 1 is supported"));
            }
        }
        let defaults = SamplingParams::default();
        let temperature = opt_number(&obj, "temperature", 0.0, 2.0)?.unwrap_or(defaults.temperature);
        let top_p = opt_number(&obj, "top_p", 0.0, 1.0)?.unwrap_or(defaults.top_p);
        let min_p = opt_number(&obj, "min_p", 0.0, 1.0)?.unwrap_or(defaults.min_p);
        let top_k = match opt_int(&obj, "top_k")? {
            Some((_, k)) if k < 0 => return Err(ApiError::invalid("top_k", "`top_k` must be 0 (off) or more")),
            Some((_, k)) => k.min(i32::MAX as i64) as i32,
            None => defaults.top_k,
        };
        let seed = match opt_int(&obj, "seed")? {
            // any integer picks a stream; reduced to the sampler's 32 bits
            Some((_, s)) => (s as u64 % (u32::MAX as u64)) as u32,
            None => fresh_seed(),
        };
        let stop = match obj.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                if items.len() > 4 {
                    return Err(ApiError::invalid("stop", "`stop` takes at most 4 strings"));
                }
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or an array of strings"))?
            }
            Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or an array of strings")),
        };
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let stream = match obj.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("stream", "`stream` must be true or false")),
        };
        let include_usage = match obj.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "stream_options.include_usage",
                        "`stream_options.include_usage` must be true or false",
                    ))
                }
            },
            Some(_) => return Err(ApiError::invalid("stream_options", "`stream_options` must be an object")),
        };
        let ignore_eos = match obj.get("ignore_eos") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("ignore_eos", "`ignore_eos` must be true or false")),
        };
        Ok(CompletionRequest {
            model,
            prompt,
            max_tokens,
            sampling: SamplingParams { temperature, top_k, top_p, min_p, seed },
            stop,
            stream,
            include_usage,
            ignore_eos,
        })
    }
}

fn fresh_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

fn parse_messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = value else {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty array of messages"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty array of messages"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(ApiError::invalid(
                    &field,
                    format!("`{field}` must be an object with `role` and `content`"),
                ));
            };
            let role = match m.get("role") {
                Some(Value::String(r))
                    if ["system", "developer", "user", "assistant", "tool"].contains(&r.as_str()) =>
                {
                    // the templates know `system`; OpenAI's newer name for it is `developer`
                    if r == "developer" {
                        "system".to_string()
                    } else {
                        r.clone()
                    }
                }
                Some(Value::String(r)) => {
                    return Err(ApiError::invalid(
                        &format!("{field}.role"),
                        format!("`{field}.role` `{r}` is not one of system, developer, user, assistant, tool"),
                    ))
                }
                _ => {
                    return Err(ApiError::invalid(&format!("{field}.role"), format!("`{field}.role` must be a string")))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => text_parts(parts, &field)?,
                _ => {
                    return Err(ApiError::invalid(
                        &format!("{field}.content"),
                        format!("`{field}.content` must be a string or an array of text parts"),
                    ))
                }
            };
            if content.contains('\0') {
                return Err(ApiError::invalid(&format!("{field}.content"), "content contains a NUL character"));
            }
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// Content given as parts: text parts are joined; other kinds (images, audio) are refused.
fn text_parts(parts: &[Value], field: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let pf = format!("{field}.content[{j}]");
        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(t)) => text.push_str(t),
            (Some(kind), _) if kind != "text" => {
                return Err(ApiError::invalid(&pf, format!("`{pf}` is of type `{kind}`; this server reads text only")))
            }
            _ => return Err(ApiError::invalid(&pf, format!("`{pf}` must be {{\"type\": \"text\", \"text\": …}}"))),
        }
    }
    Ok(text)
}

fn parse_prompt(value: Option<&Value>) -> Result<String, ApiError> {
    let text = match value {
        Some(Value::String(s)) => s.clone(),
        // the openai client sends a one-element list for a single prompt at times
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => items[0].as_str().unwrap().to_string(),
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be one string (batches of prompts are not supported)",
            ))
        }
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(_) => return Err(ApiError::invalid("prompt", "`prompt` must be a string")),
    };
    if text.contains('\0') {
        return Err(ApiError::invalid("prompt", "`prompt` contains a NUL character"));
    }
    Ok(text)
}

/// An optional integer field (JSON integers only; `null` counts as absent).
fn opt_int<'a>(obj: &Map<String, Value>, field: &'a str) -> Result<Option<(&'a str, i64)>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Some((field, i))),
            None => Err(ApiError::invalid(field, format!("`{field}` must be an integer (got {n})"))),
        },
        Some(v) => Err(ApiError::invalid(field, format!("`{field}` must be an integer (got {})", type_name(v)))),
    }
}

/// An optional number field within `[lo, hi]`.
fn opt_number(obj: &Map<String, Value>, field: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::invalid(field, format!("`{field}` must be between {lo} and {hi} (got {n})")));
            }
            Ok(Some(x as f32))
        }
        Some(v) => Err(ApiError::invalid(field, format!("`{field}` must be a number (got {})", type_name(v)))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Token counts of one reply.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
        })
    }
}

/// Builds the response objects of one request.
pub struct Responder {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Responder {
    pub fn new(endpoint: Endpoint, model: &str, serial: u64) -> Responder {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        Responder { endpoint, id: format!("{prefix}-{serial}"), created, model: model.to_string() }
    }

    /// The whole reply.
    pub fn complete(&self, text: &str, finish: FinishReason, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "finish_reason": finish.as_str(),
            }),
            Endpoint::Completions => {
                json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str() })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.json(),
        })
    }

    /// A streamed piece; `first` carries the assistant role (chat), `finish` ends the choice.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (first, finish) {
                    (_, Some(_)) => json!({}),
                    (true, None) => json!({ "role": "assistant", "content": text }),
                    (false, None) => json!({ "content": text }),
                };
                json!({ "index": 0, "delta": delta, "finish_reason": finish.map(FinishReason::as_str) })
            }
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.map(FinishReason::as_str),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The usage chunk after the last choice chunk (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.json(),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(body.as_bytes(), Endpoint::Chat)
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("{", None),
            ("[1]", None),
            (r#"{"messages": []}"#, Some("model")),
            (r#"{"model": 3, "messages": []}"#, Some("model")),
            (r#"{"model": "m"}"#, Some("messages")),
            (r#"{"model": "m", "messages": []}"#, Some("messages")),
            (r#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#, Some("messages[0].role")),
            (r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#, Some("messages[0].content")),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#, Some("max_tokens")),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
                Some("temperature"),
            ),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 2}"#, Some("top_p")),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}"#, Some("stop")),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#, Some("stream")),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}"#, Some("n")),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "ignore_eos": 1}"#, Some("ignore_eos")),
        ];
        for (body, param) in cases {
            let err = chat(body).expect_err(body);
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), param, "{body}: {}", err.message);
        }
        let ok = chat(r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stop": "x", "seed": 7, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}"#).unwrap();
        assert!(ok.stream && ok.include_usage);
        assert_eq!(ok.stop, vec!["x".to_string()]);
        assert_eq!(ok.sampling.seed, 7);
        let Prompt::Chat(m) = ok.prompt else { panic!() };
        assert_eq!(m[0].content, "hi");
    }
}
