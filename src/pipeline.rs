//! The whole job as one pipeline of typed stages: calibrate → candidates → measure → choose →
//! confirm → held-out report → profile. `kvtuner tune` runs all of it ([`tune`]); `search -m` and
//! `fit --text` start from a sensitivity table and run the rest through the same stages. A
//! measured profile can only come out of [`choose`], which measures the candidates with every
//! uniform cache of the budget, keeps a profile only if it beats them all, and measures the
//! profile's own types again before it returns; so a fix to the choice lands once.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::cache_type::CacheType;
use crate::calibrate::{self, CalibrateError, CalibrateOptions};
use crate::eval::{EvalError, Evaluator};
use crate::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use crate::llama::rpc;
use crate::llama::{Backend, Context, ContextParams, CreateContextError, LoadModelError, Model, ModelParams};
use crate::placement::{self, FitPlan, PlacementError};
use crate::profile::{
    Calibration, ComparedUniform, LayerTypes, Measured as ProfileMeasured, ModelIdentity, Profile, ProfileKeys,
    ProfileWindow,
};
use crate::runtime::Devices;
use crate::search::{self, SearchError};
use crate::select::{self, Candidate, HeldOut, Measured, Measurer, Problems, SelectError, SelectOptions, Selection};
use crate::sensitivity::Sensitivity;

/// What the profile must fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Budget {
    /// Bits per cached value over the whole model's cache.
    Bits(f64),
    /// GPU memory per offload device (one size for each, or one per device in order) for weights,
    /// compute buffers and the offloaded layers' caches at the target context; `-ngl` is chosen
    /// with the profile. Layers left on the CPU take `cpu_pairs`.
    Vram { sizes: Vec<u64>, cpu_pairs: String, max_kld: Option<f64> },
}

#[derive(Debug, Clone)]
pub struct TuneOptions {
    pub calibrate: CalibrateOptions,
    /// Allowed K-V pairs (of the GPU's layers with [`Budget::Vram`]): `cuda`, `cpu` or a list
    /// ([`search::parse_pairs`]).
    pub pairs: String,
    pub budget: Budget,
    /// Context the sizes are read at (the runtime's cells at this context).
    pub target_ctx: u32,
    /// Chunks of each held-out text.
    pub eval_chunks: usize,
    pub select: SelectOptions,
    /// Profile name (default: from the model and the bits per value).
    pub name: Option<String>,
    /// A sensitivity table measured before on this model and calibration text (e.g. by a `tune`
    /// at another budget): calibration is skipped.
    pub sensitivity: Option<Sensitivity>,
    /// With the window searched per layer and `sensitivity`: the table calibrated with the window
    /// on every layer (both calibrations are then skipped).
    pub sensitivity_window: Option<Sensitivity>,
    /// Where the model runs while it is measured (with [`Budget::Vram`], `n_gpu_layers` is where
    /// calibration runs; 0 = the most layers whose weights fit the budget).
    pub devices: Devices,
    /// A key treatment (patches 0018-0020) measured on the calibration text's first
    /// [`crate::runtime::KEY_TOKENS`] tokens and used by every measurement of the run (uniform
    /// caches compared included); the profile carries it.
    pub keys: Option<ProfileKeys>,
    /// A recent window on every layer (with its sinks) in every measurement of the run, uniform
    /// caches compared included, scored in ubatches of [`WINDOW_UBATCH`]; the profile carries it.
    pub window: Option<ProfileWindow>,
    /// The window searched per layer instead: the layers are calibrated without it and again with
    /// it on every layer, each layer keeps it where it takes more error off than a wider type of
    /// the same bytes would (the budget counts its bytes), and uniform caches compete with and
    /// without it on every layer. Needs a budget in bits and a calibration in the run.
    pub window_per_layer: bool,
    /// Tokens per chunk of the calibration text on which candidates are measured and chosen, and
    /// of the held-out checks (default: the calibration's chunks; with the window searched per
    /// layer, the target context, where a window is the share of each layer it will be).
    pub select_ctx: Option<u32>,
    /// Depths of passkeys hidden in the calibration text at the target context that a profile
    /// must retrieve as many of as the best uniform cache of the budget (empty: no veto).
    pub passkey_depths: Vec<f64>,
}

