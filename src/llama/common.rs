//! llama.cpp's `common/` through kvtuner's C shim (`shim/kvtuner_common.h`): chat templates
//! (Jinja, tools, the model's default system prompt), the parsers of tool-call formats, JSON
//! schema → grammar, and llama-server's sampler (penalties, logit bias, lazy grammars).
//! Data crosses as JSON text; every C++ exception comes back as an error here.

use std::ffi::{c_char, CStr, CString};
use std::ptr::NonNull;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::context::Context;
use super::model::{Model, Token};
use super::sys;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CommonError(pub String);

/// A string the shim allocated, freed on drop.
struct ShimString(*mut c_char);

impl ShimString {
    fn take(&self) -> String {
        if self.0.is_null() {
            return String::new();
        }
        // Safety: the shim returns NUL-terminated strings it allocated; read before drop.
        unsafe { CStr::from_ptr(self.0) }.to_string_lossy().into_owned()
    }
}

impl Drop for ShimString {
    fn drop(&mut self) {
        // Safety: allocated by the shim (malloc) or NULL; freed once.
        unsafe { sys::kvt_string_free(self.0) };
    }
}

/// Calls a shim function that returns non-zero with `*error` set on failure.
fn call(f: impl FnOnce(*mut *mut c_char) -> i32) -> Result<(), CommonError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let rc = f(&mut error);
    let error = ShimString(error);
    if rc == 0 {
        Ok(())
    } else {
        let message = error.take();
        Err(CommonError(if message.is_empty() { "llama.cpp common/ failed".into() } else { message }))
    }
}

fn c_string(s: &str, what: &str) -> Result<CString, CommonError> {
    CString::new(s).map_err(|_| CommonError(format!("{what} contains a NUL byte")))
}

/// Where a model's chat template comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// `tokenizer.chat_template` (and its `tool_use` variant) of the model.
    Model,
    /// Jinja source (e.g. a file's).
    Jinja(String),
    /// A template llama.cpp implements in C++, by name (`llama_chat_builtin_templates`).
    Builtin(String),
}

/// What a template can do (`jinja::caps`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TemplateCaps {
    #[serde(default)]
    pub supports_tools: bool,
    #[serde(default)]
    pub supports_tool_calls: bool,
    #[serde(default)]
    pub supports_parallel_tool_calls: bool,
    #[serde(default)]
    pub supports_system_role: bool,
}

#[derive(Debug, Deserialize)]
struct TemplateInfo {
    source: String,
    caps: TemplateCaps,
}

/// A model's chat templates, compiled once.
#[derive(Debug)]
pub struct ChatTemplates {
    raw: NonNull<sys::kvt_chat_templates>,
    source: String,
    caps: TemplateCaps,
}

// Safety: the templates are immutable after init (apply reads them); common_chat_templates_apply
// keeps no state between calls, so shared use from several threads is sound.
unsafe impl Send for ChatTemplates {}
unsafe impl Sync for ChatTemplates {}

impl Drop for ChatTemplates {
    fn drop(&mut self) {
        // Safety: from kvt_chat_templates_init, freed once.
        unsafe { sys::kvt_chat_templates_free(self.raw.as_ptr()) };
    }
}

/// A rendered request: the prompt and how to constrain and parse the reply.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AppliedTemplate {
    pub prompt: String,
    /// Grammar for tool calls or `response_format` (empty: none).
    pub grammar: String,
    /// The grammar applies only once a trigger appears (tool calls in `auto` mode).
    pub grammar_lazy: bool,
    pub grammar_triggers: Vec<GrammarTrigger>,
    /// Control tokens the reply may contain as text (e.g. `<tool_call>`).
    pub preserved_tokens: Vec<String>,
    pub additional_stops: Vec<String>,
    pub format: String,
    /// What the template already wrote of the assistant's turn.
    pub generation_prompt: String,
    /// The serialized parser of the reply.
    pub parser: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct GrammarTrigger {
    /// `token`, `word`, `pattern` or `pattern_full`.
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
}

