//! The KV cache of a model as the runtime reports it: per-layer K/V row sizes and which layers
//! are sliding-window ([`KvLayout`]), what a context holds ([`RuntimeKv`]), and what a context
//! of any length and types would hold ([`Sizer`], sized by the runtime without allocating).

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

    pub fn uniform(&self, k: CacheType, v: CacheType) -> Vec<(CacheType, CacheType)> {
        vec![(k, v); self.layers.len()]
    }
}

/// What a context's KV cache holds, read back from the runtime: bytes per layer as allocated
/// and the values they store (cells × row length), so bits per value need no model of the
/// runtime's sizing rules (sliding-window caches hold window + ubatch cells, for example).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RuntimeKv {
    /// Σ K and V tensor bytes over the layers, recent windows included.
    pub tensor_bytes: u64,
    /// Of which the recent windows' (with their sinks): the same for every set of cache types.
    pub window_bytes: u64,
    /// Bytes of the backend buffers holding the cache (what `llama_kv_buffer_size` reports).
    pub buffer_bytes: u64,
    /// Cached values (K and V) at full occupancy.
    pub values: u64,
}

impl RuntimeKv {
    pub fn of(ctx: &Context<'_>) -> RuntimeKv {
        let mut kv = RuntimeKv { tensor_bytes: 0, window_bytes: 0, buffer_bytes: ctx.kv_buffer_bytes(), values: 0 };
        for info in ctx.layers().into_iter().flatten() {
            kv.tensor_bytes += info.bytes_k + info.bytes_v + info.bytes_window;
            kv.window_bytes += info.bytes_window;
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

/// Sizes of caches the runtime would allocate, read from contexts of a metadata-only copy of the
/// model (llama.cpp's `no_alloc`: the runtime sizes every tensor but allocates none), so any
/// context length and any per-layer types can be asked without the memory they describe.
pub struct Sizer {
    model: Model,
}

impl Sizer {
    pub fn new(path: &std::path::Path) -> Result<Sizer, crate::llama::LoadModelError> {
        let params = crate::llama::ModelParams { metadata_only: true, ..Default::default() };
        Ok(Sizer { model: Model::load(crate::llama::Backend::init(), path, &params)? })
    }

    /// The KV cache of a context of `n_ctx` tokens (steps of [`RUNTIME_UBATCH`]) with `types`.
    pub fn kv(&self, types: &[(CacheType, CacheType)], n_ctx: u32) -> Result<RuntimeKv, CreateContextError> {
        self.kv_sequences(types, n_ctx, 1)
    }

    /// [`Sizer::kv`] of a context shared by `n_seq` sequences (`n_ctx` in all; a server's slots).
    pub fn kv_sequences(
        &self,
        types: &[(CacheType, CacheType)],
        n_ctx: u32,
        n_seq: u32,
    ) -> Result<RuntimeKv, CreateContextError> {
        let params = ContextParams {
            flash_attn: crate::llama::FlashAttn::On,
            no_kv_profile: true,
            layer_types: Some(crate::llama::LayerCacheTypes::from_pairs(types.iter().copied())),
            ..Default::default()
        };
        self.kv_with(&params, n_ctx, n_seq)
    }

    /// The KV cache of a context with the cache types of `params` (uniform, per layer, or the
    /// model's embedded profile) and `n_seq` sequences sharing `n_ctx` tokens.
    pub fn kv_with(&self, params: &ContextParams, n_ctx: u32, n_seq: u32) -> Result<RuntimeKv, CreateContextError> {
        let params = ContextParams {
            n_ctx,
            n_seq_max: n_seq,
            n_batch: RUNTIME_UBATCH.min(n_ctx),
            n_ubatch: RUNTIME_UBATCH.min(n_ctx),
            ..params.clone()
        };
        Ok(RuntimeKv::of(&Context::new(&self.model, &params)?))
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

/// Each layer's info (`None` for layers without a cache) from a context the runtime creates at
/// `n_ctx` with steps of `n_ubatch` tokens, f16 caches and `window`.
fn runtime_layers(
    model: &Model,
    n_ctx: u32,
    n_ubatch: u32,
    window: Option<&crate::llama::RecentWindow>,
) -> Result<Vec<Option<crate::llama::KvLayerInfo>>, CreateContextError> {
    let params = ContextParams {
        n_ctx,
        n_batch: n_ubatch.min(n_ctx),
        n_ubatch: n_ubatch.min(n_ctx),
        no_kv_profile: true,
        window: window.cloned(),
        ..Default::default()
    };
    Ok(Context::new(model, &params)?.layers())
}

/// Cells each layer holds at context `n_ctx` with steps of `n_ubatch` tokens, read from a
/// context the runtime creates for it (`None` for layers without a cache). Cells do not depend
/// on the cache type.
pub fn runtime_cells(model: &Model, n_ctx: u32, n_ubatch: u32) -> Result<Vec<Option<u64>>, CreateContextError> {
    Ok(runtime_layers(model, n_ctx, n_ubatch, None)?.into_iter().map(|i| i.map(|i| i.n_cells as u64)).collect())
}

/// Per layer, the bytes `window` (on every layer it names) adds to it at `n_ctx`, read back from
/// the runtime; `None` for a layer without a cache.
pub fn runtime_window_bytes(
    model: &Model,
    n_ctx: u32,
    n_ubatch: u32,
    window: &crate::llama::RecentWindow,
) -> Result<Vec<Option<u64>>, CreateContextError> {
    Ok(runtime_layers(model, n_ctx, n_ubatch, Some(window))?.into_iter().map(|i| i.map(|i| i.bytes_window)).collect())
}
