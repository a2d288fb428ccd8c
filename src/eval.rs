//! Quality of a KV cache configuration against the f16-cache baseline: KL divergence of the
//! next-token distributions, top-1 agreement and perplexity, on fixed chunks of real text.
//! Shared by `calibrate`, `search` (verification) and `ab`.
//!
//! Convention (llama-perplexity's): each chunk of `n_ctx` tokens starts with BOS (for models
//! whose tokenizer adds one), and only the second half is scored, so every scored position sees at least `n_ctx/2` tokens of context.

use std::time::Instant;

use serde::Serialize;

use crate::llama::{Batch, Context, ContextParams, CreateContextError, DecodeError, Model, Token, TokenizeError};
use crate::sensitivity::Quality;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("the text has {tokens} tokens, fewer than one chunk of {n_ctx}; use a longer text or a smaller -c")]
    TextTooShort { tokens: usize, n_ctx: u32 },
    #[error("context size {0} is too small to score (need at least 16 tokens)")]
    ContextTooSmall(u32),
    #[error("tokenizing the evaluation text")]
    Tokenize(#[from] TokenizeError),
    #[error("creating a context")]
    Context(#[from] CreateContextError),
    #[error("decoding a chunk")]
    Decode(#[from] DecodeError),
}

/// Per-position scores of one configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub kld: Vec<f64>,
    pub top1_same: Vec<bool>,
    /// Negative log-likelihood of the true next token.
    pub nll: Vec<f64>,
    /// Scored positions per chunk (the first `chunk_sizes[0]` entries are chunk 0's, ...).
    pub chunk_sizes: Vec<usize>,
    /// KV buffer bytes of the context that was scored, as the runtime allocated them.
    pub kv_bytes: u64,
}

/// Summary of [`Scores`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub kld_mean: f64,
    /// Standard error of the mean KLD.
    pub kld_stderr: f64,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    pub top1: f64,
    pub ppl: f64,
    pub positions: usize,
    /// Mean KLD of each chunk: how much the text, not the cache, moves the number.
    pub kld_chunk_means: Vec<f64>,
    /// KV buffer bytes the runtime allocated for the scored context.
    pub kv_bytes: u64,
}

impl Scores {
    pub fn summary(&self) -> Summary {
        let n = self.kld.len().max(1) as f64;
        let mean = self.kld.iter().sum::<f64>() / n;
        let var = self.kld.iter().map(|k| (k - mean) * (k - mean)).sum::<f64>() / (n - 1.0).max(1.0);
        let mut sorted = self.kld.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
        let mut chunk_means = Vec::with_capacity(self.chunk_sizes.len());
        let mut at = 0;
        for &len in &self.chunk_sizes {
            let part = &self.kld[at..(at + len).min(self.kld.len())];
            chunk_means.push(part.iter().sum::<f64>() / part.len().max(1) as f64);
            at += len;
        }
        Summary {
            kld_mean: mean,
            kld_stderr: (var / n).sqrt(),
            kld_median: pct(0.5),
            kld_p99: pct(0.99),
            kld_max: sorted.last().copied().unwrap_or(0.0),
            top1: self.top1_same.iter().filter(|&&s| s).count() as f64 / n,
            ppl: (self.nll.iter().sum::<f64>() / self.nll.len().max(1) as f64).exp(),
            positions: self.kld.len(),
            kld_chunk_means: chunk_means,
            kv_bytes: self.kv_bytes,
        }
    }

    pub fn quality(&self) -> Quality {
        let s = self.summary();
        Quality { kld_mean: s.kld_mean, kld_p99: s.kld_p99, top1: s.top1 }
    }

    /// `later`'s positions after these: scores of chunks `a..b` then of `b..c` are the scores
    /// of `a..c` (each chunk runs from an empty cache, so the split changes no number).
    pub fn append(&mut self, later: Scores) {
        self.kld.extend(later.kld);
        self.top1_same.extend(later.top1_same);
        self.nll.extend(later.nll);
        self.chunk_sizes.extend(later.chunk_sizes);
    }

    fn push(&mut self, row: RowScore) {
        self.kld.push(row.kld);
        self.top1_same.push(row.top1_same);
        self.nll.push(row.nll);
    }
}

