//! Model, context and device options shared by the commands, `serve`, the pipelines and tests
//! (llama.cpp's -m, -c, -ngl, -fa, -ctk, -ctv, -t, --rpc, --kv-profile): a loaded model and the
//! context parameters a cache configuration starts from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::assets::NamedText;
use crate::cache_type::CacheType;
use crate::gguf::{self, GgufHeader};
use crate::llama::{
    Backend, ChatMessage, Context, ContextParams, FlashAttn, LayerCacheTypes, Model, ModelParams, RecentWindow,
};
use crate::profile::{EmbeddedProfile, ModelIdentity, Profile, ProfileKeys, ProfileWindow};

/// Where a model runs: layers offloaded to this machine's GPUs and then to RPC servers, threads,
/// flash attention.
#[derive(Debug, Clone, PartialEq)]
pub struct Devices {
    /// Layers offloaded (-ngl); -1 = all.
    pub n_gpu_layers: i32,
    /// RPC servers (HOST:PORT) that take offloaded layers after this machine's GPUs.
    pub rpc: Vec<String>,
    /// Threads (0 = all cores).
    pub threads: i32,
    pub flash_attn: FlashAttn,
}

impl Default for Devices {
    fn default() -> Self {
        Devices { n_gpu_layers: 0, rpc: Vec::new(), threads: 0, flash_attn: FlashAttn::Auto }
    }
}

/// A model that could not be loaded on the devices asked for.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Rpc(#[from] crate::llama::rpc::RpcError),
    #[error(transparent)]
    Load(#[from] crate::llama::LoadModelError),
}

impl Devices {
    /// Loads `path` on these devices (RPC servers connected first).
    pub fn load_model(&self, path: &Path) -> Result<Model, DeviceError> {
        load_model(path, self.n_gpu_layers, &self.rpc)
    }

    /// Context parameters for measuring cache configurations: these threads and flash
    /// attention, no embedded profile (each configuration names its types).
    pub fn measuring_params(&self) -> ContextParams {
        ContextParams {
            n_threads: self.threads,
            flash_attn: self.flash_attn,
            no_kv_profile: true,
            ..Default::default()
        }
    }

    /// `-ngl 99 -fa on`, `CPU`, `-ngl 20 --rpc a:1,b:2`: for reports and profiles.
    pub fn describe(&self) -> String {
        let mut out = match self.n_gpu_layers {
            0 if self.rpc.is_empty() => "CPU".to_string(),
            n => format!("-ngl {n}"),
        };
        if !self.rpc.is_empty() {
            out += &format!(" --rpc {}", self.rpc.join(","));
        }
        out += match self.flash_attn {
            FlashAttn::Auto => "",
            FlashAttn::On => " -fa on",
            FlashAttn::Off => " -fa off",
        };
        out
    }
}

/// What a context is opened with (`chat`, `layers`, `serve`, `calibrate`).
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeOptions {
    pub model: PathBuf,
    /// Context size in tokens.
    pub ctx_size: u32,
    pub devices: Devices,
    /// Uniform K type; given, it wins over an embedded profile (and says so).
    pub cache_type_k: Option<CacheType>,
    pub cache_type_v: Option<CacheType>,
    /// `auto` (the embedded profile, if any), `off` (uniform) or a profile YAML file.
    pub kv_profile: String,
}

/// Reads a model's GGUF header (the error names the file).
pub fn read_model_header(path: &Path) -> anyhow::Result<GgufHeader> {
    gguf::read_header(path).with_context(|| format!("reading {}", path.display()))
}

/// The identity profiles are checked against.
pub fn read_identity(path: &Path) -> anyhow::Result<ModelIdentity> {
    Ok(ModelIdentity::from_header(&read_model_header(path)?)?)
}

/// Loads a profile file and checks that it was made for the model at `model`.
pub fn load_profile_for(spec: &str, identity: &ModelIdentity, model: &Path) -> anyhow::Result<Profile> {
    let profile = Profile::load(spec)?;
    profile.check_model(identity).with_context(|| format!("profile {spec} does not fit {}", model.display()))?;
    Ok(profile)
}

/// Per-layer types of a profile, as the context takes them.
pub fn profile_layer_types(profile: &Profile) -> LayerCacheTypes {
    LayerCacheTypes::from_pairs(profile.layers.iter().map(|l| (l.k, l.v)))
}

/// A profile's recent window, as the context takes it.
pub fn profile_window(profile: &Profile) -> Option<RecentWindow> {
    profile.window.as_ref().map(|w| recent_window(w, profile.layers.len()))
}

