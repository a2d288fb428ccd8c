//! Per-layer KV cache profiles: which cache type each layer's K and V use, stored as YAML.
//!
//! A profile is written for people first: one line per layer, the model it was made for, and
//! what was measured. The on-disk schema (version 1):
//!
//! ```yaml
//! # kvtuner cache profile — see README
//! schema: 1
//! name: gemma3-270m-mixed-6.5
//! description: free text (optional)
//! model:
//!   architecture: gemma3
//!   layers: 18
//!   fingerprint: <hex sha256 of the GGUF tensor-info section>
//!   name: gemma-3-270m-it          # general.name, informational (optional)
//! layers:                          # exactly `model.layers` entries, index = layer
//! - { k: q8_0, v: q4_0 }  # 0
//! window:                          # optional: a recent window (patch 0014)
//!   size: 128                      # the last 128 positions of each sequence, also kept in
//!   k: f16                         # these K and V types (f16 or q8_0)
//!   v: f16
//!   layers: [0, 1, 5]              # optional: the layers that keep one (default: every layer)
//! keys:                            # optional: key treatment (patches 0018/0019), every layer
//!   shift: true                    # each layer's mean key subtracted as keys are cached
//!   scale: 0.5                     # key channels divided by their deviation to this power
//!   text: lee-calibration          # what they are measured on (the GGUF stores the vectors)
//! measured:                        # optional
//!   bits_per_value: 6.52
//!   kv_bytes: 12345678
//!   context: 1024
//!   kld_mean: 0.0123               # optional
//!   kld_eval_text: "..."           # optional
//!   predicted_kld: 0.011           # optional
//! calibration:                     # optional
//!   text: ...
//!   context: 1024
//!   chunks: 4
//!   types: [f16, q8_0, q5_0, q4_0]
//!   pairs: cuda                    # optional
//! tool_version: 0.1.0              # optional
//! ```
//!
//! Unknown keys are rejected so that a typo (`mesured:`) is an error rather than a silently
//! ignored block.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::cache_type::CacheType;

/// The profile schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// First line of every saved profile.
pub const HEADER: &str = "# kvtuner cache profile — see README";

/// A per-layer KV cache assignment for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub schema: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub model: ModelIdentity,
    /// One entry per layer; the index is the layer number.
    pub layers: Vec<LayerTypes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<ProfileWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<ProfileKeys>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_version: Option<String>,
}

/// Which model a profile belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    /// `general.architecture`, e.g. `gemma3`.
    pub architecture: String,
    /// `<arch>.block_count`.
    pub layers: usize,
    /// Hex sha256 of the GGUF tensor-info section (tensor names, shapes, types and offsets): it
    /// identifies the model's tensor layout, not its weights: a fine-tune of the same base in the
    /// same quantization shares it. Empty means "not bound to a model" (e.g. an imported preset).
    pub fingerprint: String,
    /// `general.name`; informational only, never compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Cache types of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerTypes {
    #[serde(deserialize_with = "de_k")]
    pub k: CacheType,
    #[serde(deserialize_with = "de_v")]
    pub v: CacheType,
}

// serde_norway's error path stops at the enclosing layer (`layers[3]`) for a bad type name,
// so the message itself says whether it was `k` or `v`.
fn de_cache_type<'de, D: Deserializer<'de>>(d: D, field: &str) -> Result<CacheType, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|e| serde::de::Error::custom(format!("{field}: {e}")))
}

fn de_k<'de, D: Deserializer<'de>>(d: D) -> Result<CacheType, D::Error> {
    de_cache_type(d, "k")
}

fn de_v<'de, D: Deserializer<'de>>(d: D) -> Result<CacheType, D::Error> {
    de_cache_type(d, "v")
}

