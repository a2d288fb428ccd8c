//! The KV cache shape of a model: per-layer K/V row sizes and which layers are sliding-window.
//! Sizes at any context and for any per-layer types follow from it without allocating a cache.

use serde::{Deserialize, Serialize};

use crate::cache_type::CacheType;
use crate::llama::{Context, ContextParams, CreateContextError, Model};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Values per token in the layer's K cache (KV heads × key length).
    pub k_dim: u64,
    /// Values per token in the layer's V cache.
    pub v_dim: u64,
    /// Sliding-window layer: holds at most `window` tokens.
    pub sliding: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    /// One entry per layer; `None` for layers without a KV cache.
    pub layers: Vec<Option<LayerShape>>,
    /// Sliding window in tokens (0 = none).
    pub window: u32,
}

impl KvLayout {
    /// Reads the layout from the runtime: a tiny f16 context reports each layer's bytes and cells.
    pub fn probe(model: &Model) -> Result<KvLayout, CreateContextError> {
        let params =
            ContextParams { n_ctx: 256, n_batch: 256, n_ubatch: 256, no_kv_profile: true, ..Default::default() };
        let ctx = Context::new(model, &params)?;
        let layers = ctx
            .layers()
            .into_iter()
            .map(|info| {
                info.map(|i| LayerShape {
                    k_dim: i.bytes_k / i.n_cells as u64 / 2,
                    v_dim: i.bytes_v / i.n_cells as u64 / 2,
                    sliding: i.is_swa,
                })
            })
            .collect();
        Ok(KvLayout { layers, window: model.n_swa() })
    }

    /// Tokens a layer holds at context `n_ctx` (sliding layers hold at most the window).
    pub fn cells(&self, shape: &LayerShape, n_ctx: u64) -> u64 {
        if shape.sliding && self.window > 0 {
            n_ctx.min(self.window as u64)
        } else {
            n_ctx
        }
    }

    /// KV bytes at `n_ctx` with `types[il] = (k, v)`.
    pub fn bytes(&self, types: &[(CacheType, CacheType)], n_ctx: u64) -> u64 {
        self.layers
            .iter()
            .zip(types)
            .filter_map(|(l, &(k, v))| l.map(|s| (s, k, v)))
            .map(|(s, k, v)| (k.row_bytes(s.k_dim) + v.row_bytes(s.v_dim)) * self.cells(&s, n_ctx))
            .sum()
    }

    /// Average storage bits per cached value at `n_ctx`.
    pub fn bits_per_value(&self, types: &[(CacheType, CacheType)], n_ctx: u64) -> f64 {
        let values: u64 = self.layers.iter().flatten().map(|s| (s.k_dim + s.v_dim) * self.cells(s, n_ctx)).sum();
        if values == 0 {
            return 0.0;
        }
        self.bytes(types, n_ctx) as f64 * 8.0 / values as f64
    }

    pub fn uniform(&self, k: CacheType, v: CacheType) -> Vec<(CacheType, CacheType)> {
        vec![(k, v); self.layers.len()]
    }
}

/// What a context's KV cache holds, read back from the runtime: bytes per layer as allocated
/// and the values they store (cells × row length), so bits per value need no model of the
/// runtime's sizing rules (sliding-window caches hold window + ubatch cells, for example).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RuntimeKv {
    /// Σ K and V tensor bytes over the layers.
    pub tensor_bytes: u64,
    /// Bytes of the backend buffers holding the cache (what `llama_kv_buffer_size` reports).
    pub buffer_bytes: u64,
    /// Cached values (K and V) at full occupancy.
    pub values: u64,
}

impl RuntimeKv {
    pub fn of(ctx: &Context<'_>) -> RuntimeKv {
        let mut kv = RuntimeKv { tensor_bytes: 0, buffer_bytes: ctx.kv_buffer_bytes(), values: 0 };
        for info in ctx.layers().into_iter().flatten() {
            kv.tensor_bytes += info.bytes_k + info.bytes_v;
            kv.values += values_in(info.type_k, info.bytes_k) + values_in(info.type_v, info.bytes_v);
        }
        kv
    }

    /// Storage bits per cached value (tensor bytes; buffers add only alignment).
    pub fn bits_per_value(&self) -> f64 {
        if self.values == 0 {
            0.0
        } else {
            self.tensor_bytes as f64 * 8.0 / self.values as f64
        }
    }
}

/// Values stored in `bytes` of type `ty` (whole blocks).
fn values_in(ty: CacheType, bytes: u64) -> u64 {
    let (block, block_bytes) = ty.block();
    bytes / block_bytes * block
}

/// Tokens per step the sizes are read at: llama.cpp's default `-ub`, which kvtuner's chat, ab
/// speed runs and server use too (a sliding-window cache holds window + ubatch cells).
pub const RUNTIME_UBATCH: u32 = 512;

/// Cells each layer holds at context `n_ctx` with steps of `n_ubatch` tokens, read from a
/// context the runtime creates for it (`None` for layers without a cache). The context uses the
/// cheapest cache type (cells do not depend on the type).
pub fn runtime_cells(model: &Model, n_ctx: u32, n_ubatch: u32) -> Result<Vec<Option<u64>>, CreateContextError> {
    let params = ContextParams {
        n_ctx,
        n_batch: n_ubatch.min(n_ctx),
        n_ubatch: n_ubatch.min(n_ctx),
        no_kv_profile: true,
        ..Default::default()
    };
    let ctx = Context::new(model, &params)?;
    Ok(ctx.layers().into_iter().map(|i| i.map(|i| i.n_cells as u64)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_layers_cost_their_window() {
        let layout = KvLayout {
            layers: vec![
                Some(LayerShape { k_dim: 256, v_dim: 256, sliding: true }),
                Some(LayerShape { k_dim: 256, v_dim: 256, sliding: false }),
                None,
            ],
            window: 512,
        };
        let f16 = layout.uniform(CacheType::F16, CacheType::F16);
        // sliding: 512 cells, global: 4096 cells; 2 bytes per value, K and V
        assert_eq!(layout.bytes(&f16, 4096), (512 + 4096) * 256 * 2 * 2);
        assert_eq!(layout.bits_per_value(&f16, 4096), 16.0);
        let mixed = vec![(CacheType::Q8_0, CacheType::Q4_0); 3];
        assert!((layout.bits_per_value(&mixed, 4096) - 6.5).abs() < 1e-12);
    }

    #[test]
    fn mixed_layers_sum_their_row_bytes() {
        let layout =
            KvLayout { layers: vec![Some(LayerShape { k_dim: 256, v_dim: 256, sliding: false }); 3], window: 0 };
        let types =
            [(CacheType::F16, CacheType::F16), (CacheType::Q8_0, CacheType::Q4_0), (CacheType::Q8_0, CacheType::Q4_0)];
        // q8_0: 8 blocks of 34 bytes per 256-value row; q4_0: 8 blocks of 18 bytes
        let expected = ((512 + 512) + 2 * (272 + 144)) * 10;
        assert_eq!(layout.bytes(&types, 10), expected);
        let bpv = layout.bits_per_value(&types, 10);
        assert!((bpv - expected as f64 * 8.0 / (3 * 512 * 10) as f64).abs() < 1e-12);
    }
}
