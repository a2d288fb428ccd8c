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

/// Baseline distributions of one chunk's scored positions.
struct BaselineChunk {
    tokens: Vec<Token>,
    /// Row-major [positions][n_vocab] probabilities under the f16 cache.
    probs: Vec<f32>,
    /// Σ p·log p per position (minus the entropy), so KL(p‖q) = negent − Σ p·x + lse(x).
    negent: Vec<f64>,
    top1: Vec<u32>,
    /// Negative log-likelihood of the true next token under the baseline.
    nll: Vec<f64>,
}

/// Chunks of text with their f16-cache baseline, ready to score configurations against.
pub struct Evaluator<'m> {
    model: &'m Model,
    n_ctx: u32,
    n_threads: i32,
    /// Tokens per forward step (llama.cpp's n_ubatch), the same for the baseline and every
    /// configuration scored, so they all run the same kernels (1 = single-token decodes).
    n_ubatch: u32,
    chunks: Vec<BaselineChunk>,
    n_vocab: usize,
    /// Forward passes run so far (baseline included).
    pub forward_passes: u64,
    /// Seconds spent in forward passes.
    pub forward_seconds: f64,
}

/// Logits below max − CUTOFF contribute < e^-30 each to the softmax sum: with a vocabulary of
/// 262k that bounds the relative error of the sum by 3e-8, and skipping their exp() makes a
/// 262k-token row about ten times cheaper.
const CUTOFF: f32 = 30.0;

/// (max, argmax, log-sum-exp) of a row of logits.
fn lse(logits: &[f32]) -> (f32, u32, f64) {
    let (mut max, mut arg) = (f32::NEG_INFINITY, 0u32);
    for (i, &x) in logits.iter().enumerate() {
        if x > max {
            max = x;
            arg = i as u32;
        }
    }
    let floor = max - CUTOFF;
    let mut sum = 0f64;
    for &x in logits {
        if x > floor {
            sum += ((x - max) as f64).exp();
        }
    }
    (max, arg, max as f64 + sum.ln())
}

/// Fills `probs` with softmax(logits); returns (argmax, Σ p·log p).
fn softmax_into(logits: &[f32], probs: &mut [f32]) -> (u32, f64, f64) {
    let (max, arg, lse) = lse(logits);
    let floor = max - CUTOFF;
    let mut negent = 0f64;
    for (p, &x) in probs.iter_mut().zip(logits) {
        if x > floor {
            let lp = x as f64 - lse;
            let pv = lp.exp();
            *p = pv as f32;
            negent += pv * lp;
        } else {
            *p = 0.0;
        }
    }
    (arg, negent, lse)
}

/// KL(p‖q) where p is given by its probabilities and Σ p·log p, and q by logits (relative
/// error ≲ 1e-4 from storing p in f32; see the cutoff test). Returns
/// (kld, argmax of q, lse of q).
fn kld_row(probs: &[f32], negent: f64, logits: &[f32]) -> (f64, u32, f64) {
    let (_, arg, lse_q) = lse(logits);
    let dot: f64 = probs.iter().zip(logits).map(|(&p, &x)| p as f64 * x as f64).sum();
    ((negent - dot + lse_q).max(0.0), arg, lse_q)
}

impl<'m> Evaluator<'m> {
    /// Tokenizes `text`, cuts up to `max_chunks` chunks of `n_ctx` tokens and computes the
    /// f16-cache baseline with `base` (its cache types are overridden to uniform f16). Every
    /// configuration is later scored with `base.n_ubatch` as its step size.
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
            n_ubatch: base.n_ubatch.min(n_ctx).max(1),
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
            let scored = ev.scored(&chunk);
            let n_vocab = ev.n_vocab;
            let mut probs = vec![0f32; scored.len() * n_vocab];
            let (mut negent, mut top1, mut nll) = (Vec::new(), Vec::new(), Vec::new());
            ev.forward(&mut ctx, &chunk, |i, logits| {
                let (arg, ne, lse) = softmax_into(logits, &mut probs[i * n_vocab..(i + 1) * n_vocab]);
                negent.push(ne);
                top1.push(arg);
                let next = chunk[scored.start + i + 1] as usize;
                nll.push(lse - logits[next] as f64);
            })?;
            ev.chunks.push(BaselineChunk { tokens: chunk, probs, negent, top1, nll });
        }
        Ok(ev)
    }

    /// Context parameters for a configuration: `base` with the evaluator's context and step size, and
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
        p.n_ubatch = self.n_ubatch;
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
        for (row, pos) in scored.enumerate() {
            let logits = ctx.logits(pos as i32).expect("logits of a scored position");
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
        let chunks = std::mem::take(&mut self.chunks);
        let result = (|| {
            for chunk in &chunks {
                let scored = self.scored(&chunk.tokens);
                let n_vocab = self.n_vocab;
                self.forward(&mut ctx, &chunk.tokens, |i, logits| {
                    let probs = &chunk.probs[i * n_vocab..(i + 1) * n_vocab];
                    let (kld, arg, lse_q) = kld_row(probs, chunk.negent[i], logits);
                    scores.kld.push(kld);
                    scores.top1_same.push(arg == chunk.top1[i]);
                    let next = chunk.tokens[scored.start + i + 1] as usize;
                    scores.nll.push(lse_q - logits[next] as f64);
                })?;
            }
            Ok(())
        })();
        self.chunks = chunks;
        result.map(|_| scores)
    }

    /// Perplexity of the baseline itself.
    pub fn baseline_ppl(&self) -> f64 {
        let nll: Vec<f64> = self.chunks.iter().flat_map(|c| c.nll.iter().copied()).collect();
        (nll.iter().sum::<f64>() / nll.len().max(1) as f64).exp()
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
    fn the_cutoff_changes_nothing_measurable() {
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
        let s = Scores { kld: vec![0.0, 0.1, 0.2, 0.3], top1_same: vec![true, true, false, true], nll: vec![1.0; 4] };
        let m = s.summary();
        assert!((m.kld_mean - 0.15).abs() < 1e-12);
        assert_eq!(m.top1, 0.75);
        assert!((m.ppl - 1f64.exp()).abs() < 1e-12);
        assert_eq!(m.kld_max, 0.3);
    }
}