/// Baseline distributions of one chunk's scored positions.
struct BaselineChunk {
    /// Row-major [positions][n_vocab] probabilities under the f16 cache.
    probs: Vec<f32>,
    /// Σ p·log p per position (minus the entropy), so KL(p‖q) = negent − Σ p·x + lse(x).
    negent: Vec<f64>,
    top1: Vec<u32>,
}

/// Where the f16-cache baseline lives while configurations are scored.
enum Baseline {
    /// Every scored row's probabilities, computed once: each configuration then costs one pass.
    Stored(Vec<BaselineChunk>),
    /// Nothing stored: the baseline runs in lock-step with the configurations it is compared to,
    /// a step of `n_ubatch` tokens at a time, so memory does not grow with the context.
    Streamed,
}

/// How an [`Evaluator`] holds its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BaselineMode {
    Stored,
    Streamed,
}

/// Default limit for a stored baseline (`n_ctx/2 × n_vocab` f32 per chunk); above it the
/// evaluator streams. 2 GiB holds 4 chunks of 1024 tokens of Gemma 3's 262k vocabulary.
pub const DEFAULT_STORED_BASELINE_LIMIT: u64 = 2 << 30;

/// Configurations stepped in lock-step with one streamed baseline (each holds its own context), at
/// most.
const STREAM_GROUP: usize = 8;

/// What the logits of the contexts stepped together may take: each context holds `n_ubatch` rows
/// of the vocabulary on the host and in its compute buffer on the device, 512 MiB a context for a
/// 262k vocabulary, so a group is smaller for large vocabularies.
const STREAM_LOGITS_BYTES: u64 = 2 << 30;

/// The scores of one position against the baseline.
struct RowScore {
    kld: f64,
    top1_same: bool,
    nll: f64,
}

/// Chunks of text with their f16-cache baseline, ready to score configurations against.
pub struct Evaluator<'m> {
    model: &'m Model,
    n_ctx: u32,
    n_threads: i32,
    /// Tokens per forward step (llama.cpp's n_ubatch), the same for the baseline and every
    /// configuration scored, so they all run the same kernels (1 = single-token decodes).
    n_ubatch: u32,
    /// Parameters of the baseline context (the reference cache type, uniform).
    base: ContextParams,
    chunks: Vec<Vec<Token>>,
    baseline: Baseline,
    /// NLL of the true next token under the baseline, per chunk (filled by the first pass that
    /// runs the baseline).
    baseline_nll: Vec<Vec<f64>>,
    n_vocab: usize,
    /// Forward passes run so far (baseline included), counted per chunk.
    pub forward_passes: u64,
    /// Seconds spent in forward passes (decoding and scoring).
    pub forward_seconds: f64,
    /// Of those, seconds in the decodes and reading the logits back.
    pub decode_seconds: f64,
}

/// A chunk of text as the model sees it: BOS in place of its first token where the model's
/// texts start with one.
fn chunk_with_bos(tokens: &[Token], bos: Option<Token>) -> Vec<Token> {
    let mut chunk = tokens.to_vec();
    if let Some(bos) = bos {
        chunk[0] = bos;
    }
    chunk
}

/// Lanes of the vectorised loops below (AVX-512 holds 16 f32 or 8 f64).
const LANES: usize = 16;

/// e^x for x ≤ 0 in f32, written so that the compiler vectorises it: x = n·ln 2 + r with n found by
/// the 1.5·2²³ rounding trick, e^r by its Taylor polynomial of degree 7 (|r| ≤ ln 2 / 2: truncation
/// below 1e-8, so the error is f32 rounding, ~1e-7 relative), then 2ⁿ put into the exponent bits.
/// Below -87, where f32 underflows, e^-87 (3e-38) stands in: it changes no sum of a row.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6; // ln 2, split in a high and a low part
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n = t.to_bits() as i32 - SHIFT.to_bits() as i32;
    p * f32::from_bits(((n + 127) << 23) as u32)
}

