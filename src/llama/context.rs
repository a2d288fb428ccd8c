//! An inference context: KV cache, decode, logits, per-layer cache types, state files.

use std::ffi::CString;
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::NonNull;

use super::backend::take_recent_log;
use super::batch::Batch;
use super::model::{log_suffix, Model, Token};
use super::sys;
use crate::cache_type::CacheType;

/// When to use flash attention (`-fa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttn {
    /// Let llama.cpp decide (on when a quantized V cache needs it).
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for FlashAttn {
    type Err = String;

    /// `auto`, `on` or `off` (llama.cpp's `-fa` values; `1`/`0` too).
    fn from_str(s: &str) -> Result<FlashAttn, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(FlashAttn::Auto),
            "on" | "1" | "true" => Ok(FlashAttn::On),
            "off" | "0" | "false" => Ok(FlashAttn::Off),
            other => Err(format!("`{other}`: flash attention is auto, on or off")),
        }
    }
}

/// Per-layer K and V cache types (index = layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCacheTypes {
    pub k: Vec<CacheType>,
    pub v: Vec<CacheType>,
}

impl LayerCacheTypes {
    /// From `(K, V)` per layer.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (CacheType, CacheType)>) -> LayerCacheTypes {
        let (k, v) = pairs.into_iter().unzip();
        LayerCacheTypes { k, v }
    }
}

/// A recent window per layer (patch 0014): layer `il` keeps the last `layers[il]` positions of
/// each sequence also in `type_k`/`type_v` (f16 or q8_0) and attends to them there, to older
/// positions in its cache type. Every nonzero size must be the same; needs flash attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentWindow {
    /// Positions per layer (0: no window; index = layer, one entry per layer).
    pub layers: Vec<u32>,
    pub type_k: CacheType,
    pub type_v: CacheType,
    /// The first positions of each sequence every window layer also keeps (attention sinks,
    /// patch 0021); 0: none.
    pub sinks: u32,
}

