//! Speed in llama-bench's terms: `pp512` (prompt processing) and `tg128` (generation) tokens
//! per second, each after `depth` tokens already in the cache (`@ d N`).

use std::time::Instant;

use serde::Serialize;

use crate::llama::{Batch, Context, DecodeError, Model};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Speed {
    pub depth: u32,
    pub pp_tokens_per_s: f64,
    pub tg_tokens_per_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("depth {depth} + {need} tokens do not fit the context of {n_ctx}; raise -c")]
    TooDeep { depth: u32, need: u32, n_ctx: u32 },
    #[error("{n_seq} sequences do not fit a context made for {n_seq_max}")]
    TooManySequences { n_seq: u32, n_seq_max: u32 },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Deterministic token ids spread over the vocabulary (speed does not depend on the text).
fn token(model: &Model, i: u32) -> i32 {
    ((i as u64 * 7919 + 13) % model.n_vocab() as u64) as i32
}

fn fill(ctx: &mut Context<'_>, start: u32, n: u32, batch_size: u32) -> Result<(), BenchError> {
    let model = ctx.model();
    let mut batch = Batch::new(batch_size as usize);
    let mut pos = start;
    while pos < start + n {
        batch.clear();
        let end = (pos + batch_size).min(start + n);
        for p in pos..end {
            batch.add(token(model, p), p as i32, 0, p + 1 == end).expect("batch sized to fit");
        }
        ctx.decode(&batch)?;
        pos = end;
    }
    Ok(())
}

/// Seconds `work` takes on the device: the context is synchronised before the timer starts (so
/// earlier work is not counted) and before it stops (decode returns before the device is done).
fn timed(
    ctx: &mut Context<'_>,
    work: impl FnOnce(&mut Context<'_>) -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    ctx.synchronize();
    let t = Instant::now();
    work(ctx)?;
    ctx.synchronize();
    Ok(t.elapsed().as_secs_f64())
}

/// A prompt-processing pass shorter than this is repeated on the same depth (up to
/// `MAX_PP_PASSES` passes) and the median rate kept: on a GPU, pp512 over a 16k-token cache takes
/// ~45 ms, and single passes of unchanged prefill code differed by up to 4% between H200 runs.
const MIN_PP_SECONDS: f64 = 0.25;
const MAX_PP_PASSES: usize = 5;

/// One measurement of pp`n_pp` and tg`n_tg` at `depth` (the cache is cleared first).
pub fn measure(ctx: &mut Context<'_>, depth: u32, n_pp: u32, n_tg: u32, batch_size: u32) -> Result<Speed, BenchError> {
    let need = n_pp.max(n_tg);
    if depth + need > ctx.n_ctx() {
        return Err(BenchError::TooDeep { depth, need, n_ctx: ctx.n_ctx() });
    }
    let model = ctx.model();
    // prompt processing: depth tokens first (not timed), then n_pp tokens, as often as a short
    // pass needs (the n_pp tokens are removed before the next pass)
    ctx.clear();
    fill(ctx, 0, depth, batch_size)?;
    let mut rates = Vec::with_capacity(MAX_PP_PASSES);
    let mut spent = 0.0;
    loop {
        let seconds = timed(ctx, |ctx| fill(ctx, depth, n_pp, batch_size))?;
        rates.push(n_pp as f64 / seconds);
        spent += seconds;
        if spent >= MIN_PP_SECONDS || rates.len() == MAX_PP_PASSES {
            break;
        }
        ctx.remove_range(0, depth as i32, -1);
    }
    let pp = Stat::of(&rates).median;

    // generation: depth tokens, then n_tg single-token steps
    ctx.remove_range(0, depth as i32, -1);
    let mut batch = Batch::new(1);
    let seconds = timed(ctx, |ctx| {
        for i in 0..n_tg {
            batch.clear();
            batch.add(token(model, depth + i), (depth + i) as i32, 0, true).expect("one token fits");
            ctx.decode(&batch)?;
        }
        Ok(())
    })?;
    let tg = n_tg as f64 / seconds;
    Ok(Speed { depth, pp_tokens_per_s: pp, tg_tokens_per_s: tg })
}

/// Generation with `n_seq` sequences at once (a server's slots): every sequence holds `depth`
/// tokens of its own, then each step decodes one token for every sequence in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParallelSpeed {
    pub depth: u32,
    pub n_seq: u32,
    /// Generated tokens per second, all sequences together.
    pub aggregate_tokens_per_s: f64,
    /// Generated tokens per second of each sequence (aggregate / n_seq).
    pub per_sequence_tokens_per_s: f64,
    /// Tokens generated in the timed steps (n_seq × n_tg) and the seconds they took.
    pub generated_tokens: u32,
    pub seconds: f64,
}