/// (max, first argmax) of a row.
fn max_arg(logits: &[f32]) -> (f32, u32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in chunks.by_ref() {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    (max, logits.iter().position(|&x| x == max).unwrap_or(0) as u32)
}

/// Σ e^(x − max) over a row, exponentials in f32 lanes, sums of each lane in f64.
fn sum_exp(logits: &[f32], max: f32) -> f64 {
    let mut total = [0f64; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in chunks.by_ref() {
        for (t, &x) in total.iter_mut().zip(c) {
            *t += exp_neg(x - max) as f64;
        }
    }
    total.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| exp_neg(x - max) as f64).sum::<f64>()
}

/// Σ a·b in f64 lanes.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut total = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x as f64 * y as f64).sum();
    for (x, y) in ca.zip(cb) {
        for ((t, &x), &y) in total.iter_mut().zip(x).zip(y) {
            *t += x as f64 * y as f64;
        }
    }
    total.iter().sum::<f64>() + rest
}

/// (max, argmax, log-sum-exp) of a row of logits.
fn lse(logits: &[f32]) -> (f32, u32, f64) {
    let (max, arg) = max_arg(logits);
    (max, arg, max as f64 + sum_exp(logits, max).ln())
}

/// Fills `probs` with softmax(logits); returns (argmax, Σ p·log p, lse).
fn softmax_into(logits: &[f32], probs: &mut [f32]) -> (u32, f64, f64) {
    let (max, arg, lse) = lse(logits);
    // log p = x − lse = (x − max) − (lse − max); the second term is small, so f32 keeps p's
    // relative precision
    let shift = (lse - max as f64) as f32;
    for (p, &x) in probs.iter_mut().zip(logits) {
        *p = exp_neg((x - max) - shift);
    }
    // Σ p·log p = Σ p·x − lse·Σ p
    let negent = dot(probs, logits) - lse * probs.iter().map(|&p| p as f64).sum::<f64>();
    (arg, negent, lse)
}

/// KL(p‖q) where p is given by its probabilities and Σ p·log p, and q by logits (relative
/// error ≲ 1e-4 from storing p in f32; see the precision test). Returns
/// (kld, argmax of q, lse of q).
fn kld_row(probs: &[f32], negent: f64, logits: &[f32]) -> (f64, u32, f64) {
    let (_, arg, lse_q) = lse(logits);
    ((negent - dot(probs, logits) + lse_q).max(0.0), arg, lse_q)
}

/// Scores one position: the configuration's logits against the baseline row.
fn score_row(probs: &[f32], negent: f64, top1: u32, logits: &[f32], next: usize) -> RowScore {
    let (kld, arg, lse_q) = kld_row(probs, negent, logits);
    RowScore { kld, top1_same: arg == top1, nll: lse_q - logits[next] as f64 }
}

/// Maps `f` over `items` on every core, in order. Scoring a row is a pass over the vocabulary
/// (up to 262k logits) and rows are independent, so a step's rows are split into one contiguous
/// run per thread; on a GPU this is most of an evaluation's host time.
fn par_rows<I, T, R>(items: I, f: impl Fn(T) -> R + Sync) -> Vec<R>
where
    I: Iterator<Item = T>,
    T: Send,
    R: Send,
{
    par_rows_with(items, || (), |_, t| f(t))
}

