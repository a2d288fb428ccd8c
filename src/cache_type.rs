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
    /// ggml's 2-bit weight type (64 values, levels {-1, 0, 1, 2} × the block's max): a baseline
    /// for the narrow cache types.
    Q2_0 = 42,
    /// kvtuner's 2-bit type for rotated caches (patch 0006): 64 values, 4 Gaussian levels, one scale.
    Kv2 = 64,
    /// kvtuner's 3-bit type for rotated caches (patch 0006): 64 values, 8 Gaussian levels, one scale.
    Kv3 = 65,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV cache type `{0}` (known: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, kv3, kv2, q2_0)")]
pub struct UnknownCacheType(pub String);

impl CacheType {
    pub const ALL: [CacheType; 12] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q5_1,
        CacheType::Q5_0,
        CacheType::Q4_1,
        CacheType::Q4_0,
        CacheType::Iq4Nl,
        CacheType::Kv3,
        CacheType::Kv2,
        CacheType::Q2_0,
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
            CacheType::Kv3 => "kv3",
            CacheType::Kv2 => "kv2",
            CacheType::Q2_0 => "q2_0",
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
            CacheType::Kv3 => (64, 26),
            CacheType::Kv2 | CacheType::Q2_0 => (64, 18),
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

    /// Values of `data`, whole blocks of this type as ggml stores them (its reference
    /// dequantization). Used to read back what a cache holds (`Context::layer_cache_data`).
    pub fn dequantize(self, data: &[u8]) -> Vec<f32> {
        let (blck, bytes) = self.block();
        let (blck, bytes) = (blck as usize, bytes as usize);
        assert!(data.len().is_multiple_of(bytes), "{} bytes are not whole {self} blocks", data.len());
        let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let mut out = Vec::with_capacity(data.len() / bytes * blck);
        for b in data.chunks_exact(bytes) {
            match self {
                CacheType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                CacheType::F16 => out.push(f16_at(b, 0)),
                CacheType::Bf16 => out.push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                CacheType::Q8_0 => {
                    let d = f16_at(b, 0);
                    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
                }
                CacheType::Q4_0 | CacheType::Iq4Nl | CacheType::Q4_1 => {
                    let d = f16_at(b, 0);
                    let (m, qs) = if self == CacheType::Q4_1 { (f16_at(b, 2), &b[4..20]) } else { (0.0, &b[2..18]) };
                    let value = |nib: u8| match self {
                        CacheType::Q4_0 => (nib as f32 - 8.0) * d,
                        CacheType::Q4_1 => nib as f32 * d + m,
                        _ => IQ4_NL_LEVELS[nib as usize] as f32 * d,
                    };
                    out.extend(qs.iter().map(|&q| value(q & 0x0f)));
                    out.extend(qs.iter().map(|&q| value(q >> 4)));
                }
                CacheType::Q2_0 => {
                    let d = f16_at(b, 0);
                    out.extend((0..64).map(|j| (((b[2 + j / 4] >> (2 * (j % 4))) & 3) as f32 - 1.0) * d));
                }
                CacheType::Kv2 | CacheType::Kv3 => {
                    let d = f16_at(b, 0);
                    let (levels, qs, qh): (&[i8], _, _) = if self == CacheType::Kv2 {
                        (&KV2_LEVELS, &b[2..18], None)
                    } else {
                        (&KV3_LEVELS, &b[2..18], Some(&b[18..26]))
                    };
                    out.extend((0..64).map(|j| {
                        let low = (qs[j % 16] >> (2 * (j / 16))) & 3;
                        let high = qh.map_or(0, |h: &[u8]| ((h[j % 8] >> (j / 8)) & 1) << 2);
                        levels[(low | high) as usize] as f32 * d
                    }));
                }
                CacheType::Q5_0 | CacheType::Q5_1 => {
                    let d = f16_at(b, 0);
                    let (m, rest) =
                        if self == CacheType::Q5_1 { (f16_at(b, 2), &b[4..]) } else { (-16.0 * d, &b[2..]) };
                    let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    let qs = &rest[4..20];
                    let value = |nib: u8, bit: u32| ((nib as u32 | (bit & 1) << 4) as f32) * d + m;
                    out.extend(qs.iter().enumerate().map(|(j, &q)| value(q & 0x0f, qh >> j)));
                    out.extend(qs.iter().enumerate().map(|(j, &q)| value(q >> 4, qh >> (j + 16))));
                }
            }
        }
        out
    }
}

/// kv2's and kv3's levels: the Lloyd-Max levels of a unit Gaussian times 84.08 / 58, rounded
/// (ggml's kvalues_kv2/kv3, patch 0006).
const KV2_LEVELS: [i8; 4] = [-127, -38, 38, 127];
const KV3_LEVELS: [i8; 8] = [-125, -78, -44, -14, 14, 44, 78, 125];

/// iq4_nl's non-uniform 4-bit levels (ggml's kvalues_iq4nl).
const IQ4_NL_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

impl fmt::Display for CacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheType {
    type Err = UnknownCacheType;

    /// ggml's type name, ASCII case-insensitive, nothing trimmed: the rule patch 0003 applies to
    /// the names in a model's embedded profile (`llama_kv_type_from_name`), so that kvtuner and
    /// the runtime accept and refuse the same names. Callers that split lists trim the items.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownCacheType(s.to_string()))
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
        assert_eq!("Q8_0".parse::<CacheType>().unwrap(), CacheType::Q8_0);
        assert!(" q8_0".parse::<CacheType>().is_err());
        assert!("q8_0\n".parse::<CacheType>().is_err());
    }

    /// `dequantize` reads what ggml's quantizer wrote: every type, values back within the
    /// type's step (a wrong block layout or nibble order is off by whole values).
    #[test]
    fn dequantize_reads_ggml_blocks() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 5) as f32)).collect();
        for t in CacheType::ALL {
            let mut buf = vec![0u8; t.row_bytes(256) as usize];
            // Safety: buf holds one row of 256 values of type t; no importance matrix.
            let written = unsafe {
                crate::llama::sys::ggml_quantize_chunk(
                    t.ggml_id(),
                    x.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    0,
                    1,
                    256,
                    std::ptr::null(),
                )
            };
            assert_eq!(written, buf.len(), "{t}");
            let y = t.dequantize(&buf);
            let tolerance = match t {
                CacheType::F32 => 0.0,
                CacheType::F16 | CacheType::Bf16 => 0.02,
                CacheType::Q8_0 => 0.025,
                CacheType::Q5_0 | CacheType::Q5_1 => 0.35,
                // 8 and 4 Gaussian levels scaled by the RMS: the largest values are clipped
                CacheType::Kv3 => 1.1,
                CacheType::Kv2 => 2.2,
                // levels at 0, ±max: everything between 0 and max/2 rounds to one of them
                CacheType::Q2_0 => 2.6,
                _ => 0.65,
            };
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() <= tolerance, "{t}[{i}]: {a} read back as {b}");
            }
        }
    }
}