impl RecentWindow {
    /// The same window of `size` positions in `ty` on every one of `n_layer` layers.
    pub fn uniform(n_layer: usize, size: u32, ty: CacheType) -> RecentWindow {
        RecentWindow { layers: vec![size; n_layer], type_k: ty, type_v: ty, sinks: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    /// Threads for generation and prompt processing; 0 = llama.cpp's default.
    pub n_threads: i32,
    pub flash_attn: FlashAttn,
    pub type_k: CacheType,
    pub type_v: CacheType,
    /// Per-layer types; `None` = `type_k`/`type_v` everywhere (or the model's embedded profile).
    pub layer_types: Option<LayerCacheTypes>,
    /// A recent window per layer in a wider type; `None` = none.
    pub window: Option<RecentWindow>,
    /// A constant subtracted from each layer's keys as they are cached (patch 0018): the layers'
    /// vectors of `n_embd_k_gqa` values one after another ([`crate::key_treatment`] measures them);
    /// the runtime checks the count. `None` = none.
    pub key_shift: Option<Vec<f32>>,
    /// Positive factors per key channel, laid out as `key_shift` (patch 0019): each layer's keys are
    /// divided by them and its queries multiplied, so scores are unchanged but channels of different
    /// sizes share a narrow type's range. `None` = none.
    pub key_scale: Option<Vec<f32>>,
    /// Ignore the profile embedded in the model's metadata.
    pub no_kv_profile: bool,
    /// Full-size sliding-window cache (llama.cpp's default); kvtuner defaults to the window.
    pub swa_full: bool,
    pub offload_kqv: bool,
    /// Sequences the context decodes side by side (a server's slots); `n_ctx` is shared among
    /// them: each gets `n_ctx / n_seq_max` cells in a stream of its own (not unified).
    pub n_seq_max: u32,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 4096,
            n_batch: 512,
            n_ubatch: 512,
            n_threads: 0,
            flash_attn: FlashAttn::Auto,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
            layer_types: None,
            window: None,
            key_shift: None,
            key_scale: None,
            no_kv_profile: false,
            swa_full: false,
            offload_kqv: true,
            n_seq_max: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateContextError {
    #[error("per-layer cache types: K has {k} entries and V has {v}, but the model has {layers} layers")]
    LayerCount { k: usize, v: usize, layers: u32 },
    #[error("the recent window has {got} per-layer entries, but the cache types have {want}")]
    WindowLayers { got: usize, want: usize },
    #[error("llama.cpp could not create a context for {model}{}", log_suffix(.log))]
    Failed { model: String, log: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the context is full: no KV cache slot for {n_tokens} more tokens (n_ctx = {n_ctx})")]
    NoSlot { n_tokens: usize, n_ctx: u32 },
    #[error("decoding was aborted")]
    Aborted,
    #[error("llama_decode failed with code {code}{}", log_suffix(.log))]
    Failed { code: i32, log: String },
    #[error("batch is empty")]
    Empty,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file path {0} is not valid UTF-8")]
    BadPath(String),
    #[error("could not save the KV state to {path}{}", log_suffix(.log))]
    Save { path: String, log: String },
    #[error("could not load the KV state from {path} (made with another model, context or cache types?){}", log_suffix(.log))]
    Load { path: String, log: String },
}

/// What one layer's KV cache holds, as the runtime created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KvLayerInfo {
    pub type_k: CacheType,
    pub type_v: CacheType,
    pub bytes_k: u64,
    pub bytes_v: u64,
    pub n_cells: u32,
    pub is_swa: bool,
    /// The layer's device has no native flash-attention kernel for its K/V pair: the attention
    /// runs on another device, or (CUDA) on a cache converted to f16 at every step. Patch 0007
    /// warns at context creation.
    pub attn_fallback: bool,
    /// ggml's name of the device holding the layer's K cache (`CPU`, `CUDA0`,
    /// `RPC0[host:port]`); empty when nothing is allocated (metadata-only models).
    pub device: DeviceName,
    /// Recent-window positions (0: none), its K and V types and the bytes of both.
    pub window: u32,
    /// The first positions the window also keeps (patch 0021).
    pub window_sinks: u32,
    pub type_k_window: Option<CacheType>,
    pub type_v_window: Option<CacheType>,
    pub bytes_window: u64,
    /// The layer caches its keys less a constant (patch 0018, [`ContextParams::key_shift`]).
    pub k_shifted: bool,
    /// The layer caches its keys divided per channel (patch 0019, [`ContextParams::key_scale`]).
    pub k_scaled: bool,
}

/// Memory on one buffer type ([`Context::memory`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BufferMemory {
    /// ggml's name of the buffer type (`CPU`, `CUDA0`, `CUDA_Host`, `RPC0[host:port]`).
    pub buffer_type: String,
    /// Name of its device (empty if none).
    pub device: String,
    pub is_host: bool,
    /// Weights.
    pub model: u64,
    /// KV cache and other per-context state.
    pub context: u64,
    /// Compute buffers.
    pub compute: u64,
}

impl BufferMemory {
    pub fn total(&self) -> u64 {
        self.model + self.context + self.compute
    }
}

/// A device name as llama.cpp reports it in a fixed buffer (keeps `KvLayerInfo` `Copy`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DeviceName([u8; 64]);

impl DeviceName {
    fn from_c(raw: &[std::ffi::c_char; 64]) -> DeviceName {
        let mut b = [0u8; 64];
        for (d, s) in b.iter_mut().zip(raw.iter()) {
            *d = *s as u8;
        }
        b[63] = 0;
        DeviceName(b)
    }

    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(self.0.len());
        std::str::from_utf8(&self.0[..end]).unwrap_or("?")
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl serde::Serialize for DeviceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Timings since the context was created or last reset.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Perf {
    pub prompt_ms: f64,
    pub prompt_tokens: i32,
    pub eval_ms: f64,
    pub eval_tokens: i32,
}

/// A context on a model it borrows.
#[derive(Debug)]
pub struct Context<'m> {
    raw: NonNull<sys::llama_context>,
    model: &'m Model,
    n_vocab: usize,
    _not_sync: PhantomData<*mut ()>,
}

// Safety: a llama_context may move between threads; it is not Sync (no &self method is thread-safe).
unsafe impl Send for Context<'_> {}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // Safety: `raw` came from llama_init_from_model and is freed exactly once.
        unsafe { sys::llama_free(self.raw.as_ptr()) };
    }
}

