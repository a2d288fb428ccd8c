//! OpenAI's request and response shapes: requests are read field by field from JSON so that an
//! error names the field, responses and errors are built as OpenAI's API returns them.

use serde_json::{json, Map, Value};

use crate::llama::{json_schema_to_grammar, SamplerSpec, Token, ToolCall};

use super::engine::{FinishReason, TokenLogprob};

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

/// A parsed `/v1/chat/completions` or `/v1/completions` request (or an Ollama one, `ollama`).
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub input: Input,
    /// OpenAI function tools, checked (`{"type": "function", "function": {"name", …}}`).
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
    /// What the reply must match (`response_format`, llama-server's `json_schema` or `grammar`).
    pub constraint: Option<Constraint>,
    pub max_tokens: Option<u32>,
    /// Sampling (the grammar fields are filled from the template and `constraint` later).
    pub sampler: SamplerSpec,
    /// The request gave a seed: the prompt is decoded in full (no cached prefix) so that the
    /// same seed gives the same text whatever the cache holds.
    pub fixed_seed: bool,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// llama.cpp server's extension: generate `max_tokens` whatever end-of-generation tokens
    /// come (benchmarks, tests).
    pub ignore_eos: bool,
    /// Log-probabilities of each reply token with this many alternatives (`None`: not asked).
    pub logprobs: Option<usize>,
    /// llama-server's `cache_prompt`: false decodes the whole prompt (benchmarks of reuse).
    pub cache_prompt: bool,
    /// Extra variables for the chat template (llama-server's `chat_template_kwargs`).
    pub template_kwargs: Map<String, Value>,
}