/// Tokens per ubatch a run with a recent window is scored in: each query then sees at least its
/// last W - 31 positions wide (a decode step sees W), where a 512-token ubatch would show most of
/// its queries none of the window's earlier positions.
pub const WINDOW_UBATCH: u32 = 32;

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
    #[error("loading the model")]
    Load(#[from] LoadModelError),
    #[error("connecting to the RPC servers")]
    Rpc(#[from] rpc::RpcError),
    #[error("placing layers within the GPU memory budget")]
    Placement(#[from] PlacementError),
    #[error("no -ngl fits {0}")]
    NoFit(String),
    #[error("the sensitivity table was measured on {table}, not on this model ({model}) and text ({text})")]
    ForeignTable { table: String, model: String, text: String },
    #[error("measuring the keys on the calibration text")]
    Keys(#[from] crate::key_treatment::KeyMeasureError),
    #[error("tokenizing the calibration text as the passkey haystack")]
    Haystack(#[from] crate::llama::TokenizeError),
    #[error("a window searched per layer needs {0}")]
    WindowSearch(&'static str),
}

/// Seconds each stage took.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub load: f64,
    pub calibrate: f64,
    /// Of `calibrate`: the decodes (and reading their logits back), and scoring the rows against
    /// the baseline; the rest is making contexts and the like.
    pub calibrate_decode: f64,
    pub calibrate_scoring: f64,
    pub select: f64,
    pub held_out: f64,
}

impl Timings {
    pub fn total(&self) -> f64 {
        self.load + self.calibrate + self.select + self.held_out
    }
}

/// Progress of the pipeline's stages.
pub enum Stage<'a> {
    /// Calibration: forward passes done and in all, the trial starting, and the estimated seconds
    /// left (after the first passes).
    Calibrate {
        done: usize,
        total: usize,
        what: &'a str,
        eta: Option<f64>,
    },
    Note(&'a str),
}

/// How a measured profile is described and bound.
#[derive(Debug, Clone)]
pub struct ProfileMeta {
    /// The pairs the search allowed, in words.
    pub pairs: String,
    pub target_ctx: u32,
    pub name: Option<String>,
    /// Replaces the chosen candidate's label in the description (e.g. `fit for 24 GiB at -ngl 40`).
    pub label: Option<String>,
    /// Devices, `-ngl` and flash attention of the measurements.
    pub measured_on: String,
}

/// A measured choice, confirmed: the selection and the profile made from it, whose own types were
/// measured again on the calibration text and reproduced the selection's KLD without exceeding
/// the best uniform cache. Only [`choose`] makes one.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub selection: Selection,
    pub profile: Profile,
}

impl Choice {
    /// The KLD the confirmation reproduced on the calibration text (recorded in the profile).
    pub fn confirmed_kld(&self) -> f64 {
        self.profile.measured.as_ref().and_then(|m| m.kld_confirmed).expect("choose() confirms")
    }

    /// Records a held-out check (the first one a profile keeps) in the profile.
    pub fn record_held_out(&mut self, check: &HeldOut) {
        let m = self.profile.measured.as_mut().expect("choose() records measurements");
        m.kld_mean = Some(check.chosen.kld());
        m.kld_eval_text = Some(check.text.clone());
        m.compared_uniform =
            Some(ComparedUniform { types: uniform_types(&check.uniform), kld_mean: check.uniform.kld() });
    }
}

fn uniform_types(m: &Measured) -> String {
    m.candidate.label.trim_start_matches("uniform ").to_string()
}

/// Measures `candidates` (with every uniform cache of the budget among them) on the calibration
/// measurer, chooses the lowest measured KLD (a profile only if it beats every uniform cache),
/// makes the profile and measures its types again: the stage every measured profile goes through.
pub fn choose(
    cal: &mut Measurer<'_, '_>,
    sens: &Sensitivity,
    candidates: &[Candidate],
    max_bytes: u64,
    opts: SelectOptions,
    meta: &ProfileMeta,
) -> Result<Choice, SelectError> {
    if candidates.is_empty() {
        return Err(SelectError::NothingFits { max_bytes, smallest: 0 });
    }
    let selection = select::select_among(cal, candidates, max_bytes, opts)?;
    let chosen = Chosen {
        label: meta.label.as_deref().unwrap_or(&selection.chosen.candidate.label),
        ..(&selection.chosen).into()
    };
    let mut profile = profile_for(sens, chosen, &meta.pairs, meta.target_ctx, meta.name.clone());
    // the profile's own types, measured again without the memo: the bound it claims
    let types: Vec<_> = profile.layers.iter().map(|l| (l.k, l.v)).collect();
    let confirmed_kld = cal.confirm(&types, &selection)?;
    let m = profile.measured.as_mut().expect("profile_for records measurements");
    m.kld_confirmed = Some(confirmed_kld);
    m.uniform_calibration =
        selection.best_uniform.as_ref().map(|u| ComparedUniform { types: uniform_types(u), kld_mean: u.kld() });
    m.measured_on = Some(meta.measured_on.clone());
    Ok(Choice { selection, profile })
}

/// The held-out stage: the choice, the uniform cache `against` and `heuristic` (if any) measured
/// on each text (never used to choose); the first check is recorded in the profile.
#[allow(clippy::too_many_arguments)]
pub fn held_out(
    model: &Model,
    texts: &[(String, String)],
    n_ctx: u32,
    chunks: usize,
    base: &ContextParams,
    window: Option<&ProfileWindow>,
    target_ctx: u32,
    choice: &mut Choice,
    heuristic: Option<Candidate>,
    progress: &mut dyn FnMut(Stage<'_>),
) -> Result<Vec<HeldOut>, SelectError> {
    let mut checks = Vec::new();
    for (text, label) in texts {
        progress(Stage::Note(&format!("held-out check on {label}")));
        let mut ev = Evaluator::new(model, text, n_ctx, chunks, base)?;
        let mut m = Measurer::new(&mut ev, base.clone(), target_ctx, label.clone()).with_window(window.cloned());
        checks.extend(held_out_on(std::slice::from_mut(&mut m), choice, heuristic.clone())?);
    }
    Ok(checks)
}

/// [`held_out`] on measurers of held-out texts the caller keeps (to measure more on them).
pub fn held_out_on(
    held: &mut [Measurer<'_, '_>],
    choice: &mut Choice,
    heuristic: Option<Candidate>,
) -> Result<Vec<HeldOut>, SelectError> {
    let against = choice.selection.best_uniform.as_ref().unwrap_or(&choice.selection.chosen).candidate.clone();
    let mut checks = Vec::new();
    for m in held.iter_mut() {
        checks.push(select::held_out_with(m, &choice.selection, &against, heuristic.clone())?);
    }
    if let (Some(first), true) =
        (checks.first(), choice.profile.measured.as_ref().is_some_and(|m| m.kld_mean.is_none()))
    {
        choice.record_held_out(first);
    }
    Ok(checks)
}

/// Each layer's cache device as the runtime places it for `model` (empty for a layer without a
/// cache), read back from a small context.
pub fn layer_devices(model: &Model) -> Result<Vec<String>, CreateContextError> {
    let ctx = Context::new(model, &ContextParams { n_ctx: 256, no_kv_profile: true, ..Default::default() })?;
    Ok(ctx.layers().iter().map(|i| i.map_or_else(String::new, |i| i.device.to_string())).collect())
}

/// Devices, `-ngl` and flash attention as measured: `CUDA0 (-ngl 99 -fa on)`, `CPU`.
pub fn measured_on(model: &Model, devices: &Devices, n_gpu_layers: i32) -> Result<String, CreateContextError> {
    let mut names: Vec<String> = Vec::new();
    for d in layer_devices(model)?.into_iter().filter(|d| !d.is_empty()) {
        if !names.contains(&d) {
            names.push(d);
        }
    }
    let how = Devices { n_gpu_layers, ..devices.clone() }.describe();
    Ok(if how == "CPU" { names.join(", ") } else { format!("{} ({how})", names.join(", ")) })
}

#[derive(Debug, Clone, Serialize)]
pub struct Tuned {
    pub sensitivity: Sensitivity,
    /// With the window searched per layer: the calibration with the window on every layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity_window: Option<Sensitivity>,
    pub choice: Choice,
    pub held_out: Vec<HeldOut>,
    /// The `-ngl` the profile was measured and is meant to run at.
    pub n_gpu_layers: i32,
    /// With a VRAM budget: every `-ngl`'s placement and the uniform baselines.
    pub fit: Option<FitPlan>,
    pub seconds: Timings,
}

/// Runs the whole pipeline on the model at `model_path`. `calibration` is (text, label);
/// `held_out` texts are only measured, never used to choose. `resume` is the calibration's
/// journal file.
pub fn tune(
    model_path: &Path,
    identity: &ModelIdentity,
    calibration: (&str, &str),
    held_out_texts: &[(String, String)],
    opts: &TuneOptions,
    resume: Option<&Path>,
    progress: &mut dyn FnMut(Stage<'_>),
) -> Result<Tuned, TuneError> {
    let t0 = Instant::now();
    let rpc = rpc::add_servers(Backend::init(), &opts.devices.rpc)?;
    let load = |ngl: i32| -> Result<Model, TuneError> {
        let params = ModelParams { n_gpu_layers: ngl, rpc: rpc.clone(), ..Default::default() };
        Ok(Model::load(Backend::init(), model_path, &params)?)
    };
    let mut copts = CalibrateOptions { text_label: calibration.1.to_string(), ..opts.calibrate.clone() };

    // With a VRAM budget and no -ngl, calibration runs with the most layers whose weights fit.
    let mut ngl = opts.devices.n_gpu_layers;
    if let Budget::Vram { sizes, .. } = &opts.budget {
        if ngl == 0 {
            let (costs, budget) = placement::costs_and_budget(model_path, &rpc, identity.layers, copts.n_ctx, sizes)?;
            ngl = placement::most_layers_fitting(&costs, &budget)?;
            progress(Stage::Note(&format!(
                "calibrating at -ngl {ngl}: the most layers whose weights, compute buffers and f16 cache at context {} fit the budget",
                copts.n_ctx
            )));
        }
    }
    let model = load(ngl)?;
    let t_loaded = Instant::now();
    // the key treatment: in every context of the run; a sensitivity table says it was measured
    // with it (its text label), so one measured without is not taken for one measured with
    if let Some(keys) = &opts.keys {
        let (moments, n) =
            crate::key_treatment::measure_text(&model, calibration.0, crate::runtime::KEY_TOKENS, &copts.base)?;
        crate::runtime::apply_profile_keys(&mut copts.base, keys, &moments);
        copts.text_label = format!("{} (keys: {})", calibration.1, keys.describe());
        progress(Stage::Note(&format!("keys: {} measured on {n} tokens of {}", keys.describe(), calibration.1)));
    }
    // the recent window: likewise, and labelled likewise; searched per layer, the run measures
    // without it and calibrates a second time with it on every layer
    let per_layer = opts.window.as_ref().filter(|_| opts.window_per_layer);
    if opts.window_per_layer && opts.window.is_none() {
        return Err(TuneError::WindowSearch("a window (its size and types)"));
    }
    // candidates are chosen (and checked held out) on chunks of the context they are meant for
    // when asked, or by default for a window searched per layer: its share of a full-context
    // layer, and so what it is worth, depends on the chunk length (bench/tune-window-per-layer.md)
    let select_ctx = opts.select_ctx.unwrap_or(if per_layer.is_some() { opts.target_ctx } else { copts.n_ctx });
    if per_layer.is_some() {
        if opts.sensitivity.is_some() != opts.sensitivity_window.is_some() {
            return Err(TuneError::WindowSearch(
                "both calibrations, in the run or as tables (--sensitivity and --sensitivity-window), not one",
            ));
        }
        if !matches!(opts.budget, Budget::Bits(_)) {
            return Err(TuneError::WindowSearch("a --budget in bits per value"));
        }
        // a window's share of a layer at the chunk length is what the choice sees, not at -c
        if select_ctx < opts.target_ctx {
            progress(Stage::Note(&format!(
                "note: the window is chosen on {select_ctx}-token chunks, where it is a larger share of each \
                 full-context layer than at {} tokens (bench/tune-window-per-layer.md); --select-ctx {} chooses it \
                 where it will run",
                opts.target_ctx, opts.target_ctx
            )));
        }
    }
    let mut window_copts = None;
    if let Some(w) = &opts.window {
        let described = w.describe(identity.layers);
        copts.base.n_ubatch = copts.base.n_ubatch.min(WINDOW_UBATCH);
        let mut windowed = copts.clone();
        windowed.base.window = Some(crate::runtime::recent_window(w, identity.layers));
        windowed.text_label = format!("{} (window: {described})", copts.text_label);
        if per_layer.is_some() {
            copts.text_label = format!("{} (window per layer: {described}; measured without)", copts.text_label);
            window_copts = Some(windowed);
        } else {
            copts = windowed;
        }
    }
    let calibration = (calibration.0, copts.text_label.as_str());
    let base = copts.base.clone();

    progress(Stage::Note("baseline (f16 cache) on the calibration text"));
    let mut ev = Evaluator::new(&model, calibration.0, copts.n_ctx, copts.chunks, &base)?;
    let started = Instant::now();
    let sens = match &opts.sensitivity {
        Some(table) => {
            same_source(table, identity, calibration.1)?;
            progress(Stage::Note("calibration: the sensitivity table given"));
            table.clone()
        }
        None => {
            // the rate from the passes run here (a resumed run skips some)
            let mut first: Option<usize> = None;
            calibrate::calibrate_with(&mut ev, identity, &copts, resume, &mut |done, total, what| {
                let from = *first.get_or_insert(done);
                let elapsed = started.elapsed().as_secs_f64();
                let eta =
                    (done >= from + 3 && done < total).then(|| elapsed / (done - from) as f64 * (total - done) as f64);
                progress(Stage::Calibrate { done, total, what, eta })
            })?
        }
    };
    let (mut calibrate_decode, mut calibrate_scoring) = (ev.decode_seconds, ev.forward_seconds - ev.decode_seconds);
    let sens_window = match (&window_copts, &opts.sensitivity_window) {
        (Some(wopts), Some(table)) => {
            same_source(table, identity, &wopts.text_label)?;
            progress(Stage::Note("calibration with the window: the table given"));
            Some(table.clone())
        }
        (Some(wopts), None) => {
            progress(Stage::Note("calibrating again with the window on every layer"));
            let mut ev_w = Evaluator::new(&model, calibration.0, wopts.n_ctx, wopts.chunks, &wopts.base)?;
            let table = calibrate::calibrate_with(&mut ev_w, identity, wopts, None, &mut |done, total, what| {
                progress(Stage::Calibrate { done, total, what, eta: None })
            })?;
            calibrate_decode += ev_w.decode_seconds;
            calibrate_scoring += ev_w.forward_seconds - ev_w.decode_seconds;
            Some(table)
        }
        (None, _) => None,
    };
    let t1 = Instant::now();
    let select_label = match select_ctx == copts.n_ctx {
        true => calibration.1.to_string(),
        false => {
            progress(Stage::Note(&format!("choosing on {select_ctx}-token chunks of {}", calibration.1)));
            ev = Evaluator::new(&model, calibration.0, select_ctx, copts.chunks, &base)?;
            format!("{} in {select_ctx}-token chunks", calibration.1)
        }
    };

    let gpu_pairs = search::parse_pairs(&opts.pairs, &sens.types, search::CUDA_FA_PAIRS)?;
    let cells = runtime_cells(&model, opts.target_ctx, RUNTIME_UBATCH)?;
    let problems = match (&sens_window, &window_copts) {
        (Some(windowed), Some(wopts)) => {
            let window = wopts.base.window.as_ref().expect("set above");
            let window_bytes = crate::kv_layout::runtime_window_bytes(&model, opts.target_ctx, RUNTIME_UBATCH, window)?;
            Problems::with_window(&sens, windowed, &cells, &window_bytes, &gpu_pairs)?
        }
        _ => Problems::new(&sens, &cells, &gpu_pairs)?,
    };
    let mut meta = ProfileMeta {
        pairs: opts.pairs.clone(),
        target_ctx: opts.target_ctx,
        name: opts.name.clone(),
        label: None,
        measured_on: String::new(),
    };
    let veto = match opts.passkey_depths.is_empty() {
        true => None,
        false => {
            let veto = select::PasskeyVeto::new(
                model.tokenize(calibration.0, false, false)?,
                opts.target_ctx,
                &opts.passkey_depths,
            );
            progress(Stage::Note(&format!(
                "passkey veto: {} key(s) at {} tokens in the calibration text, for the best uniform cache and each \
                 configuration of lower KLD until one finds as many",
                veto.cases.len(),
                opts.target_ctx
            )));
            Some(veto)
        }
    };
    let stages = Stages {
        veto,
        opts,
        sens: &sens,
        label: &select_label,
        held_out_texts,
        n_ctx: select_ctx,
        base: &base,
        window: per_layer.cloned(),
    };
    let (mut choice, held, n_gpu_layers, fit, t2) = match &opts.budget {
        Budget::Bits(bits) => {
            let max_bytes = select::bytes_at_bits(problems.main(), *bits);
            let candidates = select::candidates(&problems, max_bytes, opts.select)?;
            let heuristic = problems.heuristic(max_bytes)?;
            let picked =
                stages.choose_and_check(&model, &mut ev, ngl, &candidates, max_bytes, heuristic, meta, progress)?;
            (picked.0, picked.1, ngl, None, picked.2)
        }
        Budget::Vram { sizes, cpu_pairs: cpu_spec, max_kld } => {
            let cpu_pairs = search::parse_pairs(cpu_spec, &sens.types, search::CUDA_FA_PAIRS)?;
            let target = placement::FitTarget {
                n_ctx: opts.target_ctx,
                vram: sizes,
                gpu_pairs: &gpu_pairs,
                cpu_pairs: &cpu_pairs,
                max_predicted: *max_kld,
            };
            let plan = placement::plan(problems.main(), model_path, &rpc, target)?;
            let Some(chosen) = plan.chosen().cloned() else {
                return Err(TuneError::NoFit(format!("{:?} bytes of GPU memory", sizes)));
            };
            let estimator = problems.by_estimator[0].0;
            let candidates = placement::same_budget_candidates(
                problems.main(),
                estimator,
                &chosen,
                &gpu_pairs,
                &cpu_pairs,
                &plan.budget,
            )?;
            meta.label = Some(format!("fit at -ngl {}", chosen.ngl));
            meta.pairs = format!("{} on the GPU, {} on the CPU", opts.pairs, cpu_spec);
            let kv_budget = chosen.kv_budget.unwrap_or(0);
            // measured where it will run: at the pick's -ngl; -ngl 99 and -ngl 33 offload the same
            // of a 32-layer model, and then the calibration's model and baseline serve
            let offloaded = |n: i32| if n < 0 { identity.layers as i32 + 1 } else { n.min(identity.layers as i32 + 1) };
            let picked = if offloaded(chosen.ngl) == offloaded(ngl) {
                stages.choose_and_check(&model, &mut ev, chosen.ngl, &candidates, kv_budget, None, meta, progress)?
            } else {
                drop(ev);
                progress(Stage::Note(&format!("loading the model at the pick's -ngl {}", chosen.ngl)));
                let at_pick = load(chosen.ngl)?;
                let mut ev = Evaluator::new(&at_pick, calibration.0, select_ctx, copts.chunks, &base)?;
                stages.choose_and_check(&at_pick, &mut ev, chosen.ngl, &candidates, kv_budget, None, meta, progress)?
            };
            (picked.0, picked.1, chosen.ngl, Some(plan), picked.2)
        }
    };
    choice.profile.keys = opts.keys.clone();
    choice.profile.window = match per_layer {
        // the layers the chosen configuration keeps the window on (none: no window)
        Some(w) => {
            let on = &choice.selection.chosen.candidate.windowed;
            (!on.is_empty())
                .then(|| ProfileWindow { layers: (on.len() < identity.layers).then(|| on.clone()), ..w.clone() })
        }
        None => opts.window.clone(),
    };
    let seconds = Timings {
        load: (t_loaded - t0).as_secs_f64(),
        calibrate: (t1 - t_loaded).as_secs_f64(),
        calibrate_decode,
        calibrate_scoring,
        select: (t2 - t1).as_secs_f64(),
        held_out: t2.elapsed().as_secs_f64(),
    };
    Ok(Tuned { sensitivity: sens, sensitivity_window: sens_window, choice, held_out: held, n_gpu_layers, fit, seconds })
}

/// A table given for a calibration must have been measured on this model and on `text` (its
/// label names the text and how it was measured: key treatment, window).
fn same_source(table: &Sensitivity, identity: &ModelIdentity, text: &str) -> Result<(), TuneError> {
    if table.model.fingerprint != identity.fingerprint || table.text != text {
        return Err(TuneError::ForeignTable {
            table: format!("{} ({})", table.model.fingerprint, table.text),
            model: identity.fingerprint.clone(),
            text: text.to_string(),
        });
    }
    Ok(())
}

/// What [`tune`]'s last stages share, whatever the budget.
struct Stages<'a> {
    opts: &'a TuneOptions,
    sens: &'a Sensitivity,
    /// The calibration text's label.
    label: &'a str,
    held_out_texts: &'a [(String, String)],
    n_ctx: u32,
    base: &'a ContextParams,
    /// The window a candidate's windowed layers keep (searched per layer).
    window: Option<ProfileWindow>,
    veto: Option<select::PasskeyVeto>,
}

impl Stages<'_> {
    /// Chooses among `candidates` on the calibration evaluator `ev` of `model` (at `-ngl ngl`),
    /// confirms, then reports on the held-out texts. Returns the choice, the checks and when the
    /// choice was made.
    #[allow(clippy::too_many_arguments)]
    fn choose_and_check(
        &self,
        model: &Model,
        ev: &mut Evaluator<'_>,
        ngl: i32,
        candidates: &[Candidate],
        max_bytes: u64,
        heuristic: Option<Candidate>,
        mut meta: ProfileMeta,
        progress: &mut dyn FnMut(Stage<'_>),
    ) -> Result<(Choice, Vec<HeldOut>, Instant), TuneError> {
        let opts = self.opts;
        meta.measured_on = measured_on(model, &opts.devices, ngl)?;
        let mut cal = Measurer::new(ev, self.base.clone(), opts.target_ctx, self.label)
            .with_window(self.window.clone())
            .with_passkey_veto(self.veto.clone());
        let mut choice = choose(&mut cal, self.sens, candidates, max_bytes, opts.select, &meta)?;
        let verdict = choice.selection.verdict();
        // with a VRAM budget the -ngl is part of the answer
        let note = match opts.budget {
            Budget::Vram { .. } => format!("-ngl {ngl}: {verdict}"),
            Budget::Bits(_) => verdict,
        };
        progress(Stage::Note(&note));
        let chosen_at = Instant::now();
        let held = held_out(
            model,
            self.held_out_texts,
            self.n_ctx,
            opts.eval_chunks,
            self.base,
            self.window.as_ref(),
            opts.target_ctx,
            &mut choice,
            heuristic,
            progress,
        )?;
        Ok((choice, held, chosen_at))
    }
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

/// A chosen configuration as a profile bound to the calibrated model (a held-out check is
/// recorded later, by [`Choice::record_held_out`]).
pub fn profile_for(
    sens: &Sensitivity,
    chosen: Chosen<'_>,
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
        window: None,
        keys: None,
        measured: Some(ProfileMeasured {
            bits_per_value: bits,
            kv_bytes: chosen.kv_bytes,
            context: target_ctx,
            predicted_kld: chosen.predicted,
            kld_calibration: chosen.kld_calibration,
            ..Default::default()
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
