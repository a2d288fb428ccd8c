//! GGUF metadata: where a profile lives inside a model file (read by patches 0003, 0017 and 0020
//! at run time), and what kvtuner reads back of one (the runtime's verdict on it).

use serde::Serialize;

use super::{ModelIdentity, Profile, ProfileWindow, SCHEMA_VERSION};
use crate::cache_type::CacheType;

/// Prefix of every key kvtuner writes (the GGUF spec asks tools to use their own namespace).
pub const META_PREFIX: &str = "kvtuner.";
/// Key prefixes that belong to a profile; `strip` removes these (and [`META_PROFILE_KEYS`]),
/// leaving other kvtuner keys (e.g. `kvtuner.synth.seed` of synthetic models) alone.
pub const META_PROFILE_PREFIXES: [&str; 2] = ["kvtuner.cache.", "kvtuner.profile."];
pub const META_PROFILE_KEYS: [&str; 2] = [META_SCHEMA, META_TOOL];
/// Per-layer K cache types: array of type-name strings, length = block count.
pub const META_TYPE_K: &str = "kvtuner.cache.type_k";
/// Per-layer V cache types: array of type-name strings, length = block count.
pub const META_TYPE_V: &str = "kvtuner.cache.type_v";
/// u32: version of this key layout.
pub const META_SCHEMA: &str = "kvtuner.schema_version";
/// string: profile name (shown in the runtime's log).
pub const META_NAME: &str = "kvtuner.profile.name";
/// f32: measured average bits per cached value.
pub const META_BITS: &str = "kvtuner.profile.bits_per_value";
/// u32 array, one entry per layer: recent-window positions (0: none), patch 0014.
pub const META_WINDOW: &str = "kvtuner.cache.window";
/// Strings: the recent window's K and V types (f16 or q8_0).
pub const META_WINDOW_K: &str = "kvtuner.cache.window_type_k";
pub const META_WINDOW_V: &str = "kvtuner.cache.window_type_v";
/// u32: the first positions the window also keeps (attention sinks, patch 0021); absent: none.
pub const META_WINDOW_SINKS: &str = "kvtuner.cache.window_sinks";
/// f32 arrays laid out as the runtime's kv_k_shift (each layer's n_embd_k_gqa values in turn):
/// the key shift and scale (patches 0018/0019, applied from the GGUF by patch 0020).
pub const META_KEY_SHIFT: &str = "kvtuner.cache.key_shift";
pub const META_KEY_SCALE: &str = "kvtuner.cache.key_scale";
/// string: what the key shift and scale were measured on.
pub const META_KEY_TEXT: &str = "kvtuner.profile.key_text";
/// u64: measured KV bytes at `kvtuner.profile.context`.
pub const META_KV_BYTES: &str = "kvtuner.profile.kv_bytes";
/// u32: context the numbers were measured at.
pub const META_CONTEXT: &str = "kvtuner.profile.context";
/// f32: measured mean KLD against an f16 cache.
pub const META_KLD: &str = "kvtuner.profile.kld_mean";
/// string: the text the KLD was measured on.
pub const META_KLD_TEXT: &str = "kvtuner.profile.kld_eval_text";
/// string: kvtuner version that wrote the keys.
pub const META_TOOL: &str = "kvtuner.tool_version";
/// Where the profile was measured (devices, `-ngl`, flash attention).
pub const META_MEASURED_ON: &str = "kvtuner.profile.measured_on";
/// u8 array of zeros, written last: keeps the tensor data at the input's offset modulo 64 KiB
/// so annotating copies whole page-cache folios (see `gguf::COPY_GRANULE`). Carries no
/// information.
pub const META_PADDING: &str = "kvtuner.profile.padding";

/// A model file's GGUF header could not identify the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the model has no general.architecture key")]
    NoArchitecture,
    #[error("the model has no {0}.block_count key")]
    NoBlockCount(String),
}

