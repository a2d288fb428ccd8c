//! Measured selection: predictions propose candidates, measurements on the calibration text
//! decide, and held-out text reports.
//!
//! At a byte budget the candidates are every uniform configuration of the allowed pairs that
//! fits, and for each estimator ([`Estimator`]) the predicted-best profile that fits plus its
//! cheaper Pareto neighbours. All are measured end to end on the same calibration chunks; the
//! lowest measured mean KLD wins, fewer bytes breaking a tie (so a uniform cache wins a tie with
//! a profile of its size). A profile is therefore chosen only when it measured better than every
//! uniform cache at or below the budget; otherwise the selection says so and keeps the uniform
//! cache. Sizes are the tensor bytes the runtime allocates at the target context, read back
//! from it, and checked against what the search expected.

pub mod report;
mod veto;

pub use veto::{PasskeyScore, PasskeyVeto};

use std::collections::HashMap;

use serde::Serialize;

use crate::cache_type::CacheType;
use crate::eval::{EvalError, Evaluator, Scores, Summary};
use crate::kv_layout::{RuntimeKv, RUNTIME_UBATCH};
use crate::llama::{Context, ContextParams, CreateContextError, LayerCacheTypes};
use crate::profile::ProfileWindow;
use crate::search::{self, Problem, SearchError};
use crate::sensitivity::Estimator;

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    /// One (K, V) pair on every layer.
    Uniform,
    /// A point of an estimator's Pareto frontier: `rank` 0 is its predicted best at the budget,
    /// 1.. its cheaper neighbours.
    Frontier { estimator: Estimator, rank: usize },
    /// ik_llama.cpp-style first/last layers at q8_0, the rest q4_0 (a baseline, not a candidate).
    Heuristic,
}

/// A configuration to measure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub label: String,
    pub origin: Origin,
    /// `(K, V)` per layer.
    pub types: Vec<(CacheType, CacheType)>,
    /// Predicted mean KLD (the `share` estimator's, for every candidate alike), if known.
    pub predicted: Option<f64>,
    /// Tensor bytes the search expects at the target context (with the windows of `windowed`).
    pub expected_bytes: u64,
    /// Layers that keep the measurer's recent window ([`Measurer::with_window`]), ascending.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub windowed: Vec<usize>,
}

impl Candidate {
    /// What a measurement is memoised by: the types and the windowed layers.
    pub(crate) fn key(&self) -> Key {
        (self.types.clone(), self.windowed.clone())
    }
}

pub(crate) type Key = (Vec<(CacheType, CacheType)>, Vec<usize>);

/// A candidate measured end to end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    #[serde(flatten)]
    pub candidate: Candidate,
    /// The KV cache at the target context, as the runtime allocated it.
    pub kv: RuntimeKv,
    /// Quality on the measured text.
    pub summary: Summary,
}

impl Measured {
    pub fn kld(&self) -> f64 {
        self.summary.kld_mean
    }

    pub fn is_uniform(&self) -> bool {
        self.candidate.origin == Origin::Uniform
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("reading the KV cache size from the runtime")]
    Context(#[from] CreateContextError),
    #[error("no configuration fits {max_bytes} bytes of KV cache (the smallest needs {smallest})")]
    NothingFits { max_bytes: u64, smallest: u64 },
    #[error(
        "{label}: the runtime allocated {runtime} bytes of K/V tensors at context {n_ctx}, the search expected {expected}"
    )]
    SizeMismatch { label: String, runtime: u64, expected: u64, n_ctx: u32 },
    #[error("passkey retrieval (the veto)")]
    Passkey(#[from] crate::passkey::PasskeyError),
    #[error("the {0} estimator needs runs this sensitivity table does not have")]
    Estimator(&'static str),
    #[error(
        "the chosen configuration, measured again on the first chunk of {text}, gives KLD {measured:.6}; the selection recorded {recorded:.6} there, and its whole-text KLD must not exceed the best uniform cache ({uniform})"
    )]
    Unconfirmed { text: String, measured: f64, recorded: f64, uniform: String },
}

/// Measures configurations on one text, each once (results are kept by their types).
pub struct Measurer<'e, 'm> {
    ev: &'e mut Evaluator<'m>,
    base: ContextParams,
    target_ctx: u32,
    label: String,
    /// The recent window a candidate's `windowed` layers keep (`base` has none then).
    window: Option<ProfileWindow>,
    done: HashMap<Key, (RuntimeKv, Summary)>,
    /// Scores of screening runs on the first chunks, which [`Measurer::measure`] completes.
    screened: HashMap<Key, Scores>,
    /// A long-context task the choice must pass ([`Measurer::with_passkey_veto`]).
    veto: Option<PasskeyVeto>,
}

