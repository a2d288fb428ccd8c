//! Reading a GGUF header (metadata and tensor infos) without touching the tensor data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::ggml_type::GgmlType;
use super::value::{Value, ValueType};
use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};

/// Nesting depth of arrays of arrays this reader accepts (llama.cpp accepts none).
pub const MAX_ARRAY_DEPTH: usize = 16;

/// One metadata entry as read from the file. Its value is decoded from `raw` on first use, so
/// reading a header with a 262k-entry vocabulary allocates no per-token strings unless asked;
/// the entry is read-only so that `raw` stays the bytes that were checked.
#[derive(Debug, Clone)]
pub struct MetadataEntry {
    key: String,
    raw: Vec<u8>,
    value: OnceLock<Value>,
}

impl MetadataEntry {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The entry's exact bytes in the file: key length, key, type tag and payload.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The decoded value (checked when the header was read).
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| {
            let mut b = &self.raw[8 + self.key.len()..];
            let ty =
                ValueType::from_id(u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))).expect("checked when read");
            b = &b[4..];
            decode_value(ty, &mut b)
        })
    }
}

impl PartialEq for MetadataEntry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.raw == other.raw
    }
}

/// One tensor info: where a tensor's data lies relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ne0 (innermost) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the tensor's data (known to be computable for tensors read by [`read_header`]).
    pub fn n_bytes(&self) -> u64 {
        self.ggml_type.tensor_bytes(&self.dims).unwrap_or(0)
    }
}

/// A GGUF file's header: everything before the tensor data.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata entries in file order.
    pub metadata: Vec<MetadataEntry>,
    pub tensors: Vec<TensorInfo>,
    /// Byte range of the tensor-info section in the file.
    pub tensor_info_range: Range<u64>,
    pub alignment: u64,
    /// Absolute file offset where the tensor data section starts.
    pub data_offset: u64,
    pub file_len: u64,
    index: HashMap<String, usize>,
    fingerprint: String,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| self.metadata[i].value())
    }

    pub fn entry(&self, key: &str) -> Option<&MetadataEntry> {
        self.index.get(key).map(|&i| &self.metadata[i])
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// An integer value of any integer type, if non-negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// A value of any numeric type, as f64.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// An array of strings (`None` if absent or not a string array).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            Value::Array(ValueType::String, items) => items.iter().map(Value::as_str).collect(),
            _ => None,
        }
    }

    /// An array of 32-bit integers as u32 (`None` if absent, of another type, or holding a negative
    /// value): what llama.cpp reads as u32 or i32 arrays.
    pub fn get_u32_array(&self, key: &str) -> Option<Vec<u32>> {
        match self.get(key)? {
            Value::Array(ValueType::U32, items) => {
                items.iter().map(|v| if let Value::U32(x) = v { Some(*x) } else { None }).collect()
            }
            Value::Array(ValueType::I32, items) => {
                items.iter().map(|v| if let Value::I32(x) = v { u32::try_from(*x).ok() } else { None }).collect()
            }
            _ => None,
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// `<arch>.block_count`.
    pub fn block_count(&self) -> Option<u64> {
        self.get_u64(&format!("{}.block_count", self.architecture()?))
    }

    /// Hex SHA-256 of the raw tensor-info section: the model's identity, unaffected by
    /// metadata edits.
    pub fn tensor_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Metadata keys in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|e| e.key())
    }

    /// Bytes of the tensor data section (from `data_offset` to the end of the file).
    pub fn data_len(&self) -> u64 {
        self.file_len - self.data_offset
    }
}