impl ModelIdentity {
    /// The identity a profile is checked against: architecture, layer count, tensor-layout fingerprint.
    pub fn from_header(header: &crate::gguf::GgufHeader) -> Result<ModelIdentity, IdentityError> {
        let architecture = header.architecture().ok_or(IdentityError::NoArchitecture)?.to_string();
        let layers = header.block_count().ok_or_else(|| IdentityError::NoBlockCount(architecture.clone()))? as usize;
        Ok(ModelIdentity {
            architecture,
            layers,
            fingerprint: header.tensor_fingerprint().to_string(),
            name: header.get_str("general.name").map(str::to_string),
        })
    }
}

/// Edits that remove every profile key (what `strip` does, and what `annotate` does first so a
/// new profile never inherits stale numbers from an old one).
pub fn remove_profile_edits() -> crate::gguf::MetadataEdits {
    let mut e = crate::gguf::MetadataEdits::new();
    for p in META_PROFILE_PREFIXES {
        e = e.remove_prefix(p);
    }
    for k in META_PROFILE_KEYS {
        e = e.remove_key(k);
    }
    e
}

impl Profile {
    /// The metadata entries of the profile's key treatment ([`Profile::keys`]) from the keys'
    /// moments measured on the model (`moments_text` names the text); none without `keys`.
    pub fn key_metadata(
        &self,
        moments: &crate::key_treatment::KeyMoments,
        moments_text: &str,
    ) -> Vec<(String, crate::gguf::Value)> {
        use crate::gguf::Value;
        let Some(keys) = &self.keys else { return Vec::new() };
        let mut kv = Vec::new();
        if keys.shift {
            kv.push((META_KEY_SHIFT.to_string(), Value::f32_array(moments.mean.iter().copied())));
        }
        if let Some(power) = keys.scale {
            kv.push((META_KEY_SCALE.to_string(), Value::f32_array(moments.scale(power))));
        }
        kv.push((META_KEY_TEXT.to_string(), Value::String(moments_text.to_string())));
        kv
    }

    /// The metadata entries `kvtuner annotate` writes, in a fixed order.
    pub fn to_metadata(&self) -> Vec<(String, crate::gguf::Value)> {
        use crate::gguf::Value;
        let mut kv = vec![
            (META_SCHEMA.to_string(), Value::U32(SCHEMA_VERSION)),
            (META_NAME.to_string(), Value::String(self.name.clone())),
            (META_TYPE_K.to_string(), Value::str_array(self.layers.iter().map(|l| l.k.name()))),
            (META_TYPE_V.to_string(), Value::str_array(self.layers.iter().map(|l| l.v.name()))),
        ];
        if let Some(w) = &self.window {
            kv.push((META_WINDOW.to_string(), Value::u32_array(w.per_layer(self.layers.len()))));
            kv.push((META_WINDOW_K.to_string(), Value::String(w.k.name().to_string())));
            kv.push((META_WINDOW_V.to_string(), Value::String(w.v.name().to_string())));
            if w.sinks > 0 {
                kv.push((META_WINDOW_SINKS.to_string(), Value::U32(w.sinks)));
            }
        }
        if let Some(m) = &self.measured {
            kv.push((META_BITS.to_string(), Value::F32(m.bits_per_value as f32)));
            kv.push((META_KV_BYTES.to_string(), Value::U64(m.kv_bytes)));
            kv.push((META_CONTEXT.to_string(), Value::U32(m.context)));
            if let Some(kld) = m.kld_mean {
                kv.push((META_KLD.to_string(), Value::F32(kld as f32)));
            }
            if let Some(text) = &m.kld_eval_text {
                kv.push((META_KLD_TEXT.to_string(), Value::String(text.clone())));
            }
            if let Some(on) = &m.measured_on {
                kv.push((META_MEASURED_ON.to_string(), Value::String(on.clone())));
            }
        }
        kv.push((
            META_TOOL.to_string(),
            Value::String(self.tool_version.clone().unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())),
        ));
        kv
    }
}

