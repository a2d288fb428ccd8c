//! Importing KVTuner's published per-layer presets (bit widths per layer's K and V) as profiles
//! bound to a model: each width becomes the llama.cpp cache type of that size or the next larger.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{location_suffix, yaml_error_parts, LayerTypes, ModelIdentity, Profile, SCHEMA_VERSION};
use crate::cache_type::CacheType;

/// How one KVTuner bit width was translated to a llama.cpp cache type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitMapping {
    pub from_bits: u32,
    pub to_type: CacheType,
    /// True when llama.cpp has no type this small and a bigger one was used.
    pub raised: bool,
    /// Layers whose K used this width.
    pub k_layers: usize,
    /// Layers whose V used this width.
    pub v_layers: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read KVTuner preset {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}{}: {message}", path.display(), location_suffix(*line, *column))]
    Parse { path: PathBuf, line: Option<usize>, column: Option<usize>, message: String },
    #[error("{}: expected a map from layer index to {{nbits_key, nbits_value}}", path.display())]
    NotAMap { path: PathBuf },
    #[error("{}: the preset lists no layers", path.display())]
    Empty { path: PathBuf },
    #[error("{}: key `{key}` is not a layer index", path.display())]
    BadKey { path: PathBuf, key: String },
    #[error("{}: layer {layer} is listed twice", path.display())]
    DuplicateLayer { path: PathBuf, layer: usize },
    #[error("{}: layer {layer}: {reason}", path.display())]
    BadEntry { path: PathBuf, layer: usize, reason: String },
    #[error(
        "{}: layer {layer} {tensor}: {bits} bits has no llama.cpp cache type (supported: 16, 8, 6, 5, 4, 3, 2, 1)",
        path.display()
    )]
    UnsupportedBits { path: PathBuf, layer: usize, tensor: char, bits: i64 },
    #[error("{}: layer {missing} is missing (layers must be 0..{count} without gaps)", path.display())]
    MissingLayer { path: PathBuf, missing: usize, count: usize },
    #[error("{}: the preset has {preset} layers but the model has {model}", path.display())]
    LayerCount { path: PathBuf, preset: usize, model: usize },
}

/// KVTuner bit width → llama.cpp cache type, and whether that raised the precision.
fn map_bits(bits: i64) -> Option<(CacheType, bool)> {
    match bits {
        16 => Some((CacheType::F16, false)),
        8 => Some((CacheType::Q8_0, false)),
        // q5_0 stores 5.5 bits/value; llama.cpp has no 6-bit cache type.
        6 | 5 => Some((CacheType::Q5_0, false)),
        4 => Some((CacheType::Q4_0, false)),
        // kvtuner's narrow types for rotated caches (patch 0006)
        3 => Some((CacheType::Kv3, false)),
        2 => Some((CacheType::Kv2, false)),
        1 => Some((CacheType::Kv2, true)),
        _ => None,
    }
}