/// A profile's window block on a model of `n_layer` layers, as the context takes it.
pub fn recent_window(w: &ProfileWindow, n_layer: usize) -> RecentWindow {
    RecentWindow { layers: w.per_layer(n_layer), type_k: w.k, type_v: w.v, sinks: w.sinks }
}

/// A model to compare cache configurations on (`ab`, `capacity`): its header and identity, the
/// model loaded on the devices of `devices`, and the context parameters every configuration starts
/// from (no embedded profile: each configuration names its types).
pub fn load_for_comparison(
    path: &Path,
    devices: &Devices,
) -> anyhow::Result<(GgufHeader, ModelIdentity, Model, ContextParams)> {
    let header = read_model_header(path)?;
    let identity = ModelIdentity::from_header(&header)?;
    let model = devices.load_model(path)?;
    Ok((header, identity, model, devices.measuring_params()))
}

/// Loads a model with `n_gpu_layers` offloaded to this machine's GPUs and then to the RPC servers
/// at `rpc` (HOST:PORT), which are connected first.
pub fn load_model(path: &Path, n_gpu_layers: i32, rpc: &[String]) -> Result<Model, DeviceError> {
    let backend = Backend::init();
    let rpc = crate::llama::rpc::add_servers(backend, rpc)?;
    Ok(Model::load(backend, path, &ModelParams { n_gpu_layers, rpc, ..ModelParams::default() })?)
}

/// One cache configuration to compare (`ab`, `capacity`): a uniform pair or a profile.
pub struct CacheConfig {
    pub name: String,
    pub is_profile: bool,
    pub params: ContextParams,
    /// A key treatment to measure and apply ([`measure_config_keys`]): a profile's `keys`, or a
    /// uniform spec's `+ks`/`+kc` on the caller's text.
    pub keys: Option<ProfileKeys>,
}

/// A uniform configuration of `--against`: `T` (K and V) or `K/V`, then optionally `+ks` (a key
/// shift, patch 0018), `+kc` or `+kcP` (a key scale of deviations to the power P, default 0.5,
/// patch 0019) and `+wN` (every layer keeps its last N positions also in f16) or `+wN:q8_0` (in
/// q8_0): a recent window (patch 0014), which `+sS` makes keep the first S positions too (attention
/// sinks, patch 0021).
struct UniformSpec {
    k: CacheType,
    v: CacheType,
    window: Option<RecentWindow>,
    key_shift: bool,
    key_scale: Option<f32>,
}

fn parse_uniform(spec: &str, n_layer: usize) -> anyhow::Result<UniformSpec> {
    let mut parts = spec.split('+');
    let mut sinks = None;
    let types = parts.next().unwrap_or_default();
    let (k, v) = types.split_once('/').unwrap_or((types, types));
    let mut out = UniformSpec {
        k: k.parse().with_context(|| format!("--against `{spec}`"))?,
        v: v.parse().with_context(|| format!("--against `{spec}`"))?,
        window: None,
        key_shift: false,
        key_scale: None,
    };
    for part in parts {
        if part == "ks" && !out.key_shift {
            out.key_shift = true;
        } else if let Some(p) = part.strip_prefix("kc").filter(|_| out.key_scale.is_none()) {
            let power: f32 = if p.is_empty() {
                ProfileKeys::DEFAULT_POWER
            } else {
                p.parse().with_context(|| format!("--against `{spec}`: key-scale power `{p}`"))?
            };
            anyhow::ensure!(ProfileKeys::power_ok(power), "--against `{spec}`: a key-scale power must be in (0, 2]");
            out.key_scale = Some(power);
        } else if let Some(s) = part.strip_prefix('s').filter(|_| sinks.is_none()) {
            let s: u32 = s.parse().with_context(|| format!("--against `{spec}`: sinks `{s}`"))?;
            anyhow::ensure!(s > 0, "--against `{spec}`: 0 sinks are no sinks");
            sinks = Some(s);
        } else if let Some(w) = part.strip_prefix('w').filter(|_| out.window.is_none()) {
            let (w, on) = match w.split_once('@') {
                Some((w, list)) => {
                    (w, Some(parse_layer_list(list, n_layer).with_context(|| format!("--against `{spec}`"))?))
                }
                None => (w, None),
            };
            let (size, ty) = w.split_once(':').unwrap_or((w, "f16"));
            let size: u32 = size.parse().with_context(|| format!("--against `{spec}`: window size `{size}`"))?;
            let ty: CacheType = ty.parse().with_context(|| format!("--against `{spec}`: window type"))?;
            anyhow::ensure!(size > 0, "--against `{spec}`: a window of 0 positions is no window");
            out.window = Some(recent_window(&ProfileWindow { size, k: ty, v: ty, layers: on, sinks: 0 }, n_layer));
        } else {
            bail!("--against `{spec}`: `+{part}` is none of `+ks` (a key shift), `+kc[P]` (a key scale), `+wN[:type]` (a recent window) and `+sS` (its sinks), or is repeated");
        }
    }
    if let Some(s) = sinks {
        let w = out
            .window
            .as_mut()
            .with_context(|| format!("--against `{spec}`: sinks (`+s{s}`) are kept in a recent window: add `+wN`"))?;
        w.sinks = s;
    }
    Ok(out)
}