/// [`par_rows`] with a scratch value per thread (`init()`), e.g. a row buffer that one thread
/// reuses instead of allocating a vocabulary's worth of floats per row.
fn par_rows_with<I, T, R, S>(items: I, init: impl Fn() -> S + Sync, f: impl Fn(&mut S, T) -> R + Sync) -> Vec<R>
where
    I: Iterator<Item = T>,
    T: Send,
    R: Send,
{
    let items: Vec<T> = items.collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len().max(1));
    if threads <= 1 {
        let mut scratch = init();
        return items.into_iter().map(|t| f(&mut scratch, t)).collect();
    }
    let per = items.len().div_ceil(threads);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut it = items.into_iter();
    loop {
        let part: Vec<T> = it.by_ref().take(per).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let (f, init) = (&f, &init);
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|p| {
                s.spawn(move || {
                    let mut scratch = init();
                    p.into_iter().map(|t| f(&mut scratch, t)).collect::<Vec<R>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a scoring thread panicked")).collect()
    })
}

/// Progress of long scoring runs (a chunk of a long context takes minutes on a CPU); short
/// chunks, e.g. calibration's many, only at debug level.
fn chunk_scored(start: Instant, done: usize, of: usize, n_ctx: u32, configs: usize) {
    let seconds = start.elapsed().as_secs_f64();
    if seconds >= 10.0 {
        tracing::info!("scored chunk {done} of {of} ({n_ctx} tokens) for {configs} configuration(s) in {seconds:.0} s");
    } else {
        tracing::debug!(
            "scored chunk {done} of {of} ({n_ctx} tokens) for {configs} configuration(s) in {seconds:.1} s"
        );
    }
}

/// Peak resident memory of this process so far (Linux: VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl<'m> Evaluator<'m> {
    /// Tokenizes `text`, cuts up to `max_chunks` chunks of `n_ctx` tokens and prepares the
    /// baseline with `base`'s uniform cache types (f16 by default; per-layer types and embedded
    /// profiles are ignored for it): stored when
    /// it fits [`DEFAULT_STORED_BASELINE_LIMIT`], streamed otherwise. Every configuration is
    /// later scored with `base.n_ubatch` as its step size.
    pub fn new(
        model: &'m Model,
        text: &str,
        n_ctx: u32,
        max_chunks: usize,
        base: &ContextParams,
    ) -> Result<Evaluator<'m>, EvalError> {
        Self::with_limit(model, text, n_ctx, max_chunks, base, DEFAULT_STORED_BASELINE_LIMIT)
    }

    /// [`Evaluator::new`] with the stored baseline limited to `stored_limit` bytes (0 = always
    /// stream).
    pub fn with_limit(
        model: &'m Model,
        text: &str,
        n_ctx: u32,
        max_chunks: usize,
        base: &ContextParams,
        stored_limit: u64,
    ) -> Result<Evaluator<'m>, EvalError> {
        if n_ctx < 16 {
            return Err(EvalError::ContextTooSmall(n_ctx));
        }
        // control tokens are parsed: a chat-formatted text (`chat-calibration`) carries its
        // template's (e.g. `<|im_start|>`) as a served prompt does; plain corpora have none, so
        // they tokenize the same either way (test: plain_corpora_have_no_control_tokens)
        let tokens = model.tokenize(text, false, true)?;
        let per_chunk = n_ctx as usize;
        let n_chunks = (tokens.len() / per_chunk).min(max_chunks.max(1));
        if n_chunks == 0 {
            return Err(EvalError::TextTooShort { tokens: tokens.len(), n_ctx });
        }
        // Like llama-perplexity: a chunk starts with BOS only for models whose texts do (Qwen2.5
        // does not, and an <|endoftext|> there is a document boundary it would never see).
        let bos = model.add_bos().then(|| model.token_bos());
        let chunks = tokens.chunks_exact(per_chunk).take(n_chunks).map(|c| chunk_with_bos(c, bos)).collect();
        Self::from_chunks(model, n_ctx, base, chunks, stored_limit)
    }

    /// The evaluator of `chunks` (each `n_ctx` tokens, BOS in place): the baseline stored when it
    /// fits `stored_limit` bytes.
    fn from_chunks(
        model: &'m Model,
        n_ctx: u32,
        base: &ContextParams,
        chunks: Vec<Vec<Token>>,
        stored_limit: u64,
    ) -> Result<Evaluator<'m>, EvalError> {
        let n_vocab = model.n_vocab();
        let n_ubatch = base.n_ubatch.min(n_ctx).max(1);
        // The reference is `base`'s uniform type (f16 unless the caller asks for f32).
        let base = ContextParams { layer_types: None, no_kv_profile: true, ..base.clone() };
        let mut ev = Evaluator {
            model,
            n_ctx,
            n_threads: base.n_threads,
            n_ubatch,
            base,
            chunks,
            baseline: Baseline::Streamed,
            baseline_nll: Vec::new(),
            n_vocab,
            forward_passes: 0,
            forward_seconds: 0.0,
            decode_seconds: 0.0,
        };
        let stored_bytes = (ev.chunks.len() * ev.scored_len()) as u64 * n_vocab as u64 * 4;
        if stored_bytes <= stored_limit {
            ev.store_baseline()?;
        }
        Ok(ev)
    }

    /// An evaluator over the same text in shorter chunks of `n_ctx` tokens (at most
    /// `max_chunks`: the start of each of this one's chunks first), with its own baseline: cheap
    /// runs (e.g. calibration's single-layer runs) then cost a fraction of a pass at this one's
    /// context.
    pub fn rechunked(&self, n_ctx: u32, max_chunks: usize) -> Result<Evaluator<'m>, EvalError> {
        if n_ctx < 16 {
            return Err(EvalError::ContextTooSmall(n_ctx));
        }
        let per_chunk = n_ctx as usize;
        let bos = self.model.add_bos().then(|| self.model.token_bos());
        // the first piece of every chunk, then the second of every chunk, ...: a few short chunks
        // spread over the text, not over its first chunk
        let per_parent = self.n_ctx as usize / per_chunk;
        let chunks: Vec<Vec<Token>> = (0..per_parent)
            .flat_map(|i| self.chunks.iter().map(move |c| &c[i * per_chunk..(i + 1) * per_chunk]))
            .take(max_chunks.max(1))
            .map(|piece| chunk_with_bos(piece, bos))
            .collect();
        if chunks.is_empty() {
            return Err(EvalError::TextTooShort { tokens: self.chunks.iter().map(Vec::len).sum(), n_ctx });
        }
        Self::from_chunks(self.model, n_ctx, &self.base, chunks, DEFAULT_STORED_BASELINE_LIMIT)
    }

    fn store_baseline(&mut self) -> Result<(), EvalError> {
        let params = self.params(&self.base.clone());
        let mut ctx = Context::new(self.model, &params)?;
        let n_vocab = self.n_vocab;
        let chunks = std::mem::take(&mut self.chunks);
        let mut stored = Vec::with_capacity(chunks.len());
        let mut nlls = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            let scored = self.scored(chunk);
            let mut probs = vec![0f32; scored.len() * n_vocab];
            let (mut negent, mut top1, mut nll) = (Vec::new(), Vec::new(), Vec::new());
            self.forward(&mut [&mut ctx], chunk, 1, |ks, rows| {
                let out = &mut probs[ks[0] * n_vocab..(ks[0] + rows.len()) * n_vocab];
                let results = par_rows(out.chunks_mut(n_vocab).zip(rows).zip(ks), |((p, r), &k)| {
                    let (arg, ne, lse) = softmax_into(r[0], p);
                    (arg, ne, lse - r[0][chunk[scored.start + k + 1] as usize] as f64)
                });
                for (arg, ne, n) in results {
                    top1.push(arg);
                    negent.push(ne);
                    nll.push(n);
                }
            })?;
            stored.push(BaselineChunk { probs, negent, top1 });
            nlls.push(nll);
        }
        self.chunks = chunks;
        self.baseline = Baseline::Stored(stored);
        self.baseline_nll = nlls;
        Ok(())
    }

    /// Context parameters for a configuration: `config` with the evaluator's context and step size.
    fn params(&self, config: &ContextParams) -> ContextParams {
        let mut p = config.clone();
        p.n_ctx = self.n_ctx;
        p.n_batch = self.n_ubatch;
        p.n_ubatch = self.n_ubatch;
        p
    }

    /// Positions scored in a chunk: the second half, each predicting the next token.
    fn scored(&self, chunk: &[Token]) -> std::ops::Range<usize> {
        chunk.len() / 2..chunk.len() - 1
    }

    fn scored_len(&self) -> usize {
        let n = self.n_ctx as usize;
        n - 1 - n / 2
    }

    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Scored positions over all chunks.
    pub fn positions(&self) -> usize {
        self.chunks.len() * self.scored_len()
    }

    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn mode(&self) -> BaselineMode {
        match self.baseline {
            Baseline::Stored(_) => BaselineMode::Stored,
            Baseline::Streamed => BaselineMode::Streamed,
        }
    }

    /// Runs `chunk` through every context in `ctxs` in lock-step, `n_ubatch` tokens a step, and
    /// calls `on_step(ks, rows)` after each step with its scored positions: every `stride`-th of
    /// the chunk's scored positions (the others compute no logits), `ks[j]` the index among the
    /// scored positions and `rows[j][c]` context `c`'s logits row there. Steps come in order; the
    /// callback may score the rows in parallel.
    fn forward(
        &mut self,
        ctxs: &mut [&mut Context<'_>],
        chunk: &[Token],
        stride: usize,
        mut on_step: impl FnMut(&[usize], &[Vec<&[f32]>]),
    ) -> Result<(), EvalError> {
        let start = Instant::now();
        for ctx in ctxs.iter_mut() {
            ctx.clear();
        }
        let scored = self.scored(chunk);
        let stride = stride.max(1);
        let is_scored = |pos: usize| scored.contains(&pos) && (pos - scored.start).is_multiple_of(stride);
        let step = self.n_ubatch as usize;
        let mut batch = Batch::new(step);
        let mut decode_seconds = 0.0;
        for first in (0..chunk.len()).step_by(step) {
            let part = &chunk[first..(first + step).min(chunk.len())];
            batch.clear();
            batch.add_sequence(part, first as i32, 0, |i| is_scored(first + i)).map_err(|_| DecodeError::Empty)?;
            let t = Instant::now();
            for ctx in ctxs.iter_mut() {
                ctx.decode(&batch)?;
            }
            let positions: Vec<usize> = (first..first + part.len()).filter(|&p| is_scored(p)).collect();
            let rows: Vec<Vec<&[f32]>> = positions
                .iter()
                .map(|&pos| {
                    ctxs.iter().map(|c| c.logits((pos - first) as i32).expect("logits of a scored position")).collect()
                })
                .collect();
            decode_seconds += t.elapsed().as_secs_f64();
            if !rows.is_empty() {
                let ks: Vec<usize> = positions.iter().map(|p| p - scored.start).collect();
                on_step(&ks, &rows);
            }
        }
        self.forward_passes += ctxs.len() as u64;
        self.forward_seconds += start.elapsed().as_secs_f64();
        self.decode_seconds += decode_seconds;
        Ok(())
    }

    /// Scores a configuration (its cache types / per-layer types) on every chunk.
    pub fn score(&mut self, config: &ContextParams) -> Result<Scores, EvalError> {
        Ok(self.score_many(std::slice::from_ref(config))?.pop().expect("one configuration"))
    }

    /// Scores configurations on every chunk. A stored baseline scores them one after another; a
    /// streamed one runs up to eight at a time in lock-step with the baseline.
    pub fn score_many(&mut self, configs: &[ContextParams]) -> Result<Vec<Scores>, EvalError> {
        self.score_many_first(configs, self.chunks.len())
    }

    /// [`Evaluator::score_many`] on the first `n_chunks` chunks only (e.g. cheap screening runs
    /// on part of the text the decisive runs use whole).
    pub fn score_many_first(&mut self, configs: &[ContextParams], n_chunks: usize) -> Result<Vec<Scores>, EvalError> {
        self.score_sampled(configs, n_chunks, 1)
    }

    /// [`Evaluator::score_many_first`] on every `stride`-th scored position only: the positions
    /// left out compute no logits (the output layer is a large share of a pass for big
    /// vocabularies), at the price of a noisier mean.
    pub fn score_sampled(
        &mut self,
        configs: &[ContextParams],
        n_chunks: usize,
        stride: usize,
    ) -> Result<Vec<Scores>, EvalError> {
        let n_chunks = n_chunks.clamp(1, self.chunks.len());
        self.score_chunks(configs, 0..n_chunks, stride)
    }

    /// Scores configurations on chunks `range` (e.g. the rest of the text after screening runs
    /// on its first chunks: [`Scores::append`] joins the two).
    pub fn score_chunks(
        &mut self,
        configs: &[ContextParams],
        range: std::ops::Range<usize>,
        stride: usize,
    ) -> Result<Vec<Scores>, EvalError> {
        let range = range.start.min(self.chunks.len())..range.end.min(self.chunks.len());
        let stride = stride.max(1);
        let mut out = Vec::with_capacity(configs.len());
        if matches!(self.baseline, Baseline::Stored(_)) {
            for config in configs {
                out.push(self.score_stored(config, range.clone(), stride)?);
            }
        } else {
            let per_context = self.n_ubatch as u64 * self.n_vocab as u64 * 4;
            let group = ((STREAM_LOGITS_BYTES / per_context.max(1)) as usize).saturating_sub(1).clamp(1, STREAM_GROUP);
            for group in configs.chunks(group) {
                out.extend(self.score_streamed(group, range.clone(), stride)?);
            }
        }
        Ok(out)
    }

    fn score_stored(
        &mut self,
        config: &ContextParams,
        range: std::ops::Range<usize>,
        stride: usize,
    ) -> Result<Scores, EvalError> {
        let mut ctx = Context::new(self.model, &self.params(config))?;
        let mut scores = Scores { kv_bytes: ctx.kv_buffer_bytes(), ..Scores::default() };
        let chunks = std::mem::take(&mut self.chunks);
        let Baseline::Stored(stored) = std::mem::replace(&mut self.baseline, Baseline::Streamed) else {
            unreachable!("called with a stored baseline")
        };
        let n_vocab = self.n_vocab;
        let result = (|| {
            for (chunk, base) in chunks[range.clone()].iter().zip(&stored[range.clone()]) {
                let chunk_start = Instant::now();
                let scored = self.scored(chunk);
                self.forward(&mut [&mut ctx], chunk, stride, |ks, rows| {
                    let rows = par_rows(rows.iter().zip(ks), |(r, &k)| {
                        let probs = &base.probs[k * n_vocab..(k + 1) * n_vocab];
                        score_row(probs, base.negent[k], base.top1[k], r[0], chunk[scored.start + k + 1] as usize)
                    });
                    rows.into_iter().for_each(|r| scores.push(r));
                })?;
                scores.chunk_sizes.push(scored.len().div_ceil(stride));
                chunk_scored(chunk_start, scores.chunk_sizes.len(), range.len(), self.n_ctx, 1);
            }
            Ok(())
        })();
        self.chunks = chunks;
        self.baseline = Baseline::Stored(stored);
        result.map(|_| scores)
    }

    fn score_streamed(
        &mut self,
        configs: &[ContextParams],
        range: std::ops::Range<usize>,
        stride: usize,
    ) -> Result<Vec<Scores>, EvalError> {
        let mut base_ctx = Context::new(self.model, &self.params(&self.base.clone()))?;
        let mut ctxs = Vec::with_capacity(configs.len());
        for c in configs {
            ctxs.push(Context::new(self.model, &self.params(c))?);
        }
        let mut scores: Vec<Scores> =
            ctxs.iter().map(|c| Scores { kv_bytes: c.kv_buffer_bytes(), ..Scores::default() }).collect();
        let n_vocab = self.n_vocab;
        let chunks = std::mem::take(&mut self.chunks);
        let record_nll = self.baseline_nll.is_empty() && range == (0..chunks.len()) && stride <= 1;
        let mut nlls = Vec::new();
        let result = (|| {
            for chunk in &chunks[range.clone()] {
                let chunk_start = Instant::now();
                let scored = self.scored(chunk);
                let mut nll = Vec::new();
                let mut all: Vec<&mut Context<'_>> = std::iter::once(&mut base_ctx).chain(ctxs.iter_mut()).collect();
                self.forward(&mut all, chunk, stride, |ks, rows| {
                    let per_row = par_rows_with(
                        rows.iter().zip(ks),
                        || vec![0f32; n_vocab],
                        |row, (logits, &k)| {
                            let next = chunk[scored.start + k + 1] as usize;
                            let (top1, negent, lse) = softmax_into(logits[0], row);
                            let config_rows: Vec<RowScore> =
                                logits[1..].iter().map(|l| score_row(row, negent, top1, l, next)).collect();
                            (lse - logits[0][next] as f64, config_rows)
                        },
                    );
                    for (n, config_rows) in per_row {
                        nll.push(n);
                        for (s, r) in scores.iter_mut().zip(config_rows) {
                            s.push(r);
                        }
                    }
                })?;
                for s in scores.iter_mut() {
                    s.chunk_sizes.push(scored.len().div_ceil(stride));
                }
                nlls.push(nll);
                chunk_scored(chunk_start, nlls.len(), range.len(), self.n_ctx, scores.len());
            }
            Ok(())
        })();
        self.chunks = chunks;
        if record_nll && result.is_ok() {
            self.baseline_nll = nlls;
        }
        result.map(|_| scores)
    }

    /// Perplexity of the baseline itself (NaN before a streamed baseline has run).
    pub fn baseline_ppl(&self) -> f64 {
        let nll: Vec<f64> = self.baseline_nll.iter().flatten().copied().collect();
        if nll.is_empty() {
            return f64::NAN;
        }
        (nll.iter().sum::<f64>() / nll.len() as f64).exp()
    }

    pub fn threads(&self) -> i32 {
        self.n_threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kld_matches_the_definition() {
        let base = [1.0f32, 2.0, 3.0, -1.0];
        let mut probs = [0f32; 4];
        let (arg, negent, _) = softmax_into(&base, &mut probs);
        assert_eq!(arg, 2);
        let (k, _, _) = kld_row(&probs, negent, &base);
        assert!(k.abs() < 1e-7);
        let test = [1.0f32, 2.0, 2.5, -1.0];
        let (k2, _, _) = kld_row(&probs, negent, &test);
        let softmax = |x: &[f32]| {
            let e: Vec<f64> = x.iter().map(|&v| (v as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<_>>()
        };
        let (p, q) = (softmax(&base), softmax(&test));
        let exact: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        assert!((k2 - exact).abs() < 1e-6, "{k2} vs {exact}");
    }

    #[test]
    fn exp_neg_is_exp_to_f32_precision() {
        for i in 0..96_000 {
            let x = -(i as f32) * 0.000_9; // down to -86.4
            let (got, want) = (exp_neg(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 3e-7 * want + 1e-38, "e^{x}: {got} vs {want}");
        }
        assert!(exp_neg(-1000.0) > 0.0 && exp_neg(-1000.0) < 1e-37);
    }

    #[test]
    fn a_262k_row_scores_as_in_f64() {
        // a 262k-token row with a long tail far below the maximum
        let mut base: Vec<f32> = (0..262_144).map(|i| -((i % 997) as f32) * 0.05).collect();
        base[7] = 12.0;
        let mut test = base.clone();
        test[7] = 11.5;
        test[11] = 3.0;
        let mut probs = vec![0f32; base.len()];
        let (_, negent, _) = softmax_into(&base, &mut probs);
        let (k, _, _) = kld_row(&probs, negent, &test);
        let softmax = |x: &[f32]| {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<_>>()
        };
        let (p, q) = (softmax(&base), softmax(&test));
        let exact: f64 = p.iter().zip(&q).map(|(p, q)| if *p > 0.0 { p * (p / q).ln() } else { 0.0 }).sum();
        // f32 probabilities of a near-certain token limit the relative precision to ~1e-4,
        // far below the sampling noise of a mean KLD (a few percent).
        assert!((k - exact).abs() < 1e-4 * exact, "{k} vs {exact}");
    }

    #[test]
    fn summary_statistics() {
        let s = Scores {
            kld: vec![0.0, 0.1, 0.2, 0.3],
            top1_same: vec![true, true, false, true],
            nll: vec![1.0; 4],
            chunk_sizes: vec![1, 3],
            kv_bytes: 7,
        };
        let m = s.summary();
        assert_eq!(m.kld_chunk_means.len(), 2);
        assert!(m.kld_chunk_means[0] == 0.0 && (m.kld_chunk_means[1] - 0.2).abs() < 1e-12, "{:?}", m.kld_chunk_means);
        assert!((m.kld_mean - 0.15).abs() < 1e-12);
        assert_eq!(m.top1, 0.75);
        assert!((m.ppl - 1f64.exp()).abs() < 1e-12);
        assert_eq!(m.kld_max, 0.3);
    }
}
