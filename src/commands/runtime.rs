//! Turns the shared runtime flags (-m, -c, -ngl, -fa, -ctk, -ctv, -t, --kv-profile) into a
//! loaded model and context parameters.

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use crate::cli::RuntimeArgs;
use kvtuner::gguf;
use kvtuner::llama::{Backend, ContextParams, LayerCacheTypes, Model, ModelParams};
use kvtuner::profile::{ModelIdentity, Profile};

/// Which per-layer profile a context gets.
pub enum ProfileChoice {
    /// Whatever the model embeds (the runtime applies it), or uniform types if none.
    Auto { embedded: Option<String> },
    /// Uniform -ctk/-ctv.
    Off,
    /// A profile file.
    File(Box<Profile>),
}

impl ProfileChoice {
    pub fn describe(&self) -> String {
        match self {
            ProfileChoice::Auto { embedded: Some(name) } => format!("{name} (embedded in the model)"),
            ProfileChoice::Auto { embedded: None } => "none (uniform -ctk/-ctv)".into(),
            ProfileChoice::Off => "off (uniform -ctk/-ctv)".into(),
            ProfileChoice::File(p) => format!("{} (from file)", p.name),
        }
    }
}

pub struct Opened {
    pub model: Model,
    pub params: ContextParams,
    pub choice: ProfileChoice,
}

pub fn open(args: &RuntimeArgs) -> anyhow::Result<Opened> {
    let header = gguf::read_header(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let choice = match args.kv_profile.as_str() {
        "auto" => ProfileChoice::Auto {
            embedded: header
                .get_str_array("kvtuner.cache.type_k")
                .map(|_| header.get_str("kvtuner.profile.name").unwrap_or("unnamed").to_string()),
        },
        "off" => ProfileChoice::Off,
        path => {
            let profile = Profile::load(PathBuf::from(path))?;
            let identity = ModelIdentity::from_header(&header)?;
            profile
                .check_model(&identity)
                .with_context(|| format!("profile {path} does not fit {}", args.model.display()))?;
            ProfileChoice::File(Box::new(profile))
        }
    };
    let model = Model::load(
        Backend::init(),
        &args.model,
        &ModelParams { n_gpu_layers: args.n_gpu_layers, ..ModelParams::default() },
    )?;
    let mut params = ContextParams {
        n_ctx: args.ctx_size,
        n_batch: 512.min(args.ctx_size),
        n_ubatch: 512.min(args.ctx_size),
        n_threads: args.threads,
        flash_attn: args.flash_attn,
        type_k: args.cache_type_k,
        type_v: args.cache_type_v,
        ..ContextParams::default()
    };
    match &choice {
        ProfileChoice::Auto { .. } => {}
        ProfileChoice::Off => params.no_kv_profile = true,
        ProfileChoice::File(p) => {
            if p.layers.len() != model.n_layer() as usize {
                bail!("profile {} has {} layers, the model has {}", p.name, p.layers.len(), model.n_layer());
            }
            params.layer_types = Some(LayerCacheTypes {
                k: p.layers.iter().map(|l| l.k).collect(),
                v: p.layers.iter().map(|l| l.v).collect(),
            });
        }
    }
    Ok(Opened { model, params, choice })
}

/// Reads the text to run on; returns it with a label for reports.
pub fn load_text(spec: &str) -> anyhow::Result<(String, String)> {
    match spec {
        "lee-calibration" | "lee-evaluation" => {
            let split =
                kvtuner::assets::load_split(&kvtuner::assets::cache_dir()).context("fetching the Lee corpus")?;
            Ok(if spec == "lee-calibration" {
                (split.calibration.clone(), split.calibration_label())
            } else {
                (split.evaluation.clone(), split.evaluation_label())
            })
        }
        path => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading text file {path}"))?;
            Ok((text, path.to_string()))
        }
    }
}