/// A profile found in a model's metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddedProfile {
    pub name: Option<String>,
    /// Per-layer types as far as they could be read (None where a name is unknown).
    pub layers: Vec<(Option<CacheType>, Option<CacheType>)>,
    /// Its recent window (`kvtuner.cache.window…`), if it has one.
    pub window: Option<EmbeddedWindow>,
    /// Its key treatment (`kvtuner.cache.key_shift` / `key_scale`), if it has one.
    pub keys: Option<EmbeddedKeys>,
    pub bits_per_value: Option<f64>,
    pub kld_mean: Option<f64>,
    /// Everything that would make the runtime ignore it (it then uses uniform types).
    pub problems: Vec<String>,
}

/// The recent window of a profile found in a model's metadata, as far as it reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddedWindow {
    /// Positions per layer (0: none); empty when the key does not read.
    pub layers: Vec<u32>,
    pub k: Option<CacheType>,
    pub v: Option<CacheType>,
    /// The first positions it also keeps (`kvtuner.cache.window_sinks`; 0: none).
    pub sinks: u32,
}

/// Which key treatment a profile in a model's metadata carries (the arrays as they read).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddedKeys {
    pub shift: bool,
    pub scale: bool,
    /// What they were measured on (`kvtuner.profile.key_text`).
    pub text: Option<String>,
}

impl EmbeddedWindow {
    /// `w128 f16/f16 on 24 of 24 layers`.
    pub fn describe(&self) -> String {
        let size = self.layers.iter().copied().max().unwrap_or(0);
        let on = self.layers.iter().filter(|&&w| w > 0).count();
        let name = |t: Option<CacheType>| t.map_or("?", CacheType::name);
        let label = ProfileWindow::label(size, self.sinks);
        format!("{label} {}/{} on {on} of {} layers", name(self.k), name(self.v), self.layers.len())
    }
}

