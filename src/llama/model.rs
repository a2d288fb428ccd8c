//! A loaded model and its vocabulary.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::backend::{take_recent_log, Backend};
use super::rpc::RpcDevice;
use super::sys;

pub type Token = i32;

#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    #[error("model file {0} does not exist")]
    NotFound(PathBuf),
    #[error("model path {0} is not valid UTF-8 or contains NUL")]
    BadPath(PathBuf),
    #[error("llama.cpp could not load {path}{}", log_suffix(.log))]
    Failed { path: PathBuf, log: String },
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("text contains a NUL byte at {0}")]
    Nul(usize),
    #[error("text is too long to tokenize ({0} bytes)")]
    TooLong(usize),
    #[error("llama.cpp failed to tokenize the text")]
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template `{name}` is neither a file nor one llama.cpp knows (known: {known}, or `plain`)")]
    Unknown { name: String, known: String },
    #[error("reading the chat template {path}: {message}")]
    File { path: String, message: String },
    #[error("{origin} cannot be used: {message}")]
    Invalid { origin: String, message: String },
    #[error("rendering the chat template: {0}")]
    Render(String),
}

pub(crate) fn log_suffix(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(":\n{log}")
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// Layers to offload to the GPU (`-ngl`); -1 = all.
    pub n_gpu_layers: i32,
    pub use_mmap: bool,
    /// Metadata only (llama.cpp's `no_alloc`): no weights are read and contexts of this model
    /// allocate no buffers, but report the sizes they would allocate (`Context::layers`).
    pub metadata_only: bool,
    /// Devices of RPC servers (`rpc::add_server`) that take offloaded layers, after this
    /// machine's GPUs; empty: llama.cpp's default (every local device).
    pub rpc: Vec<RpcDevice>,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams { n_gpu_layers: 0, use_mmap: true, metadata_only: false, rpc: Vec::new() }
    }
}

/// This machine's GPUs (ggml's registry), in registry order.
fn local_gpus() -> Vec<sys::ggml_backend_dev_t> {
    // Safety: plain reads of ggml's device registry; i < the count.
    let n = unsafe { sys::ggml_backend_dev_count() };
    (0..n)
        .map(|i| unsafe { sys::ggml_backend_dev_get(i) })
        .filter(|&d| {
            // Safety: d came from the registry.
            let t = unsafe { sys::ggml_backend_dev_type(d) };
            !d.is_null() && (t == sys::GGML_BACKEND_DEVICE_TYPE_GPU || t == sys::GGML_BACKEND_DEVICE_TYPE_IGPU)
        })
        .collect()
}

/// A model loaded by llama.cpp. Contexts borrow it.
#[derive(Debug)]
pub struct Model {
    raw: NonNull<sys::llama_model>,
    path: PathBuf,
}

// Safety: llama.cpp's model is immutable after loading and documented as shareable across threads.
unsafe impl Send for Model {}
// Safety: see Send; all methods take &self and only read the model.
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // Safety: `raw` came from llama_model_load_from_file and is freed exactly once; contexts
        // borrowing it are gone (lifetime).
        unsafe { sys::llama_model_free(self.raw.as_ptr()) };
    }
}