impl<'e, 'm> Measurer<'e, 'm> {
    /// `base`: threads, flash attention, offload; `target_ctx`: the context sizes are read at;
    /// `label`: the text's name for reports.
    pub fn new(
        ev: &'e mut Evaluator<'m>,
        base: ContextParams,
        target_ctx: u32,
        label: impl Into<String>,
    ) -> Measurer<'e, 'm> {
        Measurer {
            ev,
            base,
            target_ctx,
            label: label.into(),
            window: None,
            done: HashMap::new(),
            screened: HashMap::new(),
            veto: None,
        }
    }

    /// The window a candidate's `windowed` layers keep (its `layers` are ignored): a search of
    /// windows per layer, where `base` has none.
    pub fn with_window(mut self, window: Option<ProfileWindow>) -> Self {
        self.window = window;
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn evaluator(&mut self) -> &mut Evaluator<'m> {
        self.ev
    }

    fn params(&self, types: &[(CacheType, CacheType)], windowed: &[usize]) -> ContextParams {
        let window = match (&self.window, windowed.is_empty()) {
            (_, true) => self.base.window.clone(),
            (Some(w), false) => Some(crate::runtime::recent_window(
                &ProfileWindow { layers: Some(windowed.to_vec()), ..w.clone() },
                types.len(),
            )),
            (None, false) => panic!("a candidate with windowed layers given to a measurer without a window"),
        };
        ContextParams {
            layer_types: Some(LayerCacheTypes::from_pairs(types.iter().copied())),
            no_kv_profile: true,
            window,
            ..self.base.clone()
        }
    }

    /// The KV cache a context at the target context gets for `c`, read from the runtime.
    fn runtime_kv(&self, c: &Candidate) -> Result<RuntimeKv, CreateContextError> {
        let params = ContextParams {
            n_ctx: self.target_ctx,
            n_batch: RUNTIME_UBATCH.min(self.target_ctx),
            n_ubatch: RUNTIME_UBATCH.min(self.target_ctx),
            ..self.params(&c.types, &c.windowed)
        };
        Ok(RuntimeKv::of(&Context::new(self.ev.model(), &params)?))
    }

    /// Measures `candidates` on the first `n_chunks` chunks only and returns their mean KLD
    /// there; the scores are kept, so a later [`Measurer::measure`] of the same types runs only
    /// the rest of the text.
    pub fn screen(&mut self, candidates: &[&Candidate], n_chunks: usize) -> Result<Vec<f64>, SelectError> {
        let todo: Vec<&Candidate> = candidates
            .iter()
            .copied()
            .filter(|c| !self.done.contains_key(&c.key()) && !self.screened.contains_key(&c.key()))
            .collect();
        let params: Vec<ContextParams> = todo.iter().map(|c| self.params(&c.types, &c.windowed)).collect();
        tracing::info!("screening {} configuration(s) on the first {n_chunks} chunk(s) of {}", todo.len(), self.label);
        for (c, s) in todo.iter().zip(self.ev.score_many_first(&params, n_chunks)?) {
            self.screened.insert(c.key(), s);
        }
        Ok(candidates
            .iter()
            .map(|c| {
                let first = |s: &Summary| s.kld_chunk_means.iter().take(n_chunks).sum::<f64>();
                match (self.done.get(&c.key()), self.screened.get(&c.key())) {
                    (Some((_, summary)), _) => first(summary) / n_chunks as f64,
                    (None, Some(s)) => s.summary().kld_mean,
                    (None, None) => unreachable!("screened above"),
                }
            })
            .collect())
    }

