//! Per-layer K/V sensitivity, measured end to end on real text at a low cost.
//!
//! Estimator: for every layer, one forward pass with only that layer's K at the narrowest
//! candidate type (the rest at the background type, f16 or q8_0), and one with only its V there
//! — `2·L` passes per chunk on the first `layer_chunks` chunks; they give each layer's share of
//! the error. For every quantized type, one uniform "anchor" pass for K (all K at t, V f16) and
//! one for V fix the scale, on every chunk (the scale is what heavy-tailed, text-dependent errors
//! move most, and it costs only `2·(T−1)` passes): a layer's predicted ΔKLD at type t is its share
//! times the uniform error at t. Total per chunk: `1 + 2·L + 2·(T−1)` passes (plus one for a
//! q8_0 background) instead of `1 + 2·L·(T−1)`. The measured selection ([`crate::select`]) then
//! verifies what the sums predict.
//!
//! Results are appended to `<output>.partial` as they come, so an interrupted run resumes.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cache_type::CacheType;
use crate::eval::{EvalError, Evaluator};
use crate::kv_layout::{runtime_cells, KvLayout, RUNTIME_UBATCH};
use crate::llama::{ContextParams, CreateContextError, LayerCacheTypes, Model};
use crate::profile::ModelIdentity;
use crate::sensitivity::{Anchor, LayerSensitivity, Quality, Sensitivity, SCHEMA_VERSION};

#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    pub n_ctx: u32,
    /// Chunks of the text for the uniform runs (and the evaluator).
    pub chunks: usize,
    /// Chunks for the single-layer runs (the first ones; at most `chunks`).
    pub layer_chunks: usize,
    /// Tokens per chunk of the single-layer runs (at most `n_ctx`; each is the start of one of
    /// the calibration chunks). A shorter chunk costs that fraction of a pass, and the
    /// single-layer runs are `2·L` of a calibration's passes. They only give each layer's
    /// *share* of the error; at half the context that ranking moved a little (bench/tune-cpu.md:
    /// Gemma's held-out choice better, Qwen's 7-15% worse than at the whole context), at three
    /// quarters (tune's default) both models chose as well as at the whole context.
    pub layer_ctx: u32,
    /// The single-layer runs score every `layer_stride`-th position of those chunks (1: all);
    /// the others compute no logits, which is a large share of a pass for big vocabularies.
    pub layer_stride: usize,
    /// What the other layers hold during a single-layer run: f16, or q8_0 (a layer's share is
    /// then its change from the all-q8_0 cache, which is where profiles near 7 bits live).
    pub background: CacheType,
    /// Candidate types; f16 is always included (as the reference).
    pub types: Vec<CacheType>,
    /// Base context parameters (threads, flash attention, GPU offload of the KV cache).
    pub base: ContextParams,
    /// Label of the calibration text (goes into the table).
    pub text_label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("candidate types must include at least one quantized type besides f16 (got {0:?})")]
    NoQuantizedType(Vec<CacheType>),
    #[error("reading the model's KV layout")]
    Layout(#[source] CreateContextError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("resume file {path}: {source}")]
    Resume { path: PathBuf, source: std::io::Error },
    #[error("the background type {0} must be f16 or a candidate type wider than the narrowest one")]
    Background(CacheType),
}

/// One end-to-end trial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Trial {
    /// Only layer `layer`'s K (or V) at `ty`.
    Layer { layer: usize, v: bool, ty: CacheType },
    /// Every layer's K (or V) at `ty`, the other cache f16.
    Uniform { v: bool, ty: CacheType },
    /// Every layer's K and V at `ty` (the background of the single-layer runs, when not f16).
    Background { ty: CacheType },
}

impl Trial {
    fn key(&self) -> String {
        match self {
            Trial::Layer { layer, v, ty } => format!("layer {layer} {} {ty}", if *v { "V" } else { "K" }),
            Trial::Uniform { v, ty } => format!("uniform {} {ty}", if *v { "V" } else { "K" }),
            Trial::Background { ty } => format!("background {ty}"),
        }
    }

    fn types(&self, n_layer: usize, background: CacheType) -> LayerCacheTypes {
        let fill = match self {
            Trial::Layer { .. } | Trial::Background { .. } => background,
            Trial::Uniform { .. } => CacheType::F16,
        };
        let mut k = vec![fill; n_layer];
        let mut v = vec![fill; n_layer];
        match *self {
            Trial::Layer { layer, v: is_v, ty } => {
                if is_v {
                    v[layer] = ty
                } else {
                    k[layer] = ty
                }
            }
            Trial::Uniform { v: is_v, ty } => {
                if is_v {
                    v.fill(ty)
                } else {
                    k.fill(ty)
                }
            }
            Trial::Background { .. } => {}
        }
        LayerCacheTypes { k, v }
    }