/// Physical cores (as llama.cpp's `cpu_get_num_math`): hyperthread siblings share a core's
/// arithmetic units, and a spinning thread pool that also occupies them waits at every barrier
/// on threads other work has descheduled. Falls back to the logical CPUs this process may use.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(4, |n| n.get());
    let mut cores = std::collections::BTreeSet::new();
    for cpu in 0..logical.max(1) * 4 {
        let topology = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let read = |f: &str| std::fs::read_to_string(format!("{topology}/{f}")).ok();
        if let (Some(package), Some(core)) = (read("physical_package_id"), read("core_id")) {
            cores.insert((package.trim().to_string(), core.trim().to_string()));
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, params: &ContextParams) -> Result<Context<'m>, CreateContextError> {
        match &params.layer_types {
            Some(layers) => {
                let n = model.n_layer();
                if layers.k.len() != n as usize || layers.v.len() != n as usize {
                    return Err(CreateContextError::LayerCount { k: layers.k.len(), v: layers.v.len(), layers: n });
                }
                let k: Vec<sys::ggml_type> = layers.k.iter().map(|t| t.ggml_id()).collect();
                let v: Vec<sys::ggml_type> = layers.v.iter().map(|t| t.ggml_id()).collect();
                Self::with_type_ids(model, params, Some((&k, &v)))
            }
            None => Self::with_type_ids(model, params, None),
        }
    }

    /// [`Context::new`] with per-layer ggml type ids as the C API takes them (any value, so tests
    /// can reach the runtime's own checks); `params.layer_types` is ignored.
    fn with_type_ids(
        model: &'m Model,
        params: &ContextParams,
        layer_ids: Option<(&[sys::ggml_type], &[sys::ggml_type])>,
    ) -> Result<Context<'m>, CreateContextError> {
        // Safety: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_ubatch.min(params.n_batch);
        // llama.cpp's default (4) oversubscribes small machines, and its spinning thread pool
        // then runs many times slower; default to the physical cores we have.
        let threads = if params.n_threads > 0 { params.n_threads } else { physical_cores() as i32 };
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.flash_attn_type = match params.flash_attn {
            FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        cp.type_k = params.type_k.ggml_id();
        cp.type_v = params.type_v.ggml_id();
        cp.no_kv_profile = params.no_kv_profile;
        cp.swa_full = params.swa_full;
        cp.offload_kqv = params.offload_kqv;
        cp.n_seq_max = params.n_seq_max.max(1);
        if cp.n_seq_max > 1 {
            // one stream per sequence: a sequence can never take another's cells
            cp.kv_unified = false;
        }
        cp.no_perf = false;
        if let Some((k, v)) = layer_ids {
            // The C API takes one length for both arrays.
            if k.len() != v.len() {
                return Err(CreateContextError::LayerCount { k: k.len(), v: v.len(), layers: model.n_layer() });
            }
            cp.type_k_layers = k.as_ptr();
            cp.type_v_layers = v.as_ptr();
            cp.n_type_layers = k.len() as u32;
        }
        if let Some(window) = &params.window {
            // one length for every per-layer array (the runtime checks it against the model)
            if layer_ids.is_some() && window.layers.len() != cp.n_type_layers as usize {
                return Err(CreateContextError::WindowLayers {
                    got: window.layers.len(),
                    want: cp.n_type_layers as usize,
                });
            }
            cp.kv_window_layers = window.layers.as_ptr();
            cp.n_type_layers = window.layers.len() as u32;
            cp.type_k_window = window.type_k.ggml_id();
            cp.type_v_window = window.type_v.ggml_id();
            cp.kv_window_sinks = window.sinks;
        }
        if let Some(shift) = &params.key_shift {
            cp.kv_k_shift = shift.as_ptr();
            cp.n_kv_k_shift = shift.len();
        }
        if let Some(scale) = &params.key_scale {
            cp.kv_k_scale = scale.as_ptr();
            cp.n_kv_k_scale = scale.len();
        }
        // the per-layer arrays' one length (the runtime checks it against the model)
        if (params.key_shift.is_some() || params.key_scale.is_some()) && cp.n_type_layers == 0 {
            cp.n_type_layers = model.n_layer();
        }

        take_recent_log();
        // Safety: the model outlives the context ('m); the per-layer arrays are borrowed for the
        // call (llama_init_from_model copies them).
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
        let raw = NonNull::new(raw).ok_or_else(|| CreateContextError::Failed {
            model: model.path().display().to_string(),
            log: take_recent_log(),
        })?;
        Ok(Context { raw, model, n_vocab: model.n_vocab(), _not_sync: PhantomData })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    pub fn n_ctx(&self) -> u32 {
        // Safety: pure query on a valid context.
        unsafe { sys::llama_n_ctx(self.raw.as_ptr()) }
    }

    /// Cells each sequence may use (`n_ctx / n_seq_max`).
    pub fn n_ctx_seq(&self) -> u32 {
        // Safety: pure query on a valid context.
        unsafe { sys::llama_n_ctx_seq(self.raw.as_ptr()) }
    }

    /// Sequences the context was created for.
    pub fn n_seq_max(&self) -> u32 {
        // Safety: pure query on a valid context.
        unsafe { sys::llama_n_seq_max(self.raw.as_ptr()) }
    }

    /// Runs the model on a batch; logits of the tokens marked for output become readable.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), DecodeError> {
        if batch.is_empty() {
            return Err(DecodeError::Empty);
        }
        take_recent_log();
        // Safety: the batch's arrays are valid for batch.len() entries; the context is valid.
        let code = unsafe { sys::llama_decode(self.raw.as_ptr(), batch.raw()) };
        match code {
            0 => Ok(()),
            1 => Err(DecodeError::NoSlot { n_tokens: batch.len(), n_ctx: self.n_ctx() }),
            2 => Err(DecodeError::Aborted),
            code => Err(DecodeError::Failed { code, log: take_recent_log() }),
        }
    }

    /// Waits until the backends finished the work of earlier decode calls (GPU decodes return
    /// before the GPU is done; timers must wait).
    pub fn synchronize(&mut self) {
        // Safety: valid context.
        unsafe { sys::llama_synchronize(self.raw.as_ptr()) };
    }

    /// Logits of batch token `i` of the last decode (it must have been marked for output;
    /// negative counts from the end of the outputs).
    pub fn logits(&self, i: i32) -> Option<&[f32]> {
        // Safety: returns NULL for an invalid index or a pointer to n_vocab floats owned by the
        // context, valid until the next decode (which needs &mut self, so not while borrowed).
        let p = unsafe { sys::llama_get_logits_ith(self.raw.as_ptr(), i) };
        if p.is_null() {
            return None;
        }
        // Safety: see above; n_vocab floats.
        Some(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    /// The most likely token after output `i` (greedy decoding), if its logits were asked for.
    pub fn greedy_token(&self, i: i32) -> Option<Token> {
        self.logits(i)?.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(t, _)| t as Token)
    }

    /// Decodes `tokens` into sequence 0 at positions `pos..`, in batches of `n_batch`, with logits
    /// for the last token only (a prompt before generating).
    pub fn decode_prompt(&mut self, tokens: &[Token], pos: i32, n_batch: usize) -> Result<(), DecodeError> {
        let mut batch = Batch::new(n_batch);
        for (i, part) in tokens.chunks(n_batch).enumerate() {
            let last = (i + 1) * n_batch >= tokens.len();
            batch.clear();
            batch
                .add_sequence(part, pos + (i * n_batch) as i32, 0, |j| last && j == part.len() - 1)
                .expect("a part fits its batch");
            self.decode(&batch)?;
        }
        Ok(())
    }

    /// Greedy continuation of sequence 0 after the last decode (whose last token kept its
    /// logits): up to `max` tokens from position `pos`, ending early at an end-of-generation token
    /// or once `stop` holds for the bytes so far. Returns the continuation's bytes.
    pub fn generate_greedy(
        &mut self,
        pos: i32,
        max: usize,
        stop: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, DecodeError> {
        let model = self.model;
        let mut out = Vec::new();
        let mut batch = Batch::new(1);
        for (n, p) in (pos..).take(max).enumerate() {
            let next = self.greedy_token(-1).expect("the last decoded token kept its logits");
            if model.is_eog(next) {
                break;
            }
            out.extend(model.token_piece_bytes(next, false));
            if stop(&out) || n + 1 == max {
                break;
            }
            batch.clear();
            batch.add(next, p, 0, true).expect("one token fits the batch");
            self.decode(&batch)?;
        }
        Ok(out)
    }

    /// What layer `il`'s KV cache really holds; `None` if the layer has no cache here.
    pub fn layer_info(&self, il: u32) -> Option<KvLayerInfo> {
        let mut info = sys::llama_kv_layer_info::default();
        // Safety: info is a valid out-pointer; the context is valid.
        let ok = unsafe { sys::llama_kv_layer_get_info(self.raw.as_ptr(), il as i32, &mut info) };
        if !ok {
            return None;
        }
        Some(KvLayerInfo {
            type_k: CacheType::from_ggml_id(info.type_k)?,
            type_v: CacheType::from_ggml_id(info.type_v)?,
            bytes_k: info.bytes_k as u64,
            bytes_v: info.bytes_v as u64,
            n_cells: info.n_cells,
            is_swa: info.is_swa,
            attn_fallback: info.attn_fallback,
            device: DeviceName::from_c(&info.device),
            window: info.window,
            window_sinks: info.window_sinks,
            type_k_window: (info.window > 0).then(|| CacheType::from_ggml_id(info.type_k_window)).flatten(),
            type_v_window: (info.window > 0).then(|| CacheType::from_ggml_id(info.type_v_window)).flatten(),
            bytes_window: info.bytes_window as u64,
            k_shifted: info.k_shifted,
            k_scaled: info.k_scaled,
        })
    }

    /// Layer `il`'s K (`v == false`) or V cache tensor as stored: per stream, one row per cell in
    /// the layer's cache type ([`CacheType::dequantize`] reads it); V is transposed when flash
    /// attention is off. `None` when the layer has no such cache. Waits for pending decodes.
    pub fn layer_cache_data(&mut self, il: u32, v: bool) -> Option<Vec<u8>> {
        // Safety: a NULL destination only asks for the size; the context is valid.
        let n = unsafe { sys::llama_kv_layer_get_data(self.raw.as_ptr(), il as i32, v, std::ptr::null_mut(), 0) };
        if n == 0 {
            return None;
        }
        let mut out = vec![0u8; n];
        // Safety: `out` has room for the n bytes the call writes.
        let written = unsafe {
            sys::llama_kv_layer_get_data(self.raw.as_ptr(), il as i32, v, out.as_mut_ptr().cast(), out.len())
        };
        (written == n).then_some(out)
    }

    /// `layer_info` for every layer of the model.
    pub fn layers(&self) -> Vec<Option<KvLayerInfo>> {
        (0..self.model.n_layer()).map(|il| self.layer_info(il)).collect()
    }

    /// Memory of this context and its model per buffer type (patch 0002): weights, KV cache and
    /// compute buffers, as the runtime allocates them (with a metadata-only model: would).
    pub fn memory(&self) -> Vec<BufferMemory> {
        // Safety: counting call (out = NULL); valid context.
        let n = unsafe { sys::llama_memory_entries(self.raw.as_ptr(), std::ptr::null_mut(), 0) }.max(0);
        // Safety: llama_memory_entry is plain data (char arrays, bool, integers); all-zero is valid.
        let mut raw: Vec<sys::llama_memory_entry> = vec![unsafe { std::mem::zeroed() }; n as usize];
        // Safety: `raw` holds n entries; the context is unchanged since the count.
        let written = unsafe { sys::llama_memory_entries(self.raw.as_ptr(), raw.as_mut_ptr(), n) }.clamp(0, n);
        raw.truncate(written as usize);
        raw.iter()
            .map(|e| BufferMemory {
                buffer_type: DeviceName::from_c(&e.buft).to_string(),
                device: DeviceName::from_c(&e.device).to_string(),
                is_host: e.is_host,
                model: e.model,
                context: e.context,
                compute: e.compute,
            })
            .collect()
    }

    /// Bytes of the backend buffers holding the KV cache.
    pub fn kv_buffer_bytes(&self) -> u64 {
        // Safety: pure query on a valid context.
        unsafe { sys::llama_kv_buffer_size(self.raw.as_ptr()) as u64 }
    }

    /// Forgets every cached token.
    pub fn clear(&mut self) {
        // Safety: valid context; memory may be NULL for models without a cache, which llama.cpp handles.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.raw.as_ptr()), true) };
    }

    /// Removes positions [p0, p1) of sequence `seq` (p1 < 0 = to the end).
    pub fn remove_range(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // Safety: valid context and memory.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.raw.as_ptr()), seq, p0, p1) }
    }

    /// Copies every cell of sequence `src` to sequence `dst`. With per-sequence streams (the
    /// default when `n_seq_max > 1`) the data is copied (at the next decode) and `dst` then
    /// owns cells of its own; within one stream the cells are shared.
    pub fn copy_sequence(&mut self, src: i32, dst: i32) {
        // llama.cpp aborts on an id it has no stream for
        assert!(
            (0..self.n_seq_max() as i32).contains(&src) && (0..self.n_seq_max() as i32).contains(&dst),
            "sequence ids {src}, {dst} must be below n_seq_max {}",
            self.n_seq_max()
        );
        // Safety: valid context and memory; both ids checked above.
        unsafe { sys::llama_memory_seq_cp(sys::llama_get_memory(self.raw.as_ptr()), src, dst, -1, -1) }
    }

    /// Shifts positions [p0, p1) of sequence `seq` by `delta`.
    pub fn shift_range(&mut self, seq: i32, p0: i32, p1: i32, delta: i32) {
        // Safety: valid context and memory.
        unsafe { sys::llama_memory_seq_add(sys::llama_get_memory(self.raw.as_ptr()), seq, p0, p1, delta) }
    }

    /// Largest position cached for `seq`, -1 when empty.
    pub fn max_position(&self, seq: i32) -> i32 {
        // Safety: valid context and memory.
        unsafe { sys::llama_memory_seq_pos_max(sys::llama_get_memory(self.raw.as_ptr()), seq) }
    }

    /// Smallest position cached for `seq`, -1 when empty. A sliding-window cache forgets old
    /// positions, so this says whether a cached prefix can still be continued.
    pub fn min_position(&self, seq: i32) -> i32 {
        // Safety: valid context and memory.
        unsafe { sys::llama_memory_seq_pos_min(sys::llama_get_memory(self.raw.as_ptr()), seq) }
    }

    /// Saves the KV state and the tokens it holds.
    pub fn save_state(&mut self, path: &Path, tokens: &[Token]) -> Result<(), StateError> {
        let c = path_cstring(path)?;
        take_recent_log();
        // Safety: path and tokens are valid for the call.
        let ok = unsafe { sys::llama_state_save_file(self.raw.as_ptr(), c.as_ptr(), tokens.as_ptr(), tokens.len()) };
        if ok {
            Ok(())
        } else {
            Err(StateError::Save { path: path.display().to_string(), log: take_recent_log() })
        }
    }

    /// Loads a state saved by [`Context::save_state`]; returns its tokens.
    pub fn load_state(&mut self, path: &Path) -> Result<Vec<Token>, StateError> {
        let c = path_cstring(path)?;
        let mut tokens = vec![0 as Token; self.n_ctx() as usize];
        let mut n: usize = 0;
        take_recent_log();
        // Safety: tokens has capacity n_ctx; n is a valid out-pointer.
        let ok = unsafe {
            sys::llama_state_load_file(self.raw.as_ptr(), c.as_ptr(), tokens.as_mut_ptr(), tokens.len(), &mut n)
        };
        if !ok {
            return Err(StateError::Load { path: path.display().to_string(), log: take_recent_log() });
        }
        tokens.truncate(n);
        Ok(tokens)
    }

    pub fn perf(&self) -> Perf {
        // Safety: pure query on a valid context.
        let p = unsafe { sys::llama_perf_context(self.raw.as_ptr()) };
        Perf { prompt_ms: p.t_p_eval_ms, prompt_tokens: p.n_p_eval, eval_ms: p.t_eval_ms, eval_tokens: p.n_eval }
    }

    pub fn reset_perf(&mut self) {
        // Safety: valid context.
        unsafe { sys::llama_perf_context_reset(self.raw.as_ptr()) };
    }

    pub(crate) fn as_ptr(&mut self) -> *mut sys::llama_context {
        self.raw.as_ptr()
    }
}

fn path_cstring(path: &Path) -> Result<CString, StateError> {
    path.to_str().and_then(|s| CString::new(s).ok()).ok_or_else(|| StateError::BadPath(path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::{Backend, ModelParams};
    use crate::synth::{write_model, SynthSpec};

    /// The runtime's own type check (patch 0001), which the typed Rust API cannot reach: a type
    /// the KV cache cannot store is refused with an error naming the layer, and the C side's
    /// length check catches a count that does not match the model.
    #[test]
    fn runtime_refuses_unsupported_types_and_wrong_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = SynthSpec { n_layer: 3, ..SynthSpec::tiny() };
        write_model(&spec, &path, &mut |_, _| {}).unwrap();
        let model = Model::load(Backend::init(), &path, &ModelParams::default()).unwrap();
        let params = ContextParams { n_ctx: 256, n_threads: 1, ..Default::default() };
        let f16 = CacheType::F16.ggml_id();
        let q2_k: sys::ggml_type = 10; // GGML_TYPE_Q2_K: a weight type, not a cache type

        let err = Context::with_type_ids(&model, &params, Some((&[f16, q2_k, f16], &[f16; 3]))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("layer 1: K cache type 10 (q2_K) is not supported"), "{msg}");

        let err = Context::with_type_ids(&model, &params, Some((&[f16; 3], &[f16, f16, 9999]))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("layer 2: V cache type 9999 (invalid) is not supported"), "{msg}");

        let err = Context::with_type_ids(&model, &params, Some((&[f16; 2], &[f16; 2]))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("have 2 entries, but the model has 3 layers"), "{msg}");

        // the same arrays with supported types work
        let ok = Context::with_type_ids(&model, &params, Some((&[f16; 3], &[f16; 3])));
        assert!(ok.is_ok());
    }
}