/// `5/11/17` or `0-3/9`: layers in ascending order, each below `n_layer` (a window's `@` list;
/// `/`, not `,`, which separates `--against`'s configurations).
fn parse_layer_list(list: &str, n_layer: usize) -> anyhow::Result<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for item in list.split('/') {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let (a, b): (usize, usize) = (
            a.parse().with_context(|| format!("window layers: `{item}` is not a layer or a range a-b"))?,
            b.parse().with_context(|| format!("window layers: `{item}` is not a layer or a range a-b"))?,
        );
        anyhow::ensure!(a <= b, "window layers: range `{item}` runs backwards");
        anyhow::ensure!(b < n_layer, "window layers: layer {b} is past the model's last ({})", n_layer - 1);
        anyhow::ensure!(out.last().is_none_or(|&l| l < a), "window layers: `{list}` is not in ascending order");
        out.extend(a..=b);
    }
    Ok(out)
}

/// `+w128`, `+w128:q8_0@5/11/17+s4`: a recent window as `--against` spells it.
fn window_spec(w: &RecentWindow) -> String {
    let size = w.layers.iter().copied().max().unwrap_or(0);
    let mut out = if w.type_k == CacheType::F16 { format!("+w{size}") } else { format!("+w{size}:{}", w.type_k) };
    if w.layers.contains(&0) {
        let on: Vec<String> =
            w.layers.iter().enumerate().filter(|(_, &n)| n > 0).map(|(il, _)| il.to_string()).collect();
        out += &format!("@{}", on.join("/"));
    }
    if w.sinks > 0 {
        out += &format!("+s{}", w.sinks);
    }
    out
}

/// The configurations of `--against` (uniform caches) and `--profile` (`auto`: the profile the
/// model embeds; or YAML files made for it) on top of `base`. `auto` alone on a model without a
/// profile is skipped with a note; among other profiles it is an error. A uniform `+ks`/`+kc`
/// is to be measured on `key_text`; a profile's keys on its own text.
pub fn cache_configs(
    against: &[String],
    profiles: &[String],
    key_text: &str,
    header: &GgufHeader,
    identity: &ModelIdentity,
    model: &Path,
    base: &ContextParams,
) -> anyhow::Result<Vec<CacheConfig>> {
    let mut configs = Vec::new();
    for spec in against {
        let UniformSpec { k, v, window, key_shift, key_scale } = parse_uniform(spec, identity.layers)?;
        let mut name = if k == v { k.to_string() } else { format!("{k}/{v}") };
        if key_shift {
            name += "+ks";
        }
        match key_scale {
            Some(p) if p == ProfileKeys::DEFAULT_POWER => name += "+kc",
            Some(p) => name += &format!("+kc{p}"),
            None => {}
        }
        if let Some(w) = &window {
            name += &window_spec(w);
        }
        configs.push(CacheConfig {
            name,
            is_profile: false,
            params: ContextParams { type_k: k, type_v: v, window, ..base.clone() },
            keys: (key_shift || key_scale.is_some()).then(|| ProfileKeys {
                shift: key_shift,
                scale: key_scale,
                text: key_text.to_string(),
            }),
        });
    }
    for spec in profiles {
        if spec == "auto" {
            match EmbeddedProfile::from_header(header) {
                Some(p) if p.problems.is_empty() => configs.push(CacheConfig {
                    name: format!("profile {}", p.name.as_deref().unwrap_or("embedded")),
                    is_profile: true,
                    params: ContextParams { no_kv_profile: false, ..base.clone() },
                    keys: None, // the runtime applies the embedded profile's own
                }),
                Some(p) => bail!("the model's embedded profile is unusable: {}", p.problems.join("; ")),
                None if profiles.len() == 1 => {
                    eprintln!("note: {} has no embedded profile; comparing uniform caches only", model.display())
                }
                None => bail!("--profile auto: {} has no embedded profile", model.display()),
            }
        } else {
            let profile = load_profile_for(spec, identity, model)?;
            configs.push(CacheConfig {
                name: format!("profile {}", profile.name),
                is_profile: true,
                params: ContextParams {
                    layer_types: Some(profile_layer_types(&profile)),
                    window: profile_window(&profile),
                    ..base.clone()
                },
                keys: profile.keys.clone(),
            });
        }
    }
    Ok(configs)
}

