//! Per-layer sensitivity table: what `kvtuner calibrate` measures and `kvtuner search` reads.
//!
//! For every layer and candidate type, the KL divergence to the f16-cache baseline when only
//! that layer's K (or only its V) takes the type and every other layer stays f16.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache_type::CacheType;
use crate::kv_layout::KvLayout;
use crate::profile::ModelIdentity;

pub const SCHEMA_VERSION: u32 = 1;

/// Quality of one configuration against the f16-cache baseline, over the evaluated positions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub kld_mean: f64,
    pub kld_p99: f64,
    /// Share of positions whose most likely token equals the baseline's.
    pub top1: f64,
}

/// One layer's sensitivity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSensitivity {
    pub layer: usize,
    /// Predicted ΔKLD when only this layer's K cache takes the type (f16 = 0).
    pub k: BTreeMap<CacheType, f64>,
    /// Predicted ΔKLD when only this layer's V cache takes the type (f16 = 0).
    pub v: BTreeMap<CacheType, f64>,
    /// End-to-end measurements behind the prediction, keyed `k:q4_0`, `v:q4_0`.
    #[serde(default)]
    pub measured: BTreeMap<String, Quality>,
}

/// A uniform configuration measured end to end, used to check the additive model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anchor {
    pub k: CacheType,
    pub v: CacheType,
    pub quality: Quality,
    /// Sum of the per-layer predictions for this configuration.
    pub predicted_kld: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    pub schema: u32,
    pub model: ModelIdentity,
    pub layout: KvLayout,
    /// Tokens per chunk.
    pub context: u32,
    pub chunks: u32,
    /// Calibration text label.
    pub text: String,
    /// Candidate types (f16 first).
    pub types: Vec<CacheType>,
    pub layers: Vec<LayerSensitivity>,
    #[serde(default)]
    pub anchors: Vec<Anchor>,
    /// The uniform cache the single-layer runs were measured against when it was not f16 (their
    /// errors are changes from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<Anchor>,
    /// Cells each layer holds at `context`, read back from the runtime (llama.cpp's default
    /// n_ubatch of 512; `null` for layers without a cache). Empty in tables from before they were
    /// recorded: searching those needs the model to read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<Option<u64>>,
    /// Forward passes spent and wall time.
    pub forward_passes: u64,
    pub seconds: f64,
    /// How the per-type predictions were derived (estimator description).
    pub method: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SensitivityError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: serde_norway::Error },
    #[error("{path}: schema {found} is not supported (expected {SCHEMA_VERSION})")]
    Schema { path: String, found: u32 },
    #[error("{path}: layer {layer} has no value for {which} type {ty}")]
    Missing { path: String, layer: usize, which: &'static str, ty: CacheType },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

impl Sensitivity {
    /// Predicted KLD of a per-layer assignment under the additive model.
    pub fn predict(&self, types: &[(CacheType, CacheType)]) -> f64 {
        self.layers
            .iter()
            .zip(types)
            .map(|(l, (k, v))| l.k.get(k).copied().unwrap_or(f64::NAN) + l.v.get(v).copied().unwrap_or(f64::NAN))
            .sum()
    }

    pub fn load(path: &Path) -> Result<Sensitivity, SensitivityError> {
        let p = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| SensitivityError::Read { path: p.clone(), source })?;
        let s: Sensitivity =
            serde_norway::from_str(&text).map_err(|source| SensitivityError::Parse { path: p.clone(), source })?;
        if s.schema != SCHEMA_VERSION {
            return Err(SensitivityError::Schema { path: p, found: s.schema });
        }
        for l in &s.layers {
            for &t in &s.types {
                if !l.k.contains_key(&t) {
                    return Err(SensitivityError::Missing { path: p, layer: l.layer, which: "K", ty: t });
                }
                if !l.v.contains_key(&t) {
                    return Err(SensitivityError::Missing { path: p, layer: l.layer, which: "V", ty: t });
                }
            }
        }
        Ok(s)
    }

    /// Atomic write (temp file in the same folder, then rename).
    pub fn save(&self, path: &Path) -> Result<(), SensitivityError> {
        let p = path.display().to_string();
        let text = serde_norway::to_string(self).expect("a sensitivity table serialises");
        crate::atomic_write(path, text.as_bytes()).map_err(|source| SensitivityError::Write { path: p, source })
    }
}

/// Predicted error per cache type of one layer's K or V.
pub type TypeErrors = BTreeMap<CacheType, f64>;

/// How per-layer errors are predicted from a calibration's measurements. Each is a different
/// guess at how single-layer errors add up; the measured selection verifies the candidates of
/// all of them, so a poor guess costs a few passes, never a worse profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Estimator {
    /// Each layer's share of the summed single-layer mean KLD at the narrowest type, times the
    /// uniform run at each type (K and V scaled separately): the table's own `k`/`v` values.
    Share,
    /// Shares from each single-layer run's p99 KLD instead of its mean: weighs the layers whose
    /// errors sit in the tail (heavy-tailed models such as Qwen2.5).
    Tail,
    /// Single-layer mean KLD as measured, scaled per type by the uniform runs' ratio to the
    /// narrowest type: K against V keeps the single-layer runs' proportions.
    Direct,
}