/// Imports a KVTuner calibration preset: a YAML or JSON map from layer index (integer or
/// string key) to `{nbits_key: N, nbits_value: M}`. Other keys inside a layer are ignored.
///
/// Without `model` the profile is bound to no weights (empty fingerprint, architecture
/// `unknown`); `check_model` will then report it until it is rebound.
pub fn import_kvtuner(
    path: impl AsRef<Path>,
    model: Option<&ModelIdentity>,
) -> Result<(Profile, Vec<BitMapping>), ImportError> {
    use serde_norway::Value;
    let path = path.as_ref();
    let p = || path.to_path_buf();
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read { path: p(), source })?;
    let value: Value = serde_norway::from_str(&text).map_err(|e| {
        let (line, column, message) = yaml_error_parts(&e);
        ImportError::Parse { path: p(), line, column, message }
    })?;
    let Value::Mapping(map) = value else {
        return Err(ImportError::NotAMap { path: p() });
    };
    let mut by_layer: BTreeMap<usize, (i64, i64)> = BTreeMap::new();
    for (key, entry) in &map {
        let layer = match key {
            Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
            Value::String(s) => s.trim().parse::<usize>().ok(),
            _ => None,
        }
        .ok_or_else(|| ImportError::BadKey { path: p(), key: value_text(key) })?;
        let bits = |field: &str| -> Result<i64, ImportError> {
            let bad = |reason: String| ImportError::BadEntry { path: p(), layer, reason };
            let v = entry.get(field).ok_or_else(|| bad(format!("`{field}` is missing")))?;
            match v {
                Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            }
            .ok_or_else(|| bad(format!("`{field}` is `{}`, not a bit count", value_text(v))))
        };
        if !entry.is_mapping() {
            return Err(ImportError::BadEntry {
                path: p(),
                layer,
                reason: format!("expected {{nbits_key, nbits_value}}, found `{}`", value_text(entry)),
            });
        }
        let pair = (bits("nbits_key")?, bits("nbits_value")?);
        if by_layer.insert(layer, pair).is_some() {
            return Err(ImportError::DuplicateLayer { path: p(), layer });
        }
    }
    if by_layer.is_empty() {
        return Err(ImportError::Empty { path: p() });
    }
    let count = by_layer.len();
    if let Some(missing) = (0..count).find(|i| !by_layer.contains_key(i)) {
        return Err(ImportError::MissingLayer {
            path: p(),
            missing,
            count: by_layer.keys().next_back().map_or(count, |m| m.saturating_add(1)),
        });
    }
    if let Some(m) = model {
        if m.layers != count {
            return Err(ImportError::LayerCount { path: p(), preset: count, model: m.layers });
        }
    }

    let mut mappings: BTreeMap<i64, BitMapping> = BTreeMap::new();
    let mut layers = Vec::with_capacity(count);
    for (&layer, &(kb, vb)) in &by_layer {
        let mut convert = |bits: i64, tensor: char| -> Result<CacheType, ImportError> {
            let (t, raised) =
                map_bits(bits).ok_or_else(|| ImportError::UnsupportedBits { path: p(), layer, tensor, bits })?;
            let m = mappings.entry(bits).or_insert(BitMapping {
                from_bits: bits as u32,
                to_type: t,
                raised,
                k_layers: 0,
                v_layers: 0,
            });
            if tensor == 'K' {
                m.k_layers += 1;
            } else {
                m.v_layers += 1;
            }
            Ok(t)
        };
        let k = convert(kb, 'K')?;
        let v = convert(vb, 'V')?;
        layers.push(LayerTypes { k, v });
    }

    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "kvtuner-import".into());
    let file = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let identity = model.cloned().unwrap_or(ModelIdentity {
        architecture: "unknown".into(),
        layers: count,
        fingerprint: String::new(),
        name: None,
    });
    let raised: Vec<String> = mappings.values().filter(|m| m.raised).map(|m| m.from_bits.to_string()).collect();
    let mut description = format!("Imported from KVTuner preset `{file}`.");
    if !raised.is_empty() {
        description.push_str(&format!(
            " {}-bit layers were raised to kv2, the narrowest cache type (2 bits plus a scale).",
            raised.join("/")
        ));
    }
    let profile = Profile {
        schema: SCHEMA_VERSION,
        name: stem,
        description: Some(description),
        model: identity,
        layers,
        window: None,
        keys: None,
        measured: None,
        calibration: None,
        tool_version: Some(env!("CARGO_PKG_VERSION").to_string()),
    };
    // Widest first, as a report reads naturally.
    Ok((profile, mappings.into_values().rev().collect()))
}

fn value_text(v: &serde_norway::Value) -> String {
    serde_norway::to_string(v).map(|s| s.trim().to_string()).unwrap_or_else(|_| format!("{v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_mapping_table() {
        assert_eq!(map_bits(16), Some((CacheType::F16, false)));
        assert_eq!(map_bits(8), Some((CacheType::Q8_0, false)));
        assert_eq!(map_bits(6), Some((CacheType::Q5_0, false)));
        assert_eq!(map_bits(5), Some((CacheType::Q5_0, false)));
        assert_eq!(map_bits(4), Some((CacheType::Q4_0, false)));
        assert_eq!(map_bits(3), Some((CacheType::Kv3, false)));
        assert_eq!(map_bits(2), Some((CacheType::Kv2, false)));
        assert_eq!(map_bits(1), Some((CacheType::Kv2, true)));
        for b in [0, 7, 9, 32, -4] {
            assert_eq!(map_bits(b), None);
        }
    }
}
