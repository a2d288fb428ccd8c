//! Turns the shared runtime flags (-m, -c, -ngl, -fa, -ctk, -ctv, -t, --kv-profile) into a
//! loaded model and context parameters.

use std::path::Path;

use anyhow::{bail, Context as _};

use crate::cli::{DeviceArgs, RuntimeArgs};
use kvtuner::assets::NamedText;
use kvtuner::cache_type::CacheType;
use kvtuner::gguf::{self, GgufHeader};
use kvtuner::llama::{Backend, Context, ContextParams, LayerCacheTypes, Model, ModelParams};
use kvtuner::profile::{EmbeddedProfile, ModelIdentity, Profile};

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

/// A model to compare cache configurations on (`ab`, `capacity`): its header and identity, the
/// model loaded on the devices of `devices`, and the context parameters every configuration starts
/// from (no embedded profile: each configuration names its types).
pub fn load_for_comparison(
    path: &Path,
    devices: &DeviceArgs,
) -> anyhow::Result<(GgufHeader, ModelIdentity, Model, ContextParams)> {
    let header = read_model_header(path)?;
    let identity = ModelIdentity::from_header(&header)?;
    let model = load_model(path, devices.n_gpu_layers, &devices.rpc)?;
    let base = ContextParams {
        n_threads: devices.threads,
        flash_attn: devices.flash_attn,
        no_kv_profile: true,
        ..Default::default()
    };
    Ok((header, identity, model, base))
}

/// Loads a model with `n_gpu_layers` offloaded to this machine's GPUs and then to the RPC servers
/// at `rpc` (HOST:PORT), which are connected first.
pub fn load_model(path: &Path, n_gpu_layers: i32, rpc: &[String]) -> anyhow::Result<Model> {
    let backend = Backend::init();
    let rpc = kvtuner::llama::rpc::add_servers(backend, rpc)?;
    Ok(Model::load(backend, path, &ModelParams { n_gpu_layers, rpc, ..ModelParams::default() })?)
}

/// One cache configuration to compare (`ab`, `capacity`): a uniform pair or a profile.
pub struct CacheConfig {
    pub name: String,
    pub is_profile: bool,
    pub params: ContextParams,
}

/// `T` (K and V) or `K/V`, as `--against` takes them.
fn parse_uniform(spec: &str) -> anyhow::Result<(CacheType, CacheType)> {
    let (k, v) = spec.split_once('/').unwrap_or((spec, spec));
    Ok((
        k.parse().with_context(|| format!("--against `{spec}`"))?,
        v.parse().with_context(|| format!("--against `{spec}`"))?,
    ))
}

/// The configurations of `--against` (uniform caches) and `--profile` (`auto`: the profile the
/// model embeds; or YAML files made for it) on top of `base`. `auto` alone on a model without a
/// profile is skipped with a note; among other profiles it is an error.
pub fn cache_configs(
    against: &[String],
    profiles: &[String],
    header: &GgufHeader,
    identity: &ModelIdentity,
    model: &Path,
    base: &ContextParams,
) -> anyhow::Result<Vec<CacheConfig>> {
    let mut configs = Vec::new();
    for spec in against {
        let (k, v) = parse_uniform(spec)?;
        let name = if k == v { k.to_string() } else { format!("{k}/{v}") };
        configs.push(CacheConfig {
            name,
            is_profile: false,
            params: ContextParams { type_k: k, type_v: v, ..base.clone() },
        });
    }
    for spec in profiles {
        if spec == "auto" {
            match EmbeddedProfile::from_header(header) {
                Some(p) if p.problems.is_empty() => configs.push(CacheConfig {
                    name: format!("profile {}", p.name.as_deref().unwrap_or("embedded")),
                    is_profile: true,
                    params: ContextParams { no_kv_profile: false, ..base.clone() },
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
                params: ContextParams { layer_types: Some(profile_layer_types(&profile)), ..base.clone() },
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
    /// differ from it (it fell back to uniform types); that is then said once on stderr.
    pub fn applied_profile(&self, ctx: &Context<'_>) -> String {
        if let (ProfileChoice::Auto { embedded: Some(name) }, Some(e)) = (&self.choice, &self.embedded) {
            let differs = ctx.layers().iter().zip(e.layers.iter().map(Some).chain(std::iter::repeat(None))).any(
                |(applied, wanted)| match (applied, wanted) {
                    (Some(a), Some(&(k, v))) => (Some(a.type_k), Some(a.type_v)) != (k, v),
                    (Some(_), None) => true,
                    (None, _) => false,
                },
            );
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

pub fn open(args: &RuntimeArgs) -> anyhow::Result<Opened> {
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
    let model = load_model(&args.model, args.device.n_gpu_layers, &args.device.rpc)?;
    let mut params = ContextParams {
        n_ctx: args.ctx_size,
        n_batch: 512.min(args.ctx_size),
        n_ubatch: 512.min(args.ctx_size),
        n_threads: args.device.threads,
        flash_attn: args.device.flash_attn,
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
        }
    }
    Ok(Opened { model, params, choice, identity, embedded: embedded_profile })
}

/// Reads the text to run on; returns it with a label for reports.
pub fn load_text(spec: &str) -> anyhow::Result<(String, String)> {
    match NamedText::parse(spec) {
        Some(named) => {
            named.load(&kvtuner::assets::cache_dir()).with_context(|| format!("fetching the text of {spec}"))
        }
        None => {
            let text = std::fs::read_to_string(spec).with_context(|| format!("reading text file {spec}"))?;
            Ok((text, spec.to_string()))
        }
    }
}