    /// Single-layer runs screen on the first chunks; the others run on every chunk.
    fn is_layer(&self) -> bool {
        matches!(self, Trial::Layer { .. })
    }
}

/// Settings that must match for a resume file to be reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResumeKey {
    fingerprint: String,
    n_ctx: u32,
    chunks: usize,
    #[serde(default)]
    layer_chunks: usize,
    #[serde(default = "one")]
    layer_stride: usize,
    #[serde(default)]
    layer_ctx: u32,
    #[serde(default)]
    background: Option<CacheType>,
    text_label: String,
    text_tokens: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize, Deserialize)]
struct ResumeLine {
    trial: Trial,
    quality: Quality,
}

/// The trials a calibration runs, in order.
pub fn plan(n_layers_with_kv: &[usize], types: &[CacheType], background: CacheType) -> Vec<Trial> {
    let narrow = narrowest(types);
    let mut trials = Vec::new();
    if background != CacheType::F16 {
        trials.push(Trial::Background { ty: background });
    }
    for &layer in n_layers_with_kv {
        trials.push(Trial::Layer { layer, v: false, ty: narrow });
        trials.push(Trial::Layer { layer, v: true, ty: narrow });
    }
    for &ty in types.iter().filter(|t| t.is_quantized()) {
        trials.push(Trial::Uniform { v: false, ty });
        trials.push(Trial::Uniform { v: true, ty });
    }
    trials
}

fn narrowest(types: &[CacheType]) -> CacheType {
    *types
        .iter()
        .filter(|t| t.is_quantized())
        .min_by(|a, b| a.bits_per_value().total_cmp(&b.bits_per_value()))
        .expect("checked")
}

/// Forward passes a calibration costs (baselines included, one per chunk), for the up-front
/// estimate; single-layer runs on shorter chunks (`layer_ctx`) count one each, with their
/// baseline.
pub fn cost(n_layers_with_kv: usize, types: &[CacheType], opts: &CalibrateOptions) -> u64 {
    let quantized = types.iter().filter(|t| t.is_quantized()).count();
    let background = usize::from(opts.background != CacheType::F16);
    let layer_chunks = opts.layer_chunks.clamp(1, opts.chunks.max(1));
    let short_baseline = if layer_ctx(opts, opts.n_ctx) < opts.n_ctx { layer_chunks } else { 0 };
    ((1 + 2 * quantized + background) * opts.chunks.max(1) + 2 * n_layers_with_kv * layer_chunks + short_baseline)
        as u64
}

/// The single-layer runs' chunk length for calibration chunks of `n_ctx` tokens.
fn layer_ctx(opts: &CalibrateOptions, n_ctx: u32) -> u32 {
    match opts.layer_ctx {
        0 => n_ctx,
        n => n.clamp(16.min(n_ctx), n_ctx),
    }
}

