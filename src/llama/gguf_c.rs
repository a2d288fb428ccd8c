//! llama.cpp's own GGUF reader (`gguf_init_from_file`), used to cross-check the files kvtuner
//! writes: what ggml sees is what every llama.cpp-based program sees.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::sys;

#[derive(Debug, thiserror::Error)]
pub enum GgufCError {
    #[error("path {0} is not valid UTF-8 or contains NUL")]
    BadPath(PathBuf),
    #[error("ggml's gguf_init_from_file rejected {0}")]
    Rejected(PathBuf),
}

/// One tensor as ggml reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufCTensor {
    pub name: String,
    pub ggml_type: u32,
    pub offset: u64,
    pub size: u64,
}

/// What ggml reads from a GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufCSummary {
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    /// Keys in file order.
    pub keys: Vec<String>,
    pub tensors: Vec<GgufCTensor>,
}

struct GgufContext(NonNull<sys::gguf_context>);

impl Drop for GgufContext {
    fn drop(&mut self) {
        // Safety: the pointer came from gguf_init_from_file and is freed once.
        unsafe { sys::gguf_free(self.0.as_ptr()) };
    }
}

fn c_string(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // Safety: ggml returns NUL-terminated strings owned by the context, alive during this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl GgufCSummary {
    pub fn read(path: &Path) -> Result<GgufCSummary, GgufCError> {
        let c = path.to_str().and_then(|s| CString::new(s).ok()).ok_or_else(|| GgufCError::BadPath(path.into()))?;
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        // Safety: valid C string; no_alloc reads only the header.
        let raw = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
        let ctx = GgufContext(NonNull::new(raw).ok_or_else(|| GgufCError::Rejected(path.into()))?);
        let p = ctx.0.as_ptr();
        // Safety (all calls below): `p` is a valid context; ids are within the counts it reports.
        unsafe {
            let keys = (0..sys::gguf_get_n_kv(p)).map(|i| c_string(sys::gguf_get_key(p, i))).collect();
            let tensors = (0..sys::gguf_get_n_tensors(p))
                .map(|i| GgufCTensor {
                    name: c_string(sys::gguf_get_tensor_name(p, i)),
                    ggml_type: sys::gguf_get_tensor_type(p, i),
                    offset: sys::gguf_get_tensor_offset(p, i) as u64,
                    size: sys::gguf_get_tensor_size(p, i) as u64,
                })
                .collect();
            Ok(GgufCSummary {
                version: sys::gguf_get_version(p),
                alignment: sys::gguf_get_alignment(p) as u64,
                data_offset: sys::gguf_get_data_offset(p) as u64,
                keys,
                tensors,
            })
        }
    }
}
