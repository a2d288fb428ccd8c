//! GGUF (v2 and v3, little-endian) header reader, metadata rewriter and file writer.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64, metadata entries
//! (key string, value type u32, value), tensor infos (name string, n_dims u32, dims u64 each
//! with ne0 first, ggml type u32, data offset u64 relative to the data section), padding to
//! `general.alignment` (default 32), then the tensor data. Strings are a u64 byte length
//! followed by UTF-8 bytes without a terminator.

mod ggml_type;
mod read;
mod rewrite;
mod value;
mod write;

pub use ggml_type::GgmlType;
pub use read::{read_header, GgufHeader, GgufReadError, MetadataEntry, TensorInfo, MAX_ARRAY_DEPTH};
pub use rewrite::{
    rewrite, rewrite_header, rewrite_with, MetadataEdits, RewriteError, RewriteOptions, RewriteStats, COPY_GRANULE,
};
pub use value::{encode_kv, encode_str, MixedArray, Value, ValueType};
pub use write::{encode_tensor_info, GgufWriteError, GgufWriter, TensorDataWriter};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key holding the alignment (a u32).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;

#[cfg(test)]
mod tests;