/// Why a GGUF header could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufReadError {
    #[error("{path}: cannot read: {source}", path = .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a GGUF file (starts with {found:02x?}, expected \"GGUF\")", path = .path.display())]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)", path = .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error(
        "{path}: truncated header: {what} at offset {offset} needs {needed} bytes but the file \
         is {file_len} bytes long",
        path = .path.display()
    )]
    Truncated { path: PathBuf, what: String, offset: u64, needed: u64, file_len: u64 },
    #[error(
        "{path}: {what} at offset {offset} claims a string of {len} bytes, past the end of the \
         file ({file_len} bytes)",
        path = .path.display()
    )]
    StringPastEnd { path: PathBuf, what: String, offset: u64, len: u64, file_len: u64 },
    #[error("{path}: {what} at offset {offset} is not valid UTF-8", path = .path.display())]
    InvalidUtf8 { path: PathBuf, what: String, offset: u64 },
    #[error(
        "{path}: {what} at offset {offset} claims {count} elements, more than the remaining \
         {remaining} bytes of the file can hold",
        path = .path.display()
    )]
    CountTooLarge { path: PathBuf, what: String, offset: u64, count: u64, remaining: u64 },
    #[error("{path}: metadata key `{key}` appears twice", path = .path.display())]
    DuplicateKey { path: PathBuf, key: String },
    #[error("{path}: metadata entry {index} has an empty key", path = .path.display())]
    EmptyKey { path: PathBuf, index: u64 },
    #[error("{path}: metadata key `{key}` has unknown value type {type_id} at offset {offset}", path = .path.display())]
    UnknownValueType { path: PathBuf, key: String, type_id: u32, offset: u64 },
    #[error("{path}: metadata key `{key}` nests arrays deeper than {MAX_ARRAY_DEPTH}", path = .path.display())]
    ArrayTooDeep { path: PathBuf, key: String },
    #[error("{path}: `general.alignment` must be a u32, found {found}", path = .path.display())]
    AlignmentType { path: PathBuf, found: ValueType },
    #[error("{path}: alignment {alignment} is not a nonzero power of two", path = .path.display())]
    BadAlignment { path: PathBuf, alignment: u64 },
    #[error("{path}: tensor name `{name}` appears twice", path = .path.display())]
    DuplicateTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", path = .path.display())]
    BadDims { path: PathBuf, name: String, n_dims: u32 },
    #[error("{path}: tensor `{name}` has unknown ggml type {type_id}", path = .path.display())]
    UnknownTensorType { path: PathBuf, name: String, type_id: u32 },
    #[error(
        "{path}: tensor `{name}` of type {ggml_type} has shape {dims:?}, which is not a whole \
         number of blocks or overflows",
        path = .path.display()
    )]
    BadShape { path: PathBuf, name: String, ggml_type: GgmlType, dims: Vec<u64> },
    #[error(
        "{path}: tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment}",
        path = .path.display()
    )]
    MisalignedTensor { path: PathBuf, name: String, offset: u64, alignment: u64 },
    #[error(
        "{path}: tensor `{name}` data (file bytes {start}..{end}) extends past the end of the \
         file ({file_len} bytes)",
        path = .path.display()
    )]
    TensorPastEnd { path: PathBuf, name: String, start: u64, end: u128, file_len: u64 },
}

/// The header bytes read so far, grown on demand: parsing works on slices of one buffer (no
/// per-value reads or allocations), and only the header is ever read.
struct Src<'p> {
    file: File,
    path: &'p Path,
    buf: Vec<u8>,
    /// Position in the file (= index into `buf`, which starts at byte 0).
    pos: u64,
    len: u64,
}

/// First read: enough for most headers; larger ones (a 262k-token vocabulary) grow by doubling.
const FIRST_READ: u64 = 1 << 20;