    /// Measures the candidates not measured yet on the whole text (together, so a streamed
    /// baseline runs once; a screened one only on the chunks its screening left) and returns all
    /// of them in order.
    pub fn measure(&mut self, candidates: &[Candidate]) -> Result<Vec<Measured>, SelectError> {
        let mut todo: Vec<&Candidate> = Vec::new();
        for c in candidates {
            if !self.done.contains_key(&c.key()) && !todo.iter().any(|t| t.key() == c.key()) {
                todo.push(c);
            }
        }
        let all = self.ev.chunks();
        let start = |m: &Self, c: &Candidate| m.screened.get(&c.key()).map_or(0, |s| s.chunk_sizes.len());
        let mut starts: Vec<usize> = todo.iter().map(|c| start(self, c)).collect();
        starts.sort_unstable();
        starts.dedup();
        for from in starts {
            let group: Vec<&Candidate> = todo.iter().copied().filter(|c| start(self, c) == from).collect();
            let params: Vec<ContextParams> = group.iter().map(|c| self.params(&c.types, &c.windowed)).collect();
            let rest = if from < all {
                let which = if from + 1 == all { format!("chunk {all}") } else { format!("chunks {}-{all}", from + 1) };
                tracing::info!("measuring {} configuration(s) on {which} of {}", group.len(), self.label);
                self.ev.score_chunks(&params, from..all, 1)?
            } else {
                vec![Scores::default(); group.len()]
            };
            for (c, rest) in group.iter().zip(rest) {
                let mut scores = self.screened.remove(&c.key()).unwrap_or_default();
                scores.kv_bytes = rest.kv_bytes.max(scores.kv_bytes);
                scores.append(rest);
                let kv = self.runtime_kv(c)?;
                // the search sizes the cache types and the windows it chose; a window on every
                // layer from `base` adds the same to every candidate and is not counted
                let outside = if self.base.window.is_some() { kv.window_bytes } else { 0 };
                if kv.tensor_bytes - outside != c.expected_bytes {
                    return Err(SelectError::SizeMismatch {
                        label: c.label.clone(),
                        runtime: kv.tensor_bytes,
                        expected: c.expected_bytes,
                        n_ctx: self.target_ctx,
                    });
                }
                self.done.insert(c.key(), (kv, scores.summary()));
            }
        }
        Ok(candidates
            .iter()
            .map(|c| {
                let (kv, summary) = self.done[&c.key()].clone();
                Measured { candidate: c.clone(), kv, summary }
            })
            .collect())
    }
}

impl Measurer<'_, '_> {
    /// The choice as written (`types`, e.g. read back from the saved profile), measured again
    /// on the first chunk of this text without the memo: it must reproduce the selection's KLD
    /// on that chunk (the measurement is deterministic, so the same types give the same number
    /// and other types another; a relative 1e-6 allows GPU reduction order), and the recorded
    /// KLD must not exceed the best uniform cache within the budget. Returns the recorded KLD,
    /// so confirmed. This is the bound `search`, `fit` and `tune` state as a check, not as a
    /// report.
    /// The chosen candidate's windowed layers keep their window again.
    pub fn confirm(&mut self, types: &[(CacheType, CacheType)], selection: &Selection) -> Result<f64, SelectError> {
        let params = self.params(types, &selection.chosen.candidate.windowed);
        let first = |s: &Summary| s.kld_chunk_means.first().copied().unwrap_or(s.kld_mean);
        let measured = first(&self.ev.score_many_first(std::slice::from_ref(&params), 1)?[0].summary());
        let recorded = first(&selection.chosen.summary);
        let same = (measured - recorded).abs() <= 1e-6 * recorded.abs().max(1e-12);
        let uniform = selection.best_uniform.as_ref();
        let within = uniform.is_none_or(|u| selection.chosen.kld() <= u.kld() * (1.0 + 1e-6));
        if same && within {
            return Ok(selection.chosen.kld());
        }
        Err(SelectError::Unconfirmed {
            text: self.label.clone(),
            measured,
            recorded,
            uniform: uniform.map_or_else(|| "none".into(), |u| format!("{} {:.6}", u.candidate.label, u.kld())),
        })
    }
}

/// The search problems of a calibration: one per estimator, same layers, cells and pairs.
#[derive(Debug, Clone)]
pub struct Problems {
    /// The first is the `share` estimator; its predictions label every candidate.
    pub by_estimator: Vec<(Estimator, Problem)>,
}

impl Problems {
    pub fn main(&self) -> &Problem {
        &self.by_estimator[0].1
    }

    /// Bytes and prediction of `types` under the main estimator.
    pub fn evaluate(&self, types: &[(CacheType, CacheType)]) -> Result<search::Assignment, SearchError> {
        search::evaluate(self.main(), types)
    }

    /// Layers that may keep a window ([`search::LayerCosts::window`]).
    pub fn windowable(&self) -> Vec<usize> {
        let layers = &self.main().layers;
        (0..layers.len()).filter(|&il| layers[il].as_ref().is_some_and(|l| l.window.is_some())).collect()
    }

    /// Uniform `(k, v)` as a candidate.
    pub fn uniform(&self, k: CacheType, v: CacheType) -> Result<Candidate, SearchError> {
        self.uniform_on(k, v, &[])
    }

    /// Uniform `(k, v)` with the window on the layers `windowed` as a candidate.
    pub fn uniform_on(&self, k: CacheType, v: CacheType, windowed: &[usize]) -> Result<Candidate, SearchError> {
        let a = search::evaluate_windowed(self.main(), &vec![(k, v); self.main().layers.len()], windowed)?;
        let mut label = if k == v { format!("uniform {k}") } else { format!("uniform {k}/{v}") };
        if !windowed.is_empty() {
            label += " + window";
        }
        Ok(Candidate {
            label,
            origin: Origin::Uniform,
            types: a.types,
            predicted: Some(a.predicted),
            expected_bytes: a.bytes,
            windowed: a.windowed,
        })
    }

