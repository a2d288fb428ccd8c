//! Quality of a KV cache configuration against the f16-cache baseline: KL divergence of the
//! next-token distributions, top-1 agreement and perplexity, on fixed chunks of real text.
//! Shared by `calibrate`, `search` (verification) and `ab`.
//!
//! Convention (llama-perplexity's): each chunk of `n_ctx` tokens starts with BOS, and only the
//! second half is scored, so every scored position sees at least `n_ctx/2` tokens of context.

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
}

/// Summary of [`Scores`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
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
}

impl Scores {
    pub fn summary(&self) -> Summary {
        let n = self.kld.len().max(1) as f64;
        let mean = self.kld.iter().sum::<f64>() / n;
        let var = self.kld.iter().map(|k| (k - mean) * (k - mean)).sum::<f64>() / (n - 1.0).max(1.0);
        let mut sorted = self.kld.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
        Summary {
            kld_mean: mean,
            kld_stderr: (var / n).sqrt(),
            kld_median: pct(0.5),
            kld_p99: pct(0.99),
            kld_max: sorted.last().copied().unwrap_or(0.0),
            top1: self.top1_same.iter().filter(|&&s| s).count() as f64 / n,
            ppl: (self.nll.iter().sum::<f64>() / self.nll.len().max(1) as f64).exp(),
            positions: self.kld.len(),
        }
    }

    pub fn quality(&self) -> Quality {
        let s = self.summary();
        Quality { kld_mean: s.kld_mean, kld_p99: s.kld_p99, top1: s.top1 }
    }
}

/// Baseline log-probabilities of one chunk's scored positions.
struct BaselineChunk {
    tokens: Vec<Token>,
    /// Row-major [positions][n_vocab] log-softmax of the f16-cache logits.
    logprobs: Vec<f32>,
    top1: Vec<u32>,
}

/// Chunks of text with their f16-cache baseline, ready to score configurations against.
pub struct Evaluator<'m> {
    model: &'m Model,
    n_ctx: u32,
    n_threads: i32,
    chunks: Vec<BaselineChunk>,
    n_vocab: usize,
    /// Forward passes run so far (baseline included).
    pub forward_passes: u64,
    /// Seconds spent in forward passes.
    pub forward_seconds: f64,
}

fn log_softmax_into(logits: &[f32], out: &mut [f32]) -> u32 {
    let (mut max, mut arg) = (f32::NEG_INFINITY, 0u32);
    for (i, &x) in logits.iter().enumerate() {
        if x > max {
            max = x;
            arg = i as u32;
        }
    }
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    for (o, &x) in out.iter_mut().zip(logits) {
        *o = (x as f64 - lse) as f32;
    }
    arg
}

/// KL(p_base || p_test) for one position, given the baseline log-probs and the test logits.
fn kld_row(base: &[f32], test_logits: &[f32], scratch: &mut [f32]) -> (f64, u32) {
    let arg = log_softmax_into(test_logits, scratch);
    let mut kld = 0.0f64;
    for (&lb, &lt) in base.iter().zip(scratch.iter()) {
        let p = (lb as f64).exp();
        if p > 0.0 {
            kld += p * (lb as f64 - lt as f64);
        }
    }
    (kld.max(0.0), arg)
}