impl EmbeddedProfile {
    /// Reads `kvtuner.*` keys; `None` when the model carries no per-layer types.
    pub fn from_header(header: &crate::gguf::GgufHeader) -> Option<EmbeddedProfile> {
        if [META_TYPE_K, META_TYPE_V, META_WINDOW, META_WINDOW_SINKS, META_KEY_SHIFT, META_KEY_SCALE]
            .iter()
            .all(|k| header.get(k).is_none())
        {
            return None;
        }
        let mut problems = Vec::new();
        let n_layer = header.block_count().unwrap_or(0) as usize;
        let mut read = |key: &str| -> Vec<Option<CacheType>> {
            match header.get_str_array(key) {
                None => {
                    problems.push(format!("{key} is missing or not an array of strings"));
                    vec![None; n_layer]
                }
                Some(names) => {
                    if names.len() != n_layer {
                        problems.push(format!("{key} has {} entries, the model has {n_layer} layers", names.len()));
                    }
                    names
                        .iter()
                        .enumerate()
                        .map(|(il, n)| match n.parse::<CacheType>() {
                            Ok(t) => Some(t),
                            Err(_) => {
                                problems.push(format!("{key}[{il}] = \"{n}\" is not a KV cache type"));
                                None
                            }
                        })
                        .collect()
                }
            }
        };
        let k = read(META_TYPE_K);
        let v = read(META_TYPE_V);
        // the window: the same verdict as patch 0017 (llama_kv_profile_apply) and 0014's validation
        let window = header.get(META_WINDOW).map(|_| {
            let layers = match header.get_u32_array(META_WINDOW) {
                None => {
                    problems.push(format!("{META_WINDOW} is not an array of non-negative 32-bit integers"));
                    Vec::new()
                }
                Some(ls) => {
                    if ls.len() != n_layer {
                        problems
                            .push(format!("{META_WINDOW} has {} entries, the model has {n_layer} layers", ls.len()));
                    }
                    let sizes: std::collections::BTreeSet<u32> = ls.iter().copied().filter(|&w| w > 0).collect();
                    if sizes.len() > 1 {
                        problems.push(format!(
                            "{META_WINDOW} holds windows of several sizes ({sizes:?}): the runtime takes one"
                        ));
                    }
                    ls
                }
            };
            let mut window_type = |key: &str| match header.get_str(key) {
                None => {
                    problems.push(format!("{key} is missing ({META_WINDOW} is set)"));
                    None
                }
                Some(n) => match n.parse::<CacheType>() {
                    Ok(t) if ProfileWindow::TYPES.contains(&t) => Some(t),
                    _ => {
                        problems.push(format!("{key} = \"{n}\" is not a window type (f16 or q8_0)"));
                        None
                    }
                },
            };
            let k = window_type(META_WINDOW_K);
            let v = window_type(META_WINDOW_V);
            EmbeddedWindow { layers, k, v, sinks: 0 }
        });
        // its sinks: the same verdict as patch 0022 (a non-negative 32-bit integer, with a window)
        let mut window = window;
        if let Some(value) = header.get(META_WINDOW_SINKS) {
            let sinks = match value {
                crate::gguf::Value::U32(x) => Some(*x),
                crate::gguf::Value::I32(x) => u32::try_from(*x).ok(),
                _ => None,
            };
            match (sinks, window.as_mut()) {
                (None, _) => problems.push(format!("{META_WINDOW_SINKS} is not a non-negative 32-bit integer")),
                (Some(_), None) => {
                    problems.push(format!("{META_WINDOW_SINKS} is set without {META_WINDOW} to keep them in"))
                }
                (Some(s), Some(w)) => w.sinks = s,
            }
        }
        // the key shift and scale: the same verdict as patch 0020 (arrays of 32-bit floats; their
        // length, finiteness and sign are checked by the runtime against the model's layers)
        let mut key_array = |key: &str, positive: bool| match header.get(key) {
            None => false,
            Some(crate::gguf::Value::Array(crate::gguf::ValueType::F32, items)) => {
                let ok = |v: &crate::gguf::Value| matches!(v, crate::gguf::Value::F32(x) if x.is_finite() && (!positive || *x > 0.0));
                if let Some(i) = items.iter().position(|v| !ok(v)) {
                    let what = if positive { "a finite positive number" } else { "finite" };
                    problems.push(format!("{key}[{i}] is not {what}"));
                }
                true
            }
            Some(_) => {
                problems.push(format!("{key} is not an array of 32-bit floats"));
                true
            }
        };
        let (shift, scale) = (key_array(META_KEY_SHIFT, false), key_array(META_KEY_SCALE, true));
        let keys = (shift || scale).then(|| EmbeddedKeys {
            shift,
            scale,
            text: header.get_str(META_KEY_TEXT).map(str::to_string),
        });
        // the same verdict as patch 0003 (llama_model_base::load_hparams)
        match header.get(META_SCHEMA) {
            None => problems.push(format!("{META_SCHEMA} is missing")),
            Some(value) => match value.as_u64() {
                Some(v) if v == SCHEMA_VERSION as u64 => {}
                Some(v) => problems.push(format!("{META_SCHEMA} is {v}, this runtime reads schema {SCHEMA_VERSION}")),
                None => problems.push(format!(
                    "{META_SCHEMA} is not a non-negative integer, this runtime reads schema {SCHEMA_VERSION}"
                )),
            },
        }
        let n = k.len().max(v.len());
        let layers = (0..n).map(|i| (k.get(i).copied().flatten(), v.get(i).copied().flatten())).collect();
        Some(EmbeddedProfile {
            name: header.get_str(META_NAME).map(str::to_string),
            layers,
            window,
            keys,
            bits_per_value: header.get_f64(META_BITS),
            kld_mean: header.get_f64(META_KLD),
            problems,
        })
    }
}