    /// The first/last-layers heuristic with the most q8_0 layers within `max_bytes`.
    pub fn heuristic(&self, max_bytes: u64) -> Result<Option<Candidate>, SearchError> {
        Ok(search::heuristic_at_bytes(self.main(), max_bytes)?.map(|a| Candidate {
            label: "first/last layers q8_0, rest q4_0".into(),
            origin: Origin::Heuristic,
            types: a.types,
            predicted: Some(a.predicted),
            expected_bytes: a.bytes,
            windowed: Vec::new(),
        }))
    }
}

/// How many candidates a selection measures besides the uniform ones, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectOptions {
    /// Cheaper Pareto neighbours of the main estimator's pick to measure too.
    pub neighbours: usize,
    /// Candidates are first measured on this many chunks (0: none, every candidate is measured on
    /// the whole text); only the best `finalists` profiles are then measured on the whole text,
    /// beside every uniform cache that can compete ([`UNIFORM_SCREEN_FACTOR`]). The choice is
    /// made on the whole text alone, so screening only decides which candidates compete, as
    /// predictions do.
    pub screen_chunks: usize,
    pub finalists: usize,
}

/// A uniform cache whose KLD on the screening chunks is more than this many times the best
/// uniform cache's there is not measured further, and is listed as screened out: to end below
/// it on the whole text, the ratio of the two would have to move by more than this factor from
/// the first chunk to the whole text. Over every pair of uniform caches in
/// bench/search-gemma3-270m.json and bench/search-qwen2.5-coder-0.5b.json it moved by at most
/// 1.05× (Gemma) and 3.4× (Qwen, whose chunks differ up to 9× for one cache). The uniform caches
/// that can compete, the budget's own among them, are always measured whole.
pub const UNIFORM_SCREEN_FACTOR: f64 = 8.0;

impl Default for SelectOptions {
    fn default() -> Self {
        SelectOptions { neighbours: 2, screen_chunks: 1, finalists: 2 }
    }
}

/// A candidate that did not reach the final measurement, with its KLD on the screening chunks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Screened {
    pub label: String,
    pub kld_screen: f64,
    pub chunks: usize,
}

/// The candidates at `max_bytes`: uniform configurations that fit (each also with the window on
/// every layer, where the problem has windows), each estimator's predicted best, and the main
/// estimator's `neighbours` next cheaper frontier points. No duplicates.
pub fn candidates(problems: &Problems, max_bytes: u64, opts: SelectOptions) -> Result<Vec<Candidate>, SearchError> {
    let mut out: Vec<Candidate> = Vec::new();
    let push = |c: Candidate, out: &mut Vec<Candidate>| {
        if c.expected_bytes <= max_bytes && !out.iter().any(|o| o.key() == c.key()) {
            out.push(c);
        }
    };
    let windowable = problems.windowable();
    for &(k, v) in &problems.main().pairs {
        push(problems.uniform(k, v)?, &mut out);
        if !windowable.is_empty() {
            push(problems.uniform_on(k, v, &windowable)?, &mut out);
        }
    }
    for (i, (est, problem)) in problems.by_estimator.iter().enumerate() {
        let frontier = search::frontier(problem)?;
        let fit = frontier.partition_point(|a| a.bytes <= max_bytes);
        let take = if i == 0 { opts.neighbours + 1 } else { 1 };
        for (rank, a) in frontier[..fit].iter().rev().take(take).enumerate() {
            let main = search::evaluate_windowed(problems.main(), &a.types, &a.windowed)?;
            push(
                Candidate {
                    label: format!(
                        "profile ({}{}){}",
                        est.name(),
                        if rank > 0 { format!(" -{rank}") } else { String::new() },
                        match a.windowed.len() {
                            0 => String::new(),
                            n => format!(" + window on {n} layers"),
                        }
                    ),
                    origin: Origin::Frontier { estimator: *est, rank },
                    types: a.types.clone(),
                    predicted: Some(main.predicted),
                    expected_bytes: main.bytes,
                    windowed: a.windowed.clone(),
                },
                &mut out,
            );
        }
    }
    Ok(out)
}

