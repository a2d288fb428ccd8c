//! Exact optimiser from a per-layer sensitivity table to per-layer (K, V) cache types.
//!
//! Each layer with a KV cache picks one (K type, V type) pair from an allowed list. A layer's cost
//! is `(k.row_bytes(k_dim) + v.row_bytes(v_dim)) * cells` bytes and its predicted error is
//! `dk[k] + dv[v]` (additive model). Minimising the summed error under a byte budget is a
//! multiple-choice knapsack; [`frontier`] solves it for every budget at once.
//!
//! # Algorithm: exact Pareto-set merging
//!
//! Layers are folded in one at a time. After layer `i` the state is the set of non-dominated
//! `(bytes, error)` points over all assignments of layers `0..=i`: every point of the previous set
//! is combined with every allowed pair of layer `i`, and a sweep over the candidates in order of
//! bytes keeps one only if its error is strictly below every cheaper-or-equal candidate's (the
//! previous frontier shifted by one pair is already in that order, so this is a linear merge per
//! pair rather than a sort).
//! This is exact: if an assignment's prefix is dominated by another prefix (no more bytes, no more
//! error), swapping in that prefix gives a full assignment that is no worse in either, because
//! cost addition is exact and IEEE rounding of `a + x` is monotone in `a`.
//!
//! Chosen over a dynamic programme indexed by cost units (bytes / gcd of all item costs) because
//! it yields the whole frontier directly, needs no table-size guard, and is never larger: the
//! frontier holds at most one point per distinct reachable total cost, so its size is bounded by
//! `(max_total - min_total) / gcd + 1` — exactly the DP table width — and is usually far smaller.
//! An 80-layer × 16-pair model (sliding and global layers mixed) takes milliseconds.
//!
//! # Determinism and ties
//!
//! Predicted error of an assignment is summed over layers in index order starting from 0.0 (a
//! left fold), the same way everywhere in this module, so equal assignments give equal bits.
//! Among assignments with equal bytes and equal predicted error, the one whose sequence of pair
//! indices (in each layer's pair order: its own pairs, else `Problem::pairs`; layer 0 first) is
//! lexicographically smallest is returned.
//! Among equal predicted error at different bytes, the cheaper one wins (the frontier keeps it).
//!
//! # Input validation
//!
//! Error values must be finite and non-negative: NaN, infinite or negative values are rejected
//! with [`SearchError::BadError`] naming the layer, side and type (no clamping). Row sizes must be
//! whole blocks of every type they may take ([`SearchError::PartialBlock`]), as in llama.cpp.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cache_type::CacheType;

/// One layer's shape at the target context and its per-type predicted errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCosts {
    /// Values per K row (per token).
    pub k_dim: u64,
    /// Values per V row (per token).
    pub v_dim: u64,
    /// Tokens the layer holds at the target context (a sliding layer holds its window).
    pub cells: u64,
    /// Predicted error when this layer's K cache takes the type (f16 usually 0).
    pub dk: BTreeMap<CacheType, f64>,
    /// Predicted error when this layer's V cache takes the type (f16 usually 0).
    pub dv: BTreeMap<CacheType, f64>,
    /// Pairs this layer may take instead of [`Problem::pairs`] (a layer on another device: the
    /// CPU's pairs for a layer left there, the GPU's for an offloaded one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<Vec<(CacheType, CacheType)>>,
    /// A recent window the layer may keep (patch 0014): each of its pairs is then also an option
    /// with the window, at the window's bytes more and the errors measured with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowCosts>,
}

/// One layer's recent window as a search option: what it adds and what the types cost with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowCosts {
    /// Bytes the window's rows add to the layer (the runtime's, as the cells are).
    pub bytes: u64,
    /// Predicted error when this layer's K cache takes the type and the window is kept.
    pub dk: BTreeMap<CacheType, f64>,
    /// Predicted error when this layer's V cache takes the type and the window is kept.
    pub dv: BTreeMap<CacheType, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// Per layer; `None` for layers without a KV cache (they cost 0 and contribute 0).
    pub layers: Vec<Option<LayerCosts>>,
    /// Allowed (K, V) pairs of every layer without pairs of its own; their order is the
    /// tie-break order.
    pub pairs: Vec<(CacheType, CacheType)>,
}

impl Problem {
    /// The pairs layer `layer` may take (its own, else [`Problem::pairs`]).
    pub fn pairs_of(&self, layer: usize) -> &[(CacheType, CacheType)] {
        self.layers.get(layer).and_then(|l| l.as_ref()).and_then(|l| l.pairs.as_deref()).unwrap_or(&self.pairs)
    }
}