/// The depth each of `n_seq` sequences holds: `depth` for all, or (`spread`) depths spread evenly
/// from a quarter of `depth` (sequence 0) to `depth` (the last), as a server's slots hold
/// conversations of unequal lengths.
pub fn sequence_depths(n_seq: u32, depth: u32, spread: bool) -> Vec<u32> {
    let low = depth / 4;
    (0..n_seq)
        .map(|s| match (spread, n_seq) {
            (true, 2..) => low + ((u64::from(depth - low) * u64::from(s)) / u64::from(n_seq - 1)) as u32,
            _ => depth,
        })
        .collect()
}

/// tg`n_tg` of `n_seq` sequences at `depth` each, or at depths spread below it
/// ([`sequence_depths`]). The context needs `n_seq_max >= n_seq` with per-sequence streams and
/// `depth + n_tg + 1` cells per sequence. One sequence is filled to `depth`, then copied to the
/// others (a buffer copy: the caches are as large as n_seq separate prefills make them), which drop
/// what lies beyond their own depth.
pub fn measure_parallel(
    ctx: &mut Context<'_>,
    n_seq: u32,
    depth: u32,
    spread: bool,
    n_tg: u32,
    batch_size: u32,
) -> Result<ParallelSpeed, BenchError> {
    let per_seq = ctx.n_ctx() / ctx.n_seq_max().max(1);
    if n_seq > ctx.n_seq_max() {
        return Err(BenchError::TooManySequences { n_seq, n_seq_max: ctx.n_seq_max() });
    }
    if depth + n_tg + 1 > per_seq {
        return Err(BenchError::TooDeep { depth, need: n_tg + 1, n_ctx: per_seq });
    }
    let model = ctx.model();
    let depths = sequence_depths(n_seq, depth, spread);
    ctx.clear();
    fill(ctx, 0, depth, batch_size)?;
    for s in 1..n_seq {
        ctx.copy_sequence(0, s as i32);
    }
    for (s, &d) in depths.iter().enumerate().filter(|(_, &d)| d < depth) {
        ctx.remove_range(s as i32, d as i32, -1);
    }
    let mut batch = Batch::new(n_seq as usize);
    // one untimed step: it performs the copies
    let step = |ctx: &mut Context<'_>, batch: &mut Batch, i: u32| -> Result<(), BenchError> {
        batch.clear();
        for (s, &d) in depths.iter().enumerate() {
            batch.add(token(model, d + i + s as u32), (d + i) as i32, s as i32, true).expect("batch sized to fit");
        }
        Ok(ctx.decode(batch)?)
    };
    step(ctx, &mut batch, 0)?;
    let seconds = timed(ctx, |ctx| (1..=n_tg).try_for_each(|i| step(ctx, &mut batch, i)))?;
    let generated_tokens = n_seq * n_tg;
    let aggregate = f64::from(generated_tokens) / seconds;
    Ok(ParallelSpeed {
        depth,
        n_seq,
        aggregate_tokens_per_s: aggregate,
        per_sequence_tokens_per_s: aggregate / f64::from(n_seq),
        generated_tokens,
        seconds,
    })
}

/// Decode in drafts of `n_draft` tokens of one sequence per step, as speculative decoding verifies
/// them (every draft token's logits requested, every draft accepted).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DraftSpeed {
    pub depth: u32,
    pub n_draft: u32,
    /// Draft tokens decoded per second (n_draft per step).
    pub tokens_per_s: f64,
    /// Steps (one op per layer over `n_draft` query tokens) per second.
    pub steps_per_s: f64,
}

/// `n_steps` drafts of `n_draft` tokens after `depth` tokens (the cache is cleared first; the
/// context needs `depth + (n_steps + 1) * n_draft` cells and a batch of `n_draft`).
pub fn measure_draft(
    ctx: &mut Context<'_>,
    depth: u32,
    n_draft: u32,
    n_steps: u32,
    batch_size: u32,
) -> Result<DraftSpeed, BenchError> {
    let need = (n_steps + 1) * n_draft;
    if depth + need > ctx.n_ctx() {
        return Err(BenchError::TooDeep { depth, need, n_ctx: ctx.n_ctx() });
    }
    let model = ctx.model();
    ctx.clear();
    fill(ctx, 0, depth, batch_size)?;
    let mut batch = Batch::new(n_draft as usize);
    let step = |ctx: &mut Context<'_>, batch: &mut Batch, first: u32| -> Result<(), BenchError> {
        batch.clear();
        for p in first..first + n_draft {
            batch.add(token(model, p), p as i32, 0, true).expect("batch sized to fit");
        }
        Ok(ctx.decode(batch)?)
    };
    // one untimed step (first use of this batch shape)
    step(ctx, &mut batch, depth)?;
    let seconds = timed(ctx, |ctx| (1..=n_steps).try_for_each(|i| step(ctx, &mut batch, depth + i * n_draft)))?;
    Ok(DraftSpeed {
        depth,
        n_draft,
        tokens_per_s: f64::from(n_steps * n_draft) / seconds,
        steps_per_s: f64::from(n_steps) / seconds,
    })
}

/// Median and the spread (min, max) of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Stat {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat { median, min: v.first().copied().unwrap_or(f64::NAN), max: v.last().copied().unwrap_or(f64::NAN) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 4.0]).median, 2.5);
    }
}