/// The outcome of a selection at one budget.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub max_bytes: u64,
    /// The lowest measured KLD within the budget (a uniform cache when no profile beat it).
    pub chosen: Measured,
    /// The best measured uniform cache within the budget.
    pub best_uniform: Option<Measured>,
    /// Whether the chosen configuration is a profile (it then measured below every uniform
    /// cache within the budget).
    pub profile_wins: bool,
    /// Every configuration measured for this budget, on the whole calibration text.
    pub considered: Vec<Measured>,
    /// Candidates screened out on the first chunks (never chosen from): profiles beyond the
    /// finalists, uniform caches far worse than the best uniform one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub screened_out: Vec<Screened>,
    /// The text the choice was made on.
    pub text: String,
    /// With a passkey veto: the keys found by the best uniform cache and by each configuration
    /// tried before the chosen one (the chosen one last but one, the uniform cache last).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passkey: Vec<PasskeyScore>,
    /// Configurations of lower KLD than the chosen one that found fewer passkeys than the best
    /// uniform cache.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vetoed: Vec<String>,
}

impl Selection {
    /// One line for people: what was chosen and why.
    pub fn verdict(&self) -> String {
        let c = &self.chosen;
        let said = match (&self.best_uniform, self.profile_wins) {
            (Some(u), true) => format!(
                "{} measured KLD {:.5} on {}, below the best uniform cache within the budget ({} {:.5}, {:.2}×)",
                c.candidate.label,
                c.kld(),
                self.text,
                u.candidate.label,
                u.kld(),
                c.kld() / u.kld()
            ),
            (None, true) => {
                format!("{} measured KLD {:.5} on {} (no uniform cache fits)", c.candidate.label, c.kld(), self.text)
            }
            (_, false) if !self.vetoed.is_empty() => format!(
                "no profile measured better than {} ({:.5}) on {} within {} bytes and found as many passkeys: keeping \
                 the uniform cache",
                c.candidate.label,
                c.kld(),
                self.text,
                self.max_bytes
            ),
            (_, false) => format!(
                "no profile measured better than {} ({:.5}) on {} within {} bytes: keeping the uniform cache",
                c.candidate.label,
                c.kld(),
                self.text,
                self.max_bytes
            ),
        };
        let score = |label: &str| self.passkey.iter().find(|p| p.label == label).map(PasskeyScore::describe);
        match (score(&c.candidate.label), &self.best_uniform) {
            (None, _) => said,
            (Some(own), Some(u)) if u.candidate.label != c.candidate.label => {
                let bar = score(&u.candidate.label).unwrap_or_default();
                let vetoed = match self.vetoed.is_empty() {
                    true => String::new(),
                    false => format!("; fewer found, so not chosen: {}", self.vetoed.join(", ")),
                };
                format!("{said}; {own} (the uniform cache {bar}){vetoed}")
            }
            (Some(own), _) => match self.vetoed.is_empty() {
                true => format!("{said}; {own}"),
                false => format!("{said} ({own}); fewer found, so not chosen: {}", self.vetoed.join(", ")),
            },
        }
    }
}

/// Measures the candidates at `max_bytes` on the measurer's text and picks the best measured.
pub fn select(
    m: &mut Measurer<'_, '_>,
    problems: &Problems,
    max_bytes: u64,
    opts: SelectOptions,
) -> Result<Selection, SelectError> {
    let cands = candidates(problems, max_bytes, opts)?;
    if cands.is_empty() {
        let smallest = search::frontier(problems.main())?.first().map_or(0, |a| a.bytes);
        return Err(SelectError::NothingFits { max_bytes, smallest });
    }
    select_among(m, &cands, max_bytes, opts)
}

/// Measures `candidates` (not empty) on the measurer's text and picks as [`select`] does: the
/// lowest measured KLD, a profile only if it beats every uniform cache among them. With
/// screening, every candidate is first measured on the first chunks; the best `opts.finalists`
/// profiles, and every uniform cache within [`UNIFORM_SCREEN_FACTOR`] of the best uniform one
/// there, go on to the rest of the text (their first chunks are not run again). The choice is
/// made on the whole text alone.
pub fn select_among(
    m: &mut Measurer<'_, '_>,
    candidates: &[Candidate],
    max_bytes: u64,
    opts: SelectOptions,
) -> Result<Selection, SelectError> {
    let screen = opts.screen_chunks > 0 && opts.screen_chunks < m.ev.chunks() && candidates.len() > 1;
    let mut screened_out = Vec::new();
    let finals: Vec<Candidate> = if screen {
        let all: Vec<&Candidate> = candidates.iter().collect();
        let klds = m.screen(&all, opts.screen_chunks)?;
        let (keep, out) = finalists(&all, &klds, opts);
        screened_out = out;
        keep
    } else {
        candidates.to_vec()
    };
    let considered = m.measure(&finals)?;
    let mut selection = choose(considered, max_bytes, m.label());
    selection.screened_out = screened_out;
    m.veto(selection)
}