impl ChatTemplates {
    pub fn new(model: &Model, source: &TemplateSource) -> Result<ChatTemplates, CommonError> {
        let (text, jinja) = match source {
            TemplateSource::Model => (None, true),
            TemplateSource::Jinja(src) => (Some(c_string(src, "the chat template")?), true),
            TemplateSource::Builtin(name) => (Some(c_string(name, "the template name")?), false),
        };
        let mut raw: *mut sys::kvt_chat_templates = std::ptr::null_mut();
        // Safety: the model outlives the call (the templates copy what they need of its vocab);
        // text is NUL-terminated or NULL; raw is written on success only.
        call(|err| unsafe {
            sys::kvt_chat_templates_init(
                model.as_ptr(),
                text.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
                jinja,
                &mut raw,
                err,
            )
        })?;
        let raw = NonNull::new(raw).ok_or_else(|| CommonError("the chat templates were not created".into()))?;
        let mut out: *mut c_char = std::ptr::null_mut();
        // Safety: valid handle; out is freed by ShimString.
        let info = call(|err| unsafe { sys::kvt_chat_templates_info(raw.as_ptr(), &mut out, err) });
        let out = ShimString(out);
        let mut templates = ChatTemplates { raw, source: String::new(), caps: TemplateCaps::default() };
        info?;
        let info: TemplateInfo =
            serde_json::from_str(&out.take()).map_err(|e| CommonError(format!("template info: {e}")))?;
        templates.source = info.source;
        templates.caps = info.caps;
        Ok(templates)
    }

    pub fn caps(&self) -> &TemplateCaps {
        &self.caps
    }

    /// The template's source (Jinja, or the built-in's name).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `inputs` (see `kvt_chat_apply`: messages, tools, tool_choice, json_schema, …).
    pub fn apply(&self, inputs: &Value) -> Result<AppliedTemplate, CommonError> {
        let text = c_string(&inputs.to_string(), "the request")?;
        let mut out: *mut c_char = std::ptr::null_mut();
        // Safety: valid handle and NUL-terminated input; out is freed by ShimString.
        let rc = call(|err| unsafe { sys::kvt_chat_apply(self.raw.as_ptr(), text.as_ptr(), &mut out, err) });
        let out = ShimString(out);
        rc?;
        serde_json::from_str(&out.take()).map_err(|e| CommonError(format!("rendered template: {e}")))
    }
}

/// A tool call the reply makes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// A reply (or the part of it so far) as the template's parser reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedReply {
    pub content: String,
    pub reasoning_content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// The parser of one reply's format.
#[derive(Debug)]
pub struct ChatParser {
    raw: NonNull<sys::kvt_chat_parser>,
}

// Safety: a parser is used by one request handler at a time (&self parse does not mutate).
unsafe impl Send for ChatParser {}

impl Drop for ChatParser {
    fn drop(&mut self) {
        // Safety: from kvt_chat_parser_init, freed once.
        unsafe { sys::kvt_chat_parser_free(self.raw.as_ptr()) };
    }
}

impl ChatParser {
    /// The parser for replies to `applied`; `reasoning_format` as llama-server's (`auto`, `none`).
    pub fn new(applied: &AppliedTemplate, reasoning_format: &str, parse_tool_calls: bool) -> Result<Self, CommonError> {
        let params = serde_json::json!({
            "format": applied.format,
            "generation_prompt": applied.generation_prompt,
            "parser": applied.parser,
            "reasoning_format": reasoning_format,
            "parse_tool_calls": parse_tool_calls,
        });
        let text = c_string(&params.to_string(), "the parser")?;
        let mut raw: *mut sys::kvt_chat_parser = std::ptr::null_mut();
        // Safety: NUL-terminated input; raw is written on success only.
        call(|err| unsafe { sys::kvt_chat_parser_init(text.as_ptr(), &mut raw, err) })?;
        let raw = NonNull::new(raw).ok_or_else(|| CommonError("the parser was not created".into()))?;
        Ok(ChatParser { raw })
    }