/// Runs the calibration. `progress(done, total, label)` is called before each trial, in tokens
/// run through the model (a trial on n chunks of c tokens is n·c), so that time per token gives
/// an honest ETA.
pub fn calibrate(
    model: &Model,
    identity: &ModelIdentity,
    text: &str,
    opts: &CalibrateOptions,
    resume: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Sensitivity, CalibrateError> {
    progress(0, 0, "baseline (f16 cache)");
    let mut ev = Evaluator::new(model, text, opts.n_ctx, opts.chunks, &opts.base)?;
    calibrate_with(&mut ev, identity, opts, resume, progress)
}

/// [`calibrate`] on an evaluator the caller made (and may go on using, e.g. to select
/// profiles on the same text without recomputing its baseline).
pub fn calibrate_with(
    ev: &mut Evaluator<'_>,
    identity: &ModelIdentity,
    opts: &CalibrateOptions,
    resume: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Sensitivity, CalibrateError> {
    let start = Instant::now();
    let model = ev.model();
    let mut types = opts.types.clone();
    if !types.contains(&CacheType::F16) {
        types.insert(0, CacheType::F16);
    }
    types.sort_by(|a, b| b.bits_per_value().total_cmp(&a.bits_per_value()));
    types.dedup();
    if !types.iter().any(|t| t.is_quantized()) {
        return Err(CalibrateError::NoQuantizedType(types));
    }
    let bg = opts.background;
    if bg != CacheType::F16 && (!types.contains(&bg) || bg == narrowest(&types)) {
        return Err(CalibrateError::Background(bg));
    }
    let layout = KvLayout::probe(model).map_err(CalibrateError::Layout)?;
    let cells = runtime_cells(model, opts.n_ctx, RUNTIME_UBATCH).map_err(CalibrateError::Layout)?;
    let with_kv: Vec<usize> = layout.layers.iter().enumerate().filter(|(_, l)| l.is_some()).map(|(i, _)| i).collect();
    let trials = plan(&with_kv, &types, bg);
    let layer_chunks = opts.layer_chunks.clamp(1, ev.chunks());
    let layer_ctx = layer_ctx(opts, ev.n_ctx());

    // Resume: reuse lines of a previous run with identical settings.
    let key = ResumeKey {
        fingerprint: identity.fingerprint.clone(),
        n_ctx: opts.n_ctx,
        chunks: ev.chunks(),
        layer_chunks,
        layer_stride: opts.layer_stride.max(1),
        layer_ctx,
        background: Some(bg),
        text_label: opts.text_label.clone(),
        text_tokens: ev.positions(),
    };
    let mut done: BTreeMap<Trial, Quality> = BTreeMap::new();
    let mut journal = match resume {
        Some(path) => Some(open_journal(path, &key, &mut done)?),
        None => None,
    };

    let n_layer = layout.layers.len();
    let all_chunks = ev.chunks();
    // the single-layer runs' own chunks (and baseline) when they are shorter, made when first
    // needed (a resumed run may need none)
    let mut short: Option<Evaluator<'_>> = None;
    let n_ctx = ev.n_ctx();
    let tokens = |t: &Trial| if t.is_layer() { layer_chunks * layer_ctx as usize } else { all_chunks * n_ctx as usize };
    let total: usize = trials.iter().map(tokens).sum();
    let mut passed = 0;
    for trial in &trials {
        let n_tokens = tokens(trial);
        passed += n_tokens;
        if done.contains_key(trial) {
            continue;
        }
        progress(passed - n_tokens, total, &trial.key());
        let config = ContextParams { layer_types: Some(trial.types(n_layer, bg)), ..opts.base.clone() };
        let one = std::slice::from_ref(&config);
        let quality = if trial.is_layer() && layer_ctx < n_ctx {
            let short = match &mut short {
                Some(s) => s,
                None => short.insert(ev.rechunked(layer_ctx, layer_chunks)?),
            };
            short.score_sampled(one, layer_chunks, opts.layer_stride)?[0].quality()
        } else if trial.is_layer() {
            ev.score_sampled(one, layer_chunks, opts.layer_stride)?[0].quality()
        } else {
            ev.score(&config)?.quality()
        };
        if let (Some(f), Some(path)) = (journal.as_mut(), resume) {
            let line = serde_json::to_string(&ResumeLine { trial: trial.clone(), quality }).expect("serialisable");
            writeln!(f, "{line}")
                .and_then(|_| f.flush())
                .map_err(|source| CalibrateError::Resume { path: path.to_path_buf(), source })?;
        }
        done.insert(trial.clone(), quality);
    }
    progress(total, total, "done");
    if let Some(short) = &short {
        // one calibration: the short chunks' passes and time are part of it
        ev.forward_passes += short.forward_passes;
        ev.forward_seconds += short.forward_seconds;
        ev.decode_seconds += short.decode_seconds;
    }

    let opts = CalibrateOptions { chunks: ev.chunks(), layer_chunks, layer_ctx, ..opts.clone() };
    let mut table = assemble(
        identity,
        layout,
        &opts,
        &types,
        &with_kv,
        &done,
        // the evaluators' baselines included (they are made for the calibration)
        ev.forward_passes,
        start.elapsed().as_secs_f64(),
    );
    table.cells = cells;
    Ok(table)
}

fn open_journal(
    path: &Path,
    key: &ResumeKey,
    done: &mut BTreeMap<Trial, Quality>,
) -> Result<std::fs::File, CalibrateError> {
    let err = |source| CalibrateError::Resume { path: path.to_path_buf(), source };
    let header = serde_json::to_string(key).expect("serialisable");
    if let Ok(f) = std::fs::File::open(path) {
        let mut lines = std::io::BufReader::new(f).lines();
        if lines.next().and_then(Result::ok).as_deref() == Some(header.as_str()) {
            for line in lines.map_while(Result::ok) {
                // A line cut short by an interruption is skipped (its trial runs again).
                if let Ok(l) = serde_json::from_str::<ResumeLine>(&line) {
                    done.insert(l.trial, l.quality);
                }
            }
            return std::fs::OpenOptions::new().append(true).open(path).map_err(err);
        }
    }
    let mut f = std::fs::File::create(path).map_err(err)?;
    writeln!(f, "{header}").map_err(err)?;
    Ok(f)
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    identity: &ModelIdentity,
    layout: KvLayout,
    opts: &CalibrateOptions,
    types: &[CacheType],
    with_kv: &[usize],
    done: &BTreeMap<Trial, Quality>,
    forward_passes: u64,
    seconds: f64,
) -> Sensitivity {
    let narrow = narrowest(types);
    let uniform = |v: bool, ty: CacheType| done[&Trial::Uniform { v, ty }].kld_mean;
    // Against a q8_0 background a layer's error is its change from the all-q8_0 cache.
    let floor = match opts.background {
        CacheType::F16 => 0.0,
        ty => done[&Trial::Background { ty }].kld_mean,
    };
    // Single-layer errors do not add up to the uniform error (each single-layer run also carries
    // effects that do not accumulate: on Gemma 3 270M the per-layer V deltas sum to ~6× the
    // uniform V error, K to ~2×). So each layer's share of the narrow-type error comes from the
    // single-layer runs, and the uniform runs fix the scale for every type, K and V separately:
    //   ΔK_il(t) = q_il / Σ_j q_j · KLD(all K at t).
    let single = |layer: usize, v: bool| (done[&Trial::Layer { layer, v, ty: narrow }].kld_mean - floor).max(0.0);
    let total = |v: bool| -> f64 { with_kv.iter().map(|&l| single(l, v)).sum() };
    let (total_k, total_v) = (total(false), total(true));
    let mut layers = Vec::new();
    for &layer in with_kv {
        let mut k = BTreeMap::new();
        let mut v = BTreeMap::new();
        let mut measured = BTreeMap::new();
        for (is_v, map) in [(false, &mut k), (true, &mut v)] {
            let q = done[&Trial::Layer { layer, v: is_v, ty: narrow }];
            measured.insert(format!("{}:{narrow}", if is_v { "v" } else { "k" }), q);
            let sum = if is_v { total_v } else { total_k };
            let share = if sum > 0.0 { single(layer, is_v) / sum } else { 1.0 / with_kv.len() as f64 };
            for &ty in types {
                let delta = if ty.is_quantized() { share * uniform(is_v, ty) } else { 0.0 };
                map.insert(ty, delta.max(0.0));
            }
        }
        layers.push(LayerSensitivity { layer, k, v, measured });
    }
    let mut s = Sensitivity {
        schema: SCHEMA_VERSION,
        model: identity.clone(),
        layout,
        context: opts.n_ctx,
        chunks: opts.chunks as u32,
        text: opts.text_label.clone(),
        types: types.to_vec(),
        layers,
        anchors: Vec::new(),
        background: match opts.background {
            CacheType::F16 => None,
            ty => Some(Anchor { k: ty, v: ty, quality: done[&Trial::Background { ty }], predicted_kld: 0.0 }),
        },
        cells: Vec::new(),
        forward_passes,
        seconds,
        method: format!(
            "each layer's share of the error from single-layer runs at {narrow} (one K or V at a time, rest {}; {}{} of {} chunks{}), scaled per type and per K/V by uniform runs on every chunk",
            opts.background,
            opts.layer_chunks,
            if opts.layer_ctx < opts.n_ctx { format!(" chunk(s) of {} tokens, each the start of one", opts.layer_ctx) } else { String::new() },
            opts.chunks,
            match opts.layer_stride {
                0 | 1 => String::new(),
                2 => ", every 2nd scored position".to_string(),
                3 => ", every 3rd scored position".to_string(),
                n => format!(", every {n}th scored position"),
            }
        ),
    };
    let n_layer = s.layout.layers.len();
    for &ty in types.iter().filter(|t| t.is_quantized()) {
        for is_v in [false, true] {
            let mut cfg = vec![(CacheType::F16, CacheType::F16); n_layer];
            for c in cfg.iter_mut() {
                if is_v {
                    c.1 = ty
                } else {
                    c.0 = ty
                }
            }
            let cfg: Vec<_> = with_kv.iter().map(|&i| cfg[i]).collect();
            let predicted = s.predict(&cfg);
            let quality = done[&Trial::Uniform { v: is_v, ty }];
            s.anchors.push(Anchor {
                k: if is_v { CacheType::F16 } else { ty },
                v: if is_v { ty } else { CacheType::F16 },
                quality,
                predicted_kld: predicted,
            });
        }
    }
    s
}