/// Which screened candidates go on to the whole text (`klds`: their KLD on the screening
/// chunks): the best `opts.finalists` profiles and every uniform cache within
/// [`UNIFORM_SCREEN_FACTOR`] of the best uniform one; the rest, best first, as screened out.
fn finalists(all: &[&Candidate], klds: &[f64], opts: SelectOptions) -> (Vec<Candidate>, Vec<Screened>) {
    let best_uniform =
        all.iter().zip(klds).filter(|(c, _)| c.origin == Origin::Uniform).map(|(_, &k)| k).min_by(f64::total_cmp);
    let mut profiles: Vec<(f64, &Candidate)> =
        klds.iter().copied().zip(all.iter().copied()).filter(|(_, c)| c.origin != Origin::Uniform).collect();
    profiles.sort_by(|a, b| a.0.total_cmp(&b.0));
    profiles.truncate(opts.finalists.max(1));
    let (mut keep, mut out) = (Vec::new(), Vec::new());
    for (c, &kld) in all.iter().zip(klds) {
        let kept = if c.origin == Origin::Uniform {
            best_uniform.is_none_or(|best| kld <= best * UNIFORM_SCREEN_FACTOR)
        } else {
            profiles.iter().any(|p| p.1.key() == c.key())
        };
        if kept {
            keep.push((*c).clone());
        } else {
            out.push(Screened { label: c.label.clone(), kld_screen: kld, chunks: opts.screen_chunks });
        }
    }
    out.sort_by(|a, b| a.kld_screen.total_cmp(&b.kld_screen));
    (keep, out)
}

/// The decision itself: the lowest measured KLD, then fewer bytes, then a uniform cache before a
/// profile (ties keep the simple cache). `considered` must not be empty.
fn choose(considered: Vec<Measured>, max_bytes: u64, text: &str) -> Selection {
    let best = |it: &mut dyn Iterator<Item = &Measured>| -> Option<Measured> { it.min_by(|a, b| rank(a, b)).cloned() };
    let chosen = best(&mut considered.iter()).expect("non-empty");
    let best_uniform = best(&mut considered.iter().filter(|c| c.is_uniform()));
    Selection {
        max_bytes,
        profile_wins: !chosen.is_uniform(),
        chosen,
        best_uniform,
        considered,
        screened_out: Vec::new(),
        text: text.to_string(),
        passkey: Vec::new(),
        vetoed: Vec::new(),
    }
}

/// The choice's order: lower measured KLD, then fewer bytes, then a uniform cache before a profile.
fn rank(a: &Measured, b: &Measured) -> std::cmp::Ordering {
    a.kld()
        .total_cmp(&b.kld())
        .then(a.kv.tensor_bytes.cmp(&b.kv.tensor_bytes))
        .then(b.is_uniform().cmp(&a.is_uniform()))
}

/// Bytes of `bits_per_value` over the problem's cached values (rounded down, so a uniform
/// configuration of exactly that many bits fits).
pub fn bytes_at_bits(problem: &Problem, bits_per_value: f64) -> u64 {
    let values: u64 = problem.layers.iter().flatten().map(|l| (l.k_dim + l.v_dim) * l.cells).sum();
    (bits_per_value * values as f64 / 8.0 + 1e-6).floor() as u64
}

/// Pearson correlation of (predicted, measured) points; `None` with fewer than three.
pub fn correlation(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let (vx, vy): (f64, f64) =
        (points.iter().map(|p| (p.0 - mx).powi(2)).sum(), points.iter().map(|p| (p.1 - my).powi(2)).sum());
    Some(cov / (vx * vy).sqrt())
}

impl Problems {
    /// One problem per estimator the table supports (`share` always), for layers holding
    /// `cells[il]` tokens (read from the runtime) and the allowed `pairs`.
    pub fn new(
        sens: &crate::sensitivity::Sensitivity,
        cells: &[Option<u64>],
        pairs: &[(CacheType, CacheType)],
    ) -> Result<Problems, SelectError> {
        let mut by_estimator = Vec::new();
        for est in Estimator::ALL {
            match sens.problem(est, cells, pairs.to_vec()) {
                Some(p) => by_estimator.push((est, p)),
                None if est == Estimator::Share => return Err(SelectError::Estimator(est.name())),
                None => {}
            }
        }
        Ok(Problems { by_estimator })
    }