/// What to continue.
#[derive(Debug, Clone)]
pub enum Input {
    /// OpenAI messages, checked and normalised: `role` (developer → system), `content` a string,
    /// and for assistants `tool_calls` with string arguments, for tools `tool_call_id`.
    Chat(Vec<Value>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    /// `{"type": "function", "function": {"name": …}}`: this tool must be called.
    Function(String),
}

/// A constraint on the reply, with the field it came from (for errors).
#[derive(Debug, Clone)]
pub enum Constraint {
    Schema { schema: Value, field: &'static str },
    Grammar(String),
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// OpenAI fields this server does not implement: refused, never ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("audio", "audio output is not supported"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not supported"),
    ("functions", "the legacy `functions` field is not supported; send `tools`"),
    ("function_call", "the legacy `function_call` field is not supported; send `tool_choice`"),
    ("suffix", "`suffix` (insertion) is not supported"),
];

impl CompletionRequest {
    /// Reads a request body; every error names the field.
    pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<CompletionRequest, ApiError> {
        let obj = json_object(body)?;
        for (field, why) in UNSUPPORTED {
            if obj.get(*field).is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(field, *why));
            }
        }
        if let Some(Value::Array(m)) = obj.get("modalities") {
            if m.iter().any(|x| x != "text") {
                return Err(ApiError::invalid("modalities", "only text output is supported"));
            }
        }
        if endpoint == Endpoint::Completions {
            if let Some(Value::Bool(true)) = obj.get("echo") {
                return Err(ApiError::invalid("echo", "`echo` is not supported"));
            }
            if let Some((_, n)) = opt_int(&obj, "best_of")? {
                if n != 1 {
                    return Err(ApiError::invalid("best_of", "only `best_of`: 1 is supported"));
                }
            }
        }
        let model = match obj.get("model") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
            None => return Err(ApiError::invalid("model", "`model` is required")),
        };
        let input = match endpoint {
            Endpoint::Chat => Input::Chat(parse_messages(obj.get("messages"))?),
            Endpoint::Completions => Input::Text(parse_prompt(obj.get("prompt"))?),
        };
        let max_tokens = match (opt_int(&obj, "max_completion_tokens")?, opt_int(&obj, "max_tokens")?) {
            (Some((field, n)), _) | (None, Some((field, n))) => Some(positive(field, n)?),
            (None, None) => None,
        };
        if let Some((_, n)) = opt_int(&obj, "n")? {
            if n != 1 {
                return Err(ApiError::invalid("n", "only `n`: 1 is supported"));
            }
        }
        let (tools, tool_choice, parallel_tool_calls) = match endpoint {
            Endpoint::Chat => parse_tools(&obj)?,
            Endpoint::Completions => {
                if obj.get("tools").is_some_and(|t| !t.is_null()) {
                    return Err(ApiError::invalid("tools", "`tools` belongs to /v1/chat/completions"));
                }
                (Vec::new(), ToolChoice::Auto, false)
            }
        };
        let constraint = parse_constraint(&obj)?;
        let (sampler, fixed_seed) = parse_sampling(&obj)?;
        let stop = match obj.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or an array of strings"))?,
            Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or an array of strings")),
        };
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
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
        let logprobs = match endpoint {
            Endpoint::Chat => match (opt_bool(&obj, "logprobs")?, opt_int(&obj, "top_logprobs")?) {
                (_, Some((f, n))) if !(0..=20).contains(&n) => {
                    return Err(ApiError::invalid(f, "`top_logprobs` must be between 0 and 20"))
                }
                (Some(true), top) => Some(top.map_or(0, |(_, n)| n as usize)),
                (_, Some(_)) => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs`: true")),
                _ => None,
            },
            // the legacy API: `logprobs` is the number of alternatives (0-5)
            Endpoint::Completions => match opt_int(&obj, "logprobs")? {
                Some((f, n)) if !(0..=5).contains(&n) => {
                    return Err(ApiError::invalid(f, "`logprobs` must be between 0 and 5"))
                }
                Some((_, n)) => Some(n as usize),
                None => None,
            },
        };
        let template_kwargs = match obj.get("chat_template_kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => {
                return Err(ApiError::invalid("chat_template_kwargs", "`chat_template_kwargs` must be an object"))
            }
        };
        Ok(CompletionRequest {
            model,
            input,
            tools,
            tool_choice,
            parallel_tool_calls,
            constraint,
            max_tokens,
            sampler,
            fixed_seed,
            stop,
            stream,
            include_usage,
            ignore_eos: opt_bool(&obj, "ignore_eos")?.unwrap_or(false),
            logprobs,
            cache_prompt: opt_bool(&obj, "cache_prompt")?.unwrap_or(true),
            template_kwargs,
        })
    }
}

/// The body as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(400, "invalid_request_error", Some("invalid_json"), format!("the body is not valid JSON: {e}"))
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::new(400, "invalid_request_error", Some("invalid_json"), "the body must be a JSON object")),
    }
}

fn positive(field: &str, n: i64) -> Result<u32, ApiError> {
    if n <= 0 {
        return Err(ApiError::invalid(field, format!("`{field}` must be at least 1 (got {n})")));
    }
    Ok(n.min(u32::MAX as i64) as u32)
}

/// Sampling fields (OpenAI's and llama-server's), and whether the seed was given.
pub fn parse_sampling(obj: &Map<String, Value>) -> Result<(SamplerSpec, bool), ApiError> {
    let d = SamplerSpec::default();
    let top_k = match opt_int(obj, "top_k")? {
        Some((_, k)) if k < 0 => return Err(ApiError::invalid("top_k", "`top_k` must be 0 (off) or more")),
        Some((_, k)) => k.min(i32::MAX as i64) as i32,
        None => d.top_k,
    };
    let repeat_last_n = match opt_int(obj, "repeat_last_n")? {
        Some((f, n)) if n < -1 => {
            return Err(ApiError::invalid(f, "`repeat_last_n` must be -1 (the context), 0 or more"))
        }
        Some((_, n)) => n.min(i32::MAX as i64) as i32,
        None => d.repeat_last_n,
    };
    // any non-negative integer picks a stream (reduced to the sampler's 32 bits); a negative one
    // (llama-server's -1) asks for a random seed, as no seed does
    let seed = opt_int(obj, "seed")?.map(|(_, s)| s).filter(|s| *s >= 0);
    let logit_bias = match obj.get("logit_bias") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let field = format!("logit_bias.{k}");
                let token: Token =
                    k.parse().map_err(|_| ApiError::invalid(&field, "`logit_bias` keys are token ids"))?;
                let bias = v
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| ApiError::invalid(&field, "a logit bias is a number between -100 and 100"))?;
                Ok((token, bias as f32))
            })
            .collect::<Result<_, ApiError>>()?,
        Some(_) => return Err(ApiError::invalid("logit_bias", "`logit_bias` must be an object of token id → bias")),
    };
    let spec = SamplerSpec {
        seed: seed.map_or_else(fresh_seed, |s| (s as u64 % (u32::MAX as u64)) as u32),
        temperature: opt_number(obj, "temperature", 0.0, 2.0)?.unwrap_or(d.temperature),
        top_k,
        top_p: opt_number(obj, "top_p", 0.0, 1.0)?.unwrap_or(d.top_p),
        min_p: opt_number(obj, "min_p", 0.0, 1.0)?.unwrap_or(d.min_p),
        typical_p: opt_number(obj, "typical_p", 0.0, 1.0)?.unwrap_or(d.typical_p),
        repeat_penalty: opt_number(obj, "repeat_penalty", 0.01, 10.0)?.unwrap_or(d.repeat_penalty),
        repeat_last_n,
        presence_penalty: opt_number(obj, "presence_penalty", -2.0, 2.0)?.unwrap_or(d.presence_penalty),
        frequency_penalty: opt_number(obj, "frequency_penalty", -2.0, 2.0)?.unwrap_or(d.frequency_penalty),
        logit_bias,
        ..d
    };
    Ok((spec, seed.is_some()))
}

/// `response_format` (OpenAI), `json_schema` and `grammar` (llama-server): at most one.
fn parse_constraint(obj: &Map<String, Value>) -> Result<Option<Constraint>, ApiError> {
    let mut found = Vec::new();
    match obj.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::Object(rf)) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                found.push(Constraint::Schema { schema: json!({ "type": "object" }), field: "response_format" })
            }
            Some("json_schema") => {
                let schema = match rf.get("json_schema") {
                    Some(Value::Object(js)) => match js.get("schema") {
                        Some(s @ Value::Object(_)) => s.clone(),
                        // OpenAI: a json_schema without `schema` allows any JSON
                        None => json!({}),
                        Some(_) => {
                            return Err(ApiError::invalid(
                                "response_format.json_schema.schema",
                                "`response_format.json_schema.schema` must be a JSON schema object",
                            ))
                        }
                    },
                    _ => {
                        return Err(ApiError::invalid(
                            "response_format.json_schema",
                            "`response_format` of type json_schema needs a `json_schema` object",
                        ))
                    }
                };
                found.push(Constraint::Schema { schema, field: "response_format.json_schema.schema" });
            }
            _ => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    "`response_format.type` must be text, json_object or json_schema",
                ))
            }
        },
        Some(_) => return Err(ApiError::invalid("response_format", "`response_format` must be an object")),
    }
    match obj.get("json_schema") {
        None | Some(Value::Null) => {}
        Some(s @ Value::Object(_)) => found.push(Constraint::Schema { schema: s.clone(), field: "json_schema" }),
        Some(_) => return Err(ApiError::invalid("json_schema", "`json_schema` must be a JSON schema object")),
    }
    match obj.get("grammar") {
        None | Some(Value::Null) => {}
        Some(Value::String(g)) if g.is_empty() => {}
        Some(Value::String(g)) => found.push(Constraint::Grammar(g.clone())),
        Some(_) => return Err(ApiError::invalid("grammar", "`grammar` must be a GBNF string")),
    }
    if found.len() > 1 {
        return Err(ApiError::invalid("grammar", "give one of `response_format`, `json_schema` and `grammar`"));
    }
    Ok(found.pop())
}

/// `tools`, `tool_choice` and `parallel_tool_calls`, checked.
fn parse_tools(obj: &Map<String, Value>) -> Result<(Vec<Value>, ToolChoice, bool), ApiError> {
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            items.iter().enumerate().map(|(i, t)| check_tool(t, i)).collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array of function tools")),
    };
    let tool_choice = match obj.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "`tool_choice` must be auto, none, required or a function",
                ))
            }
        },
        Some(Value::Object(o)) => match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) => ToolChoice::Function(name.to_string()),
            None => {
                return Err(ApiError::invalid(
                    "tool_choice.function.name",
                    "`tool_choice` as an object is {\"type\": \"function\", \"function\": {\"name\": …}}",
                ))
            }
        },
        Some(_) => return Err(ApiError::invalid("tool_choice", "`tool_choice` must be a string or an object")),
    };
    if tool_choice != ToolChoice::Auto && tool_choice != ToolChoice::None && tools.is_empty() {
        return Err(ApiError::invalid("tool_choice", "`tool_choice` asks for a tool call but `tools` is empty"));
    }
    if let ToolChoice::Function(name) = &tool_choice {
        if !tools.iter().any(|t| t["function"]["name"] == name.as_str()) {
            return Err(ApiError::invalid("tool_choice.function.name", format!("no tool named `{name}` in `tools`")));
        }
    }
    let parallel = opt_bool(obj, "parallel_tool_calls")?.unwrap_or(true);
    Ok((tools, tool_choice, parallel))
}

/// One `tools[i]`: a function with a name and, if given, an object schema of its parameters.
fn check_tool(tool: &Value, i: usize) -> Result<Value, ApiError> {
    let field = format!("tools[{i}]");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(&format!("{field}.type"), format!("`{field}.type` must be \"function\"")));
    }
    let Some(Value::Object(f)) = tool.get("function") else {
        return Err(ApiError::invalid(&format!("{field}.function"), format!("`{field}.function` must be an object")));
    };
    match f.get("name") {
        Some(Value::String(n))
            if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') => {}
        _ => {
            return Err(ApiError::invalid(
                &format!("{field}.function.name"),
                format!("`{field}.function.name` must be a non-empty name of letters, digits, _, - and ."),
            ))
        }
    }
    match f.get("parameters") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{field}.function.parameters"),
                format!("`{field}.function.parameters` must be a JSON schema object"),
            ))
        }
    }
    if let Some(Value::Object(p)) = f.get("parameters") {
        // the schema becomes the call's grammar: a schema it cannot convert is refused here
        json_schema_to_grammar(&Value::Object(p.clone())).map_err(|e| {
            ApiError::invalid(&format!("{field}.function.parameters"), format!("`{field}.function.parameters`: {e}"))
        })?;
    }
    Ok(tool.clone())
}

fn fresh_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

/// The messages, checked and normalised (see [`Input::Chat`]).
fn parse_messages(value: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let Some(Value::Array(items)) = value else {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty array of messages"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty array of messages"));
    }
    items.iter().enumerate().map(|(i, m)| parse_message(m, i)).collect()
}

fn parse_message(m: &Value, i: usize) -> Result<Value, ApiError> {
    let field = format!("messages[{i}]");
    let Value::Object(m) = m else {
        return Err(ApiError::invalid(&field, format!("`{field}` must be an object with `role` and `content`")));
    };
    let role = match m.get("role") {
        // the templates know `system`; OpenAI's newer name for it is `developer`
        Some(Value::String(r)) if r == "developer" => "system",
        Some(Value::String(r)) if ["system", "user", "assistant", "tool"].contains(&r.as_str()) => r.as_str(),
        Some(Value::String(r)) => {
            return Err(ApiError::invalid(
                &format!("{field}.role"),
                format!("`{field}.role` `{r}` is not one of system, developer, user, assistant, tool"),
            ))
        }
        _ => return Err(ApiError::invalid(&format!("{field}.role"), format!("`{field}.role` must be a string"))),
    };
    let mut out = Map::new();
    out.insert("role".into(), json!(role));
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
    out.insert("content".into(), json!(content));
    if role == "assistant" {
        match m.get("tool_calls") {
            None | Some(Value::Null) => {}
            Some(Value::Array(calls)) => {
                let calls = calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| past_tool_call(c, &format!("{field}.tool_calls[{j}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                if !calls.is_empty() {
                    out.insert("tool_calls".into(), Value::Array(calls));
                }
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    &format!("{field}.tool_calls"),
                    format!("`{field}.tool_calls` must be an array"),
                ))
            }
        }
    }
    if role == "tool" {
        match m.get("tool_call_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(id)) => {
                out.insert("tool_call_id".into(), json!(id));
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    &format!("{field}.tool_call_id"),
                    format!("`{field}.tool_call_id` must be a string"),
                ))
            }
        }
    }
    if let Some(Value::String(name)) = m.get("name") {
        out.insert("name".into(), json!(name));
    }
    Ok(Value::Object(out))
}

/// A tool call of an earlier assistant turn, with its arguments as JSON text.
fn past_tool_call(call: &Value, field: &str) -> Result<Value, ApiError> {
    let name = call.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(ApiError::invalid(
            &format!("{field}.function.name"),
            format!("`{field}.function.name` is required"),
        ));
    };
    let arguments = match call.get("function").and_then(|f| f.get("arguments")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => {
            if serde_json::from_str::<Value>(s).is_err() {
                return Err(ApiError::invalid(
                    &format!("{field}.function.arguments"),
                    format!("`{field}.function.arguments` is not valid JSON"),
                ));
            }
            s.clone()
        }
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{field}.function.arguments"),
                format!("`{field}.function.arguments` must be a JSON string"),
            ))
        }
    };
    let mut out = json!({ "type": "function", "function": { "name": name, "arguments": arguments } });
    if let Some(id) = call.get("id").and_then(Value::as_str) {
        out["id"] = json!(id);
    }
    Ok(out)
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

/// An optional boolean field (`null` counts as absent).
pub fn opt_bool(obj: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(field, format!("`{field}` must be true or false"))),
    }
}

/// An optional integer field (JSON integers only; `null` counts as absent).
pub fn opt_int<'a>(obj: &Map<String, Value>, field: &'a str) -> Result<Option<(&'a str, i64)>, ApiError> {
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
pub fn opt_number(obj: &Map<String, Value>, field: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
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

/// A reply as the chat template's parser reads it (plain text for templates without one).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyMessage {
    pub content: String,
    pub reasoning_content: String,
    pub tool_calls: Vec<ToolCall>,
}

impl ReplyMessage {
    /// OpenAI's assistant message (`content` null when the reply is only tool calls).
    pub fn json(&self) -> Value {
        let mut m = json!({ "role": "assistant", "content": self.content });
        if !self.tool_calls.is_empty() {
            if self.content.is_empty() {
                m["content"] = Value::Null;
            }
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
                .collect();
        }
        if !self.reasoning_content.is_empty() {
            m["reasoning_content"] = json!(self.reasoning_content);
        }
        m
    }
}

/// Log-probabilities in the shape of each endpoint.
fn logprobs_json(endpoint: Endpoint, tokens: &[TokenLogprob]) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "content": tokens.iter().map(|t| json!({
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": t.top.iter().map(|a| json!({ "token": a.token, "logprob": a.logprob, "bytes": a.bytes })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "refusal": null,
        }),
        Endpoint::Completions => {
            let mut offset = 0;
            let mut offsets = Vec::new();
            for t in tokens {
                offsets.push(offset);
                offset += t.token.len();
            }
            json!({
                "tokens": tokens.iter().map(|t| &t.token).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
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

    /// The whole reply; `logprobs` when the request asked for them.
    pub fn complete(
        &self,
        reply: &ReplyMessage,
        finish: FinishReason,
        usage: Usage,
        logprobs: Option<&[TokenLogprob]>,
    ) -> Value {
        let logprobs = logprobs.map_or(Value::Null, |l| logprobs_json(self.endpoint, l));
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": reply.json(),
                "logprobs": logprobs,
                "finish_reason": finish.as_str(),
            }),
            Endpoint::Completions => {
                json!({ "index": 0, "text": reply.content, "logprobs": logprobs, "finish_reason": finish.as_str() })
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

    /// A streamed chat piece: `delta` is OpenAI's (`role`, `content`, `tool_calls`, …).
    pub fn delta_chunk(&self, delta: Value, finish: Option<FinishReason>, logprobs: Option<&[TokenLogprob]>) -> Value {
        let logprobs = logprobs.map_or(Value::Null, |l| logprobs_json(self.endpoint, l));
        self.wrap(json!({
            "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str),
        }))
    }

    /// A streamed completion piece.
    pub fn text_chunk(&self, text: &str, finish: Option<FinishReason>, logprobs: Option<&[TokenLogprob]>) -> Value {
        let logprobs = logprobs.map_or(Value::Null, |l| logprobs_json(self.endpoint, l));
        self.wrap(json!({
            "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.map(FinishReason::as_str),
        }))
    }

    fn wrap(&self, choice: Value) -> Value {
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
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#,
                Some("tools[0].function"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]}"#,
                Some("tools[0].function.name"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}"#,
                Some("tools[0].function.parameters"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}"#,
                Some("tool_choice.function.name"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#,
                Some("tool_choice"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}"#,
                Some("messages[0].tool_calls[0].function.arguments"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}"#,
                Some("response_format.type"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}"#,
                Some("response_format.json_schema"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"schema": []}}}"#,
                Some("response_format.json_schema.schema"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}"#,
                Some("top_logprobs"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}"#,
                Some("top_logprobs"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}"#,
                Some("logit_bias.abc"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}"#,
                Some("logit_bias.5"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}"#,
                Some("presence_penalty"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}"#,
                Some("audio"),
            ),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": []}"#, Some("functions")),
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
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "grammar": "x", "json_schema": {}}"#,
                Some("grammar"),
            ),
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
        assert_eq!(ok.sampler.seed, 7);
        assert!(ok.fixed_seed);
        let Input::Chat(m) = ok.input else { panic!() };
        assert_eq!(m[0]["content"], "hi");
    }

    #[test]
    fn stop_lists_are_not_capped_and_negative_seeds_are_random() {
        let stops: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": stops, "seed": -1});
        let a = chat(&body.to_string()).unwrap();
        assert_eq!(a.stop.len(), 12);
        assert!(!a.fixed_seed);
        // two "random" seeds differ (one in 2^32 chance of a false failure)
        let b = chat(&body.to_string()).unwrap();
        assert_ne!(a.sampler.seed, b.sampler.seed);
    }

    #[test]
    fn tools_and_formats_are_read() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get"}},
            "response_format": {"type": "json_object"},
            "logprobs": true, "top_logprobs": 2,
            "logit_bias": {"42": -100},
        });
        let r = chat(&body.to_string()).unwrap();
        let Input::Chat(m) = &r.input else { panic!() };
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(m[3]["tool_call_id"], "c1");
        assert_eq!(r.tool_choice, ToolChoice::Function("get".into()));
        assert!(matches!(r.constraint, Some(Constraint::Schema { field: "response_format", .. })));
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(r.sampler.logit_bias, vec![(42, -100.0)]);
    }
}
