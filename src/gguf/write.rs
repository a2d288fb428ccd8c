//! Writing new GGUF v3 files: metadata, tensor infos, then tensor data streamed in order.

use std::collections::HashSet;
use std::io::{self, Write};

use super::ggml_type::GgmlType;
use super::read::{align_up, TensorInfo};
use super::value::{encode_kv, encode_str, Value};
use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};

#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    #[error("metadata key `{0}` added twice")]
    DuplicateKey(String),
    #[error("metadata key is empty")]
    EmptyKey,
    #[error("tensor `{0}` added twice")]
    DuplicateTensor(String),
    #[error("alignment {0} is not a nonzero power of two")]
    BadAlignment(u32),
    #[error("set the alignment with GgufWriter::set_alignment, not as a metadata value")]
    AlignmentAsKv,
    #[error("tensor `{name}` of type {ggml_type} cannot have shape {dims:?}")]
    BadShape { name: String, ggml_type: GgmlType, dims: Vec<u64> },
    #[error("tensor `{name}` expects {expected} bytes of data, got {got}")]
    WrongSize { name: String, expected: u64, got: u64 },
    #[error("all {0} tensors have been written already")]
    TooManyTensors(usize),
    #[error("finished after {written} of {total} tensors")]
    MissingTensors { written: usize, total: usize },
    #[error("write failed: {0}")]
    Io(#[from] io::Error),
}

/// Builds a GGUF v3 file: add metadata and tensor infos, then [`GgufWriter::begin`] writes
/// the header and returns a [`TensorDataWriter`] that takes each tensor's bytes in order.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<TensorInfo>,
    names: HashSet<String>,
    alignment: u64,
    data_size: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            alignment: DEFAULT_ALIGNMENT,
            data_size: 0,
        }
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the alignment and writes it as `general.alignment` (u32). Call before adding
    /// tensors.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<(), GgufWriteError> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufWriteError::BadAlignment(alignment));
        }
        assert!(self.tensors.is_empty(), "set_alignment must come before add_tensor");
        self.alignment = u64::from(alignment);
        match self.metadata.iter_mut().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some(entry) => entry.1 = Value::U32(alignment),
            None => {
                self.keys.insert(ALIGNMENT_KEY.to_string());
                self.metadata.push((ALIGNMENT_KEY.to_string(), Value::U32(alignment)));
            }
        }
        Ok(())
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Adds a metadata entry; keys must be unique and nonempty.
    pub fn add_kv(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Result<&mut Self, GgufWriteError> {
        let key = key.into();
        if key.is_empty() {
            return Err(GgufWriteError::EmptyKey);
        }
        if key == ALIGNMENT_KEY {
            return Err(GgufWriteError::AlignmentAsKv);
        }
        if !self.keys.insert(key.clone()) {
            return Err(GgufWriteError::DuplicateKey(key));
        }
        self.metadata.push((key, value.into()));
        Ok(self)
    }

    /// Adds a tensor info; its data offset follows the previous tensor's, padded to the
    /// alignment.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
    ) -> Result<&TensorInfo, GgufWriteError> {
        let name = name.into();
        let bad = || GgufWriteError::BadShape { name: name.clone(), ggml_type, dims: dims.to_vec() };
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(bad());
        }
        let n_bytes = ggml_type.tensor_bytes(dims).ok_or_else(bad)?;
        let next = self.data_size.checked_add(n_bytes).and_then(|end| align_up(end, self.alignment)).ok_or_else(bad)?;
        if !self.names.insert(name.clone()) {
            return Err(GgufWriteError::DuplicateTensor(name));
        }
        self.tensors.push(TensorInfo { name, dims: dims.to_vec(), ggml_type, offset: self.data_size });
        self.data_size = next;
        Ok(self.tensors.last().expect("just pushed"))
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The header bytes, padded to the alignment: everything before the tensor data.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            encode_kv(k, v, &mut out);
        }
        for t in &self.tensors {
            encode_tensor_info(t, &mut out);
        }
        out.resize(align_up(out.len() as u64, self.alignment).expect("small") as usize, 0);
        out
    }

    /// Size of the whole file this writer produces.
    pub fn file_size(&self) -> u64 {
        self.header_bytes().len() as u64 + self.data_size
    }

    /// Writes the header to `w` and returns the writer for the tensor data.
    pub fn begin<W: Write>(&self, mut w: W) -> Result<TensorDataWriter<W>, GgufWriteError> {
        let header = self.header_bytes();
        w.write_all(&header)?;
        Ok(TensorDataWriter {
            w,
            tensors: self.tensors.clone(),
            alignment: self.alignment,
            next: 0,
            in_tensor: 0,
            written: header.len() as u64,
        })
    }

    /// Writes a whole file, asking `data` for each tensor's bytes in order.
    pub fn write_all<W: Write>(&self, w: W, mut data: impl FnMut(&TensorInfo) -> Vec<u8>) -> Result<W, GgufWriteError> {
        let mut dw = self.begin(w)?;
        for t in &self.tensors {
            dw.write_tensor(&data(t))?;
        }
        dw.finish()
    }
}

/// Appends one tensor info: name, n_dims, dims, type, offset.
pub fn encode_tensor_info(t: &TensorInfo, out: &mut Vec<u8>) {
    encode_str(&t.name, out);
    out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
    for d in &t.dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&t.ggml_type.0.to_le_bytes());
    out.extend_from_slice(&t.offset.to_le_bytes());
}

/// Takes tensor data in the order the tensors were added, padding after each.
pub struct TensorDataWriter<W: Write> {
    w: W,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    next: usize,
    /// Bytes of the current tensor written so far (by `write_tensor_part`).
    in_tensor: u64,
    written: u64,
}

impl<W: Write> TensorDataWriter<W> {
    /// The tensor whose data comes next.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.tensors.get(self.next)
    }

    /// Bytes written to the output so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Writes the whole data of the next tensor.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<(), GgufWriteError> {
        let t = self.next_tensor().ok_or(GgufWriteError::TooManyTensors(self.tensors.len()))?;
        if self.in_tensor != 0 || data.len() as u64 != t.n_bytes() {
            return Err(GgufWriteError::WrongSize {
                name: t.name.clone(),
                expected: t.n_bytes(),
                got: self.in_tensor + data.len() as u64,
            });
        }
        self.write_tensor_part(data)
    }

    /// Writes part of the next tensor's data; once its bytes are complete, pads and moves
    /// on to the following tensor. Parts must not cross tensor boundaries.
    pub fn write_tensor_part(&mut self, data: &[u8]) -> Result<(), GgufWriteError> {
        let t = self.next_tensor().ok_or(GgufWriteError::TooManyTensors(self.tensors.len()))?;
        let total = t.n_bytes();
        let after = self.in_tensor + data.len() as u64;
        if after > total {
            return Err(GgufWriteError::WrongSize { name: t.name.clone(), expected: total, got: after });
        }
        self.w.write_all(data)?;
        self.written += data.len() as u64;
        self.in_tensor = after;
        if after == total {
            let pad = align_up(self.written, self.alignment).expect("small") - self.written;
            self.w.write_all(&vec![0u8; pad as usize])?;
            self.written += pad;
            self.in_tensor = 0;
            self.next += 1;
        }
        Ok(())
    }

    /// Checks that every tensor was written, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W, GgufWriteError> {
        if self.next != self.tensors.len() {
            return Err(GgufWriteError::MissingTensors { written: self.next, total: self.tensors.len() });
        }
        self.w.flush()?;
        Ok(self.w)
    }
}