    /// Parses the reply so far (`partial`: more may follow, so an unfinished call is not an error).
    pub fn parse(&self, text: &str, partial: bool) -> Result<ParsedReply, CommonError> {
        let mut out: *mut c_char = std::ptr::null_mut();
        // Safety: text is valid for len bytes (it need not be NUL-terminated); out freed below.
        let rc = call(|err| unsafe {
            sys::kvt_chat_parse(self.raw.as_ptr(), text.as_ptr() as *const c_char, text.len(), partial, &mut out, err)
        });
        let out = ShimString(out);
        rc?;
        let v: Value = serde_json::from_str(&out.take()).map_err(|e| CommonError(format!("parsed reply: {e}")))?;
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(ParsedReply {
            content: s(&v["content"]),
            reasoning_content: s(&v["reasoning_content"]),
            tool_calls: v["tool_calls"]
                .as_array()
                .map(|calls| {
                    calls
                        .iter()
                        .map(|c| ToolCall {
                            id: s(&c["id"]),
                            name: s(&c["function"]["name"]),
                            arguments: s(&c["function"]["arguments"]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// A JSON schema as a GBNF grammar (llama.cpp's converter: the one llama-server uses).
pub fn json_schema_to_grammar(schema: &Value) -> Result<String, CommonError> {
    let text = c_string(&schema.to_string(), "the schema")?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // Safety: NUL-terminated input; out is freed by ShimString.
    let rc = call(|err| unsafe { sys::kvt_json_schema_to_grammar(text.as_ptr(), &mut out, err) });
    let out = ShimString(out);
    rc?;
    Ok(out.take())
}

/// Where a grammar comes from: it decides whether the sampler first feeds it the generation
/// prompt the template already wrote (output-format and tool-call grammars do, a user's does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrammarKind {
    #[default]
    User,
    OutputFormat,
    ToolCalls,
}

/// llama-server's sampling parameters for one request.
#[derive(Debug, Clone, Serialize)]
pub struct SamplerSpec {
    pub seed: u32,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub typical_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// (token, bias added to its logit).
    pub logit_bias: Vec<(Token, f32)>,
    pub grammar: String,
    pub grammar_kind: GrammarKind,
    pub grammar_lazy: bool,
    pub grammar_triggers: Vec<GrammarTrigger>,
    pub preserved_tokens: Vec<Token>,
    pub generation_prompt: String,
}

impl Default for SamplerSpec {
    fn default() -> Self {
        SamplerSpec {
            seed: 0xC0FFEE,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            typical_p: 1.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            grammar: String::new(),
            grammar_kind: GrammarKind::User,
            grammar_lazy: false,
            grammar_triggers: Vec::new(),
            preserved_tokens: Vec::new(),
            generation_prompt: String::new(),
        }
    }
}

/// llama-server's sampler (`common_sampler`): penalties, logit bias, the sampling chain and a
/// grammar checked against the sampled token first.
#[derive(Debug)]
pub struct CommonSampler {
    raw: NonNull<sys::kvt_sampler>,
}

// Safety: a sampler has no thread affinity; it is used from one thread at a time (&mut).
unsafe impl Send for CommonSampler {}

impl Drop for CommonSampler {
    fn drop(&mut self) {
        // Safety: from kvt_sampler_init, freed once.
        unsafe { sys::kvt_sampler_free(self.raw.as_ptr()) };
    }
}

impl CommonSampler {
    /// Fails on a grammar llama.cpp cannot parse (the message says where).
    pub fn new(model: &Model, spec: &SamplerSpec) -> Result<CommonSampler, CommonError> {
        let text = c_string(&serde_json::to_string(spec).expect("serialisable"), "the sampling parameters")?;
        let mut raw: *mut sys::kvt_sampler = std::ptr::null_mut();
        // Safety: the model outlives the sampler (the engine owns both, model first); raw is
        // written on success only.
        call(|err| unsafe { sys::kvt_sampler_init(model.as_ptr(), text.as_ptr(), &mut raw, err) })?;
        let raw = NonNull::new(raw).ok_or_else(|| CommonError("the sampler was not created".into()))?;
        Ok(CommonSampler { raw })
    }

    /// Samples from output `idx` of the last decode and accepts the token.
    pub fn sample(&mut self, ctx: &mut Context<'_>, idx: i32) -> Result<Token, CommonError> {
        let mut token = sys::LLAMA_TOKEN_NULL;
        // Safety: valid sampler and context; idx is checked by llama.cpp.
        call(|err| {
            token = unsafe { sys::kvt_sampler_sample(self.raw.as_ptr(), ctx.as_ptr(), idx, err) };
            if token == sys::LLAMA_TOKEN_NULL {
                1
            } else {
                0
            }
        })?;
        Ok(token)
    }
}
