//! The engine: one thread owns the context and decodes every active slot's next token plus
//! prefill chunks of new requests in one batch per step (continuous batching). Requests wait in a
//! bounded queue; a request whose client went away (its event receiver dropped) frees its slot at
//! the next step. Each slot keeps the tokens its sequence holds, so a follow-up turn reuses the
//! cached prefix instead of decoding the conversation again.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::chat::{find, partial_suffix, prompt_tokens, PLAIN_STOPS};
use crate::llama::{Batch, CommonSampler, Context, DecodeError, Model, SamplerSpec, Token};

use super::metrics::{KvAccounting, Metrics};

/// What to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation rendered by the chat template (its control tokens are parsed).
    Template(String),
    /// A plain `User:`/`Assistant:` transcript (a base model's): the reply ends at the next turn.
    Transcript(String),
    /// Raw text (`/v1/completions`).
    Text(String),
}

/// One generation request, with the channel its events go to.
#[derive(Debug)]
pub struct GenRequest {
    pub prompt: Prompt,
    /// Longest reply; `None` = what is left of the slot's context.
    pub max_tokens: Option<u32>,
    pub sampler: SamplerSpec,
    /// Control tokens (as text) the reply may contain and shows as text, e.g. `<tool_call>`.
    pub preserved_tokens: Vec<String>,
    /// The request field a bad grammar is reported against.
    pub grammar_field: &'static str,
    pub stop: Vec<String>,
    /// End-of-generation tokens (and a transcript template's end-of-turn stop strings) do not end
    /// the reply; EOG tokens are decoded like any other.
    pub ignore_eos: bool,
    /// Send each token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Reuse the longest cached prefix of a free slot (false: decode the whole prompt).
    pub cache_prompt: bool,
    pub events: UnboundedSender<Event>,
}