    /// [`Problems::new`] where each layer may also keep a recent window: `windowed` is the same
    /// calibration measured with the window on every layer, `window_bytes[il]` what the window
    /// adds to layer `il` (read from the runtime). An estimator goes only where both tables
    /// support it.
    pub fn with_window(
        sens: &crate::sensitivity::Sensitivity,
        windowed: &crate::sensitivity::Sensitivity,
        cells: &[Option<u64>],
        window_bytes: &[Option<u64>],
        pairs: &[(CacheType, CacheType)],
    ) -> Result<Problems, SelectError> {
        let mut by_estimator = Vec::new();
        for est in Estimator::ALL {
            match sens.problem_with_window(windowed, est, cells, window_bytes, pairs.to_vec()) {
                Some(p) => by_estimator.push((est, p)),
                None if est == Estimator::Share => return Err(SelectError::Estimator(est.name())),
                None => {}
            }
        }
        Ok(Problems { by_estimator })
    }
}

/// The held-out check of a selection on one text.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    pub text: String,
    pub chosen: Measured,
    /// The uniform configuration whose size was the budget.
    pub uniform: Measured,
    /// The first/last-layers heuristic within the same budget.
    pub heuristic: Option<Measured>,
}

impl HeldOut {
    /// Chosen KLD / uniform KLD on this text.
    pub fn ratio(&self) -> f64 {
        self.chosen.kld() / self.uniform.kld()
    }
}

/// Measures a selection's choice, the uniform configuration of the budget and the heuristic on
/// held-out text (never used to choose).
pub fn held_out(
    m: &mut Measurer<'_, '_>,
    problems: &Problems,
    selection: &Selection,
    uniform: &Candidate,
) -> Result<HeldOut, SelectError> {
    let heuristic = problems.heuristic(selection.max_bytes)?;
    held_out_with(m, selection, uniform, heuristic)
}

/// [`held_out`] with the heuristic given, or none (`fit`: its budget is the GPU's share of the
/// cache, which the heuristic's whole-model size does not describe).
pub fn held_out_with(
    m: &mut Measurer<'_, '_>,
    selection: &Selection,
    uniform: &Candidate,
    heuristic: Option<Candidate>,
) -> Result<HeldOut, SelectError> {
    let mut cands = vec![selection.chosen.candidate.clone(), uniform.clone()];
    cands.extend(heuristic.clone());
    let measured = m.measure(&cands)?;
    Ok(HeldOut {
        text: m.label().to_string(),
        chosen: measured[0].clone(),
        uniform: measured[1].clone(),
        heuristic: heuristic.map(|_| measured[2].clone()),
    })
}

/// A selection at the size of one uniform configuration, and its held-out checks.
#[derive(Debug, Clone, Serialize)]
pub struct AtSize {
    pub uniform: Candidate,
    pub selection: Selection,
    pub held_out: Vec<HeldOut>,
}

/// The uniform configurations of the allowed pairs from all-`low` to all-`high` bytes (e.g. q4_0
/// to q8_0), cheapest first.
pub fn uniform_sizes(problems: &Problems, low: CacheType, high: CacheType) -> Result<Vec<Candidate>, SearchError> {
    let lo = problems.uniform(low, low)?.expected_bytes;
    let hi = problems.uniform(high, high)?.expected_bytes;
    let mut out = Vec::new();
    for &(k, v) in &problems.main().pairs {
        let u = problems.uniform(k, v)?;
        if (lo..=hi).contains(&u.expected_bytes) && !out.iter().any(|o: &Candidate| o.types == u.types) {
            out.push(u);
        }
    }
    out.sort_by_key(|u| u.expected_bytes);
    Ok(out)
}