/// A profile's recent window (patch 0014): the layers listed keep the last `size` positions of
/// each sequence also in `k` / `v` and attend to them there, to older positions in their own types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileWindow {
    pub size: u32,
    #[serde(deserialize_with = "de_k")]
    pub k: CacheType,
    #[serde(deserialize_with = "de_v")]
    pub v: CacheType,
    /// The layers that keep a window, ascending; `None`: every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<usize>>,
}

impl ProfileWindow {
    /// Types a window can have (what the runtime takes).
    pub const TYPES: [CacheType; 2] = [CacheType::F16, CacheType::Q8_0];

    /// Positions per layer (0: no window) for a model of `n_layer` layers, as the runtime and the
    /// GGUF key take them.
    pub fn per_layer(&self, n_layer: usize) -> Vec<u32> {
        match &self.layers {
            None => vec![self.size; n_layer],
            Some(ls) => (0..n_layer).map(|il| if ls.contains(&il) { self.size } else { 0 }).collect(),
        }
    }

    /// `w128 f16/f16`, `w128 q8_0 on 12 layers`: for summaries and tables.
    pub fn describe(&self, n_layer: usize) -> String {
        let ty = if self.k == self.v { self.k.to_string() } else { format!("{}/{}", self.k, self.v) };
        match &self.layers {
            Some(ls) if ls.len() != n_layer => format!("w{} {ty} on {} of {n_layer} layers", self.size, ls.len()),
            _ => format!("w{} {ty}", self.size),
        }
    }

    fn validate(&self, n_layer: usize) -> Result<(), ProfileInvalid> {
        if self.size == 0 {
            return Err(ProfileInvalid::WindowSize);
        }
        for (which, t) in [("k", self.k), ("v", self.v)] {
            if !Self::TYPES.contains(&t) {
                return Err(ProfileInvalid::WindowType { which, found: t });
            }
        }
        if let Some(ls) = &self.layers {
            for (i, &l) in ls.iter().enumerate() {
                if l >= n_layer || (i > 0 && l <= ls[i - 1]) {
                    return Err(ProfileInvalid::WindowLayers { layer: l, n_layer });
                }
            }
        }
        Ok(())
    }
}

/// A profile's key treatment: each layer's mean key subtracted as keys are cached (patch 0018),
/// each key channel divided by its deviation to a power and the queries multiplied by it (patch
/// 0019). Both leave attention unchanged in exact arithmetic and give narrow key types their range
/// back. The vectors are measured per model on `text` ([`crate::key_shift::measure`]) when the
/// profile is embedded (`annotate`, `tune`) or compared (`ab`); the GGUF carries them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileKeys {
    #[serde(default)]
    pub shift: bool,
    /// The power of each channel's deviation the keys are divided by (0.5: the best measured,
    /// bench/key-scale.md); `None`: no scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// Calibration text they are measured on: `lee-calibration`, `code-calibration`,
    /// `chat-calibration` or a file (never the text a profile's quality is reported on).
    #[serde(default = "ProfileKeys::default_text")]
    pub text: String,
}

impl ProfileKeys {
    fn default_text() -> String {
        "lee-calibration".to_string()
    }

    /// The shift and the scale of the square root of the deviation, measured on `text`.
    pub fn shift_and_scale(text: &str) -> ProfileKeys {
        ProfileKeys { shift: true, scale: Some(0.5), text: text.to_string() }
    }

    /// `shift + scale std^0.5`: for summaries.
    pub fn describe(&self) -> String {
        let scale = self.scale.map(|p| format!("scale std^{p}"));
        [self.shift.then(|| "shift".to_string()), scale].into_iter().flatten().collect::<Vec<_>>().join(" + ")
    }

    fn validate(&self) -> Result<(), ProfileInvalid> {
        match self.scale {
            None if !self.shift => Err(ProfileInvalid::KeysEmpty),
            Some(p) if !(p > 0.0 && p <= 2.0) => Err(ProfileInvalid::KeyScalePower(p.to_string())),
            _ => Ok(()),
        }
    }
}