impl Estimator {
    pub const ALL: [Estimator; 3] = [Estimator::Share, Estimator::Tail, Estimator::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Estimator::Share => "share",
            Estimator::Tail => "tail",
            Estimator::Direct => "direct",
        }
    }
}

impl Sensitivity {
    /// The narrowest quantized candidate type (the single-layer runs use it).
    pub fn narrowest(&self) -> Option<CacheType> {
        self.types
            .iter()
            .copied()
            .filter(|t| t.is_quantized())
            .min_by(|a, b| a.bits_per_value().total_cmp(&b.bits_per_value()))
    }

    fn anchor(&self, v: bool, ty: CacheType) -> Option<f64> {
        self.anchors
            .iter()
            .find(|a| if v { a.k == CacheType::F16 && a.v == ty } else { a.v == CacheType::F16 && a.k == ty })
            .map(|a| a.quality.kld_mean)
    }

    /// Per layer (by position in `layers`), predicted K and V errors per type under `est`.
    /// `None` when the table lacks the single-layer or uniform runs the estimator needs.
    pub fn layer_errors(&self, est: Estimator) -> Option<Vec<(TypeErrors, TypeErrors)>> {
        if est == Estimator::Share {
            return Some(self.layers.iter().map(|l| (l.k.clone(), l.v.clone())).collect());
        }
        let narrow = self.narrowest()?;
        let mut sides: [Vec<BTreeMap<CacheType, f64>>; 2] = [Vec::new(), Vec::new()];
        for (is_v, out) in [(false, 0usize), (true, 1)] {
            let key = format!("{}:{narrow}", if is_v { "v" } else { "k" });
            let q: Vec<Quality> = self.layers.iter().map(|l| l.measured.get(&key).copied()).collect::<Option<_>>()?;
            let a_narrow = self.anchor(is_v, narrow)?;
            let floor = self.background.as_ref().map_or(0.0, |b| b.quality.kld_mean);
            let total: f64 = q.iter().map(|q| q.kld_p99.max(0.0)).sum();
            for qi in &q {
                let mut map = BTreeMap::new();
                for &ty in &self.types {
                    let delta = if !ty.is_quantized() {
                        0.0
                    } else {
                        let a = self.anchor(is_v, ty)?;
                        match est {
                            Estimator::Tail if total > 0.0 => qi.kld_p99.max(0.0) / total * a,
                            Estimator::Tail => a / q.len() as f64,
                            _ if a_narrow > 0.0 => (qi.kld_mean - floor).max(0.0) * a / a_narrow,
                            _ => (qi.kld_mean - floor).max(0.0),
                        }
                    };
                    map.insert(ty, delta.max(0.0));
                }
                sides[out].push(map);
            }
        }
        let [k, v] = sides;
        Some(k.into_iter().zip(v).collect())
    }

    /// The search problem under `est` for a runtime whose layers hold `cells[il]` tokens
    /// (read back from the runtime: [`crate::kv_layout::runtime_cells`]) over `pairs`.
    pub fn problem(
        &self,
        est: Estimator,
        cells: &[Option<u64>],
        pairs: Vec<(CacheType, CacheType)>,
    ) -> Option<crate::search::Problem> {
        let errors = self.layer_errors(est)?;
        let by_layer: BTreeMap<usize, usize> = self.layers.iter().enumerate().map(|(i, l)| (l.layer, i)).collect();
        let layers = self
            .layout
            .layers
            .iter()
            .enumerate()
            .map(|(il, shape)| {
                let shape = (*shape)?;
                let (dk, dv) = errors[*by_layer.get(&il)?].clone();
                Some(crate::search::LayerCosts {
                    k_dim: shape.k_dim,
                    v_dim: shape.v_dim,
                    cells: cells.get(il).copied().flatten()?,
                    dk,
                    dv,
                    pairs: None,
                    window: None,
                })
            })
            .collect();
        Some(crate::search::Problem { layers, pairs })
    }

    /// [`Sensitivity::problem`] where every layer may also keep a recent window: `windowed` is
    /// this calibration measured with the window on every layer (its errors are the layer's with
    /// the window), `window_bytes[il]` the window's bytes on layer `il`. `None` as `problem`, or
    /// when the tables' layers differ or a layer's window bytes are missing.
    pub fn problem_with_window(
        &self,
        windowed: &Sensitivity,
        est: Estimator,
        cells: &[Option<u64>],
        window_bytes: &[Option<u64>],
        pairs: Vec<(CacheType, CacheType)>,
    ) -> Option<crate::search::Problem> {
        let mut problem = self.problem(est, cells, pairs)?;
        let errors = windowed.layer_errors(est)?;
        let by_layer: BTreeMap<usize, usize> = windowed.layers.iter().enumerate().map(|(i, l)| (l.layer, i)).collect();
        for (il, l) in problem.layers.iter_mut().enumerate() {
            if let Some(l) = l {
                let (dk, dv) = errors[*by_layer.get(&il)?].clone();
                l.window = Some(crate::search::WindowCosts { bytes: window_bytes.get(il).copied().flatten()?, dk, dv });
            }
        }
        Some(problem)
    }
}