/// A chat message for [`Model::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl Model {
    pub fn load(_backend: Backend, path: &Path, params: &ModelParams) -> Result<Model, LoadModelError> {
        if !path.is_file() {
            return Err(LoadModelError::NotFound(path.to_path_buf()));
        }
        let c_path = path
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| LoadModelError::BadPath(path.to_path_buf()))?;
        // Safety: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.n_gpu_layers;
        mp.no_alloc = params.metadata_only;
        // llama.cpp's memory-fit pass maps nothing: no_alloc goes with the plain load mode
        if !params.use_mmap || params.metadata_only {
            mp.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        }
        // the device list (NULL-terminated) must outlive the call
        let mut devices: Vec<sys::ggml_backend_dev_t> = Vec::new();
        if !params.rpc.is_empty() {
            devices = local_gpus();
            devices.extend(params.rpc.iter().map(|d| d.as_ptr()));
            devices.push(std::ptr::null_mut());
            mp.devices = devices.as_mut_ptr();
        }
        take_recent_log();
        // Safety: c_path is a valid C string for the call; params is a valid struct by value;
        // mp.devices is NULL or points into `devices`, alive until after the call.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        drop(devices);
        let raw = NonNull::new(raw)
            .ok_or_else(|| LoadModelError::Failed { path: path.to_path_buf(), log: take_recent_log() })?;
        Ok(Model { raw, path: path.to_path_buf() })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.raw.as_ptr()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // Safety: the model is valid; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.raw.as_ptr()) }
    }

    /// Layers a per-layer cache profile covers: the GGUF's `<arch>.block_count`, NextN/MTP
    /// layers included (the runtime's `n_layer_all`; patch 0001 takes arrays of this length). A
    /// NextN layer has no cache in a main context, which `Context::layer_info` reports.
    pub fn n_layer(&self) -> u32 {
        // Safety: pure queries on a valid model.
        unsafe {
            (sys::llama_model_n_layer(self.raw.as_ptr()) + sys::llama_model_n_layer_nextn(self.raw.as_ptr())) as u32
        }
    }

    /// NextN/MTP layers among [`Model::n_layer`] (the last ones).
    pub fn n_layer_nextn(&self) -> u32 {
        // Safety: pure query on a valid model.
        unsafe { sys::llama_model_n_layer_nextn(self.raw.as_ptr()) as u32 }
    }
    pub fn n_head(&self) -> u32 {
        // Safety: pure query on a valid model.
        unsafe { sys::llama_model_n_head(self.raw.as_ptr()) as u32 }
    }
    pub fn n_head_kv(&self) -> u32 {
        // Safety: pure query on a valid model.
        unsafe { sys::llama_model_n_head_kv(self.raw.as_ptr()) as u32 }
    }
    pub fn n_embd(&self) -> u32 {
        // Safety: pure query on a valid model.
        unsafe { sys::llama_model_n_embd(self.raw.as_ptr()) as u32 }
    }
    pub fn n_ctx_train(&self) -> u32 {
        // Safety: pure query on a valid model.
        unsafe { sys::llama_model_n_ctx_train(self.raw.as_ptr()) as u32 }
    }
    /// Sliding-window size, 0 when the model has no sliding-window layers.
    pub fn n_swa(&self) -> u32 {
        // Safety: pure query on a valid model.
        unsafe { sys::llama_model_n_swa(self.raw.as_ptr()) as u32 }
    }
    pub fn n_vocab(&self) -> usize {
        // Safety: pure query on a valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as usize }
    }
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // Safety: buf is writable for its length; llama.cpp NUL-terminates within it.
        let n = unsafe { sys::llama_model_desc(self.raw.as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// A scalar metadata value as llama.cpp renders it (arrays are not available here).
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 1024];
        // Safety: key is a valid C string; buf is writable for its length.
        let n = unsafe {
            sys::llama_model_meta_val_str(self.raw.as_ptr(), key.as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len())
        };
        if n < 0 {
            return None;
        }
        if n as usize >= buf.len() {
            buf.resize(n as usize + 1, 0);
            // Safety: as above, with a buffer large enough for the whole value.
            unsafe {
                sys::llama_model_meta_val_str(
                    self.raw.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
        }
        buf.truncate(n as usize);
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    pub fn token_bos(&self) -> Token {
        // Safety: pure query on a valid vocab.
        unsafe { sys::llama_vocab_bos(self.vocab()) }
    }
    /// Whether the tokenizer starts a text with BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        // Safety: pure query on a valid vocab.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    /// End of generation (EOS, EOT, …).
    pub fn is_eog(&self, token: Token) -> bool {
        // Safety: pure query on a valid vocab.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Tokenizes `text`; `add_special` adds BOS if the model wants it, `parse_special` lets
    /// control tokens in the text (e.g. `<start_of_turn>`) be recognised.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>, TokenizeError> {
        if let Some(pos) = text.bytes().position(|b| b == 0) {
            return Err(TokenizeError::Nul(pos));
        }
        let len: i32 = text.len().try_into().map_err(|_| TokenizeError::TooLong(text.len()))?;
        let mut tokens = vec![0 as Token; text.len() + 2];
        // Safety: text is valid for len bytes; tokens is writable for its length.
        let mut n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
                text.as_ptr() as *const c_char,
                len,
                tokens.as_mut_ptr(),
                tokens.len() as i32,
                add_special,
                parse_special,
            )
        };
        if n < 0 && n != i32::MIN {
            tokens.resize((-n) as usize, 0);
            // Safety: as above, with the buffer grown to the size llama.cpp asked for.
            n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    parse_special,
                )
            };
        }
        if n < 0 {
            return Err(TokenizeError::Failed);
        }
        tokens.truncate(n as usize);
        Ok(tokens)
    }

    /// The bytes a token stands for (may be part of a UTF-8 character).
    pub fn token_piece_bytes(&self, token: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // Safety: buf is writable for its length.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// The model's own chat template (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<String> {
        // Safety: returns NULL or a string owned by the model.
        let p = unsafe { sys::llama_model_chat_template(self.raw.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // Safety: non-NULL, NUL-terminated, lives as long as the model.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// Names of the chat templates llama.cpp has built in.
pub fn builtin_templates() -> Vec<String> {
    // Safety: with len 0 the call only counts.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let mut ptrs = vec![std::ptr::null::<c_char>(); n.max(0) as usize];
    // Safety: ptrs has room for n entries; llama.cpp fills static strings.
    unsafe { sys::llama_chat_builtin_templates(ptrs.as_mut_ptr(), ptrs.len()) };
    ptrs.into_iter()
        .filter(|p| !p.is_null())
        // Safety: non-NULL static NUL-terminated strings.
        .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect()
}