/// One reply token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of generation or a stop string.
    Stop,
    /// `max_tokens` or the slot's context reached.
    Length,
    /// The reply is tool calls (decided by the handler that parses the reply).
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// What the engine tells a request's handler, in this order: `Started` or `Rejected` once, then
/// `Text` pieces, then `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// The request cannot run (before `Started`): the message names the request field.
    Rejected(Rejection),
    Text(String),
    /// A reply token's log-probabilities (when asked), before its text.
    Logprob(TokenLogprob),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The runtime failed mid-reply.
    Failed(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejection {
    #[error("the prompt has {tokens} tokens; a slot holds {n_ctx_seq} (with room for at least one reply token); shorten `{field}` or start the server with a larger -c")]
    PromptTooLong { field: &'static str, tokens: usize, n_ctx_seq: u32 },
    #[error("`{field}`: {message}")]
    BadPrompt { field: &'static str, message: String },
    #[error("`{field}`: the grammar cannot be used: {message}")]
    BadGrammar { field: &'static str, message: String },
}

/// A request being answered in a slot.
struct Job {
    request: GenRequest,
    prompt: Vec<Token>,
    /// Prompt tokens decoded so far (the cached prefix counts).
    prefilled: usize,
    sampler: CommonSampler,
    /// Token ids of the request's preserved tokens (rendered as text).
    preserved: Vec<Token>,
    max_tokens: usize,
    generated: usize,
    /// Sampled but not yet decoded.
    pending: Option<Token>,
    reply: ReplyText,
    /// This step's batch index whose logits the job samples from.
    logits_at: Option<i32>,
    /// Prompt tokens in this step's batch.
    chunk: usize,
}

struct Slot {
    seq: i32,
    /// Tokens the slot's sequence holds, positions 0..len.
    cached: Vec<Token>,
    job: Option<Job>,
    /// Step at which the slot last finished a job (least recently used slots are reused first).
    last_used: u64,
}

/// The engine's configuration.
pub struct EngineConfig {
    /// Tokens per decode call.
    pub n_batch: usize,
}

pub struct Engine<'m> {
    ctx: Context<'m>,
    slots: Vec<Slot>,
    batch: Batch,
    n_ctx_seq: usize,
    n_swa: usize,
    metrics: Arc<Metrics>,
    kv: KvAccounting,
    step: u64,
}

impl<'m> Engine<'m> {
    pub fn new(ctx: Context<'m>, config: EngineConfig, metrics: Arc<Metrics>) -> Engine<'m> {
        let n_seq = ctx.n_seq_max();
        let slots =
            (0..n_seq as i32).map(|seq| Slot { seq, cached: Vec::new(), job: None, last_used: 0 }).collect::<Vec<_>>();
        let kv = KvAccounting::of(&ctx);
        metrics.slots_total.store(slots.len() as u64, Ordering::Relaxed);
        Engine {
            n_ctx_seq: ctx.n_ctx_seq() as usize,
            n_swa: ctx.model().n_swa() as usize,
            batch: Batch::new(config.n_batch.max(slots.len())),
            ctx,
            slots,
            metrics,
            kv,
            step: 0,
        }
    }

    /// Serves requests from `queue` until every sender is gone and the last reply is done.
    pub fn run(mut self, queue: Receiver<GenRequest>) {
        let mut open = true;
        loop {
            self.drop_abandoned();
            // admit queued requests while slots are free
            while open && self.slots.iter().any(|s| s.job.is_none()) {
                let idle = self.slots.iter().all(|s| s.job.is_none());
                let next = if idle {
                    // nothing to decode: sleep until a request comes or the server stops
                    match queue.recv() {
                        Ok(r) => Some(r),
                        Err(_) => {
                            open = false;
                            None
                        }
                    }
                } else {
                    match queue.try_recv() {
                        Ok(r) => Some(r),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                };
                match next {
                    Some(request) => {
                        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                        self.admit(request);
                    }
                    None if idle => break,
                    None => {}
                }
            }
            if self.slots.iter().all(|s| s.job.is_none()) {
                if !open {
                    return;
                }
                continue;
            }
            self.decode_step();
            self.publish_gauges();
        }
    }

    /// Frees the slots of requests whose client went away.
    fn drop_abandoned(&mut self) {
        let step = self.step;
        for slot in &mut self.slots {
            if slot.job.as_ref().is_some_and(|j| j.request.events.is_closed()) {
                slot.job = None;
                slot.last_used = step;
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.publish_gauges();
    }

    fn admit(&mut self, request: GenRequest) {
        if request.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (field, tokens) = match self.tokenize(&request.prompt) {
            Ok(t) => t,
            Err(rejection) => {
                let _ = request.events.send(Event::Rejected(rejection));
                return;
            }
        };
        if tokens.is_empty() {
            let rejection = Rejection::BadPrompt { field, message: "the prompt is empty".into() };
            let _ = request.events.send(Event::Rejected(rejection));
            return;
        }
        if tokens.len() >= self.n_ctx_seq {
            let rejection = Rejection::PromptTooLong { field, tokens: tokens.len(), n_ctx_seq: self.n_ctx_seq as u32 };
            let _ = request.events.send(Event::Rejected(rejection));
            return;
        }
        let (sampler, preserved) = match build_sampler(self.ctx.model(), &request) {
            Ok(s) => s,
            Err(rejection) => {
                let _ = request.events.send(Event::Rejected(rejection));
                return;
            }
        };
        // the free slot sharing the longest prefix with the prompt, else the least recently used
        let (index, common) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.job.is_none())
            .map(|(i, s)| (i, if request.cache_prompt { common_prefix(&s.cached, &tokens) } else { 0 }))
            .max_by_key(|&(i, common)| (common, std::cmp::Reverse(self.slots[i].last_used)))
            .expect("admit is called with a free slot");
        let seq = self.slots[index].seq;
        let mut common = common;
        // another slot, busy or not, may hold more of the prompt (agents resend one system prompt
        // and tool list): its sequence is copied (at the next decode, before any new token is
        // written) and cut to the shared part
        if request.cache_prompt {
            let donor = self
                .slots
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != index)
                .map(|(i, s)| (i, common_prefix(&s.cached, &tokens)))
                .max_by_key(|&(_, c)| c);
            if let Some((donor, shared)) = donor.filter(|&(_, c)| c >= common + MIN_COPIED_PREFIX) {
                let donor_seq = self.slots[donor].seq;
                self.ctx.copy_sequence(donor_seq, seq);
                self.ctx.remove_range(seq, shared as i32, -1);
                let prefix = self.slots[donor].cached[..shared].to_vec();
                self.slots[index].cached = prefix;
                common = shared;
                self.metrics.prefix_copies.fetch_add(1, Ordering::Relaxed);
            }
        }
        // keep at least one prompt token to decode: its logits start the reply
        let mut keep = common.min(tokens.len() - 1);
        let slot_len = self.slots[index].cached.len();
        // a sliding-window cache has forgotten positions before (end - window): continuing
        // from `keep` needs the window before it
        let window_intact = self.n_swa == 0 || keep == 0 || {
            let min = self.ctx.min_position(seq);
            min <= 0 || (min as usize) <= keep.saturating_sub(self.n_swa)
        };
        if !window_intact || (keep < slot_len && !self.ctx.remove_range(seq, keep as i32, -1)) {
            self.ctx.remove_range(seq, 0, -1);
            keep = 0;
        }
        let slot = &mut self.slots[index];
        slot.cached.truncate(keep);
        let room = self.n_ctx_seq - tokens.len();
        let max_tokens = request.max_tokens.map_or(room, |m| (m as usize).min(room));
        let transcript = matches!(request.prompt, Prompt::Transcript(_));
        let trim_start = !matches!(request.prompt, Prompt::Text(_));
        let mut stops: Vec<String> = request.stop.clone();
        // a transcript's stop strings are its end of turn: ignore_eos ignores them too
        if transcript && !request.ignore_eos {
            stops.extend(PLAIN_STOPS.iter().map(|s| s.to_string()));
        }
        self.metrics.prompt_tokens.fetch_add(tokens.len() as u64, Ordering::Relaxed);
        self.metrics.prompt_tokens_cached.fetch_add(keep as u64, Ordering::Relaxed);
        let _ = request.events.send(Event::Started { prompt_tokens: tokens.len(), cached_tokens: keep });
        slot.job = Some(Job {
            sampler,
            preserved,
            request,
            prompt: tokens,
            prefilled: keep,
            max_tokens,
            generated: 0,
            pending: None,
            reply: ReplyText::new(stops, trim_start),
            logits_at: None,
            chunk: 0,
        });
        self.publish_gauges();
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<(&'static str, Vec<Token>), Rejection> {
        let model = self.ctx.model();
        match prompt {
            Prompt::Template(text) | Prompt::Transcript(text) => {
                let tokens = prompt_tokens(model, text)
                    .map_err(|e| Rejection::BadPrompt { field: "messages", message: e.to_string() })?;
                Ok(("messages", tokens))
            }
            Prompt::Text(text) => {
                let tokens = model
                    .tokenize(text, true, true)
                    .map_err(|e| Rejection::BadPrompt { field: "prompt", message: e.to_string() })?;
                Ok(("prompt", tokens))
            }
        }
    }

    /// One decode: every generating slot's pending token, then prefill chunks in slot order
    /// while the batch has room.
    fn decode_step(&mut self) {
        self.step += 1;
        self.batch.clear();
        for slot in &mut self.slots {
            let Some(job) = slot.job.as_mut() else { continue };
            job.logits_at = None;
            job.chunk = 0;
            if let Some(tok) = job.pending {
                job.logits_at = Some(self.batch.len() as i32);
                self.batch.add(tok, slot.cached.len() as i32, slot.seq, true).expect("batch holds one token per slot");
            }
        }
        for slot in &mut self.slots {
            let Some(job) = slot.job.as_mut() else { continue };
            if job.pending.is_some() || job.prefilled >= job.prompt.len() {
                continue;
            }
            let room = self.batch.capacity() - self.batch.len();
            if room == 0 {
                break;
            }
            let end = (job.prefilled + room).min(job.prompt.len());
            for pos in job.prefilled..end {
                let last = pos + 1 == job.prompt.len();
                if last {
                    job.logits_at = Some(self.batch.len() as i32);
                }
                self.batch.add(job.prompt[pos], pos as i32, slot.seq, last).expect("sized to the room left");
            }
            job.chunk = end - job.prefilled;
        }
        if self.batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self.ctx.decode(&self.batch);
        self.metrics.decode_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Err(e) = result {
            self.fail_batch(&e);
            return;
        }
        // the batch is in the cache: record it per slot
        for slot in &mut self.slots {
            let Some(job) = slot.job.as_mut() else { continue };
            if let Some(tok) = job.pending.take() {
                slot.cached.push(tok);
            } else if job.chunk > 0 {
                let end = job.prefilled + job.chunk;
                slot.cached.extend_from_slice(&job.prompt[job.prefilled..end]);
                job.prefilled = end;
                self.metrics.prompt_tokens_decoded.fetch_add(job.chunk as u64, Ordering::Relaxed);
            }
        }
        self.sample_all();
    }

    /// Samples the next token of every slot whose logits this step computed, sends its text, and
    /// ends replies that are done.
    fn sample_all(&mut self) {
        let model = self.ctx.model();
        for slot in &mut self.slots {
            let Some(job) = slot.job.as_mut() else { continue };
            let Some(at) = job.logits_at else { continue };
            let tok = match job.sampler.sample(&mut self.ctx, at) {
                Ok(t) => t,
                Err(e) => {
                    // e.g. a grammar no token can continue: the reply ends with the error
                    let _ = job.request.events.send(Event::Failed(format!("sampling failed: {e}")));
                    slot.job = None;
                    slot.last_used = self.step;
                    continue;
                }
            };
            if let Some(n) = job.request.logprobs {
                if let Some(logits) = self.ctx.logits(at) {
                    let _ = job.request.events.send(Event::Logprob(token_logprob(model, logits, tok, n)));
                }
            }
            let mut finish = None;
            if model.is_eog(tok) && !job.request.ignore_eos {
                finish = Some(FinishReason::Stop);
            } else {
                job.generated += 1;
                self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                let special = job.preserved.contains(&tok);
                let (text, stopped) = job.reply.push(&model.token_piece_bytes(tok, special));
                if !text.is_empty() && job.request.events.send(Event::Text(text)).is_err() {
                    // the client went away: free the slot now
                    slot.job = None;
                    slot.last_used = self.step;
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if stopped {
                    finish = Some(FinishReason::Stop);
                } else if job.generated >= job.max_tokens || slot.cached.len() >= self.n_ctx_seq {
                    finish = Some(FinishReason::Length);
                } else {
                    job.pending = Some(tok);
                }
            }
            if let Some(finish_reason) = finish {
                let rest = job.reply.finish();
                if !rest.is_empty() {
                    let _ = job.request.events.send(Event::Text(rest));
                }
                let _ = job.request.events.send(Event::Done {
                    finish_reason,
                    prompt_tokens: job.prompt.len(),
                    completion_tokens: job.generated,
                });
                self.metrics.completed.fetch_add(1, Ordering::Relaxed);
                slot.job = None;
                slot.last_used = self.step;
            }
        }
    }

    /// A failed decode: the jobs in the batch get the error, and their sequences are dropped
    /// (what the failed batch left in the cache is unknown).
    fn fail_batch(&mut self, error: &DecodeError) {
        tracing::error!("decode failed: {error}");
        for slot in &mut self.slots {
            let in_batch = slot.job.as_ref().is_some_and(|j| j.logits_at.is_some() || j.chunk > 0);
            if !in_batch {
                continue;
            }
            if let Some(job) = slot.job.take() {
                let _ = job.request.events.send(Event::Failed(error.to_string()));
            }
            self.ctx.remove_range(slot.seq, 0, -1);
            slot.cached.clear();
            slot.last_used = self.step;
        }
    }

    /// Active slots and KV bytes in use, for /metrics.
    fn publish_gauges(&self) {
        let active = self.slots.iter().filter(|s| s.job.is_some()).count();
        self.metrics.slots_active.store(active as u64, Ordering::Relaxed);
        let cells: Vec<usize> = self.slots.iter().map(|s| s.cached.len()).collect();
        self.metrics.set_kv_in_use(self.kv.in_use(&cells));
    }
}

/// The request's sampler and its preserved tokens' ids. As llama-server does, a trigger word
/// that is one preserved token triggers on that token.
fn build_sampler(model: &Model, request: &GenRequest) -> Result<(CommonSampler, Vec<Token>), Rejection> {
    let single = |text: &str| match model.tokenize(text, false, true) {
        Ok(t) if t.len() == 1 => Some(t[0]),
        _ => None,
    };
    let preserved: Vec<Token> = request.preserved_tokens.iter().filter_map(|t| single(t)).collect();
    let mut spec = request.sampler.clone();
    for trigger in &mut spec.grammar_triggers {
        if trigger.kind == "word" {
            if let Some(tok) = single(&trigger.value).filter(|t| preserved.contains(t)) {
                trigger.kind = "token".into();
                trigger.token = Some(tok);
            }
        }
    }
    spec.preserved_tokens = preserved.clone();
    let sampler = CommonSampler::new(model, &spec)
        .map_err(|e| Rejection::BadGrammar { field: request.grammar_field, message: e.to_string() })?;
    Ok((sampler, preserved))
}

/// `token`'s log-probability under `logits` and the `top` most likely tokens'.
fn token_logprob(model: &Model, logits: &[f32], token: Token, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    let entry = |t: Token| {
        let bytes = model.token_piece_bytes(t, true);
        TokenLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob: logits[t as usize] - log_sum,
            top: Vec::new(),
        }
    };
    let mut best: Vec<Token> = Vec::with_capacity(top + 1);
    if top > 0 {
        // one pass keeping the `top` largest (top ≤ 20)
        for (t, &l) in logits.iter().enumerate() {
            if best.len() < top || l > logits[best[best.len() - 1] as usize] {
                let at = best.partition_point(|&b| logits[b as usize] >= l);
                best.insert(at, t as Token);
                best.truncate(top);
            }
        }
    }
    TokenLogprob { top: best.into_iter().map(entry).collect(), ..entry(token) }
}

/// Shortest gain in cached prompt tokens worth copying another slot's sequence for (a copy moves
/// the slot's whole cache stream).
const MIN_COPIED_PREFIX: usize = 64;

/// Length of the common prefix.
fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A reply's bytes turned into text to send: whole UTF-8 characters only, a stop string ends it
/// (and is not sent), and what may be the start of a stop string is held back until it is not.
struct ReplyText {
    bytes: Vec<u8>,
    emitted: usize,
    stops: Vec<String>,
    /// Leading whitespace of the reply is dropped (a transcript's `Assistant:` is followed by a
    /// space the reply does not include).
    trim_start: bool,
}

impl ReplyText {
    fn new(stops: Vec<String>, trim_start: bool) -> ReplyText {
        ReplyText { bytes: Vec::new(), emitted: 0, stops, trim_start }
    }

    /// Adds a token's bytes; returns the text now safe to send and whether a stop string ended it.
    fn push(&mut self, piece: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(piece);
        if self.trim_start && self.emitted == 0 {
            let lead = self.bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
            self.bytes.drain(..lead);
        }
        if let Some(cut) = self.stops.iter().filter_map(|s| find(&self.bytes, s.as_bytes())).min() {
            self.bytes.truncate(cut);
            return (self.take(self.bytes.len(), true), true);
        }
        let held =
            self.stops.iter().map(|s| partial_suffix(&self.bytes[self.emitted..], s.as_bytes())).max().unwrap_or(0);
        (self.take(self.bytes.len() - held, false), false)
    }

    /// The rest, at the end of the reply.
    fn finish(&mut self) -> String {
        self.take(self.bytes.len(), true)
    }

    /// Text from `emitted` up to `upto`: whole characters, or everything (lossy) when `all`.
    fn take(&mut self, upto: usize, all: bool) -> String {
        if upto <= self.emitted {
            return String::new();
        }
        let bytes = &self.bytes[self.emitted..upto];
        let text = if all {
            String::from_utf8_lossy(bytes).into_owned()
        } else {
            let valid = match std::str::from_utf8(bytes) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            std::str::from_utf8(&bytes[..valid]).expect("checked").to_string()
        };
        self.emitted += if all { bytes.len() } else { text.len() };
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_holds_back_stop_prefixes_and_split_characters() {
        let mut r = ReplyText::new(vec!["\nUser:".into()], true);
        assert_eq!(r.push(b" Paris"), ("Paris".into(), false));
        assert_eq!(r.push(b".\nUs"), (".".into(), false)); // "\nUs" may start the stop string
        assert_eq!(r.push(b"er: x"), (String::new(), true));
        assert_eq!(r.finish(), "");

        let mut r = ReplyText::new(vec![], false);
        let e_acute = "é".as_bytes();
        assert_eq!(r.push(&e_acute[..1]), (String::new(), false));
        assert_eq!(r.push(&e_acute[1..]), ("é".into(), false));
        let mut r = ReplyText::new(vec!["\nUser:".into()], false);
        assert_eq!(r.push(b"a\nU"), ("a".into(), false));
        assert_eq!(r.finish(), "\nU", "what was held back comes out at the end");
    }
}