impl<'m> Evaluator<'m> {
    /// Tokenizes `text`, cuts up to `max_chunks` chunks of `n_ctx` tokens and computes the
    /// f16-cache baseline with `base` (its cache types are overridden to uniform f16).
    pub fn new(
        model: &'m Model,
        text: &str,
        n_ctx: u32,
        max_chunks: usize,
        base: &ContextParams,
    ) -> Result<Evaluator<'m>, EvalError> {
        if n_ctx < 16 {
            return Err(EvalError::ContextTooSmall(n_ctx));
        }
        let tokens = model.tokenize(text, false, false)?;
        let per_chunk = n_ctx as usize;
        let n_chunks = (tokens.len() / per_chunk).min(max_chunks.max(1));
        if n_chunks == 0 {
            return Err(EvalError::TextTooShort { tokens: tokens.len(), n_ctx });
        }
        let bos = model.token_bos();
        let mut ev = Evaluator {
            model,
            n_ctx,
            n_threads: base.n_threads,
            chunks: Vec::new(),
            n_vocab: model.n_vocab(),
            forward_passes: 0,
            forward_seconds: 0.0,
        };
        let params = ev.params(base, None);
        let mut ctx = Context::new(model, &params)?;
        for c in 0..n_chunks {
            let mut chunk = tokens[c * per_chunk..(c + 1) * per_chunk].to_vec();
            chunk[0] = bos;
            let mut logprobs = vec![0f32; ev.scored(&chunk).len() * ev.n_vocab];
            let mut top1 = Vec::new();
            ev.forward(&mut ctx, &chunk, |i, logits| {
                let row = &mut logprobs[i * ev_n_vocab(logits)..(i + 1) * ev_n_vocab(logits)];
                top1.push(log_softmax_into(logits, row));
            })?;
            ev.chunks.push(BaselineChunk { tokens: chunk, logprobs, top1 });
        }
        Ok(ev)
    }

    /// Context parameters for a configuration: `base` with the evaluator's context size, and
    /// with uniform f16 when `layers` is None and no types are given.
    fn params(&self, base: &ContextParams, config: Option<&ContextParams>) -> ContextParams {
        let mut p = config.cloned().unwrap_or_else(|| ContextParams {
            type_k: crate::cache_type::CacheType::F16,
            type_v: crate::cache_type::CacheType::F16,
            layer_types: None,
            no_kv_profile: true,
            ..base.clone()
        });
        p.n_ctx = self.n_ctx;
        p.n_batch = self.n_ctx;
        p.n_ubatch = p.n_ubatch.min(self.n_ctx).max(1);
        p
    }

    /// Positions scored in a chunk: the second half, each predicting the next token.
    fn scored(&self, chunk: &[Token]) -> std::ops::Range<usize> {
        chunk.len() / 2..chunk.len() - 1
    }

    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Scored positions over all chunks.
    pub fn positions(&self) -> usize {
        self.chunks.iter().map(|c| c.top1.len()).sum()
    }

    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    fn forward(
        &mut self,
        ctx: &mut Context<'_>,
        chunk: &[Token],
        mut on_row: impl FnMut(usize, &[f32]),
    ) -> Result<(), EvalError> {
        let start = Instant::now();
        ctx.clear();
        let scored = self.scored(chunk);
        let mut batch = Batch::new(chunk.len());
        batch.add_sequence(chunk, 0, 0, |i| scored.contains(&i)).map_err(|_| DecodeError::Empty)?;
        ctx.decode(&batch)?;
        for (row, _) in scored.enumerate() {
            let logits = ctx.logits(row as i32).expect("logits of a scored position");
            on_row(row, logits);
        }
        self.forward_passes += 1;
        self.forward_seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Scores a configuration (its cache types / per-layer types) on every chunk.
    pub fn score(&mut self, config: &ContextParams) -> Result<Scores, EvalError> {
        let params = self.params(config, Some(config));
        let model = self.model;
        let mut ctx = Context::new(model, &params)?;
        let mut scores = Scores::default();
        let mut scratch = vec![0f32; self.n_vocab];
        let chunks = std::mem::take(&mut self.chunks);
        let result = (|| {
            for chunk in &chunks {
                let scored = self.scored(&chunk.tokens);
                let n_vocab = self.n_vocab;
                self.forward(&mut ctx, &chunk.tokens, |i, logits| {
                    let base = &chunk.logprobs[i * n_vocab..(i + 1) * n_vocab];
                    let (kld, arg) = kld_row(base, logits, &mut scratch);
                    scores.kld.push(kld);
                    scores.top1_same.push(arg == chunk.top1[i]);
                    let next = chunk.tokens[scored.start + i + 1] as usize;
                    // NLL of the test distribution: scratch holds its log-softmax now.
                    scores.nll.push(-(scratch[next] as f64));
                })?;
            }
            Ok(())
        })();
        self.chunks = chunks;
        result.map(|_| scores)
    }

    /// Perplexity of the baseline itself.
    pub fn baseline_ppl(&self) -> f64 {
        let mut nll = 0.0;
        let mut n = 0usize;
        for c in &self.chunks {
            let scored = self.scored(&c.tokens);
            for (i, pos) in scored.enumerate() {
                let next = c.tokens[pos + 1] as usize;
                nll -= c.logprobs[i * self.n_vocab + next] as f64;
                n += 1;
            }
        }
        (nll / n.max(1) as f64).exp()
    }

    pub fn threads(&self) -> i32 {
        self.n_threads
    }
}

fn ev_n_vocab(logits: &[f32]) -> usize {
    logits.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kld_is_zero_for_identical_and_positive_otherwise() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let mut base = [0f32; 4];
        log_softmax_into(&logits, &mut base);
        let mut scratch = [0f32; 4];
        let (k, arg) = kld_row(&base, &logits, &mut scratch);
        assert!(k.abs() < 1e-7);
        assert_eq!(arg, 2);
        let (k2, _) = kld_row(&base, &[1.0, 2.0, 2.5, -1.0], &mut scratch);
        // exact value: sum p (log p - log q)
        let p: Vec<f64> = base.iter().map(|&x| (x as f64).exp()).collect();
        let mut q = [1.0f64, 2.0, 2.5, -1.0].map(f64::exp);
        let s: f64 = q.iter().sum();
        q.iter_mut().for_each(|x| *x /= s);
        let exact: f64 = p.iter().zip(q).map(|(p, q)| p * (p / q).ln()).sum();
        assert!((k2 - exact).abs() < 1e-6, "{k2} vs {exact}");
    }

    #[test]
    fn summary_statistics() {
        let s = Scores { kld: vec![0.0, 0.1, 0.2, 0.3], top1_same: vec![true, true, false, true], nll: vec![1.0; 4] };
        let m = s.summary();
        assert!((m.kld_mean - 0.15).abs() < 1e-12);
        assert_eq!(m.top1, 0.75);
        assert!((m.ppl - 1f64.exp()).abs() < 1e-12);
        assert_eq!(m.kld_max, 0.3);
    }
}