/// Selection at the size of each of `sizes` on the calibration measurer, each checked on every
/// held-out measurer.
pub fn verify_sizes(
    calibration: &mut Measurer<'_, '_>,
    held: &mut [Measurer<'_, '_>],
    problems: &Problems,
    sizes: &[Candidate],
    opts: SelectOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<AtSize>, SelectError> {
    let mut out = Vec::new();
    for u in sizes {
        progress(&format!("selecting at the size of {}", u.label));
        let selection = select(calibration, problems, u.expected_bytes, opts)?;
        progress(&selection.verdict());
        let mut checks = Vec::new();
        for h in held.iter_mut() {
            checks.push(held_out(h, problems, &selection, u)?);
        }
        out.push(AtSize { uniform: u.clone(), selection, held_out: checks });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CacheType::{Q4_0, Q8_0};

    pub(super) fn measured(
        label: &str,
        origin: Origin,
        types: Vec<(CacheType, CacheType)>,
        bytes: u64,
        kld: f64,
    ) -> Measured {
        let summary = crate::eval::Scores {
            kld: vec![kld],
            top1_same: vec![true],
            nll: vec![1.0],
            chunk_sizes: vec![1],
            kv_bytes: bytes,
        }
        .summary();
        Measured {
            candidate: Candidate {
                label: label.into(),
                origin,
                types,
                predicted: Some(kld / 2.0),
                expected_bytes: bytes,
                windowed: Vec::new(),
            },
            kv: RuntimeKv { tensor_bytes: bytes, window_bytes: 0, buffer_bytes: bytes, values: bytes },
            summary,
        }
    }

    pub(super) fn profile(rank: usize, bytes: u64, kld: f64) -> Measured {
        let origin = Origin::Frontier { estimator: Estimator::Share, rank };
        measured(&format!("p{rank}"), origin, vec![(Q8_0, Q4_0), (Q4_0, Q8_0)], bytes, kld)
    }

    #[test]
    fn screening_keeps_the_best_profiles_and_every_uniform_cache_that_can_compete() {
        let u = |label: &str, t| measured(label, Origin::Uniform, vec![t; 2], 100, 0.0).candidate;
        let p = |rank| profile(rank, 100, 0.0).candidate;
        let (budget, narrow, far) = (
            u("uniform q8_0/q4_0", (Q8_0, Q4_0)),
            u("uniform q5_0", (CacheType::Q5_0, CacheType::Q5_0)),
            u("uniform q4_0", (Q4_0, Q4_0)),
        );
        let (mut p0, mut p1, mut p2) = (p(0), p(1), p(2));
        p1.types = vec![(Q8_0, Q8_0), (Q4_0, Q4_0)];
        p2.types = vec![(Q4_0, Q4_0), (Q8_0, Q8_0)];
        p0.label = "p0".into();
        let all = [&budget, &narrow, &far, &p0, &p1, &p2];
        // the uniform q5_0 is 7.9× the best uniform cache on the first chunk, q4_0 8.1×
        let klds = [0.010, 0.079, 0.081, 0.012, 0.009, 0.011];
        let opts = SelectOptions { finalists: 2, ..SelectOptions::default() };
        let (keep, out) = finalists(&all, &klds, opts);
        let kept: Vec<&str> = keep.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(kept, ["uniform q8_0/q4_0", "uniform q5_0", "p1", "p2"]);
        let dropped: Vec<(&str, f64)> = out.iter().map(|s| (s.label.as_str(), s.kld_screen)).collect();
        assert_eq!(dropped, [("p0", 0.012), ("uniform q4_0", 0.081)]);
    }

    #[test]
    fn a_profile_that_measures_worse_than_a_uniform_cache_is_not_chosen() {
        // The predicted best profile (rank 0) measures worse than uniform q8_0/q4_0.
        let considered = vec![
            measured("uniform q8_0/q4_0", Origin::Uniform, vec![(Q8_0, Q4_0); 2], 100, 0.010),
            measured("uniform q4_0", Origin::Uniform, vec![(Q4_0, Q4_0); 2], 70, 0.030),
            profile(0, 100, 0.012),
            profile(1, 95, 0.011),
        ];
        let s = choose(considered, 100, "cal");
        assert!(!s.profile_wins);
        assert_eq!(s.chosen.candidate.label, "uniform q8_0/q4_0");
        assert_eq!(s.best_uniform.as_ref().unwrap().candidate.label, "uniform q8_0/q4_0");
        assert!(s.verdict().contains("keeping the uniform cache"), "{}", s.verdict());
    }

    #[test]
    fn the_best_measured_profile_wins_even_if_not_the_predicted_best() {
        let considered = vec![
            measured("uniform q8_0/q4_0", Origin::Uniform, vec![(Q8_0, Q4_0); 2], 100, 0.010),
            profile(0, 100, 0.012),
            profile(1, 96, 0.007),
        ];
        let s = choose(considered, 100, "cal");
        assert!(s.profile_wins);
        assert_eq!(s.chosen.candidate.label, "p1");
        assert!(s.verdict().contains("below the best uniform cache"), "{}", s.verdict());
    }

    #[test]
    fn ties_go_to_fewer_bytes_then_to_the_uniform_cache() {
        let considered =
            vec![profile(0, 100, 0.010), measured("uniform", Origin::Uniform, vec![(Q8_0, Q4_0); 2], 100, 0.010)];
        assert_eq!(choose(considered, 100, "cal").chosen.candidate.label, "uniform");
        let considered =
            vec![measured("uniform", Origin::Uniform, vec![(Q8_0, Q4_0); 2], 100, 0.010), profile(0, 90, 0.010)];
        assert_eq!(choose(considered, 100, "cal").chosen.candidate.label, "p0");
    }
}
