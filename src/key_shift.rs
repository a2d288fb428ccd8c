//! A constant key shift per layer (patch 0018): the mean of each layer's keys after RoPE,
//! measured on calibration text and subtracted as the keys are cached. Softmax ignores an offset
//! shared by all of one query's scores, so attention is unchanged in exact arithmetic; but a
//! constant part of the keys no longer takes a narrow cache type's range. Qwen2's key biases are
//! such a part: on Qwen2.5-Coder-0.5B one channel of layer 0 sits 491 standard deviations from
//! zero, and q4_0 loses 67-72% of the varying part of two layers' keys to it (bench/key-shift.md).

use crate::cache_type::CacheType;
use crate::llama::{Context, ContextParams, CreateContextError, DecodeError, Model, Token};

#[derive(Debug, thiserror::Error)]
pub enum KeyShiftError {
    #[error("{0} tokens are too few to measure a key shift (at least {MIN_TOKENS})")]
    TooShort(usize),
    #[error("a context of {n_ctx} tokens to measure the key shift")]
    Context {
        n_ctx: u32,
        #[source]
        source: CreateContextError,
    },
    #[error("decoding the key-shift text")]
    Decode(#[from] DecodeError),
    #[error("layer {0} has no KV cache of its own: a key shift needs one per layer")]
    NoCache(u32),
}

/// Fewest tokens a mean is taken over.
pub const MIN_TOKENS: usize = 64;

/// Each layer's mean key (its `n_embd_k_gqa` values; the layers' vectors one after another, as
/// [`ContextParams::key_shift`] takes them) over `tokens`, decoded into an f16 cache on `base`'s
/// devices and threads. A sliding-window layer averages the positions its cache still holds.
pub fn measure(model: &Model, tokens: &[Token], base: &ContextParams) -> Result<Vec<f32>, KeyShiftError> {
    if tokens.len() < MIN_TOKENS {
        return Err(KeyShiftError::TooShort(tokens.len()));
    }
    let n_ctx = tokens.len() as u32;
    let params = ContextParams {
        n_ctx,
        n_batch: 512.min(n_ctx),
        n_ubatch: 512.min(n_ctx),
        type_k: CacheType::F16,
        type_v: CacheType::F16,
        layer_types: None,
        window: None,
        key_shift: None,
        no_kv_profile: true,
        n_seq_max: 1,
        ..base.clone()
    };
    let mut ctx = Context::new(model, &params).map_err(|source| KeyShiftError::Context { n_ctx, source })?;
    ctx.decode_prompt(tokens, 0, params.n_batch as usize)?;
    let mut shift = Vec::new();
    for il in 0..model.n_layer() {
        let info = ctx.layer_info(il).ok_or(KeyShiftError::NoCache(il))?;
        let raw = ctx.layer_cache_data(il, false).ok_or(KeyShiftError::NoCache(il))?;
        let n_embd = (info.bytes_k / info.n_cells.max(1) as u64 / 2) as usize;
        shift.extend(mean_of_rows(&raw, n_embd));
    }
    Ok(shift)
}

/// The mean of the f16 rows of `n_embd` values in `raw` that were written (a cell never written is
/// all zeros, which no key is).
fn mean_of_rows(raw: &[u8], n_embd: usize) -> Vec<f32> {
    let values = CacheType::F16.dequantize(raw);
    let mut sum = vec![0.0f64; n_embd];
    let mut rows = 0usize;
    for row in values.chunks_exact(n_embd).filter(|row| row.iter().any(|&x| x != 0.0)) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += f64::from(v);
        }
        rows += 1;
    }
    sum.into_iter().map(|s| (s / rows.max(1) as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_skips_cells_never_written() {
        let row = |xs: [f32; 2]| xs.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
        let raw = [row([1.0, -2.0]), row([0.0, 0.0]), row([3.0, 4.0])].concat();
        assert_eq!(mean_of_rows(&raw, 2), vec![2.0, 1.0]);
    }
}