/// Which per-layer profile a context gets.
pub enum ProfileChoice {
    /// Whatever the model embeds (the runtime applies it), or uniform types if none.
    Auto { embedded: Option<String> },
    /// Uniform -ctk/-ctv.
    Off,
    /// Uniform -ctk/-ctv given on the command line, over the profile (named) the model embeds.
    Overridden { embedded: String },
    /// A profile file.
    File(Box<Profile>),
}

impl ProfileChoice {
    pub fn describe(&self) -> String {
        match self {
            ProfileChoice::Auto { embedded: Some(name) } => format!("{name} (embedded in the model)"),
            ProfileChoice::Auto { embedded: None } => "none (uniform -ctk/-ctv)".into(),
            ProfileChoice::Off => "off (uniform -ctk/-ctv)".into(),
            ProfileChoice::Overridden { embedded } => {
                format!("off: -ctk/-ctv given, the embedded profile {embedded} is not applied")
            }
            ProfileChoice::File(p) => format!("{} (from file)", p.name),
        }
    }
}

pub struct Opened {
    pub model: Model,
    pub params: ContextParams,
    pub choice: ProfileChoice,
    pub identity: ModelIdentity,
    /// The per-layer profile in the model's metadata, as far as it reads.
    pub embedded: Option<EmbeddedProfile>,
}

impl Opened {
    /// What the runtime applied, for banners and `--json`, read back from `ctx`: the choice's
    /// description, unless the embedded profile was asked for and the runtime's per-layer types
    /// or recent window differ from it (it fell back to uniform types); that is then said once on
    /// stderr.
    pub fn applied_profile(&self, ctx: &Context<'_>) -> String {
        if let (ProfileChoice::Auto { embedded: Some(name) }, Some(e)) = (&self.choice, &self.embedded) {
            let wanted_window = |il: usize| e.window.as_ref().and_then(|w| w.layers.get(il).copied()).unwrap_or(0);
            let (shift, scale) = e.keys.as_ref().map_or((false, false), |k| (k.shift, k.scale));
            let differs = ctx.layers().iter().enumerate().any(|(il, applied)| match (applied, e.layers.get(il)) {
                (Some(a), Some(&(k, v))) => {
                    (Some(a.type_k), Some(a.type_v)) != (k, v)
                        || a.window != wanted_window(il)
                        || (a.window > 0 && a.window_sinks != e.window.as_ref().map_or(0, |w| w.sinks))
                        || (a.k_shifted, a.k_scaled) != (shift, scale)
                }
                (Some(_), None) => true,
                (None, _) => false,
            });
            if differs {
                let why =
                    if e.problems.is_empty() { "the runtime refused it".to_string() } else { e.problems.join("; ") };
                eprintln!("warning: the profile {name} embedded in the model was not applied ({why}); the cache uses uniform -ctk/-ctv");
                return format!("none: the embedded profile {name} was not applied (uniform -ctk/-ctv)");
            }
        }
        self.choice.describe()
    }
}

