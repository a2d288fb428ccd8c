//! A parsed request → what the engine runs: the prompt rendered by the chat template (tools,
//! `tool_choice`, past tool calls and results), the grammar that constrains the reply (tool
//! calls, `response_format`, llama-server's `json_schema`/`grammar`), and the parser that reads
//! tool calls back out of the reply. Rendering happens in the request's handler, so a request
//! the template refuses gets its 400 before it waits for a slot.

use serde_json::{json, Value};

use crate::chat::{plain_transcript, Template};
use crate::llama::{json_schema_to_grammar, ChatMessage, ChatParser, GrammarKind, SamplerSpec};

use super::api::{ApiError, CompletionRequest, Constraint, Input, ToolChoice};
use super::engine::Prompt;

/// A request ready for the engine (less its event channel) and its reply parser.
pub struct Prepared {
    pub prompt: Prompt,
    pub sampler: SamplerSpec,
    pub preserved_tokens: Vec<String>,
    pub grammar_field: &'static str,
    pub stop: Vec<String>,
    /// Reads content, reasoning and tool calls out of the reply (chat templates); `None`: the
    /// reply is plain text.
    pub parser: Option<ChatParser>,
}

/// llama-server's default: a thinking model's reasoning goes to `reasoning_content`.
const REASONING_FORMAT: &str = "auto";

pub fn prepare(template: &Template, request: &CompletionRequest) -> Result<Prepared, ApiError> {
    let mut prepared = Prepared {
        prompt: Prompt::Text(String::new()),
        sampler: request.sampler.clone(),
        preserved_tokens: Vec::new(),
        grammar_field: "grammar",
        stop: request.stop.clone(),
        parser: None,
    };
    match (&request.input, template) {
        (Input::Text(text), _) => {
            prepared.prompt = Prompt::Text(text.clone());
            constrain(&mut prepared, request.constraint.as_ref())?;
        }
        (Input::Chat(messages), Template::Plain) => {
            if !request.tools.is_empty() {
                return Err(ApiError::invalid(
                    "tools",
                    "the model has no chat template, so it cannot call tools (start the server with --chat-template FILE)",
                ));
            }
            let turns = messages
                .iter()
                .enumerate()
                .map(|(i, m)| match m["role"].as_str() {
                    Some(role @ ("system" | "user" | "assistant")) if m.get("tool_calls").is_none() => {
                        Ok(ChatMessage { role: role.into(), content: m["content"].as_str().unwrap_or("").into() })
                    }
                    _ => Err(ApiError::invalid(
                        &format!("messages[{i}]"),
                        "tool calls and results need a chat template (the model has none)",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            prepared.prompt = Prompt::Transcript(plain_transcript(&turns));
            constrain(&mut prepared, request.constraint.as_ref())?;
        }
        (Input::Chat(messages), Template::Chat { templates, origin }) => {
            let calls_tools = !request.tools.is_empty() && request.tool_choice != ToolChoice::None;
            if calls_tools && !templates.caps().supports_tool_calls {
                return Err(ApiError::invalid(
                    "tools",
                    format!("{origin} has no tool calls; start the server with --chat-template FILE of one that has"),
                ));
            }
            // a named function: that tool alone, and a call is required
            let (tools, choice) = match &request.tool_choice {
                ToolChoice::Function(name) => (
                    request.tools.iter().filter(|t| t["function"]["name"] == name.as_str()).cloned().collect(),
                    "required",
                ),
                ToolChoice::Auto => (request.tools.clone(), "auto"),
                ToolChoice::None => (request.tools.clone(), "none"),
                ToolChoice::Required => (request.tools.clone(), "required"),
            };
            let mut inputs = json!({
                "messages": messages,
                "tool_choice": choice,
                "parallel_tool_calls": request.parallel_tool_calls && templates.caps().supports_parallel_tool_calls,
                "add_generation_prompt": true,
                "reasoning_format": REASONING_FORMAT,
                "chat_template_kwargs": request.template_kwargs,
            });
            if !tools.is_empty() {
                inputs["tools"] = Value::Array(tools);
            }
            let grammar_field = match &request.constraint {
                Some(Constraint::Schema { schema, field }) => {
                    inputs["json_schema"] = schema.clone();
                    field
                }
                Some(Constraint::Grammar(g)) => {
                    inputs["grammar"] = json!(g);
                    "grammar"
                }
                None => "tools",
            };
            let applied = templates.apply(&inputs).map_err(|e| {
                let field = if calls_tools && e.0.contains("grammar") { grammar_field } else { "messages" };
                ApiError::invalid(field, format!("the chat template refused the request: {e}"))
            })?;
            tracing::trace!("prompt: {}", applied.prompt);
            tracing::debug!(
                "template: format {}, grammar {} (lazy: {}), triggers {:?}, preserved {:?}, generation prompt {:?}",
                applied.format,
                applied.grammar,
                applied.grammar_lazy,
                applied.grammar_triggers,
                applied.preserved_tokens,
                applied.generation_prompt
            );
            prepared.grammar_field = if calls_tools { "tools" } else { grammar_field };
            prepared.sampler.grammar_kind = match (&request.constraint, calls_tools) {
                (_, true) => GrammarKind::ToolCalls,
                (Some(Constraint::Schema { .. }), false) => GrammarKind::OutputFormat,
                _ => GrammarKind::User,
            };
            prepared.sampler.grammar = applied.grammar.clone();
            prepared.sampler.grammar_lazy = applied.grammar_lazy;
            prepared.sampler.grammar_triggers = applied.grammar_triggers.clone();
            prepared.sampler.generation_prompt = applied.generation_prompt.clone();
            prepared.preserved_tokens = applied.preserved_tokens.clone();
            prepared.stop.extend(applied.additional_stops.iter().cloned());
            prepared.parser = Some(
                ChatParser::new(&applied, REASONING_FORMAT, calls_tools)
                    .map_err(|e| ApiError::new(500, "server_error", None, format!("the reply parser: {e}")))?,
            );
            prepared.prompt = Prompt::Template(applied.prompt);
        }
    }
    Ok(prepared)
}

/// A constraint without a chat template: a schema becomes a grammar here.
fn constrain(prepared: &mut Prepared, constraint: Option<&Constraint>) -> Result<(), ApiError> {
    match constraint {
        None => {}
        Some(Constraint::Schema { schema, field }) => {
            prepared.sampler.grammar =
                json_schema_to_grammar(schema).map_err(|e| ApiError::invalid(field, format!("`{field}`: {e}")))?;
            prepared.sampler.grammar_kind = GrammarKind::OutputFormat;
            prepared.grammar_field = field;
        }
        Some(Constraint::Grammar(g)) => {
            prepared.sampler.grammar = g.clone();
            prepared.sampler.grammar_kind = GrammarKind::User;
            prepared.grammar_field = "grammar";
        }
    }
    Ok(())
}
