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
//!   sinks: 4                       # optional: also the first 4 positions (patch 0021)
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

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::cache_type::CacheType;

mod kvtuner_import;
mod metadata;

pub use kvtuner_import::{import_kvtuner, BitMapping, ImportError};
pub use metadata::*;

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
    /// The first positions of each sequence the window also keeps (attention sinks, patch 0021);
    /// 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sinks: u32,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
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

    /// `w128` or `w128+s4`: a window's positions, as `ab --against` spells them.
    pub fn label(size: u32, sinks: u32) -> String {
        if sinks > 0 {
            format!("w{size}+s{sinks}")
        } else {
            format!("w{size}")
        }
    }

    /// `w128 f16/f16`, `w128+s4 q8_0 on 12 layers`: for summaries and tables.
    pub fn describe(&self, n_layer: usize) -> String {
        let ty = if self.k == self.v { self.k.to_string() } else { format!("{}/{}", self.k, self.v) };
        let size = Self::label(self.size, self.sinks);
        match &self.layers {
            Some(ls) if ls.len() != n_layer => format!("{size} {ty} on {} of {n_layer} layers", ls.len()),
            _ => format!("{size} {ty}"),
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
/// back. The vectors are measured per model on `text` ([`crate::key_treatment::measure`]) when the
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
    /// The power of the deviation the scale uses unless told (the best measured, bench/key-scale.md).
    pub const DEFAULT_POWER: f32 = 0.5;

    /// Whether `power` is one a key scale can use: above 0 and at most 2.
    pub fn power_ok(power: f32) -> bool {
        power > 0.0 && power <= 2.0
    }

    fn default_text() -> String {
        "lee-calibration".to_string()
    }

    /// The shift and the scale of the square root of the deviation, measured on `text`.
    pub fn shift_and_scale(text: &str) -> ProfileKeys {
        ProfileKeys { shift: true, scale: Some(Self::DEFAULT_POWER), text: text.to_string() }
    }

    /// `shift + scale std^0.5`: for summaries.
    pub fn describe(&self) -> String {
        let scale = self.scale.map(|p| format!("scale std^{p}"));
        [self.shift.then(|| "shift".to_string()), scale].into_iter().flatten().collect::<Vec<_>>().join(" + ")
    }

    fn validate(&self) -> Result<(), ProfileInvalid> {
        match self.scale {
            None if !self.shift => Err(ProfileInvalid::KeysEmpty),
            Some(p) if !Self::power_ok(p) => Err(ProfileInvalid::KeyScalePower(p.to_string())),
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
}
