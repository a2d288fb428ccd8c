//! The whole job: calibrate → search → measured selection → held-out check → profile. `kvtuner
//! tune` runs it; tests call it directly.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::cache_type::CacheType;
use crate::calibrate::{self, CalibrateError, CalibrateOptions};
use crate::eval::{EvalError, Evaluator};
use crate::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use crate::llama::{CreateContextError, Model};
use crate::profile::{Calibration, ComparedUniform, LayerTypes, Measured as ProfileMeasured, ModelIdentity, Profile};
use crate::search::{self, SearchError};
use crate::select::{self, HeldOut, Measured, Measurer, Problems, SelectError, SelectOptions, Selection};
use crate::sensitivity::Sensitivity;

#[derive(Debug, Clone)]
pub struct TuneOptions {
    pub calibrate: CalibrateOptions,
    /// Allowed K-V pairs (`cuda`, `cpu` or a list; see [`search::parse_pairs`]).
    pub pairs: String,
    /// Bits per cached value the profile may use.
    pub budget_bits: f64,
    /// Context the sizes are read at (the runtime's cells at this context).
    pub target_ctx: u32,
    /// Chunks of each held-out text.
    pub eval_chunks: usize,
    pub select: SelectOptions,
    /// Profile name (default: from the model and the bits per value).
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("calibrating")]
    Calibrate(#[from] CalibrateError),
    #[error("searching")]
    Search(#[from] SearchError),
    #[error("selecting by measurement")]
    Select(#[from] SelectError),
    #[error("held-out text")]
    Eval(#[from] EvalError),
    #[error("reading the KV cache layout from the runtime")]
    Context(#[from] CreateContextError),
}

/// Seconds each stage took.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub calibrate: f64,
    pub select: f64,
    pub held_out: f64,
}

impl Timings {
    pub fn total(&self) -> f64 {
        self.calibrate + self.select + self.held_out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Tuned {
    pub sensitivity: Sensitivity,
    pub selection: Selection,
    pub held_out: Vec<HeldOut>,
    /// The chosen configuration as a profile bound to the model (uniform when no profile won).
    pub profile: Profile,
    pub seconds: Timings,
}

/// Stages of [`tune`], for progress reports.
pub enum Stage<'a> {
    /// A calibration trial: (done, total, what).
    Calibrate(usize, usize, &'a str),
    Note(&'a str),
}

/// Runs the pipeline. `calibration` is (text, label); `held_out` texts are only measured, never
/// used to choose. `resume` is the calibration's journal file.
pub fn tune(
    model: &Model,
    identity: &ModelIdentity,
    calibration: (&str, &str),
    held_out: &[(String, String)],
    opts: &TuneOptions,
    resume: Option<&Path>,
    progress: &mut dyn FnMut(Stage<'_>),
) -> Result<Tuned, TuneError> {
    let t0 = Instant::now();
    let copts = CalibrateOptions { text_label: calibration.1.to_string(), ..opts.calibrate.clone() };
    progress(Stage::Note("baseline (f16 cache) on the calibration text"));
    let mut ev = Evaluator::new(model, calibration.0, copts.n_ctx, copts.chunks, &copts.base)?;
    let sens = calibrate::calibrate_with(&mut ev, identity, &copts, resume, &mut |d, t, w| {
        progress(Stage::Calibrate(d, t, w))
    })?;
    let t1 = Instant::now();

    let pairs = search::parse_pairs(&opts.pairs, &sens.types, search::CUDA_FA_PAIRS)?;
    let cells = runtime_cells(model, opts.target_ctx, RUNTIME_UBATCH)?;
    let problems = Problems::new(&sens, &cells, &pairs)?;
    let max_bytes = select::bytes_at_bits(problems.main(), opts.budget_bits);
    let base = copts.base.clone();
    let mut cal = Measurer::new(&mut ev, base.clone(), opts.target_ctx, calibration.1);
    let selection = select::select(&mut cal, &problems, max_bytes, opts.select)?;
    progress(Stage::Note(&selection.verdict()));
    let t2 = Instant::now();

    let mut checks = Vec::new();
    let comparator = selection.best_uniform.clone().unwrap_or_else(|| selection.chosen.clone());
    for (text, label) in held_out {
        progress(Stage::Note(&format!("held-out check on {label}")));
        let mut ev = Evaluator::new(model, text, copts.n_ctx, opts.eval_chunks, &base)?;
        let mut m = Measurer::new(&mut ev, base.clone(), opts.target_ctx, label.clone());
        checks.push(select::held_out(&mut m, &problems, &selection, &comparator.candidate)?);
    }
    let seconds = Timings {
        calibrate: (t1 - t0).as_secs_f64(),
        select: (t2 - t1).as_secs_f64(),
        held_out: t2.elapsed().as_secs_f64(),
    };
    let profile =
        profile_for(&sens, (&selection.chosen).into(), checks.first(), &opts.pairs, opts.target_ctx, opts.name.clone());
    // the profile's own types, measured again on the calibration text: the bound it claims
    let types: Vec<_> = profile.layers.iter().map(|l| (l.k, l.v)).collect();
    let kld = cal.confirm(&types, &selection)?;
    progress(Stage::Note(&format!("confirmed: the profile measured again on {}: KLD {kld:.6}", calibration.1)));
    Ok(Tuned { sensitivity: sens, selection, held_out: checks, profile, seconds })
}

/// What a profile is made from: a measured choice, or a predicted pick (no measurement).
#[derive(Debug, Clone, Copy)]
pub struct Chosen<'a> {
    pub types: &'a [(CacheType, CacheType)],
    pub label: &'a str,
    pub bits_per_value: f64,
    pub kv_bytes: u64,
    pub predicted: Option<f64>,
    /// Measured mean KLD on the calibration text (`None` for a predicted pick).
    pub kld_calibration: Option<f64>,
}

impl<'a> From<&'a Measured> for Chosen<'a> {
    fn from(m: &'a Measured) -> Chosen<'a> {
        Chosen {
            types: &m.candidate.types,
            label: &m.candidate.label,
            bits_per_value: m.kv.bits_per_value(),
            kv_bytes: m.kv.tensor_bytes,
            predicted: m.candidate.predicted,
            kld_calibration: Some(m.kld()),
        }
    }
}

/// A chosen configuration as a profile bound to the calibrated model. The KLD recorded is the
/// held-out one when there is a check, with the uniform configuration it was compared against.
pub fn profile_for(
    sens: &Sensitivity,
    chosen: Chosen<'_>,
    check: Option<&HeldOut>,
    pairs: &str,
    target_ctx: u32,
    name: Option<String>,
) -> Profile {
    let bits = chosen.bits_per_value;
    let model_name = sens.model.name.as_deref().unwrap_or(&sens.model.architecture).replace(' ', "-").to_lowercase();
    let first = chosen.types.first().copied().unwrap_or((CacheType::F16, CacheType::F16));
    let name = name.unwrap_or_else(|| match chosen.types.iter().all(|t| *t == first) {
        true => format!("{model_name}-uniform-{}-{}", first.0, first.1),
        false => format!("{model_name}-{bits:.1}bpv"),
    });
    Profile {
        name,
        description: Some(format!("kvtuner search over pairs `{pairs}` at context {target_ctx}: {}", chosen.label)),
        layers: chosen.types.iter().map(|&(k, v)| LayerTypes { k, v }).collect(),
        measured: Some(ProfileMeasured {
            bits_per_value: bits,
            kv_bytes: chosen.kv_bytes,
            context: target_ctx,
            kld_mean: check.map(|h| h.chosen.kld()),
            kld_eval_text: check.map(|h| h.text.clone()),
            predicted_kld: chosen.predicted,
            kld_calibration: chosen.kld_calibration,
            compared_uniform: check.map(|h| ComparedUniform {
                types: h.uniform.candidate.label.trim_start_matches("uniform ").to_string(),
                kld_mean: h.uniform.kld(),
            }),
        }),
        calibration: Some(Calibration {
            text: sens.text.clone(),
            context: sens.context,
            chunks: sens.chunks,
            types: sens.types.clone(),
            pairs: Some(pairs.to_string()),
        }),
        ..Profile::uniform(&sens.model, CacheType::F16, CacheType::F16, "")
    }
}