/// A per-layer type assignment and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// `(K, V)` per layer; layers without a cache get `(F16, F16)`.
    pub types: Vec<(CacheType, CacheType)>,
    /// Total KV cache bytes.
    pub bytes: u64,
    /// `bytes * 8 / Σ (k_dim + v_dim) * cells` over layers with a cache (0 when nothing is cached).
    pub bits_per_value: f64,
    /// Summed predicted error (left fold over layers in index order).
    pub predicted: f64,
    /// Layers that keep their recent window ([`LayerCosts::window`]), ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windowed: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    #[error("no (K, V) cache type pairs allowed")]
    NoPairs,
    #[error("layer {layer}: no (K, V) cache type pairs allowed")]
    NoLayerPairs { layer: usize },
    #[error("layer {layer}: no predicted error for {side} type {ty}")]
    MissingError { layer: usize, side: &'static str, ty: CacheType },
    #[error("layer {layer}: predicted error {value} for {side} type {ty} is not a finite non-negative number")]
    BadError { layer: usize, side: &'static str, ty: CacheType, value: f64 },
    #[error("layer {layer}: {side} row of {dim} values is not a whole number of {ty} blocks of {block}")]
    PartialBlock { layer: usize, side: &'static str, ty: CacheType, dim: u64, block: u64 },
    #[error("layer {layer}: KV cache size overflows 64 bits")]
    Overflow { layer: usize },
    #[error("types assigned to {got} layers, model has {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("cache type pair `{entry}`: {reason}")]
    BadPair { entry: String, reason: String },
    #[error("cache type pair `{entry}`: type {ty} is not among the candidate types ({candidates})")]
    NotCandidate { entry: String, ty: CacheType, candidates: String },
    #[error("pair spec `{0}` gives no pairs")]
    EmptyPairs(String),
    #[error("layer {layer}: a recent window is assigned but the layer has none to take")]
    NoWindow { layer: usize },
}

// ---------------------------------------------------------------------------------------------
// Preparation: per-layer option tables.

/// One allowed pair of one layer.
#[derive(Debug, Clone, Copy)]
struct Opt {
    bytes: u64,
    err: f64,
}

fn lookup(map: &BTreeMap<CacheType, f64>, layer: usize, side: &'static str, ty: CacheType) -> Result<f64, SearchError> {
    let value = *map.get(&ty).ok_or(SearchError::MissingError { layer, side, ty })?;
    if !value.is_finite() || value < 0.0 {
        return Err(SearchError::BadError { layer, side, ty, value });
    }
    Ok(value)
}

fn row_bytes(dim: u64, layer: usize, side: &'static str, ty: CacheType) -> Result<u64, SearchError> {
    let (block, _) = ty.block();
    if !dim.is_multiple_of(block) {
        return Err(SearchError::PartialBlock { layer, side, ty, dim, block });
    }
    Ok(ty.row_bytes(dim))
}

/// Bytes and predicted error of `layer` at `(k, v)`, with its window when `windowed`, validated.
fn layer_opt(layer: usize, l: &LayerCosts, (k, v): (CacheType, CacheType), windowed: bool) -> Result<Opt, SearchError> {
    let row = row_bytes(l.k_dim, layer, "K", k)?
        .checked_add(row_bytes(l.v_dim, layer, "V", v)?)
        .ok_or(SearchError::Overflow { layer })?;
    let bytes = row.checked_mul(l.cells).ok_or(SearchError::Overflow { layer })?;
    if !windowed {
        let err = lookup(&l.dk, layer, "K", k)? + lookup(&l.dv, layer, "V", v)?;
        return Ok(Opt { bytes, err });
    }
    let w = l.window.as_ref().ok_or(SearchError::NoWindow { layer })?;
    let bytes = bytes.checked_add(w.bytes).ok_or(SearchError::Overflow { layer })?;
    let err = lookup(&w.dk, layer, "K", k)? + lookup(&w.dv, layer, "V", v)?;
    Ok(Opt { bytes, err })
}

/// Σ (k_dim + v_dim) * cells over layers with a cache.
fn total_values(p: &Problem) -> Result<u64, SearchError> {
    let mut total = 0u64;
    for (layer, l) in p.layers.iter().enumerate() {
        if let Some(l) = l {
            let values = l
                .k_dim
                .checked_add(l.v_dim)
                .and_then(|d| d.checked_mul(l.cells))
                .and_then(|v| total.checked_add(v))
                .ok_or(SearchError::Overflow { layer })?;
            total = values;
        }
    }
    Ok(total)
}

fn bits_per_value(bytes: u64, values: u64) -> f64 {
    if values == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / values as f64
    }
}

/// Per layer, the option of every pair (index = pair index), then, for a layer that may keep a
/// window, of every pair with it (index = pairs + pair index: without the window first, so that
/// ties go to it); `None` for layers without a cache.
fn options(p: &Problem) -> Result<Vec<Option<Vec<Opt>>>, SearchError> {
    if p.pairs.is_empty() {
        return Err(SearchError::NoPairs);
    }
    let mut max_total = 0u64;
    let mut out = Vec::with_capacity(p.layers.len());
    for (layer, l) in p.layers.iter().enumerate() {
        let Some(l) = l else {
            out.push(None);
            continue;
        };
        let pairs = p.pairs_of(layer);
        if pairs.is_empty() {
            return Err(SearchError::NoLayerPairs { layer });
        }
        let windows: &[bool] = if l.window.is_some() { &[false, true] } else { &[false] };
        let opts = windows
            .iter()
            .flat_map(|&w| pairs.iter().map(move |&pair| (pair, w)))
            .map(|(pair, w)| layer_opt(layer, l, pair, w))
            .collect::<Result<Vec<_>, _>>()?;
        let max = opts.iter().map(|o| o.bytes).max().unwrap_or(0);
        max_total = max_total.checked_add(max).ok_or(SearchError::Overflow { layer })?;
        out.push(Some(opts));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Pareto merging.

/// Back pointers of the frontier after one layer: point `j` extends previous point `from[j]`
/// with option `choice[j]` (see [`options`]).
struct Step {
    layer: usize,
    from: Vec<u32>,
    choice: Vec<u32>,
}

/// The solved frontier: points sorted by bytes ascending, error strictly decreasing.
struct Solved {
    n_layers: usize,
    values: u64,
    bytes: Vec<u64>,
    err: Vec<f64>,
    steps: Vec<Step>,
}

/// A candidate point: a previous frontier point extended by one pair of the current layer.
#[derive(Debug, Clone, Copy)]
struct Cand {
    bytes: u64,
    err: f64,
    /// Lexicographic rank of the parent's pair-index sequence.
    parent_rank: u32,
    choice: u32,
    parent: u32,
}

/// Candidate order: bytes, then error, then lexicographic order of the pair-index sequence.
fn cand_order(a: &Cand, b: &Cand) -> std::cmp::Ordering {
    a.bytes
        .cmp(&b.bytes)
        .then(a.err.total_cmp(&b.err))
        .then(a.parent_rank.cmp(&b.parent_rank))
        .then(a.choice.cmp(&b.choice))
}

/// The sweep over candidates in candidate order: keep one only if its error is strictly below
/// that of every earlier one. Whether a candidate survives depends only on the earlier ones, so
/// sweeping parts first and merging the survivors gives the same set as one sweep over all.
fn push_pruned(out: &mut Vec<Cand>, c: Cand) {
    if out.last().is_none_or(|k| c.err < k.err) {
        out.push(c);
    }
}

fn solve(p: &Problem) -> Result<Solved, SearchError> {
    let opts = options(p)?;
    let values = total_values(p)?;
    let mut bytes = vec![0u64];
    let mut err = vec![0.0f64];
    // rank[j]: position of point j's pair-index sequence in lexicographic order among the points.
    let mut rank = vec![0u32];
    let mut steps = Vec::new();

    let mut kept: Vec<Cand> = Vec::new();
    let mut merged: Vec<Cand> = Vec::new();
    for (layer, layer_opts) in opts.iter().enumerate() {
        let Some(layer_opts) = layer_opts else { continue };
        // Fold the pairs in one at a time: the frontier shifted by pair `c` is already sorted in
        // candidate order, so a linear merge with the running result plus the sweep suffices.
        kept.clear();
        for (c, o) in layer_opts.iter().enumerate() {
            let shifted = bytes.iter().zip(&err).enumerate().map(|(j, (&b, &e))| Cand {
                bytes: b + o.bytes,
                err: e + o.err,
                parent_rank: rank[j],
                choice: c as u32,
                parent: j as u32,
            });
            merged.clear();
            let mut acc = kept.iter().copied().peekable();
            let mut shifted = shifted.peekable();
            loop {
                let next = match (acc.peek(), shifted.peek()) {
                    (Some(a), Some(b)) if cand_order(a, b).is_le() => acc.next(),
                    (Some(_), Some(_)) | (None, Some(_)) => shifted.next(),
                    (Some(_), None) => acc.next(),
                    (None, None) => break,
                };
                push_pruned(&mut merged, next.expect("peeked"));
            }
            std::mem::swap(&mut kept, &mut merged);
        }
        let mut order: Vec<u32> = (0..kept.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (kept[i as usize].parent_rank, kept[i as usize].choice));
        rank = vec![0; kept.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
        bytes = kept.iter().map(|c| c.bytes).collect();
        err = kept.iter().map(|c| c.err).collect();
        steps.push(Step {
            layer,
            from: kept.iter().map(|c| c.parent).collect(),
            choice: kept.iter().map(|c| c.choice).collect(),
        });
    }
    Ok(Solved { n_layers: p.layers.len(), values, bytes, err, steps })
}

impl Solved {
    fn assignment(&self, p: &Problem, point: usize) -> Assignment {
        let mut types = vec![(CacheType::F16, CacheType::F16); self.n_layers];
        let mut windowed = Vec::new();
        let mut j = point;
        for step in self.steps.iter().rev() {
            let pairs = p.pairs_of(step.layer);
            let c = step.choice[j] as usize;
            types[step.layer] = pairs[c % pairs.len()];
            if c >= pairs.len() {
                windowed.push(step.layer);
            }
            j = step.from[j] as usize;
        }
        windowed.reverse();
        Assignment {
            types,
            bytes: self.bytes[point],
            bits_per_value: bits_per_value(self.bytes[point], self.values),
            predicted: self.err[point],
            windowed,
        }
    }
}

/// The whole Pareto frontier: sorted by bytes strictly increasing, predicted strictly decreasing.
/// The first point is the cheapest assignment (lowest error among the cheapest), the last the most
/// accurate one (cheapest among the lowest error).
pub fn frontier(p: &Problem) -> Result<Vec<Assignment>, SearchError> {
    let s = solve(p)?;
    Ok((0..s.bytes.len()).map(|i| s.assignment(p, i)).collect())
}

/// Lowest predicted error with total bytes ≤ `max_bytes` (fewest bytes among equal error);
/// `None` when even the cheapest assignment does not fit.
pub fn best_within_bytes(p: &Problem, max_bytes: u64) -> Result<Option<Assignment>, SearchError> {
    let s = solve(p)?;
    let n = s.bytes.partition_point(|&b| b <= max_bytes);
    Ok(n.checked_sub(1).map(|i| s.assignment(p, i)))
}

/// Lowest predicted error with `bits_per_value ≤ max_bits_per_value` (the reported value is what is
/// compared); `None` when nothing fits or the bound is NaN.
pub fn best_within_bits(p: &Problem, max_bits_per_value: f64) -> Result<Option<Assignment>, SearchError> {
    let s = solve(p)?;
    let n = s.bytes.partition_point(|&b| bits_per_value(b, s.values) <= max_bits_per_value);
    Ok(n.checked_sub(1).map(|i| s.assignment(p, i)))
}

/// Fewest bytes with predicted error ≤ `max_predicted` (lowest error among equal bytes);
/// `None` when even the most accurate assignment exceeds it or the bound is NaN.
pub fn cheapest_within_error(p: &Problem, max_predicted: f64) -> Result<Option<Assignment>, SearchError> {
    let s = solve(p)?;
    let first = s.err.partition_point(|&e| e > max_predicted || max_predicted.is_nan());
    Ok((first < s.err.len()).then(|| s.assignment(p, first)))
}

/// Bytes, bits per value and predicted error of a given assignment (`types[i]` for layer `i`;
/// entries of layers without a cache are ignored), no layer with its window. The pairs need not be
/// in `p.pairs`.
pub fn evaluate(p: &Problem, types: &[(CacheType, CacheType)]) -> Result<Assignment, SearchError> {
    evaluate_windowed(p, types, &[])
}

/// [`evaluate`] with the layers `windowed` (ascending) keeping their window.
pub fn evaluate_windowed(
    p: &Problem,
    types: &[(CacheType, CacheType)],
    windowed: &[usize],
) -> Result<Assignment, SearchError> {
    if types.len() != p.layers.len() {
        return Err(SearchError::WrongLength { expected: p.layers.len(), got: types.len() });
    }
    let mut bytes = 0u64;
    let mut predicted = 0.0;
    let mut out = Vec::with_capacity(types.len());
    for &layer in windowed {
        if p.layers.get(layer).is_none_or(|l| l.as_ref().is_none_or(|l| l.window.is_none())) {
            return Err(SearchError::NoWindow { layer });
        }
    }
    for (layer, (l, &pair)) in p.layers.iter().zip(types).enumerate() {
        let Some(l) = l else {
            out.push((CacheType::F16, CacheType::F16));
            continue;
        };
        let o = layer_opt(layer, l, pair, windowed.contains(&layer))?;
        bytes = bytes.checked_add(o.bytes).ok_or(SearchError::Overflow { layer })?;
        predicted += o.err;
        out.push(pair);
    }
    let values = total_values(p)?;
    Ok(Assignment {
        types: out,
        bytes,
        bits_per_value: bits_per_value(bytes, values),
        predicted,
        windowed: windowed.to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// Baseline: ik_llama.cpp-style first/last layers at higher precision.

/// ik_llama.cpp's `--cache-type-k-first/last` style baseline. Counting only layers that have a KV
/// cache (in layer order), the first `n_first_last` and the last `n_first_last` of them take
/// `(q8_0, q8_0)`, every other one `(q4_0, q4_0)`; when `2 * n_first_last ≥` that count, all of them
/// are q8_0. Layers without a cache get `(f16, f16)` as everywhere. The pairs need not be in
/// `p.pairs`, but the layers need predicted errors for q8_0 and q4_0.
pub fn first_last_heuristic(p: &Problem, n_first_last: usize) -> Result<Assignment, SearchError> {
    let n_cached = p.layers.iter().flatten().count();
    let mut seen = 0usize;
    let types: Vec<_> = p
        .layers
        .iter()
        .map(|l| {
            if l.is_none() {
                return (CacheType::F16, CacheType::F16);
            }
            let pos = seen;
            seen += 1;
            if pos < n_first_last || pos >= n_cached.saturating_sub(n_first_last) {
                (CacheType::Q8_0, CacheType::Q8_0)
            } else {
                (CacheType::Q4_0, CacheType::Q4_0)
            }
        })
        .collect();
    evaluate(p, &types)
}

/// [`first_last_heuristic`] with the largest `n_first_last` whose bytes fit `max_bytes` (from 0 up to
/// the `n` that makes every cached layer q8_0); `None` when even all-q4_0 does not fit.
pub fn heuristic_at_bytes(p: &Problem, max_bytes: u64) -> Result<Option<Assignment>, SearchError> {
    let n_cached = p.layers.iter().flatten().count();
    for n in (0..=n_cached.div_ceil(2)).rev() {
        let a = first_last_heuristic(p, n)?;
        if a.bytes <= max_bytes {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Pair lists.

/// The K-V pairs kvtuner's CUDA build compiles flash-attention kernels for; build.rs turns the
/// same file into `GGML_CUDA_FA_QUANTS`.
pub const CUDA_FA_PAIRS: &str = include_str!("cuda_fa_pairs.txt");

/// Layers (index, pair) of `types` whose K-V pair has no compiled CUDA flash-attention kernel
/// (attention for them leaves the GPU); `None` entries (layers without a cache) are skipped.
pub fn layers_without_cuda_kernel(types: &[Option<(CacheType, CacheType)>]) -> Vec<(usize, (CacheType, CacheType))> {
    let cuda = parse_pairs("cuda", &CacheType::ALL, CUDA_FA_PAIRS).expect("the built-in CUDA pair list parses");
    types
        .iter()
        .enumerate()
        .filter_map(|(il, t)| t.filter(|pair| !cuda.contains(pair)).map(|pair| (il, pair)))
        .collect()
}

/// One warning line for [`layers_without_cuda_kernel`]'s result (`None` when it is empty).
pub fn cuda_kernel_warning(missing: &[(usize, (CacheType, CacheType))]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let mut pairs: Vec<String> = missing.iter().map(|(_, (k, v))| format!("{k}/{v}")).collect();
    pairs.sort();
    pairs.dedup();
    let layers: Vec<String> = missing.iter().map(|(il, _)| il.to_string()).collect();
    Some(format!(
        "layers {} use K-V pairs the CUDA build has no flash-attention kernel for ({}): on a GPU their attention runs on the CPU",
        layers.join(", "),
        pairs.join(", ")
    ))
}

/// Allowed (K, V) pairs from a spec:
///
/// - `cuda`: the pairs of `cuda_list` (the caller passes [`CUDA_FA_PAIRS`]: one
///   `K V` pair per line, `#` starts a comment) whose two types are both candidate types — the
///   CUDA build supports them all, but only measured types can be predicted. Unknown type names
///   or malformed lines are errors; no pair left is an error.
/// - `cpu`: every (K, V) combination of `candidate_types`, K outer, in candidate order.
/// - otherwise an explicit comma-separated list `K/V,K/V,...` (e.g. `q8_0/q4_0,f16/f16`); unknown
///   type names and types that are not candidates are errors naming the entry.
///
/// Duplicates are dropped, keeping the first occurrence (pair order is the tie-break order).
pub fn parse_pairs(
    spec: &str,
    candidate_types: &[CacheType],
    cuda_list: &str,
) -> Result<Vec<(CacheType, CacheType)>, SearchError> {
    let spec_trim = spec.trim();
    let parse_type = |entry: &str, name: &str| {
        name.trim()
            .parse::<CacheType>()
            .map_err(|e| SearchError::BadPair { entry: entry.to_string(), reason: e.to_string() })
    };
    let mut pairs = Vec::new();
    if spec_trim.eq_ignore_ascii_case("cuda") {
        for line in cuda_list.lines() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let names: Vec<&str> = entry.split_whitespace().collect();
            let [k, v] = names[..] else {
                return Err(SearchError::BadPair {
                    entry: entry.to_string(),
                    reason: "expected `<type_k> <type_v>`".to_string(),
                });
            };
            let pair = (parse_type(entry, k)?, parse_type(entry, v)?);
            if candidate_types.contains(&pair.0) && candidate_types.contains(&pair.1) {
                pairs.push(pair);
            }
        }
    } else if spec_trim.eq_ignore_ascii_case("cpu") {
        for &k in candidate_types {
            for &v in candidate_types {
                pairs.push((k, v));
            }
        }
    } else {
        for entry in spec_trim.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((k, v)) = entry.split_once('/') else {
                return Err(SearchError::BadPair {
                    entry: entry.to_string(),
                    reason: "expected `<type_k>/<type_v>`".to_string(),
                });
            };
            let pair = (parse_type(entry, k)?, parse_type(entry, v)?);
            for ty in [pair.0, pair.1] {
                if !candidate_types.contains(&ty) {
                    let candidates = candidate_types.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
                    return Err(SearchError::NotCandidate { entry: entry.to_string(), ty, candidates });
                }
            }
            pairs.push(pair);
        }
    }
    let mut unique: Vec<(CacheType, CacheType)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        if !unique.contains(&pair) {
            unique.push(pair);
        }
    }
    if unique.is_empty() {
        return Err(SearchError::EmptyPairs(spec.to_string()));
    }
    Ok(unique)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use CacheType::{F16, Q4_0, Q5_0, Q8_0};

    const CUDA: &str = CUDA_FA_PAIRS;
    const TYPES: [CacheType; 4] = [F16, Q8_0, Q5_0, Q4_0];

    fn layer(k_dim: u64, v_dim: u64, cells: u64, dk: [f64; 4], dv: [f64; 4]) -> LayerCosts {
        LayerCosts {
            k_dim,
            v_dim,
            cells,
            dk: TYPES.into_iter().zip(dk).collect(),
            dv: TYPES.into_iter().zip(dv).collect(),
            pairs: None,
            window: None,
        }
    }

    /// Every assignment as (bytes, predicted, pair indices), errors summed as a left fold.
    fn enumerate(p: &Problem) -> Vec<(u64, f64, Vec<usize>)> {
        let n = p.layers.len();
        let mut out = Vec::new();
        let mut idx = vec![0usize; n];
        loop {
            let (mut bytes, mut err) = (0u64, 0.0f64);
            for (l, &i) in p.layers.iter().zip(&idx) {
                if let Some(l) = l {
                    let pairs = l.pairs.as_deref().unwrap_or(&p.pairs);
                    let (k, v) = pairs[i % pairs.len()];
                    bytes += (k.row_bytes(l.k_dim) + v.row_bytes(l.v_dim)) * l.cells;
                    match (&l.window, i >= pairs.len()) {
                        (Some(w), true) => {
                            bytes += w.bytes;
                            err += w.dk[&k] + w.dv[&v];
                        }
                        _ => err += l.dk[&k] + l.dv[&v],
                    }
                }
            }
            // Layers without a cache only take pair index 0 (they are reported as f16/f16).
            let key: Vec<usize> = idx.clone();
            out.push((bytes, err, key));
            let mut d = 0;
            loop {
                if d == n {
                    return out;
                }
                let limit = match &p.layers[d] {
                    Some(l) => p.pairs_of(d).len() * if l.window.is_some() { 2 } else { 1 },
                    None => 1,
                };
                idx[d] += 1;
                if idx[d] < limit {
                    break;
                }
                idx[d] = 0;
                d += 1;
            }
        }
    }

    fn to_assignment(p: &Problem, (bytes, err, idx): &(u64, f64, Vec<usize>)) -> Assignment {
        let n = |il: usize| p.pairs_of(il).len();
        let types = p
            .layers
            .iter()
            .zip(idx)
            .enumerate()
            .map(|(il, (l, &i))| if l.is_some() { p.pairs_of(il)[i % n(il)] } else { (F16, F16) })
            .collect();
        let windowed = (0..p.layers.len()).filter(|&il| p.layers[il].is_some() && idx[il] >= n(il)).collect();
        let values: u64 = p.layers.iter().flatten().map(|l| (l.k_dim + l.v_dim) * l.cells).sum();
        Assignment { types, bytes: *bytes, bits_per_value: bits_per_value(*bytes, values), predicted: *err, windowed }
    }

    /// Brute-force sort: bytes, error, lexicographic pair indices.
    fn sorted(p: &Problem) -> Vec<(u64, f64, Vec<usize>)> {
        let mut all = enumerate(p);
        all.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        all
    }

    fn brute_frontier(p: &Problem) -> Vec<Assignment> {
        let mut out: Vec<Assignment> = Vec::new();
        for s in sorted(p) {
            if out.last().is_none_or(|a| s.1 < a.predicted) {
                out.push(to_assignment(p, &s));
            }
        }
        out
    }

    fn brute_best(p: &Problem, max_bytes: u64) -> Option<Assignment> {
        let mut best: Option<&(u64, f64, Vec<usize>)> = None;
        let all = sorted(p);
        for s in all.iter().filter(|s| s.0 <= max_bytes) {
            // Strict improvement only: earlier (fewer bytes, then lexicographically first) wins ties.
            if best.is_none_or(|b| s.1 < b.1) {
                best = Some(s);
            }
        }
        best.map(|s| to_assignment(p, s))
    }

    fn brute_cheapest(p: &Problem, max_err: f64) -> Option<Assignment> {
        sorted(p).iter().find(|s| s.1 <= max_err).map(|s| to_assignment(p, s))
    }

    fn arb_err() -> impl Strategy<Value = f64> {
        // Dyadic grid values force exact ties; the range gives generic values.
        prop_oneof![(0u32..8).prop_map(|i| i as f64 / 4.0), 0.0f64..3.0]
    }

    fn arb_layer() -> impl Strategy<Value = Option<LayerCosts>> {
        let dims = prop::sample::select(vec![64u64, 128, 256]);
        let cells = prop::sample::select(vec![64u64, 128, 512]);
        let all_pairs: Vec<(CacheType, CacheType)> =
            TYPES.iter().flat_map(|&k| TYPES.iter().map(move |&v| (k, v))).collect();
        // some layers with pairs of their own (a layer on another device)
        let own = prop_oneof![3 => Just(None), 1 => prop::sample::subsequence(all_pairs, 1..=3).prop_shuffle().prop_map(Some)];
        // some layers that may keep a window (its bytes on a grid too, for ties)
        let window = prop_oneof![
            2 => Just(None),
            1 => (prop::sample::select(vec![0u64, 1024, 8192, 65536]), prop::array::uniform4(arb_err()), prop::array::uniform4(arb_err()))
                .prop_map(|(bytes, dk, dv)| Some(WindowCosts {
                    bytes,
                    dk: TYPES.into_iter().zip(dk).collect(),
                    dv: TYPES.into_iter().zip(dv).collect(),
                })),
        ];
        let some = (
            dims.clone(),
            dims,
            cells,
            prop::array::uniform4(arb_err()),
            prop::array::uniform4(arb_err()),
            own,
            window,
        )
            .prop_map(|(k, v, c, dk, dv, own, window)| {
                Some(LayerCosts { pairs: own, window, ..layer(k, v, c, dk, dv) })
            });
        prop_oneof![8 => some, 1 => Just(None)]
    }

    fn arb_problem() -> impl Strategy<Value = Problem> {
        let all_pairs: Vec<(CacheType, CacheType)> =
            TYPES.iter().flat_map(|&k| TYPES.iter().map(move |&v| (k, v))).collect();
        let pairs = prop::sample::subsequence(all_pairs, 2..=4).prop_shuffle();
        (prop::collection::vec(arb_layer(), 1..=5), pairs).prop_map(|(layers, pairs)| Problem { layers, pairs })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn frontier_matches_brute_force(p in arb_problem()) {
            prop_assert_eq!(frontier(&p).unwrap(), brute_frontier(&p));
        }

        #[test]
        fn best_within_bytes_matches_brute_force(p in arb_problem(), frac in 0.0f64..1.2) {
            let all = enumerate(&p);
            let max = all.iter().map(|s| s.0).max().unwrap();
            let min = all.iter().map(|s| s.0).min().unwrap();
            for budget in [(max as f64 * frac) as u64, min, min.saturating_sub(1), max] {
                prop_assert_eq!(best_within_bytes(&p, budget).unwrap(), brute_best(&p, budget));
            }
        }

        #[test]
        fn cheapest_within_error_matches_brute_force(p in arb_problem(), frac in 0.0f64..1.2) {
            let max_err = enumerate(&p).iter().map(|s| s.1).fold(0.0, f64::max);
            for bound in [max_err * frac, 0.0, max_err] {
                prop_assert_eq!(cheapest_within_error(&p, bound).unwrap(), brute_cheapest(&p, bound));
            }
        }

        #[test]
        fn best_within_bits_agrees_with_bytes(p in arb_problem(), bits in 4.0f64..17.0) {
            let got = best_within_bits(&p, bits).unwrap();
            let values: u64 = p.layers.iter().flatten().map(|l| (l.k_dim + l.v_dim) * l.cells).sum();
            let fits: Vec<Assignment> =
                frontier(&p).unwrap().into_iter().filter(|a| a.bits_per_value <= bits).collect();
            prop_assert_eq!(got.clone(), fits.last().cloned());
            if let Some(a) = got {
                prop_assert_eq!(a.bits_per_value, bits_per_value(a.bytes, values));
            }
        }
    }

    /// 15 sliding layers (512 cells) and 3 global ones (4096 cells), head dims 256, CUDA pairs.
    fn gemma_like() -> Problem {
        let layers = (0..18)
            .map(|i| {
                let cells = if i % 6 == 5 { 4096 } else { 512 };
                let s = 1.0 + (i as f64 * 0.37).sin().abs() + if i < 2 { 3.0 } else { 0.0 };
                Some(layer(256, 256, cells, [0.0, 0.01 * s, 0.05 * s, 0.12 * s], [0.0, 0.002 * s, 0.01 * s, 0.03 * s]))
            })
            .collect();
        Problem { layers, pairs: parse_pairs("cuda", &TYPES, CUDA).unwrap() }
    }

    #[test]
    fn realistic_frontier_is_monotone_and_ends_at_f16() {
        let p = gemma_like();
        let f = frontier(&p).unwrap();
        assert!(f.len() > 10);
        for w in f.windows(2) {
            assert!(w[0].bytes < w[1].bytes && w[0].predicted > w[1].predicted);
            assert!(w[0].bits_per_value < w[1].bits_per_value);
        }
        let last = f.last().unwrap();
        assert_eq!(last.predicted, 0.0);
        assert!(last.types.iter().all(|&t| t == (F16, F16)));
        assert_eq!(last.bits_per_value, 16.0);
        let first = &f[0];
        assert!(first.types.iter().all(|&t| t == (Q4_0, Q4_0)));
        assert_eq!(first.bits_per_value, 4.5);
        // Every point's numbers are those of its own types.
        for a in &f {
            assert_eq!(&evaluate(&p, &a.types).unwrap(), a);
        }
        // The optimiser never loses to the first/last baseline at equal or fewer bytes.
        for n in 0..=9 {
            let h = first_last_heuristic(&p, n).unwrap();
            let best = best_within_bytes(&p, h.bytes).unwrap().unwrap();
            assert!(best.bytes <= h.bytes && best.predicted <= h.predicted);
        }
    }

    #[test]
    fn layers_without_cache_cost_nothing() {
        let mut p = gemma_like();
        p.layers[3] = None;
        let f = frontier(&p).unwrap();
        assert!(f.iter().all(|a| a.types[3] == (F16, F16)));
        let empty = Problem { layers: vec![None, None], pairs: p.pairs.clone() };
        let f = frontier(&empty).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].bytes, f[0].predicted, f[0].bits_per_value), (0, 0.0, 0.0));
    }

    #[test]
    fn queries_on_bounds() {
        let p = gemma_like();
        let f = frontier(&p).unwrap();
        assert_eq!(best_within_bytes(&p, f[0].bytes - 1).unwrap(), None);
        assert_eq!(best_within_bytes(&p, u64::MAX).unwrap().as_ref(), f.last());
        let at_q8 = best_within_bits(&p, 8.5).unwrap().unwrap();
        let uniform_q8 = evaluate(&p, &[(Q8_0, Q8_0); 18]).unwrap();
        assert!(at_q8.bits_per_value <= 8.5 && at_q8.bits_per_value > 8.0);
        assert!(at_q8.predicted < uniform_q8.predicted);
        assert_eq!(best_within_bits(&p, 4.4).unwrap(), None);
        assert_eq!(best_within_bits(&p, f64::NAN).unwrap(), None);
        assert_eq!(cheapest_within_error(&p, 0.0).unwrap().as_ref(), f.last());
        assert_eq!(cheapest_within_error(&p, f64::INFINITY).unwrap().as_ref(), f.first());
        assert_eq!(cheapest_within_error(&p, f64::NAN).unwrap(), None);
    }

    #[test]
    fn bad_input_is_rejected() {
        let mut p = gemma_like();
        p.layers[4].as_mut().unwrap().dk.insert(Q5_0, -0.1);
        assert!(matches!(frontier(&p), Err(SearchError::BadError { layer: 4, side: "K", ty: Q5_0, .. })));
        p.layers[4].as_mut().unwrap().dk.insert(Q5_0, f64::NAN);
        let e = frontier(&p).unwrap_err();
        assert!(e.to_string().contains("layer 4") && e.to_string().contains("q5_0"), "{e}");
        let mut p = gemma_like();
        p.layers[2].as_mut().unwrap().dv.remove(&Q4_0);
        assert_eq!(frontier(&p).unwrap_err(), SearchError::MissingError { layer: 2, side: "V", ty: Q4_0 });
        let mut p = gemma_like();
        p.layers[1].as_mut().unwrap().k_dim = 100;
        assert!(matches!(frontier(&p), Err(SearchError::PartialBlock { layer: 1, side: "K", .. })));
        let mut p = gemma_like();
        p.pairs.clear();
        assert_eq!(frontier(&p).unwrap_err(), SearchError::NoPairs);
        let mut p = gemma_like();
        p.layers[0].as_mut().unwrap().cells = u64::MAX / 2;
        assert_eq!(frontier(&p).unwrap_err(), SearchError::Overflow { layer: 0 });
    }

    /// Windows of 132 f16 rows cost every layer the same bytes; where one takes the most error off
    /// (here Gemma's global layers: 70% of it, against 10% on a sliding layer), the search keeps
    /// it first, and it weighs windows against wider types (with q8_0 allowed, a window competes
    /// with upgrading a layer). The choice evaluates to its own numbers; a window on a layer that
    /// has none to take is refused.
    #[test]
    fn the_search_keeps_a_window_where_it_takes_the_most_error_off() {
        let mut p = gemma_like();
        p.pairs = vec![(Q4_0, Q4_0)];
        let window_bytes = 132 * 2 * 256 * 2;
        for (il, l) in p.layers.iter_mut().enumerate() {
            let l = l.as_mut().unwrap();
            let keep = if il % 6 == 5 { 0.3 } else { 0.9 };
            let scaled = |m: &BTreeMap<CacheType, f64>| m.iter().map(|(&t, &e)| (t, e * keep)).collect();
            l.window = Some(WindowCosts { bytes: window_bytes, dk: scaled(&l.dk), dv: scaled(&l.dv) });
        }
        let all_q4: Vec<_> = vec![(Q4_0, Q4_0); 18];
        let plain = evaluate(&p, &all_q4).unwrap();
        assert!(plain.windowed.is_empty());
        let global = [5, 11, 17];
        let on_global = evaluate_windowed(&p, &all_q4, &global).unwrap();
        assert_eq!(on_global.windowed, global);
        assert_eq!(on_global.bytes - plain.bytes, 3 * window_bytes);
        assert_eq!(best_within_bytes(&p, on_global.bytes).unwrap().unwrap(), on_global);
        assert_eq!(best_within_bytes(&p, on_global.bytes - 1).unwrap().unwrap().windowed.len(), 2);
        // with room for everything, every layer keeps its window
        assert_eq!(frontier(&p).unwrap().pop().unwrap().windowed, (0..18).collect::<Vec<_>>());
        // windows against wider types: every point is its own numbers
        p.pairs = vec![(Q4_0, Q4_0), (Q8_0, Q8_0)];
        let f = frontier(&p).unwrap();
        assert!(f.iter().any(|a| !a.windowed.is_empty() && a.types.contains(&(Q4_0, Q4_0))));
        for a in &f {
            assert_eq!(&evaluate_windowed(&p, &a.types, &a.windowed).unwrap(), a);
        }
        p.layers[3].as_mut().unwrap().window = None;
        assert_eq!(evaluate_windowed(&p, &all_q4, &[3]).unwrap_err(), SearchError::NoWindow { layer: 3 });
        assert_eq!(evaluate_windowed(&p, &all_q4, &[40]).unwrap_err(), SearchError::NoWindow { layer: 40 });
    }

    #[test]
    fn parse_pairs_specs() {
        let cuda = parse_pairs("cuda", &TYPES, CUDA).unwrap();
        assert_eq!(cuda.len(), 10);
        assert_eq!(cuda[0], (F16, F16));
        assert_eq!(cuda[6], (Q8_0, Q4_0));
        assert!(cuda.iter().all(|&(k, v)| k.bits_per_value() >= v.bits_per_value()));
        // Only pairs of measured types are proposed.
        let cuda3 = parse_pairs(" CUDA ", &[F16, Q8_0, Q4_0], CUDA).unwrap();
        assert_eq!(cuda3, vec![(F16, F16), (F16, Q8_0), (F16, Q4_0), (Q8_0, Q8_0), (Q8_0, Q4_0), (Q4_0, Q4_0)]);
        assert!(matches!(parse_pairs("cuda", &[CacheType::Bf16], CUDA), Err(SearchError::EmptyPairs(_))));
        let e = parse_pairs("cuda", &TYPES, "f16 f16\nq8_0 q3_k # bad\n").unwrap_err();
        assert!(e.to_string().contains("q8_0 q3_k"), "{e}");
        assert!(matches!(parse_pairs("cuda", &TYPES, "f16\n"), Err(SearchError::BadPair { .. })));

        let cpu = parse_pairs("cpu", &TYPES, CUDA).unwrap();
        assert_eq!(cpu.len(), 16);
        assert_eq!(&cpu[..2], &[(F16, F16), (F16, Q8_0)]);
        assert_eq!(cpu[4], (Q8_0, F16));

        let explicit = parse_pairs("q8_0/q4_0, f16/f16,,Q8_0/q4_0", &TYPES, CUDA).unwrap();
        assert_eq!(explicit, vec![(Q8_0, Q4_0), (F16, F16)]);
        let e = parse_pairs("q8_0/q4_0,q8_0/q3_k", &TYPES, CUDA).unwrap_err();
        assert!(e.to_string().contains("`q8_0/q3_k`"), "{e}");
        let e = parse_pairs("q8_0/q4_0,iq4_nl/q4_0", &TYPES, CUDA).unwrap_err();
        assert!(matches!(&e, SearchError::NotCandidate { entry, ty: CacheType::Iq4Nl, .. } if entry == "iq4_nl/q4_0"));
        assert!(matches!(parse_pairs("q8_0-q4_0", &TYPES, CUDA), Err(SearchError::BadPair { .. })));
        assert!(matches!(parse_pairs(" ", &TYPES, CUDA), Err(SearchError::EmptyPairs(_))));
    }

    #[test]
    fn first_last_heuristic_counts() {
        let mut p = gemma_like();
        p.layers[7] = None;
        let cached = 17;
        for n in 0..12 {
            let a = first_last_heuristic(&p, n).unwrap();
            let q8 = a.types.iter().filter(|&&t| t == (Q8_0, Q8_0)).count();
            let q4 = a.types.iter().filter(|&&t| t == (Q4_0, Q4_0)).count();
            assert_eq!(q8, (2 * n).min(cached), "n = {n}");
            assert_eq!(q8 + q4, cached);
            assert_eq!(a.types[7], (F16, F16));
            if n >= 1 {
                assert_eq!((a.types[0], a.types[17]), ((Q8_0, Q8_0), (Q8_0, Q8_0)));
            }
            if n == 2 {
                // Cached layers 0, 1 and the last two (16, 17); layer 7 has no cache.
                assert_eq!(a.types[2], (Q4_0, Q4_0));
                assert_eq!((a.types[15], a.types[16]), ((Q4_0, Q4_0), (Q8_0, Q8_0)));
            }
        }
        let h3 = first_last_heuristic(&p, 3).unwrap();
        assert_eq!(heuristic_at_bytes(&p, h3.bytes).unwrap(), Some(h3.clone()));
        assert_eq!(heuristic_at_bytes(&p, h3.bytes + 1).unwrap(), Some(h3));
        let all_q8 = first_last_heuristic(&p, 9).unwrap();
        assert_eq!(heuristic_at_bytes(&p, u64::MAX).unwrap(), Some(all_q8));
        let q4 = first_last_heuristic(&p, 0).unwrap();
        assert_eq!(heuristic_at_bytes(&p, q4.bytes - 1).unwrap(), None);
    }

    /// A 70B-sized problem (80 layers, every 5th with a 32k-cell cache, 16 pairs) solves to a
    /// monotone frontier whose every point is its own types' numbers (`--nocapture` prints the
    /// time; not asserted: timing is a benchmark's job).
    #[test]
    fn eighty_layers_and_sixteen_pairs_solve_to_a_consistent_frontier() {
        let layers = (0..80)
            .map(|i| {
                let cells = if i % 5 == 4 { 32768 } else { 1024 };
                let (k, v) = if i % 5 == 4 { (512, 512) } else { (256, 256) };
                let s = 1.0 + (i as f64 * 0.73).sin().abs();
                Some(layer(
                    k,
                    v,
                    cells,
                    [0.0, 0.011 * s, 0.047 * s, 0.13 * s],
                    [0.0, 0.0021 * s, 0.0093 * s, 0.031 * s],
                ))
            })
            .collect();
        let p = Problem { layers, pairs: parse_pairs("cpu", &TYPES, CUDA).unwrap() };
        let t = std::time::Instant::now();
        let f = frontier(&p).unwrap();
        eprintln!("80 layers x 16 pairs: {} frontier points in {:?}", f.len(), t.elapsed());
        let t = std::time::Instant::now();
        let s = solve(&p).unwrap();
        let widest = s.steps.iter().map(|s| s.from.len()).max().unwrap();
        eprintln!("solve alone: {:?}, widest intermediate frontier {widest}", t.elapsed());
        assert!(f.len() > 100, "{} points", f.len());
        for w in f.windows(2) {
            assert!(w[0].bytes < w[1].bytes && w[0].predicted > w[1].predicted);
        }
        assert!(f.last().unwrap().types.iter().all(|&t| t == (F16, F16)));
        for a in f.iter().step_by(f.len() / 20) {
            assert_eq!(&evaluate(&p, &a.types).unwrap(), a);
        }
    }
}
