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

impl Sensitivity {
    /// The search problem at context `n_ctx` (sliding layers hold their window) over `pairs`.
    pub fn problem(&self, n_ctx: u64, pairs: Vec<(CacheType, CacheType)>) -> crate::search::Problem {
        let by_layer: BTreeMap<usize, &LayerSensitivity> = self.layers.iter().map(|l| (l.layer, l)).collect();
        let layers = self
            .layout
            .layers
            .iter()
            .enumerate()
            .map(|(il, shape)| {
                let shape = (*shape)?;
                let sens = by_layer.get(&il)?;
                Some(crate::search::LayerCosts {
                    k_dim: shape.k_dim,
                    v_dim: shape.v_dim,
                    cells: self.layout.cells(&shape, n_ctx),
                    dk: sens.k.clone(),
                    dv: sens.v.clone(),
                })
            })
            .collect();
        crate::search::Problem { layers, pairs }
    }
}
