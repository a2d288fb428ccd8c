//! kvtuner: layer-wise mixed-precision KV cache for llama.cpp.
//!
//! Layers, top to bottom (each uses only those below it):
//! `calibrate`, `search`, `eval`, `bench`, `profile`, `report` → `llama` (safe wrapper over the
//! patched runtime), `gguf` (read/write), `synth` (random-weight models), `assets` (real data).

pub mod assets;
pub mod cache_type;
pub mod gguf;
pub mod kv_layout;
pub mod llama;
pub mod profile;
pub mod synth;