impl Src<'_> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn io(&self, source: io::Error) -> GgufReadError {
        GgufReadError::Io { path: self.path.to_path_buf(), source }
    }

    fn truncated(&self, what: &dyn Fn() -> String, needed: u64) -> GgufReadError {
        GgufReadError::Truncated {
            path: self.path.to_path_buf(),
            what: what(),
            offset: self.pos,
            needed,
            file_len: self.len,
        }
    }

    /// Consumes `n` bytes and returns their range in `buf`.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Range<usize>, GgufReadError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let end = self.pos + n;
        if end > self.buf.len() as u64 {
            let want = end.max(2 * self.buf.len() as u64).max(FIRST_READ).min(self.len);
            let have = self.buf.len();
            self.buf.resize(want as usize, 0);
            if let Err(e) = self.file.read_exact(&mut self.buf[have..]) {
                self.buf.truncate(have);
                // The file shrank under us; report it as truncation.
                return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                    self.truncated(what, n)
                } else {
                    self.io(e)
                });
            }
        }
        let range = self.pos as usize..end as usize;
        self.pos = end;
        Ok(range)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufReadError> {
        let r = self.take(N as u64, what)?;
        Ok(self.buf[r].try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufReadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufReadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks a length-prefixed UTF-8 string and returns the range of its bytes.
    fn str_range(&mut self, what: &dyn Fn() -> String) -> Result<Range<usize>, GgufReadError> {
        let offset = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufReadError::StringPastEnd {
                path: self.path.to_path_buf(),
                what: what(),
                offset,
                len,
                file_len: self.len,
            });
        }
        let r = self.take(len, what)?;
        if std::str::from_utf8(&self.buf[r.clone()]).is_err() {
            return Err(GgufReadError::InvalidUtf8 { path: self.path.to_path_buf(), what: what(), offset });
        }
        Ok(r)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufReadError> {
        let r = self.str_range(what)?;
        Ok(std::str::from_utf8(&self.buf[r]).expect("checked by str_range").to_owned())
    }

    /// Checks that `count` items of at least `min_size` bytes each fit in the rest of the file.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        offset: u64,
        what: &dyn Fn() -> String,
    ) -> Result<(), GgufReadError> {
        if count.checked_mul(min_size).is_none_or(|n| n > self.remaining()) {
            return Err(GgufReadError::CountTooLarge {
                path: self.path.to_path_buf(),
                what: what(),
                offset,
                count,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    /// Checks one value of type `ty` (lengths, counts, UTF-8, nesting) and skips over it.
    /// Nothing is decoded: [`decode_value`] does that later from the entry's raw bytes.
    fn check_value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<(), GgufReadError> {
        let what = || format!("value of key `{key}`");
        match ty {
            ValueType::String => {
                self.str_range(&what)?;
            }
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufReadError::ArrayTooDeep { path: self.path.to_path_buf(), key: key.to_string() });
                }
                let elem = self.value_type(key)?;
                let offset = self.pos;
                let what_arr = || format!("array of key `{key}`");
                let count = self.u64(&what_arr)?;
                self.check_count(count, elem.min_encoded_size(), offset, &what_arr)?;
                match elem.fixed_size() {
                    Some(size) => {
                        self.take(count * size, &what)?;
                    }
                    None => {
                        for _ in 0..count {
                            self.check_value(elem, key, depth + 1)?;
                        }
                    }
                }
            }
            fixed => {
                self.take(fixed.fixed_size().expect("scalar types have a size"), &what)?;
            }
        }
        Ok(())
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufReadError> {
        let offset = self.pos;
        let id = self.u32(&|| format!("value type of key `{key}`"))?;
        ValueType::from_id(id).ok_or_else(|| GgufReadError::UnknownValueType {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            type_id: id,
            offset,
        })
    }
}

/// Decodes a value that [`Src::check_value`] has already checked, advancing `b` past it.
fn decode_value(ty: ValueType, b: &mut &[u8]) -> Value {
    fn split<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, tail) = b.split_at(n);
        *b = tail;
        head
    }
    let u64_at = |b: &mut &[u8]| u64::from_le_bytes(split(b, 8).try_into().expect("8 bytes"));
    match ty {
        ValueType::String => {
            let len = u64_at(b) as usize;
            Value::String(String::from_utf8(split(b, len).to_vec()).expect("checked when read"))
        }
        ValueType::Array => {
            let elem = ValueType::from_id(u32::from_le_bytes(split(b, 4).try_into().expect("4 bytes")))
                .expect("checked when read");
            let count = u64_at(b) as usize;
            let items = match elem.fixed_size() {
                Some(size) => {
                    split(b, count * size as usize).chunks_exact(size as usize).map(|c| decode_fixed(elem, c)).collect()
                }
                None => (0..count).map(|_| decode_value(elem, b)).collect(),
            };
            Value::Array(elem, items)
        }
        fixed => decode_fixed(fixed, split(b, fixed.fixed_size().expect("scalar") as usize)),
    }
}

