//! ggml tensor types as they appear in GGUF tensor infos, with their block layouts.

use std::fmt;

use crate::cache_type::CacheType;

/// A ggml tensor type id (`enum ggml_type`). Any `u32` can be held; [`GgmlType::block`]
/// says whether it is one this crate knows the size of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

/// (id, name, values per block, bytes per block), from ggml's type traits.
const TABLE: &[(u32, &str, u64, u64)] = &[
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
    // kvtuner's KV cache types (patch 0006), ids far above upstream's
    (64, "kv2", 64, 18),
    (65, "kv3", 64, 26),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        TABLE.iter().find(|e| e.0 == self.0)
    }

    /// Values per block and bytes per block, or `None` for an unknown type id.
    pub fn block(self) -> Option<(u64, u64)> {
        if let Some(ct) = CacheType::from_ggml_id(self.0) {
            return Some(ct.block());
        }
        self.entry().map(|e| (e.2, e.3))
    }

    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|e| e.1)
    }

    /// Bytes taken by a tensor of this type with these dims (ne0 first), or `None` when the
    /// type is unknown, ne0 is not a whole number of blocks, or the size overflows.
    pub fn tensor_bytes(self, dims: &[u64]) -> Option<u64> {
        let (blck, bytes) = self.block()?;
        let ne0 = dims.first().copied().unwrap_or(1);
        if ne0 % blck != 0 {
            return None;
        }
        let mut total = (ne0 / blck).checked_mul(bytes)?;
        for &d in dims.iter().skip(1) {
            total = total.checked_mul(d)?;
        }
        Some(total)
    }
}

impl From<CacheType> for GgmlType {
    fn from(t: CacheType) -> Self {
        GgmlType(t.ggml_id())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "ggml type {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_agrees_with_cache_types() {
        for ct in CacheType::ALL {
            let e = GgmlType::from(ct).entry().expect("cache type in table");
            assert_eq!((e.2, e.3), ct.block(), "{ct}");
            assert_eq!(e.1, ct.name());
        }
        assert_eq!(GgmlType(14).tensor_bytes(&[4096, 2]), Some(16 * 210 * 2));
        assert_eq!(GgmlType::Q8_0.tensor_bytes(&[33]), None);
        assert_eq!(GgmlType(4).block(), None);
        assert_eq!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]), None);
    }
}