/// Numbers measured for this profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// Average storage bits per cached K/V value, block scales included.
    pub bits_per_value: f64,
    /// Total KV cache bytes at `context`.
    pub kv_bytes: u64,
    /// Context length (cells) the numbers were measured at.
    pub context: u32,
    /// Mean KL divergence of next-token distributions against an f16 cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_mean: Option<f64>,
    /// Which text the KLD was measured on, e.g. `lee_background.cor, documents 151-300`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_eval_text: Option<String>,
    /// KLD the search predicted before measuring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_kld: Option<f64>,
    /// Mean KLD on the calibration text, where the profile was chosen by measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_calibration: Option<f64>,
    /// The uniform cache it was compared against on `kld_eval_text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared_uniform: Option<ComparedUniform>,
    /// The best uniform cache within the budget on the calibration text, where the choice was
    /// made (a profile is kept only if it measured below it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uniform_calibration: Option<ComparedUniform>,
    /// The written types measured again on the calibration text before the profile was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_confirmed: Option<f64>,
    /// Where it was measured: devices, `-ngl`, flash attention (e.g. `CUDA0 (-ngl 99 -fa on)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_on: Option<String>,
}

/// A uniform configuration and its KLD on the same text as the profile's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComparedUniform {
    /// `K/V` or one type for both, e.g. `q8_0/q4_0`.
    pub types: String,
    pub kld_mean: f64,
}

/// How the profile was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Calibration text, e.g. `lee_background.cor, documents 1-150`.
    pub text: String,
    pub context: u32,
    pub chunks: u32,
    /// Cache types the search was allowed to pick from.
    pub types: Vec<CacheType>,
    /// Which K/V type pairs were allowed, e.g. `cuda` (pairs with CUDA flash-attention kernels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<String>,
}

