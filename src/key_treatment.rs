//! The key treatment: each layer's keys after RoPE, measured per channel on calibration text, give
//! a constant shift (patch 0018: the mean, subtracted as the keys are cached) and a scale (patch
//! 0019: keys divided, queries multiplied by the deviation's square root). Both leave attention
//! unchanged in exact arithmetic (softmax ignores an offset shared by one query's scores; each
//! channel's product is kept), but a narrow cache type no longer spends its range on a constant
//! part (Qwen2's key biases: one channel of layer 0 sits 491 standard deviations from zero,
//! bench/key-shift.md) or on a few large channels (bench/key-scale.md: q4_0 keys 4x, kv3 11x closer
//! to f16 with both).

use crate::cache_type::CacheType;
use crate::llama::{Context, ContextParams, CreateContextError, DecodeError, Model, Token, TokenizeError};

#[derive(Debug, thiserror::Error)]
pub enum KeyMeasureError {
    #[error("{0} tokens are too few to measure the keys (at least {MIN_TOKENS})")]
    TooShort(usize),
    #[error("a context of {n_ctx} tokens to measure the keys")]
    Context {
        n_ctx: u32,
        #[source]
        source: CreateContextError,
    },
    #[error("decoding the text the keys are measured on")]
    Decode(#[from] DecodeError),
    #[error("layer {0} has no KV cache of its own: a key shift or scale needs one per layer")]
    NoCache(u32),
    #[error("tokenizing the text the keys are measured on")]
    Tokenize(#[from] TokenizeError),
}

/// Fewest tokens a mean is taken over.
pub const MIN_TOKENS: usize = 64;

/// Each layer's keys per channel after RoPE, over calibration text: what the key shift (patch
/// 0018) and the key scale (patch 0019) are made of.
#[derive(Debug, Clone)]
pub struct KeyMoments {
    /// The mean per channel: the key shift, the layers' vectors one after another, as
    /// [`ContextParams::key_shift`] takes them.
    pub mean: Vec<f32>,
    /// The standard deviation per channel, laid out as `mean`.
    pub std: Vec<f32>,
    /// Each layer's number of key values per token (`n_embd_k_gqa`).
    pub widths: Vec<usize>,
}

impl KeyMoments {
    /// The key scale ([`ContextParams::key_scale`]): each channel's standard deviation to the
    /// power `power`, over the layer's geometric mean (factors around 1). Dividing a key channel by
    /// `s` and multiplying the query's by it keeps their product; the error a narrow type adds to a
    /// score is smallest, for queries of equal size in every channel, with `s = std^(1/2)`
    /// (Cauchy-Schwarz over the channels), while 1 makes every key channel equally wide (KIVI's
    /// per-channel quantization, done statically). A channel that never moves gets the layer's
    /// smallest non-zero deviation, not a zero factor.
    pub fn scale(&self, power: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.std.len());
        let mut start = 0;
        for &width in &self.widths {
            let layer = &self.std[start..start + width];
            start += width;
            let floor = layer.iter().copied().filter(|&x| x > 0.0).fold(f32::INFINITY, f32::min);
            let floor = if floor.is_finite() { floor } else { 1.0 };
            let factors: Vec<f64> = layer.iter().map(|&x| f64::from(x.max(floor)).powf(f64::from(power))).collect();
            let log_mean = factors.iter().map(|x| x.ln()).sum::<f64>() / width.max(1) as f64;
            out.extend(factors.iter().map(|x| (x / log_mean.exp()) as f32));
        }
        out
    }
}

/// Each layer's key moments ([`KeyMoments`]) over `tokens`, decoded into an f16 cache on `base`'s
/// devices and threads. A sliding-window layer counts the positions its cache still holds.
pub fn measure(model: &Model, tokens: &[Token], base: &ContextParams) -> Result<KeyMoments, KeyMeasureError> {
    if tokens.len() < MIN_TOKENS {
        return Err(KeyMeasureError::TooShort(tokens.len()));
    }
    let n_ctx = tokens.len() as u32;
    // a plain f16 cache (no profile, window or treatment) on base's devices and threads
    let params = ContextParams {
        n_ctx,
        n_batch: 512.min(n_ctx),
        n_ubatch: 512.min(n_ctx),
        n_threads: base.n_threads,
        flash_attn: base.flash_attn,
        offload_kqv: base.offload_kqv,
        swa_full: base.swa_full,
        no_kv_profile: true,
        ..ContextParams::default()
    };
    let mut ctx = Context::new(model, &params).map_err(|source| KeyMeasureError::Context { n_ctx, source })?;
    ctx.decode_prompt(tokens, 0, params.n_batch as usize)?;
    let mut out = KeyMoments { mean: Vec::new(), std: Vec::new(), widths: Vec::new() };
    for il in 0..model.n_layer() {
        let info = ctx.layer_info(il).ok_or(KeyMeasureError::NoCache(il))?;
        let raw = ctx.layer_cache_data(il, false).ok_or(KeyMeasureError::NoCache(il))?;
        let n_embd = (info.bytes_k / info.n_cells.max(1) as u64 / 2) as usize;
        let (mean, std) = moments_of_rows(&raw, n_embd);
        out.mean.extend(mean);
        out.std.extend(std);
        out.widths.push(n_embd);
    }
    Ok(out)
}

/// [`measure`] over the first tokens (at most `n_max`) of `text`; with the number of tokens taken.
pub fn measure_text(
    model: &Model,
    text: &str,
    n_max: usize,
    base: &ContextParams,
) -> Result<(KeyMoments, usize), KeyMeasureError> {
    let tokens = model.tokenize(text, true, false)?;
    let n = tokens.len().min(n_max);
    Ok((measure(model, &tokens[..n], base)?, n))
}

/// The mean and standard deviation per channel of the f16 rows of `n_embd` values in `raw` that
/// were written (a cell never written is all zeros, which no key is).
fn moments_of_rows(raw: &[u8], n_embd: usize) -> (Vec<f32>, Vec<f32>) {
    let values = CacheType::F16.dequantize(raw);
    let mut sum = vec![0.0f64; n_embd];
    let mut sum_sq = vec![0.0f64; n_embd];
    let mut rows = 0usize;
    for row in values.chunks_exact(n_embd).filter(|row| row.iter().any(|&x| x != 0.0)) {
        for ((s, q), &v) in sum.iter_mut().zip(sum_sq.iter_mut()).zip(row) {
            *s += f64::from(v);
            *q += f64::from(v) * f64::from(v);
        }
        rows += 1;
    }
    let n = rows.max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sum_sq.iter().zip(&mean).map(|(q, m)| ((q / n - m * m).max(0.0)).sqrt() as f32).collect();
    (mean.into_iter().map(|m| m as f32).collect(), std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_moments_skip_cells_never_written() {
        let row = |xs: [f32; 2]| xs.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
        let raw = [row([1.0, -2.0]), row([0.0, 0.0]), row([3.0, 4.0])].concat();
        let (mean, std) = moments_of_rows(&raw, 2);
        assert_eq!(mean, vec![2.0, 1.0]);
        assert_eq!(std, vec![1.0, 3.0]);
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    #[test]
    fn the_scale_is_a_power_of_the_deviation_around_one_per_layer() {
        let m = KeyMoments { mean: vec![0.0; 4], std: vec![4.0, 1.0, 2.0, 0.0], widths: vec![2, 2] };
        let s = m.scale(0.5);
        // layer 0: sqrt(4), sqrt(1) over their geometric mean sqrt(2)
        assert!((s[0] - 2.0f32.sqrt()).abs() < 1e-6 && (s[1] - 0.5f32.sqrt()).abs() < 1e-6, "{s:?}");
        // layer 1: the channel that never moves takes the smallest deviation: equal factors
        assert!((s[2] - 1.0).abs() < 1e-6 && (s[3] - 1.0).abs() < 1e-6, "{s:?}");
    }
}
