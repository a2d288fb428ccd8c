//! A chat session: the model's template, streamed generation, context management and KV state
//! files. The terminal front end lives in `commands/chat.rs`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::llama::{
    builtin_templates, Batch, ChatMessage, ChatTemplates, Context, DecodeError, Model, Sampler, SamplingParams,
    StateError, TemplateError, TemplateSource, Token, TokenizeError,
};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the message alone ({tokens} tokens) does not fit the context of {n_ctx} tokens; raise -c")]
    MessageTooLong { tokens: usize, n_ctx: u32 },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("conversation file {path}: {message}")]
    Conversation { path: String, message: String },
}

/// How one reply went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplyStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually decoded (the rest were already in the cache).
    pub prompt_tokens_decoded: usize,
    pub prompt_ms: f64,
    pub generated_tokens: usize,
    pub generation_ms: f64,
    /// Oldest turns dropped to make room.
    pub dropped_turns: usize,
    pub interrupted: bool,
    /// Generation stopped because the context filled up.
    pub context_full: bool,
}

impl ReplyStats {
    pub fn generation_tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 * 1000.0 / self.generation_ms.max(1e-9)
    }
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens_decoded as f64 * 1000.0 / self.prompt_ms.max(1e-9)
    }
}

/// What `/save` writes next to the KV state.
#[derive(Debug, Serialize, Deserialize)]
struct SavedConversation {
    messages: Vec<ChatMessage>,
    /// What the prompt was made with ([`Template::describe`]); a load under another template is
    /// refused (the cached tokens would not be the conversation's rendering).
    template: String,
}

/// How a conversation becomes a prompt.
#[derive(Debug, Clone)]
pub enum Template {
    /// llama.cpp's `common/chat.cpp`: the model's Jinja template (with tools and its default
    /// system prompt), a Jinja file, or a template llama.cpp implements in C++.
    Chat { templates: Arc<ChatTemplates>, origin: String },
    /// A plain transcript (`User: …\nAssistant: …`) for base models without a chat template;
    /// generation stops where the model starts the next `User:` line.
    Plain,
}

impl Template {
    /// The template for `model`: `plain` (a transcript), a Jinja file, a llama.cpp built-in name,
    /// else the model's own; a model without one gets a plain transcript (base models have no
    /// template; an instruction template serves them worse).
    pub fn for_model(model: &Model, name: Option<&str>) -> Result<Template, TemplateError> {
        let (source, origin) = match (name, model.chat_template()) {
            (Some("plain"), _) | (None, None) => return Ok(Template::Plain),
            (Some(t), _) if Path::new(t).is_file() => {
                let text = std::fs::read_to_string(t)
                    .map_err(|e| TemplateError::File { path: t.to_string(), message: e.to_string() })?;
                (TemplateSource::Jinja(text), format!("Jinja template {t}"))
            }
            (Some(t), _) if builtin_templates().iter().any(|b| b == t) => {
                (TemplateSource::Builtin(t.to_string()), format!("llama.cpp built-in `{t}`"))
            }
            (Some(t), _) => {
                return Err(TemplateError::Unknown { name: t.to_string(), known: builtin_templates().join(", ") })
            }
            (None, Some(_)) => (TemplateSource::Model, "the model's chat template".to_string()),
        };
        let templates = ChatTemplates::new(model, &source)
            .map_err(|e| TemplateError::Invalid { origin: origin.clone(), message: e.to_string() })?;
        Ok(Template::Chat { templates: Arc::new(templates), origin })
    }

    /// What the prompt is made with, for banners and `--json`.
    pub fn describe(&self) -> String {
        match self {
            Template::Chat { origin, .. } => origin.clone(),
            Template::Plain => "plain User:/Assistant: transcript".into(),
        }
    }

    pub fn is_plain(&self) -> bool {
        matches!(self, Template::Plain)
    }

