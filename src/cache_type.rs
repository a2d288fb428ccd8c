//! KV cache element types kvtuner works with, named as llama.cpp names them (`-ctk q8_0`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A ggml type a KV cache layer can be stored in.
///
/// The discriminants are ggml's `enum ggml_type` values, so they cross the C boundary as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CacheType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Iq4Nl = 20,
    Bf16 = 30,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV cache type `{0}` (known: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl)")]
pub struct UnknownCacheType(pub String);

impl CacheType {
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q5_1,
        CacheType::Q5_0,
        CacheType::Q4_1,
        CacheType::Q4_0,
        CacheType::Iq4Nl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q5_1 => "q5_1",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Q4_0 => "q4_0",
            CacheType::Iq4Nl => "iq4_nl",
        }
    }

    /// ggml's `enum ggml_type` value.
    pub fn ggml_id(self) -> u32 {
        self as u32
    }

    pub fn from_ggml_id(id: u32) -> Option<CacheType> {
        CacheType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// Values per block and bytes per block, as in ggml's type traits.
    pub fn block(self) -> (u64, u64) {
        match self {
            CacheType::F32 => (1, 4),
            CacheType::F16 | CacheType::Bf16 => (1, 2),
            CacheType::Q8_0 => (32, 34),
            CacheType::Q5_1 => (32, 24),
            CacheType::Q5_0 => (32, 22),
            CacheType::Q4_1 => (32, 20),
            CacheType::Q4_0 | CacheType::Iq4Nl => (32, 18),
        }
    }

    /// Bytes of one row of `n` values (ggml_row_size).
    pub fn row_bytes(self, n: u64) -> u64 {
        let (blck, bytes) = self.block();
        n / blck * bytes
    }

    /// Storage bits per cached value, block scales included (q8_0 = 8.5, q4_0 = 4.5).
    pub fn bits_per_value(self) -> f64 {
        let (blck, bytes) = self.block();
        bytes as f64 * 8.0 / blck as f64
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, CacheType::F32 | CacheType::F16 | CacheType::Bf16)
    }
}

impl fmt::Display for CacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheType {
    type Err = UnknownCacheType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        CacheType::ALL.into_iter().find(|t| t.name() == lower).ok_or_else(|| UnknownCacheType(s.to_string()))
    }
}

impl TryFrom<String> for CacheType {
    type Error = UnknownCacheType;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CacheType> for String {
    fn from(t: CacheType) -> String {
        t.name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bits_match_ggml() {
        for t in CacheType::ALL {
            assert_eq!(t.name().parse::<CacheType>().unwrap(), t);
            assert_eq!(CacheType::from_ggml_id(t.ggml_id()), Some(t));
        }
        assert_eq!(CacheType::Q8_0.bits_per_value(), 8.5);
        assert_eq!(CacheType::Q4_0.bits_per_value(), 4.5);
        assert_eq!(CacheType::Q5_0.row_bytes(256), 176);
        assert!("q3_k".parse::<CacheType>().is_err());
    }
}