/// A profile that is well-formed YAML but not a usable profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileInvalid {
    #[error("unsupported profile schema {found} (this kvtuner reads schema {SCHEMA_VERSION})")]
    UnsupportedSchema { found: String },
    #[error("`model.layers` is {declared} but `layers` lists {found} entries")]
    LayerCount { declared: usize, found: usize },
    #[error("`layers` is empty")]
    NoLayers,
    #[error("`name` is empty")]
    EmptyName,
    #[error("`model.architecture` is empty")]
    EmptyArchitecture,
    #[error("`model.fingerprint` `{0}` is not a hex digest")]
    BadFingerprint(String),
    #[error("`window.size` is 0 (leave `window` out for no window)")]
    WindowSize,
    #[error("`window.{which}` is {found}: a window is f16 or q8_0")]
    WindowType { which: &'static str, found: CacheType },
    #[error("`window.layers`: {layer} is out of order, repeated or not below the model's {n_layer} layers")]
    WindowLayers { layer: usize, n_layer: usize },
    #[error("`keys` asks for neither `shift` nor `scale` (leave `keys` out for neither)")]
    KeysEmpty,
    #[error("`keys.scale` is {0}: the power of the deviation is above 0 and at most 2")]
    KeyScalePower(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileLoadError {
    #[error("cannot read profile {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}{}: {message}", path.display(), location_suffix(*line, *column))]
    Parse {
        path: PathBuf,
        /// 1-based, when the parser knows it.
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Invalid { path: PathBuf, source: ProfileInvalid },
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileSaveError {
    #[error("refusing to save profile to {}: {source}", path.display())]
    Invalid { path: PathBuf, source: ProfileInvalid },
    #[error("cannot serialize profile for {}: {source}", path.display())]
    Serialize { path: PathBuf, source: serde_norway::Error },
    #[error("cannot write profile {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// One way a profile's model differs from the model at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelDifference {
    Architecture { profile: String, model: String },
    Layers { profile: usize, model: usize },
    Fingerprint { profile: String, model: String },
}

impl fmt::Display for ModelDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelDifference::Architecture { profile, model } => {
                write!(f, "architecture: profile `{profile}`, model `{model}`")
            }
            ModelDifference::Layers { profile, model } => {
                write!(f, "layer count: profile {profile}, model {model}")
            }
            ModelDifference::Fingerprint { profile, model } if profile.is_empty() => write!(
                f,
                "tensor-layout fingerprint: the profile is bound to no model (an imported preset?), model `{model}`; bind it with `kvtuner profile import-kvtuner PRESET -m MODEL` or apply it with --force"
            ),
            ModelDifference::Fingerprint { profile, model } => write!(
                f,
                "tensor-layout fingerprint (names, shapes and types of the tensors): profile `{profile}`, model `{model}`"
            ),
        }
    }
}

/// The profile was made for a different model; every difference is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("profile `{profile}` does not match this model: {}", join_differences(differences))]
pub struct ProfileMismatch {
    pub profile: String,
    pub differences: Vec<ModelDifference>,
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

fn join_differences(d: &[ModelDifference]) -> String {
    d.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Splits a serde_norway error into (line, column, message without the trailing location,
/// which we print compiler-style instead).
fn yaml_error_parts(e: &serde_norway::Error) -> (Option<usize>, Option<usize>, String) {
    let msg = e.to_string();
    match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            let msg = msg.strip_suffix(&suffix).map(str::to_string).unwrap_or(msg);
            (Some(loc.line()), Some(loc.column()), msg)
        }
        None => (None, None, msg),
    }
}

/// Reads only `schema`, so a newer file is reported as "unsupported schema" rather than as
/// whatever field this version does not know.
#[derive(Deserialize)]
struct SchemaProbe {
    schema: Option<serde_norway::Value>,
}

impl Profile {
    /// A profile with the same K and V types on every layer.
    pub fn uniform(model: &ModelIdentity, k: CacheType, v: CacheType, name: impl Into<String>) -> Profile {
        Profile {
            schema: SCHEMA_VERSION,
            name: name.into(),
            description: None,
            model: model.clone(),
            layers: vec![LayerTypes { k, v }; model.layers],
            window: None,
            keys: None,
            measured: None,
            calibration: None,
            tool_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        }
    }

    /// Checks what the YAML types cannot express.
    pub fn validate(&self) -> Result<(), ProfileInvalid> {
        if self.schema != SCHEMA_VERSION {
            return Err(ProfileInvalid::UnsupportedSchema { found: self.schema.to_string() });
        }
        if self.name.trim().is_empty() {
            return Err(ProfileInvalid::EmptyName);
        }
        if self.model.architecture.trim().is_empty() {
            return Err(ProfileInvalid::EmptyArchitecture);
        }
        if !self.model.fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ProfileInvalid::BadFingerprint(self.model.fingerprint.clone()));
        }
        if self.layers.is_empty() {
            return Err(ProfileInvalid::NoLayers);
        }
        if self.layers.len() != self.model.layers {
            return Err(ProfileInvalid::LayerCount { declared: self.model.layers, found: self.layers.len() });
        }
        if let Some(w) = &self.window {
            w.validate(self.layers.len())?;
        }
        if let Some(k) = &self.keys {
            k.validate()?;
        }
        Ok(())
    }

    /// Parses and validates a profile from YAML text; `path` is only used in errors.
    pub fn from_yaml_str(text: &str, path: &Path) -> Result<Profile, ProfileLoadError> {
        let parse_err = |e: serde_norway::Error| {
            let (line, column, message) = yaml_error_parts(&e);
            ProfileLoadError::Parse { path: path.to_path_buf(), line, column, message }
        };
        if text.trim().is_empty() {
            return Err(ProfileLoadError::Parse {
                path: path.to_path_buf(),
                line: None,
                column: None,
                message: "file is empty".into(),
            });
        }
        let probe: SchemaProbe = serde_norway::from_str(text).map_err(parse_err)?;
        match &probe.schema {
            Some(serde_norway::Value::Number(n)) if n.as_u64() == Some(SCHEMA_VERSION as u64) => {}
            Some(other) => {
                let found = serde_norway::to_string(other)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| format!("{other:?}"));
                return Err(ProfileLoadError::Invalid {
                    path: path.to_path_buf(),
                    source: ProfileInvalid::UnsupportedSchema { found },
                });
            }
            // Let the full parse report the missing field with its usual wording.
            None => {}
        }
        let profile: Profile = serde_norway::from_str(text).map_err(parse_err)?;
        profile.validate().map_err(|source| ProfileLoadError::Invalid { path: path.to_path_buf(), source })?;
        Ok(profile)
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Profile, ProfileLoadError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileLoadError::Read { path: path.to_path_buf(), source })?;
        Profile::from_yaml_str(&text, path)
    }

    /// The YAML text `save` writes: header comment, one flow-style line per layer.
    pub fn to_yaml_string(&self) -> Result<String, serde_norway::Error> {
        // serde_norway only writes block style, which would spend three lines per layer;
        // so the parts before and after `layers` are serialized normally and the layer list
        // is written by hand (type names are plain identifiers, so no quoting is needed).
        #[derive(Serialize)]
        struct Head<'a> {
            schema: u32,
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            description: &'a Option<String>,
            model: &'a ModelIdentity,
        }
        #[derive(Serialize)]
        struct Tail<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            window: &'a Option<ProfileWindow>,
            #[serde(skip_serializing_if = "Option::is_none")]
            keys: &'a Option<ProfileKeys>,
            #[serde(skip_serializing_if = "Option::is_none")]
            measured: &'a Option<Measured>,
            #[serde(skip_serializing_if = "Option::is_none")]
            calibration: &'a Option<Calibration>,
            #[serde(skip_serializing_if = "Option::is_none")]
            tool_version: &'a Option<String>,
        }
        let mut out = String::new();
        out.push_str(HEADER);
        out.push('\n');
        out.push_str(&serde_norway::to_string(&Head {
            schema: self.schema,
            name: &self.name,
            description: &self.description,
            model: &self.model,
        })?);
        out.push_str("layers:\n");
        for (i, l) in self.layers.iter().enumerate() {
            // Padded so the columns line up (longest name: iq4_nl).
            let k = format!("{},", l.k);
            out.push_str(&format!("- {{ k: {k:<7} v: {:<6} }}  # {i}\n", l.v.name()));
        }
        if self.window.is_some()
            || self.keys.is_some()
            || self.measured.is_some()
            || self.calibration.is_some()
            || self.tool_version.is_some()
        {
            out.push_str(&serde_norway::to_string(&Tail {
                window: &self.window,
                keys: &self.keys,
                measured: &self.measured,
                calibration: &self.calibration,
                tool_version: &self.tool_version,
            })?);
        }
        Ok(out)
    }

    /// Validates, then writes atomically (temp file in the same folder, then rename), so a
    /// crash never leaves a half-written profile behind.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ProfileSaveError> {
        let path = path.as_ref();
        self.validate().map_err(|source| ProfileSaveError::Invalid { path: path.to_path_buf(), source })?;
        let text =
            self.to_yaml_string().map_err(|source| ProfileSaveError::Serialize { path: path.to_path_buf(), source })?;
        let write_err = |source| ProfileSaveError::Write { path: path.to_path_buf(), source };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
        tmp.write_all(text.as_bytes()).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        // Temp files start out 0600; a profile is an ordinary shareable file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(write_err)?;
        }
        tmp.persist(path).map_err(|e| write_err(e.error))?;
        Ok(())
    }

    /// Lists every way `model` differs from the model this profile was made for.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<(), ProfileMismatch> {
        let mut differences = Vec::new();
        if self.model.architecture != model.architecture {
            differences.push(ModelDifference::Architecture {
                profile: self.model.architecture.clone(),
                model: model.architecture.clone(),
            });
        }
        // Compare the layer list too, in case the struct was edited after loading.
        if self.model.layers != model.layers || self.layers.len() != model.layers {
            differences.push(ModelDifference::Layers { profile: self.layers.len(), model: model.layers });
        }
        if !self.model.fingerprint.eq_ignore_ascii_case(&model.fingerprint) {
            differences.push(ModelDifference::Fingerprint {
                profile: self.model.fingerprint.clone(),
                model: model.fingerprint.clone(),
            });
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(ProfileMismatch { profile: self.name.clone(), differences })
        }
    }

    /// Compact description such as `12×q8_0/q4_0, 6×f16/f16` (K/V pairs, most common first).
    pub fn summary(&self) -> String {
        let mut counts: Vec<(LayerTypes, usize)> = Vec::new();
        for l in &self.layers {
            match counts.iter_mut().find(|(t, _)| t == l) {
                Some((_, n)) => *n += 1,
                None => counts.push((*l, 1)),
            }
        }
        // Stable sort keeps first-appearance order among equal counts.
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        let types = counts.iter().map(|(t, n)| format!("{n}×{}/{}", t.k, t.v)).collect::<Vec<_>>().join(", ");
        let mut out = types;
        if let Some(w) = &self.window {
            out += &format!("; recent window {}", w.describe(self.layers.len()));
        }
        if let Some(k) = &self.keys {
            out += &format!("; keys: {}", k.describe());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// KVTuner preset import

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

    fn model() -> ModelIdentity {
        ModelIdentity {
            architecture: "gemma3".into(),
            layers: 3,
            fingerprint: "ab".repeat(32),
            name: Some("tiny".into()),
        }
    }

    #[test]
    fn summary_counts_pairs_most_common_first() {
        let mut p = Profile::uniform(&model(), CacheType::F16, CacheType::F16, "x");
        p.layers[1] = LayerTypes { k: CacheType::Q8_0, v: CacheType::Q4_0 };
        p.layers[2] = p.layers[1];
        assert_eq!(p.summary(), "2×q8_0/q4_0, 1×f16/f16");
    }

    #[test]
    fn check_model_lists_every_difference() {
        let p = Profile::uniform(&model(), CacheType::F16, CacheType::F16, "x");
        assert!(p.check_model(&model()).is_ok());
        let other = ModelIdentity { architecture: "llama".into(), layers: 4, fingerprint: "cd".repeat(32), name: None };
        let err = p.check_model(&other).unwrap_err();
        assert_eq!(err.differences.len(), 3);
        let text = err.to_string();
        for needle in ["architecture", "layer count: profile 3, model 4", "fingerprint"] {
            assert!(text.contains(needle), "{text}");
        }
        // The informational name is never compared.
        let renamed = ModelIdentity { name: Some("other".into()), ..model() };
        assert!(p.check_model(&renamed).is_ok());
        // An unbound profile (an imported preset) is told how to bind it.
        let unbound = Profile::uniform(
            &ModelIdentity { fingerprint: String::new(), ..model() },
            CacheType::F16,
            CacheType::F16,
            "x",
        );
        let text = unbound.check_model(&model()).unwrap_err().to_string();
        assert!(text.contains("bound to no model") && text.contains("import-kvtuner PRESET -m MODEL"), "{text}");
    }

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

// ---------------------------------------------------------------------------------------------
// GGUF metadata: where a profile lives inside a model file (read by patch 0003 at run time).
// ---------------------------------------------------------------------------------------------

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
        moments: &crate::key_shift::KeyMoments,
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
        format!("w{size} {}/{} on {on} of {} layers", name(self.k), name(self.v), self.layers.len())
    }
}

impl EmbeddedProfile {
    /// Reads `kvtuner.*` keys; `None` when the model carries no per-layer types.
    pub fn from_header(header: &crate::gguf::GgufHeader) -> Option<EmbeddedProfile> {
        if [META_TYPE_K, META_TYPE_V, META_WINDOW, META_KEY_SHIFT, META_KEY_SCALE]
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
            EmbeddedWindow { layers, k, v }
        });
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