pub fn open(args: &RuntimeOptions) -> anyhow::Result<Opened> {
    let header = read_model_header(&args.model)?;
    let identity = ModelIdentity::from_header(&header)?;
    let explicit = args.cache_type_k.is_some() || args.cache_type_v.is_some();
    let embedded_profile = EmbeddedProfile::from_header(&header);
    let choice = match args.kv_profile.as_str() {
        "auto" => {
            let embedded = embedded_profile.as_ref().map(|e| e.name.clone().unwrap_or_else(|| "unnamed".into()));
            match embedded {
                // Explicit flags win, once said: the user asked for these types.
                Some(name) if explicit => {
                    eprintln!(
                        "note: -ctk/-ctv given: the profile {name} embedded in {} is not applied (drop -ctk/-ctv to use it)",
                        args.model.display()
                    );
                    ProfileChoice::Overridden { embedded: name }
                }
                embedded => ProfileChoice::Auto { embedded },
            }
        }
        "off" => ProfileChoice::Off,
        path if explicit => bail!(
            "--kv-profile {path} sets every layer's K and V types; drop -ctk/-ctv, or use --kv-profile off for uniform types"
        ),
        path => ProfileChoice::File(Box::new(load_profile_for(path, &identity, &args.model)?)),
    };
    let model = args.devices.load_model(&args.model)?;
    let mut params = ContextParams {
        n_ctx: args.ctx_size,
        n_batch: 512.min(args.ctx_size),
        n_ubatch: 512.min(args.ctx_size),
        n_threads: args.devices.threads,
        flash_attn: args.devices.flash_attn,
        type_k: args.cache_type_k.unwrap_or(CacheType::F16),
        type_v: args.cache_type_v.unwrap_or(CacheType::F16),
        ..ContextParams::default()
    };
    match &choice {
        ProfileChoice::Auto { .. } => {}
        ProfileChoice::Off | ProfileChoice::Overridden { .. } => params.no_kv_profile = true,
        ProfileChoice::File(p) => {
            if p.layers.len() != model.n_layer() as usize {
                bail!("profile {} has {} layers, the model has {}", p.name, p.layers.len(), model.n_layer());
            }
            params.layer_types = Some(profile_layer_types(p));
            params.window = profile_window(p);
            if let Some(keys) = &p.keys {
                let (moments, label) = measure_keys(&model, &args.model, &keys.text, KEY_TOKENS, &params)?;
                eprintln!("profile {}: keys {} measured on {label}", p.name, keys.describe());
                apply_profile_keys(&mut params, keys, &moments);
            }
        }
    }
    Ok(Opened { model, params, choice, identity, embedded: embedded_profile })
}

/// Tokens the keys' moments are measured over (`+ks`/`+kc`, a profile's `keys`): at most this many
/// of the text's first tokens.
pub const KEY_TOKENS: usize = 4096;

/// The keys' moments per layer and channel ([`crate::key_treatment::measure`]) over the first tokens
/// (at most `n_max`) of `text` (a named text or a file), with the text's label.
pub fn measure_keys(
    model: &Model,
    model_path: &Path,
    text: &str,
    n_max: usize,
    base: &ContextParams,
) -> anyhow::Result<(crate::key_treatment::KeyMoments, String)> {
    let (body, label) = load_text(text, model_path)?;
    let (moments, n) = crate::key_treatment::measure_text(model, &body, n_max, base)
        .with_context(|| format!("measuring the keys on {label}"))?;
    Ok((moments, format!("{n} tokens of {label}")))
}

/// Measures the keys of every configuration that asks for a treatment ([`CacheConfig::keys`]),
/// once per text (at most `n_max` tokens of it), and applies each treatment to its parameters.
pub fn measure_config_keys(
    configs: &mut [CacheConfig],
    model: &Model,
    model_path: &Path,
    n_max: usize,
    base: &ContextParams,
) -> anyhow::Result<()> {
    let mut measured: Vec<(String, crate::key_treatment::KeyMoments)> = Vec::new();
    for c in configs.iter_mut() {
        let Some(keys) = &c.keys else { continue };
        let moments = match measured.iter().position(|(t, _)| *t == keys.text) {
            Some(i) => &measured[i].1,
            None => {
                let (moments, label) = measure_keys(model, model_path, &keys.text, n_max, base)?;
                eprintln!("key shift and scale (+ks, +kc, profile keys): each layer's keys per channel over {label}");
                measured.push((keys.text.clone(), moments));
                &measured.last().expect("pushed").1
            }
        };
        apply_profile_keys(&mut c.params, keys, moments);
    }
    Ok(())
}

/// Puts a profile's key treatment, made of `moments`, into `params`.
pub fn apply_profile_keys(params: &mut ContextParams, keys: &ProfileKeys, moments: &crate::key_treatment::KeyMoments) {
    params.key_shift = keys.shift.then(|| moments.mean.clone());
    params.key_scale = keys.scale.map(|p| moments.scale(p));
}