/// Decodes one little-endian fixed-size value (`b.len()` is the type's size).
fn decode_fixed(ty: ValueType, b: &[u8]) -> Value {
    let a = |n: usize| -> [u8; 8] {
        let mut x = [0u8; 8];
        x[..n].copy_from_slice(&b[..n]);
        x
    };
    match ty {
        ValueType::U8 => Value::U8(b[0]),
        ValueType::I8 => Value::I8(b[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes([b[0], b[1]])),
        ValueType::I16 => Value::I16(i16::from_le_bytes([b[0], b[1]])),
        ValueType::U32 => Value::U32(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::I32 => Value::I32(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::F32 => Value::F32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::Bool => Value::Bool(b[0] != 0),
        ValueType::U64 => Value::U64(u64::from_le_bytes(a(8))),
        ValueType::I64 => Value::I64(i64::from_le_bytes(a(8))),
        ValueType::F64 => Value::F64(f64::from_le_bytes(a(8))),
        ValueType::String | ValueType::Array => unreachable!("not fixed-size"),
    }
}

/// Rounds `n` up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(n: u64, align: u64) -> Option<u64> {
    n.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Reads a GGUF file's metadata and tensor infos. Memory use depends on the header only; all
/// counts and lengths are checked against the file length before anything is allocated.
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufReadError> {
    let io_err = |source| GgufReadError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut src = Src { file, path, buf: Vec::new(), pos: 0, len };

    // Magic: read what is there so a short non-GGUF file reports bad magic, not truncation.
    let magic = src.take(len.min(4), &|| "magic".into())?;
    if src.buf[magic.clone()] != GGUF_MAGIC[..] {
        return Err(GgufReadError::BadMagic { path: path.to_path_buf(), found: src.buf[magic].to_vec() });
    }

    let version = src.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufReadError::UnsupportedVersion { path: path.to_path_buf(), version });
    }
    let n_tensors_at = src.pos;
    let n_tensors = src.u64(&|| "tensor count".into())?;
    let n_kv_at = src.pos;
    let n_kv = src.u64(&|| "metadata count".into())?;
    // Each entry takes at least a key length, one key byte, a type tag and a 1-byte value:
    // a count beyond the whole file is bogus; a smaller one past the end reads as truncation.
    const MIN_KV: u64 = 8 + 1 + 4 + 1;
    src.check_count(n_kv, 1, n_kv_at, &|| "metadata count".into())?;
    let cap = n_kv.min(src.remaining() / MIN_KV) as usize;
    let mut metadata = Vec::with_capacity(cap);
    let mut index = HashMap::with_capacity(cap);
    for i in 0..n_kv {
        let entry_start = src.pos as usize;
        let key = src.string(&|| format!("key of metadata entry {i}"))?;
        if key.is_empty() {
            return Err(GgufReadError::EmptyKey { path: path.to_path_buf(), index: i });
        }
        if index.contains_key(&key) {
            return Err(GgufReadError::DuplicateKey { path: path.to_path_buf(), key });
        }
        let ty = src.value_type(&key)?;
        src.check_value(ty, &key, 0)?;
        let raw = src.buf[entry_start..src.pos as usize].to_vec();
        index.insert(key.clone(), metadata.len());
        metadata.push(MetadataEntry { key, raw, value: OnceLock::new() });
    }

    let alignment = match index.get(ALIGNMENT_KEY).map(|&i| metadata[i].value()) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) => u64::from(*a),
        Some(v) => return Err(GgufReadError::AlignmentType { path: path.to_path_buf(), found: v.value_type() }),
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufReadError::BadAlignment { path: path.to_path_buf(), alignment });
    }

    // Tensor infos: name (>= 8 bytes), n_dims (4), >= 1 dim (8), type (4), offset (8).
    const MIN_INFO: u64 = 8 + 4 + 8 + 4 + 8;
    if n_tensors > src.remaining() {
        return Err(GgufReadError::CountTooLarge {
            path: path.to_path_buf(),
            what: "tensor count".into(),
            offset: n_tensors_at,
            count: n_tensors,
            remaining: src.remaining(),
        });
    }
    let cap = n_tensors.min(src.remaining() / MIN_INFO) as usize;
    let info_start = src.pos;
    let mut tensors = Vec::with_capacity(cap);
    let mut names = HashMap::with_capacity(cap);
    for i in 0..n_tensors {
        let name = src.string(&|| format!("name of tensor {i}"))?;
        let what = || format!("info of tensor `{name}`");
        let n_dims = src.u32(&what)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufReadError::BadDims { path: path.to_path_buf(), name, n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(src.u64(&what)?);
        }
        let ggml_type = GgmlType(src.u32(&what)?);
        let offset = src.u64(&what)?;
        if names.insert(name.clone(), i).is_some() {
            return Err(GgufReadError::DuplicateTensor { path: path.to_path_buf(), name });
        }
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }
    let info_end = src.pos;
    let fingerprint = hex(&Sha256::digest(&src.buf[info_start as usize..info_end as usize]));

    let aligned = align_up(info_end, alignment).unwrap_or(u64::MAX);
    let data_offset = if n_tensors == 0 && len <= info_end { info_end } else { aligned.min(len) };
    for t in &tensors {
        let bad_shape = || GgufReadError::BadShape {
            path: path.to_path_buf(),
            name: t.name.clone(),
            ggml_type: t.ggml_type,
            dims: t.dims.clone(),
        };
        if t.ggml_type.block().is_none() {
            return Err(GgufReadError::UnknownTensorType {
                path: path.to_path_buf(),
                name: t.name.clone(),
                type_id: t.ggml_type.0,
            });
        }
        let n_bytes = t.ggml_type.tensor_bytes(&t.dims).ok_or_else(bad_shape)?;
        if t.offset % alignment != 0 {
            return Err(GgufReadError::MisalignedTensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = u128::from(aligned) + u128::from(t.offset);
        let end = start + u128::from(n_bytes);
        if end > u128::from(len) {
            return Err(GgufReadError::TensorPastEnd {
                path: path.to_path_buf(),
                name: t.name.clone(),
                start: start.min(u128::from(u64::MAX)) as u64,
                end,
                file_len: len,
            });
        }
    }

    Ok(GgufHeader {
        path: path.to_path_buf(),
        version,
        metadata,
        tensors,
        tensor_info_range: info_start..info_end,
        alignment,
        data_offset,
        file_len: len,
        index,
        fingerprint,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