    /// Strings that end a reply (not part of it).
    pub fn stop(&self) -> &'static [&'static str] {
        match self {
            Template::Chat { .. } => &[],
            Template::Plain => PLAIN_STOPS,
        }
    }

    /// `messages` as this template renders them, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        match self {
            Template::Chat { templates, .. } => apply_messages(templates, messages, true),
            Template::Plain => Ok(plain_transcript(messages)),
        }
    }
}

impl Template {
    /// A whole conversation (no assistant turn opened after it), as a served model reads it.
    pub fn render_conversation(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        match self {
            Template::Chat { templates, .. } => apply_messages(templates, messages, false),
            Template::Plain => {
                let text = plain_transcript(messages);
                Ok(text.strip_suffix("Assistant:").unwrap_or(&text).to_string())
            }
        }
    }
}

/// `messages` through a chat template, opening the assistant's turn after them or not.
fn apply_messages(
    templates: &ChatTemplates,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String, TemplateError> {
    let inputs = serde_json::json!({ "messages": messages, "add_generation_prompt": add_generation_prompt });
    Ok(templates.apply(&inputs).map_err(|e| TemplateError::Render(e.to_string()))?.prompt)
}

/// Where a base model starts the next turn of a plain transcript.
pub const PLAIN_STOPS: &[&str] = &["\nUser:", "\nuser:"];

/// `System\n\nUser: …\nAssistant: …\nAssistant:`: a base model continues the last line.
pub fn plain_transcript(messages: &[ChatMessage]) -> String {
    let mut text = String::new();
    for m in messages {
        match m.role.as_str() {
            "system" => text.push_str(&format!("{}\n\n", m.content)),
            "user" => text.push_str(&format!("User: {}\n", m.content)),
            _ => text.push_str(&format!("Assistant: {}\n", m.content)),
        }
    }
    text.push_str("Assistant:");
    text
}

/// Tokens of a rendered conversation: the template writes BOS itself when the model wants one,
/// and its control tokens (e.g. `<start_of_turn>`) are parsed.
pub fn prompt_tokens(model: &Model, text: &str) -> Result<Vec<Token>, TokenizeError> {
    let with_bos = !text.starts_with("<bos>") && !text.starts_with("<s>");
    model.tokenize(text, with_bos, true)
}

pub struct ChatSession<'m> {
    ctx: Context<'m>,
    sampler: Sampler,
    sampling: SamplingParams,
    template: Template,
    messages: Vec<ChatMessage>,
    /// Tokens whose K/V are in the cache, in order (positions 0..len).
    cached: Vec<Token>,
    /// Tokens reserved for the reply when fitting the prompt.
    pub reply_reserve: usize,
    /// Upper bound on one reply's length.
    pub max_reply_tokens: usize,
}

impl<'m> ChatSession<'m> {
    pub fn new(ctx: Context<'m>, sampling: SamplingParams, template: Template, system: Option<String>) -> Self {
        let messages = system.map(|s| vec![ChatMessage { role: "system".into(), content: s }]).unwrap_or_default();
        let n_ctx = ctx.n_ctx() as usize;
        ChatSession {
            ctx,
            sampler: Sampler::new(&sampling),
            sampling,
            template,
            messages,
            cached: Vec::new(),
            reply_reserve: (n_ctx / 4).clamp(16, 512),
            max_reply_tokens: n_ctx,
        }
    }