/// Reads the text to run on; returns it with a label for reports.
pub fn load_text(spec: &str, model: &Path) -> anyhow::Result<(String, String)> {
    let cache = crate::assets::cache_dir();
    match NamedText::parse(spec) {
        Some(named) if named.is_chat() => {
            let (conversations, label) = named
                .conversations(&cache)
                .expect("a chat text")
                .with_context(|| format!("fetching the conversations of {spec}"))?;
            let text = render_conversations(model, &conversations).with_context(|| format!("rendering {spec}"))?;
            Ok((text, format!("{label}, rendered with the model's chat template")))
        }
        Some(named) => named.load(&cache).with_context(|| format!("fetching the text of {spec}")),
        None => {
            let text = std::fs::read_to_string(spec).with_context(|| format!("reading text file {spec}"))?;
            Ok((text, spec.to_string()))
        }
    }
}

/// Conversations as the model sees them when served: each rendered by its own chat template
/// (turns alternately the user's and the assistant's), one after another.
fn render_conversations(model: &Path, conversations: &[Vec<String>]) -> anyhow::Result<String> {
    let vocab = Model::load(Backend::init(), model, &ModelParams { metadata_only: true, ..ModelParams::default() })?;
    if vocab.chat_template().is_none() {
        bail!("{} has no chat template to render conversations with (use a plain text)", model.display());
    }
    let template = crate::chat::Template::for_model(&vocab, None)?;
    let mut out = String::new();
    for turns in conversations {
        let messages: Vec<ChatMessage> = turns
            .iter()
            .enumerate()
            .map(|(i, t)| ChatMessage {
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                content: t.clone(),
            })
            .collect();
        out.push_str(&template.render_conversation(&messages)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn against_specs_take_a_recent_window_a_key_shift_and_a_key_scale() {
        let s = parse_uniform("q8_0/kv3+w128", 4).unwrap();
        assert_eq!((s.k, s.v, s.key_shift), (CacheType::Q8_0, CacheType::Kv3, false));
        let w = s.window.unwrap();
        assert_eq!((w.layers, w.type_k, w.type_v), (vec![128; 4], CacheType::F16, CacheType::F16));
        let s = parse_uniform("q4_0+w64:q8_0", 2).unwrap();
        assert_eq!(s.window.unwrap().type_v, CacheType::Q8_0);
        assert!(parse_uniform("q4_0", 2).unwrap().window.is_none());
        for spec in ["kv3+ks+w128", "kv3+w128+ks"] {
            let s = parse_uniform(spec, 2).unwrap();
            assert!(s.key_shift && s.window.is_some(), "{spec}");
        }
        assert!(parse_uniform("q4_0+ks", 2).unwrap().key_shift);
        // a key scale: +kc is the square root of the deviation, +kcP another power
        assert_eq!(parse_uniform("q4_0+ks+kc", 2).unwrap().key_scale, Some(0.5));
        assert_eq!(parse_uniform("kv3+kc1+ks", 2).unwrap().key_scale, Some(1.0));
        assert_eq!(parse_uniform("kv3+ks", 2).unwrap().key_scale, None);
        // sinks: kept by the window, in either order
        for spec in ["kv3+w64+s4", "kv3+s4+w64"] {
            assert_eq!(parse_uniform(spec, 2).unwrap().window.map(|w| (w.layers[0], w.sinks)), Some((64, 4)), "{spec}");
        }
        assert_eq!(parse_uniform("kv3+w64", 2).unwrap().window.unwrap().sinks, 0);
        // a window on some layers only, named as it was spelled
        let w = parse_uniform("kv3+w64:q8_0@1/3-4+s4", 6).unwrap().window.unwrap();
        assert_eq!(w.layers, vec![0, 64, 0, 64, 64, 0]);
        assert_eq!(window_spec(&w), "+w64:q8_0@1/3/4+s4");
        assert_eq!(window_spec(&parse_uniform("kv3+w64", 2).unwrap().window.unwrap()), "+w64");
        for bad in [
            "q4_0+s4",
            "q4_0+w8+s0",
            "q4_0+w8+s4+s4",
            "q4_0+w",
            "q4_0+w0",
            "q4_0+wx",
            "q4_0+w8:nope",
            "q4_0+ks+ks",
            "q4_0+w8+w16",
            "q4_0+k",
            "q4_0+",
            "q4_0+kc0",
            "q4_0+kc-1",
            "q4_0+kcx",
            "q4_0+kc+kc",
            "q4_0+w8@",
            "q4_0+w8@2",
            "q4_0+w8@1/0",
            "q4_0+w8@1-0",
            "q4_0+w8@0/0",
            "q4_0+w8@x",
        ] {
            assert!(parse_uniform(bad, 2).is_err(), "{bad} must be refused");
        }
    }
}
