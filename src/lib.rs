//! kvtuner: layer-wise mixed-precision KV cache for llama.cpp.
//!
//! Layers, top to bottom (each uses only those below it):
//! `serve` (OpenAI-compatible server), `pipeline` (tune), `select`, `placement`, `capacity`, `runtime`, `calibrate`, `search`, `eval`, `passkey`, `next_line`, `bench`, `profile`, `report` → `llama` (safe wrapper over the
//! patched runtime), `gguf` (read/write), `synth` (random-weight models), `assets` (real data).

pub mod assets;
pub mod bench;
pub mod cache_type;
pub mod calibrate;
pub mod capacity;
pub mod chat;
pub mod eval;
pub mod gguf;
pub mod key_treatment;
pub mod kv_layout;
pub mod llama;
pub mod next_line;
pub mod passkey;
pub mod pipeline;
pub mod placement;
pub mod profile;
pub mod report;
pub mod runtime;
pub mod search;
pub mod select;
pub mod sensitivity;
pub mod serve;
pub mod synth;

/// Writes `bytes` to `path` through a temp file in the same folder and a rename, so a reader
/// never sees a half-written file and a failure leaves the old file intact.
pub fn atomic_write(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