    pub fn context(&self) -> &Context<'m> {
        &self.ctx
    }

    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Tokens in the cache.
    pub fn context_used(&self) -> usize {
        self.cached.len()
    }

    /// Forgets the conversation (keeps the system prompt).
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
        self.cached.clear();
        self.ctx.clear();
        self.sampler = Sampler::new(&self.sampling);
    }

    fn model(&self) -> &'m Model {
        self.ctx.model()
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    /// The conversation as the template renders it (what the model reads next turn).
    pub fn prompt_text(&self) -> Result<String, ChatError> {
        Ok(self.template.render(&self.messages)?)
    }

    fn prompt_tokens(&self) -> Result<Vec<Token>, ChatError> {
        Ok(prompt_tokens(self.model(), &self.prompt_text()?)?)
    }

    /// Drops the oldest user/assistant turn (keeping a system prompt); false if none is left.
    fn drop_oldest_turn(&mut self) -> bool {
        let first = self.messages.iter().position(|m| m.role != "system");
        match first {
            // never drop the message being answered
            Some(i) if self.messages[i + 1..].iter().any(|m| m.role == "user") => {
                self.messages.remove(i);
                while self.messages.get(i).is_some_and(|m| m.role == "assistant") {
                    self.messages.remove(i);
                }
                true
            }
            _ => false,
        }
    }

    /// Sends a user message and streams the reply through `on_text`. `stop` interrupts it.
    pub fn send(
        &mut self,
        user: &str,
        stop: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(String, ReplyStats), ChatError> {
        let mut stats = ReplyStats::default();
        self.messages.push(ChatMessage { role: "user".into(), content: user.to_string() });
        let n_ctx = self.ctx.n_ctx() as usize;
        let mut prompt = self.prompt_tokens()?;
        while prompt.len() + self.reply_reserve.min(n_ctx / 2) > n_ctx {
            if !self.drop_oldest_turn() {
                let tokens = prompt.len();
                self.messages.pop();
                return Err(ChatError::MessageTooLong { tokens, n_ctx: n_ctx as u32 });
            }
            stats.dropped_turns += 1;
            prompt = self.prompt_tokens()?;
        }
        stats.prompt_tokens = prompt.len();

        // Reuse the cached prefix; decode the rest of the prompt.
        let common = self.cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count();
        // keep at least one token to decode so there are logits to sample from
        let mut keep = common.min(prompt.len() - 1);
        if !self.ctx.remove_range(0, keep as i32, -1) {
            // A cache that cannot drop a tail (e.g. a sliding-window one that has already
            // overwritten the cells) is cleared and the whole prompt decoded again.
            self.ctx.clear();
            keep = 0;
        }
        self.cached.truncate(keep);
        let t = Instant::now();
        let n_batch = 512usize;
        let mut batch = Batch::new(n_batch);
        for chunk_start in (keep..prompt.len()).step_by(n_batch) {
            let end = (chunk_start + n_batch).min(prompt.len());
            batch.clear();
            for (i, &tok) in prompt[chunk_start..end].iter().enumerate() {
                let pos = chunk_start + i;
                batch.add(tok, pos as i32, 0, pos + 1 == prompt.len()).expect("batch sized to fit");
            }
            self.ctx.decode(&batch)?;
            self.cached.extend_from_slice(&prompt[chunk_start..end]);
        }
        stats.prompt_tokens_decoded = prompt.len() - keep;
        stats.prompt_ms = t.elapsed().as_secs_f64() * 1000.0;

        // Generate.
        let t = Instant::now();
        let mut reply_bytes: Vec<u8> = Vec::new();
        let mut emitted = 0usize; // bytes of reply_bytes already passed to on_text
        let mut logits_index = (batch.len() - 1) as i32;
        let stops = self.template.stop();
        loop {
            if stop.load(Ordering::Relaxed) {
                stats.interrupted = true;
                break;
            }
            if stats.generated_tokens >= self.max_reply_tokens {
                break;
            }
            if self.cached.len() >= n_ctx {
                stats.context_full = true;
                break;
            }
            let tok = self.sampler.sample(&mut self.ctx, logits_index);
            if self.model().is_eog(tok) {
                break;
            }
            reply_bytes.extend(self.model().token_piece_bytes(tok, false));
            // A stop string ends the reply (it is not part of it).
            if let Some(cut) = stops.iter().filter_map(|s| find(&reply_bytes, s.as_bytes())).min() {
                reply_bytes.truncate(cut);
                if emitted < cut {
                    on_text(&String::from_utf8_lossy(&reply_bytes[emitted..cut]));
                }
                emitted = cut;
                self.cached.push(tok); // keep cache and token list in step: decode it below
                batch.clear();
                batch.add(tok, (self.cached.len() - 1) as i32, 0, false).expect("one token fits");
                self.ctx.decode(&batch)?;
                stats.generated_tokens += 1;
                break;
            }
            // Stream complete UTF-8 characters, holding back what may start a stop string.
            let held = stops.iter().map(|s| partial_suffix(&reply_bytes[emitted..], s.as_bytes())).max().unwrap_or(0);
            let upto = reply_bytes.len() - held;
            let valid = match std::str::from_utf8(&reply_bytes[emitted..upto]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            if valid > 0 {
                on_text(std::str::from_utf8(&reply_bytes[emitted..emitted + valid]).expect("checked"));
                emitted += valid;
            }
            batch.clear();
            batch.add(tok, self.cached.len() as i32, 0, true).expect("one token fits");
            match self.ctx.decode(&batch) {
                Ok(()) => {}
                Err(DecodeError::NoSlot { .. }) => {
                    stats.context_full = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
            self.cached.push(tok);
            logits_index = 0;
            stats.generated_tokens += 1;
        }
        stats.generation_ms = t.elapsed().as_secs_f64() * 1000.0;
        let reply = String::from_utf8_lossy(&reply_bytes).into_owned();
        if emitted < reply_bytes.len() {
            on_text(&String::from_utf8_lossy(&reply_bytes[emitted..]));
        }
        self.messages.push(ChatMessage { role: "assistant".into(), content: reply.trim().to_string() });
        Ok((reply.trim().to_string(), stats))
    }

    /// Saves the KV state to `path` and the conversation to `path` + `.json`.
    pub fn save(&mut self, path: &Path) -> Result<(), ChatError> {
        self.ctx.save_state(path, &self.cached)?;
        let conv = SavedConversation { messages: self.messages.clone(), template: self.template.describe() };
        let json_path = conversation_path(path);
        crate::atomic_write(&json_path, serde_json::to_string_pretty(&conv).expect("serialisable").as_bytes())
            .map_err(|e| ChatError::Conversation { path: json_path.display().to_string(), message: e.to_string() })
    }

    /// Loads a state saved by [`ChatSession::save`] (same model, context and cache types).
    pub fn load(&mut self, path: &Path) -> Result<(), ChatError> {
        let json_path = conversation_path(path);
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| ChatError::Conversation { path: json_path.display().to_string(), message: e.to_string() })?;
        let conv: SavedConversation = serde_json::from_str(&text)
            .map_err(|e| ChatError::Conversation { path: json_path.display().to_string(), message: e.to_string() })?;
        if conv.template != self.template.describe() {
            return Err(ChatError::Conversation {
                path: json_path.display().to_string(),
                message: format!(
                    "saved with {}, but this session uses {} (choose it with --chat-template)",
                    conv.template,
                    self.template.describe()
                ),
            });
        }
        self.ctx.clear();
        self.cached.clear();
        let tokens = self.ctx.load_state(path)?;
        self.cached = tokens;
        self.messages = conv.messages;
        Ok(())
    }
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
pub(crate) fn partial_suffix(text: &[u8], stop: &[u8]) -> usize {
    (1..stop.len().min(text.len() + 1)).rev().find(|&n| text.ends_with(&stop[..n])).unwrap_or(0)
}

fn conversation_path(state: &Path) -> std::path::PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".json");
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_helpers() {
        assert_eq!(find(b"Paris.\nUser: x", b"\nUser:"), Some(6));
        assert_eq!(partial_suffix(b"Paris.\nUs", b"\nUser:"), 3);
        assert_eq!(partial_suffix(b"Paris.", b"\nUser:"), 0);
        assert_eq!(partial_suffix(b"", b"\nUser:"), 0);
    }
}
