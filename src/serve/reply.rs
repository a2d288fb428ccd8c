//! A reply as it streams in: the template's parser turns the text so far into content,
//! reasoning and tool calls, and each step yields what is new since the last (OpenAI's deltas:
//! a tool call's id and name once, then pieces of its arguments).

use serde_json::{json, Value};

use crate::llama::{ChatParser, ParsedReply, ToolCall};

use super::api::ReplyMessage;

/// What one step adds to the reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyDelta {
    pub content: String,
    pub reasoning_content: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    /// With the call's first piece: its id and name.
    pub header: Option<(String, String)>,
    pub arguments: String,
}

impl ReplyDelta {
    pub fn is_empty(&self) -> bool {
        self.content.is_empty() && self.reasoning_content.is_empty() && self.tool_calls.is_empty()
    }

    /// OpenAI's `delta` object.
    pub fn openai(&self) -> Value {
        let mut d = json!({});
        if !self.content.is_empty() {
            d["content"] = json!(self.content);
        }
        if !self.reasoning_content.is_empty() {
            d["reasoning_content"] = json!(self.reasoning_content);
        }
        if !self.tool_calls.is_empty() {
            d["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| match &c.header {
                    Some((id, name)) => json!({
                        "index": c.index, "id": id, "type": "function",
                        "function": { "name": name, "arguments": c.arguments },
                    }),
                    None => json!({ "index": c.index, "function": { "arguments": c.arguments } }),
                })
                .collect();
        }
        d
    }
}

/// Collects a reply's text and parses it.
pub struct ReplyAssembler {
    parser: Option<ChatParser>,
    text: String,
    /// What earlier deltas have given.
    sent: ParsedReply,
    /// Ids given to the calls so far (stable across steps).
    ids: Vec<String>,
}

impl ReplyAssembler {
    pub fn new(parser: Option<ChatParser>) -> ReplyAssembler {
        ReplyAssembler { parser, text: String::new(), sent: ParsedReply::default(), ids: Vec::new() }
    }

    /// Adds reply text; returns what is new (parsed as far as it can be).
    pub fn push(&mut self, text: &str) -> ReplyDelta {
        self.text.push_str(text);
        match &self.parser {
            None => {
                self.sent.content.push_str(text);
                ReplyDelta { content: text.to_string(), ..ReplyDelta::default() }
            }
            // an unfinished call may not parse yet: the next step will
            Some(parser) => match parser.parse(&self.text, true) {
                Ok(now) => self.advance(now),
                Err(_) => ReplyDelta::default(),
            },
        }
    }

    /// Adds reply text without parsing it yet (a reply sent whole).
    pub fn append(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// The reply is complete: the last delta and the whole message. A reply the parser rejects
    /// (the model broke its tool-call format) is returned as plain content, with a warning.
    pub fn finish(&mut self) -> (ReplyDelta, ReplyMessage) {
        let delta = match &self.parser {
            None => {
                let rest = self.text[self.sent.content.len()..].to_string();
                self.sent.content = self.text.clone();
                ReplyDelta { content: rest, ..ReplyDelta::default() }
            }
            Some(parser) => match parser.parse(&self.text, false) {
                Ok(now) => self.advance(now),
                Err(e) => {
                    tracing::warn!("the reply does not parse as the template's format ({e}); sent as content");
                    let rest = self.text.strip_prefix(&self.sent.content).unwrap_or("").to_string();
                    self.sent = ParsedReply { content: self.text.clone(), ..ParsedReply::default() };
                    ReplyDelta { content: rest, ..ReplyDelta::default() }
                }
            },
        };
        let message = ReplyMessage {
            content: self.sent.content.clone(),
            reasoning_content: self.sent.reasoning_content.clone(),
            tool_calls: self.sent.tool_calls.clone(),
        };
        (delta, message)
    }

    /// What `now` adds to what was sent. Text that does not extend what was sent (a parser that
    /// revised its reading) is held until it does.
    fn advance(&mut self, now: ParsedReply) -> ReplyDelta {
        let mut delta = ReplyDelta::default();
        if let Some(rest) = now.content.strip_prefix(&self.sent.content) {
            delta.content = rest.to_string();
            self.sent.content = now.content.clone();
        }
        if let Some(rest) = now.reasoning_content.strip_prefix(&self.sent.reasoning_content) {
            delta.reasoning_content = rest.to_string();
            self.sent.reasoning_content = now.reasoning_content.clone();
        }
        for (index, call) in now.tool_calls.iter().enumerate() {
            if call.name.is_empty() {
                break;
            }
            if index == self.sent.tool_calls.len() {
                let id = if call.id.is_empty() { new_call_id() } else { call.id.clone() };
                self.ids.push(id.clone());
                delta.tool_calls.push(ToolCallDelta {
                    index,
                    header: Some((id.clone(), call.name.clone())),
                    arguments: call.arguments.clone(),
                });
                self.sent.tool_calls.push(ToolCall { id, ..call.clone() });
            } else if index < self.sent.tool_calls.len() {
                let sent = &mut self.sent.tool_calls[index];
                if let Some(rest) = call.arguments.strip_prefix(&sent.arguments) {
                    if !rest.is_empty() {
                        delta.tool_calls.push(ToolCallDelta { index, header: None, arguments: rest.to_string() });
                        sent.arguments = call.arguments.clone();
                    }
                }
            }
        }
        delta
    }
}

/// `call_` and 24 random letters and digits, as OpenAI's ids look.
fn new_call_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let state = std::collections::hash_map::RandomState::new();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let chars = (0..24).map(|i: usize| {
        let mut h = state.build_hasher();
        h.write_u128(nanos);
        h.write_usize(i);
        ALPHABET[(h.finish() % ALPHABET.len() as u64) as usize] as char
    });
    "call_".chars().chain(chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_replies_pass_through() {
        let mut r = ReplyAssembler::new(None);
        assert_eq!(r.push("Hel").content, "Hel");
        assert_eq!(r.push("lo").content, "lo");
        let (last, msg) = r.finish();
        assert!(last.is_empty());
        assert_eq!(msg.content, "Hello");
        let mut r = ReplyAssembler::new(None);
        r.append("Hi");
        r.append(" there");
        assert_eq!(r.finish().1.content, "Hi there");
    }

    #[test]
    fn tool_call_deltas_give_the_header_once_then_argument_pieces() {
        let mut r = ReplyAssembler::new(None);
        let call = |args: &str| ToolCall { id: String::new(), name: "get".into(), arguments: args.into() };
        let d = r.advance(ParsedReply { tool_calls: vec![call("{\"ci")], ..Default::default() });
        let (id, name) = d.tool_calls[0].header.clone().unwrap();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert_eq!((name.as_str(), d.tool_calls[0].arguments.as_str()), ("get", "{\"ci"));
        let d = r.advance(ParsedReply { tool_calls: vec![call("{\"city\": 1}")], ..Default::default() });
        assert_eq!(d.tool_calls, vec![ToolCallDelta { index: 0, header: None, arguments: "ty\": 1}".into() }]);
        assert_eq!(d.openai()["tool_calls"][0], json!({ "index": 0, "function": { "arguments": "ty\": 1}" } }));
        let d = r.advance(ParsedReply { tool_calls: vec![call("{\"city\": 1}")], ..Default::default() });
        assert!(d.is_empty());
        assert_eq!(r.sent.tool_calls[0].id, id, "the id stays");
    }
}
