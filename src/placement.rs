//! A cache profile and `-ngl` for a GPU memory budget: more layers on the GPU (faster) against
//! narrower caches on them (less accurate).
//!
//! llama.cpp offloads the last `ngl` layers (and with `ngl > n_layer` the output layer too); each
//! layer's KV cache lives on its layer's device. For every `ngl`, each offload device's layers and
//! what it needs besides the KV cache (weights, compute buffers) are read back from the runtime: a
//! metadata-only model (`no_alloc`) with that `ngl` and a context of the target size report each
//! layer's device and, per buffer type, the bytes they would allocate ([`Context::memory`], patch
//! 0002). What is left of a device's budget is the KV budget of its layers, whose types come from
//! the exact search ([`search::best_within_bytes`]) over the pairs the GPU has kernels for; layers
//! left on the CPU take their most accurate CPU pair (host memory is not budgeted).

use serde::Serialize;

use crate::cache_type::CacheType;
use crate::llama::rpc::RpcDevice;
use crate::llama::{
    Backend, Context, ContextParams, CreateContextError, FlashAttn, LoadModelError, Model, ModelParams,
};
use crate::search::{self, Assignment, Problem, SearchError};
use crate::select::{Candidate, Origin};
use crate::sensitivity::Estimator;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("-ngl {ngl}: {source}")]
    Load { ngl: i32, source: LoadModelError },
    #[error("-ngl {ngl}: {source}")]
    Create { ngl: i32, source: CreateContextError },
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error("{given} GPU memory sizes for {} offload devices ({}): give one for all, or one per device", devices.len(), devices.join(", "))]
    Budgets { given: usize, devices: Vec<String> },
    #[error("offload device {0} has no GPU memory size")]
    UnknownDevice(String),
    #[error("no layer leaves the CPU at any -ngl: this build or machine has no GPU (or give --rpc servers)")]
    NoOffloadDevice,
}

/// What one `-ngl` needs on the offload devices (every buffer type not in host memory), KV cache
/// aside, as the runtime sizes it.
#[derive(Debug, Clone, Serialize)]
pub struct OffloadCost {
    pub ngl: i32,
    /// Weights on the offload devices.
    pub model_bytes: u64,
    /// Compute buffers on the offload devices (measured with an f16 cache).
    pub compute_bytes: u64,
    /// The offload devices' names.
    pub devices: Vec<String>,
    /// Each offload device's share, in the order of its first layer.
    pub per_device: Vec<DeviceCost>,
}

/// One offload device's weights, compute buffers and cached layers at one `-ngl`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceCost {
    pub device: String,
    pub model_bytes: u64,
    pub compute_bytes: u64,
    /// The f16 KV cache of its layers at the context the cost was read at.
    pub f16_kv_bytes: u64,
    /// The layers whose KV cache the runtime puts on this device.
    pub layers: Vec<usize>,
}

/// [`OffloadCost`] of each `-ngl` in `ngls` at a context of `n_ctx` tokens.
pub fn offload_costs(
    model_path: &std::path::Path,
    rpc: &[RpcDevice],
    ngls: &[i32],
    n_ctx: u32,
) -> Result<Vec<OffloadCost>, PlacementError> {
    let mut out = Vec::with_capacity(ngls.len());
    for &ngl in ngls {
        let params = ModelParams { n_gpu_layers: ngl, metadata_only: true, rpc: rpc.to_vec(), ..Default::default() };
        let model =
            Model::load(Backend::init(), model_path, &params).map_err(|source| PlacementError::Load { ngl, source })?;
        let ctx_params = ContextParams {
            n_ctx,
            n_batch: crate::kv_layout::RUNTIME_UBATCH.min(n_ctx),
            n_ubatch: crate::kv_layout::RUNTIME_UBATCH.min(n_ctx),
            flash_attn: FlashAttn::On,
            no_kv_profile: true,
            ..Default::default()
        };
        let ctx = Context::new(&model, &ctx_params).map_err(|source| PlacementError::Create { ngl, source })?;
        let mut per_device: Vec<DeviceCost> = Vec::new();
        // the layers first, so that the devices come in layer order
        for (il, info) in ctx.layers().iter().enumerate() {
            match info {
                Some(info) if info.device.as_str() != "CPU" => {
                    device_entry(&mut per_device, info.device.as_str()).layers.push(il)
                }
                _ => {}
            }
        }
        for m in ctx.memory().into_iter().filter(|m| !m.is_host) {
            let d = device_entry(&mut per_device, &m.device);
            d.model_bytes += m.model;
            d.compute_bytes += m.compute;
            d.f16_kv_bytes += m.context;
        }
        out.push(OffloadCost {
            ngl,
            model_bytes: per_device.iter().map(|d| d.model_bytes).sum(),
            compute_bytes: per_device.iter().map(|d| d.compute_bytes).sum(),
            devices: per_device.iter().map(|d| d.device.clone()).collect(),
            per_device,
        });
    }
    Ok(out)
}

/// `device`'s entry of `per_device`, added (empty) if it has none yet.
fn device_entry<'a>(per_device: &'a mut Vec<DeviceCost>, device: &str) -> &'a mut DeviceCost {
    let i = match per_device.iter().position(|d| d.device == device) {
        Some(i) => i,
        None => {
            per_device.push(DeviceCost {
                device: device.to_string(),
                model_bytes: 0,
                compute_bytes: 0,
                f16_kv_bytes: 0,
                layers: vec![],
            });
            per_device.len() - 1
        }
    };
    &mut per_device[i]
}

/// The best profile for one `-ngl`.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub ngl: i32,
    /// Layers with a KV cache on the offload devices.
    pub offloaded_cache_layers: usize,
    pub cost: OffloadCost,
    /// Budget left for the offloaded layers' KV caches, all devices together (`None`: weights
    /// and compute buffers alone exceed some device's budget).
    pub kv_budget: Option<u64>,
    /// The whole model's types (`None`: no allowed pairs fit some device's layers).
    pub assignment: Option<Assignment>,
    /// KV bytes of the offloaded layers under `assignment`.
    pub offloaded_kv_bytes: u64,
    /// Each offload device's budget and use.
    pub per_device: Vec<DevicePlacement>,
}

/// One device's share of a [`Placement`].
#[derive(Debug, Clone, Serialize)]
pub struct DevicePlacement {
    pub device: String,
    /// Its whole budget (weights, compute buffers and KV cache).
    pub budget: u64,
    /// What is left of it for its layers' KV caches (`None`: over).
    pub kv_budget: Option<u64>,
    /// Its layers' KV bytes under the assignment.
    pub kv_bytes: u64,
}

/// GPU memory per offload device: one size for every device, or one per device by name.
#[derive(Debug, Clone, PartialEq)]
pub enum VramBudget {
    Each(u64),
    PerDevice(Vec<(String, u64)>),
}

impl VramBudget {
    /// `sizes` in the order of `devices` (the offload devices with every layer offloaded, as
    /// [`OffloadCost::devices`] lists them): one size for all, or one per device.
    pub fn new(sizes: &[u64], devices: &[String]) -> Result<VramBudget, PlacementError> {
        match sizes {
            [one] => Ok(VramBudget::Each(*one)),
            _ if sizes.len() == devices.len() => {
                Ok(VramBudget::PerDevice(devices.iter().cloned().zip(sizes.iter().copied()).collect()))
            }
            _ => Err(PlacementError::Budgets { given: sizes.len(), devices: devices.to_vec() }),
        }
    }

    fn of(&self, device: &str) -> Result<u64, PlacementError> {
        match self {
            VramBudget::Each(b) => Ok(*b),
            VramBudget::PerDevice(v) => v
                .iter()
                .find(|(d, _)| d == device)
                .map(|(_, b)| *b)
                .ok_or_else(|| PlacementError::UnknownDevice(device.to_string())),
        }
    }
}

/// For each cost (one `-ngl`), the least predicted error of a profile whose layers on each offload
/// device have caches that fit that device's budget less its weights and compute buffers, over
/// `gpu_pairs`; the other layers take their most accurate pair of `cpu_pairs`. The error is a
/// sum over layers, so each device's layers are searched on their own. `p.pairs` is ignored.
pub fn placements(
    p: &Problem,
    gpu_pairs: &[(CacheType, CacheType)],
    cpu_pairs: &[(CacheType, CacheType)],
    costs: &[OffloadCost],
    budget: &VramBudget,
) -> Result<Vec<Placement>, PlacementError> {
    let n_layer = p.layers.len();
    // each layer's most accurate CPU pair (lowest predicted error, first in order among equals)
    let cpu_best: Vec<Option<(CacheType, CacheType)>> = (0..n_layer)
        .map(|il| -> Result<_, SearchError> {
            let Some(layer) = &p.layers[il] else { return Ok(None) };
            let sub = Problem { layers: vec![Some(layer.clone())], pairs: cpu_pairs.to_vec() };
            Ok(search::frontier(&sub)?.last().map(|a| a.types[0]))
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(costs.len());
    for cost in costs {
        let mut types: Vec<_> =
            (0..n_layer).map(|il| cpu_best[il].unwrap_or((CacheType::F16, CacheType::F16))).collect();
        let mut fits = true;
        let mut per_device = Vec::with_capacity(cost.per_device.len());
        for d in &cost.per_device {
            let device_budget = budget.of(&d.device)?;
            let kv_budget = device_budget.checked_sub(d.model_bytes + d.compute_bytes);
            let sub = Problem {
                layers: (0..n_layer)
                    .map(|il| if d.layers.contains(&il) { p.layers[il].clone() } else { None })
                    .collect(),
                pairs: gpu_pairs.to_vec(),
            };
            let best = match kv_budget {
                Some(b) => search::best_within_bytes(&sub, b)?,
                None => None,
            };
            match &best {
                Some(g) => d.layers.iter().for_each(|&il| types[il] = g.types[il]),
                None => fits = false,
            }
            per_device.push(DevicePlacement {
                device: d.device.clone(),
                budget: device_budget,
                kv_budget,
                kv_bytes: best.as_ref().map_or(0, |g| g.bytes),
            });
        }
        let assignment = if fits { Some(search::evaluate(p, &types)?) } else { None };
        out.push(Placement {
            ngl: cost.ngl,
            offloaded_cache_layers: cost.per_device.iter().map(|d| d.layers.len()).sum(),
            cost: cost.clone(),
            kv_budget: per_device.iter().map(|d| d.kv_budget).sum(),
            offloaded_kv_bytes: if fits { per_device.iter().map(|d| d.kv_bytes).sum() } else { 0 },
            assignment,
            per_device,
        });
    }
    Ok(out)
}

/// The placement with the most offloaded cache layers among those with a profile (and, with
/// `max_predicted`, a predicted error within it); among equals the lower predicted error.
pub fn choose(placements: &[Placement], max_predicted: Option<f64>) -> Option<&Placement> {
    placements
        .iter()
        .filter(|p| p.assignment.as_ref().is_some_and(|a| max_predicted.is_none_or(|m| a.predicted <= m)))
        .max_by(|a, b| {
            a.offloaded_cache_layers.cmp(&b.offloaded_cache_layers).then_with(|| {
                let (ea, eb) = (a.assignment.as_ref().unwrap().predicted, b.assignment.as_ref().unwrap().predicted);
                eb.total_cmp(&ea) // lower error is better
            })
        })
}

/// For a uniform pair: the most offloaded cache layers at which it fits (its baseline against a
/// profile: the same budget, one type everywhere on the GPU).
pub fn uniform_at_most_layers(
    p: &Problem,
    pair: (CacheType, CacheType),
    cpu_pairs: &[(CacheType, CacheType)],
    costs: &[OffloadCost],
    budget: &VramBudget,
) -> Result<Option<Placement>, PlacementError> {
    let all = placements(p, &[pair], cpu_pairs, costs, budget)?;
    Ok(choose(&all, None).cloned())
}

/// Gives the layers the runtime keeps on the CPU (`devices[il] == "CPU"`, as
/// [`crate::llama::KvLayerInfo::device`] reports it) `cpu_pairs` of their own; the others keep
/// `p.pairs` (the GPU's). Returns how many layers got the CPU's pairs.
pub fn restrict_cpu_layers(p: &mut Problem, devices: &[String], cpu_pairs: &[(CacheType, CacheType)]) -> usize {
    let mut n = 0;
    for (l, device) in p.layers.iter_mut().zip(devices) {
        if let Some(l) = l {
            if device == "CPU" {
                l.pairs = Some(cpu_pairs.to_vec());
                n += 1;
            }
        }
    }
    n
}

/// What the pick is measured against (`fit --text`): `chosen` as a candidate, then every GPU pair
/// that, uniform on the offloaded layers, fits the same budget at the same `-ngl` (the CPU layers
/// as in the pick), each set of types once. `estimator`: the one `p`'s predictions come from.
pub fn same_budget_candidates(
    p: &Problem,
    estimator: Estimator,
    chosen: &Placement,
    gpu_pairs: &[(CacheType, CacheType)],
    cpu_pairs: &[(CacheType, CacheType)],
    budget: &VramBudget,
) -> Result<Vec<Candidate>, PlacementError> {
    let candidate = |label: String, origin: Origin, a: &Assignment| Candidate {
        label,
        origin,
        types: a.types.clone(),
        predicted: Some(a.predicted),
        expected_bytes: a.bytes,
        windowed: a.windowed.clone(),
    };
    let mut out = Vec::new();
    if let Some(a) = &chosen.assignment {
        // a pick of one pair on every cached layer is that uniform cache, and competes as one
        let cached: Vec<_> = (0..p.layers.len()).filter(|&il| p.layers[il].is_some()).map(|il| a.types[il]).collect();
        match cached.first().filter(|&&first| cached.iter().all(|&t| t == first)) {
            Some(&(k, v)) => out.push(candidate(format!("{k}/{v} on the GPU"), Origin::Uniform, a)),
            None => {
                out.push(candidate(format!("fit at -ngl {}", chosen.ngl), Origin::Frontier { estimator, rank: 0 }, a))
            }
        }
    }
    for &pair in gpu_pairs {
        let at = placements(p, &[pair], cpu_pairs, std::slice::from_ref(&chosen.cost), budget)?;
        // a pair that gives the pick's own types (or another pair's) is not a second candidate
        if let Some(a) = at[0].assignment.as_ref().filter(|a| out.iter().all(|c| c.types != a.types)) {
            out.push(candidate(format!("{}/{} on the GPU", pair.0, pair.1), Origin::Uniform, a));
        }
    }
    Ok(out)
}

/// What a VRAM budget allows, from a calibration, before anything is measured: every `-ngl`'s
/// placement, the one chosen, and each uniform GPU pair (one type for K and V) at the most layers
/// it fits.
#[derive(Debug, Clone, Serialize)]
pub struct FitPlan {
    pub context: u32,
    /// The offload devices with every layer offloaded, in the order budgets are given.
    pub devices: Vec<String>,
    #[serde(skip)]
    pub budget: VramBudget,
    pub placements: Vec<Placement>,
    /// Index into `placements`.
    pub chosen: Option<usize>,
    pub uniform: Vec<((CacheType, CacheType), Placement)>,
}

impl FitPlan {
    pub fn chosen(&self) -> Option<&Placement> {
        self.chosen.map(|i| &self.placements[i])
    }
}

/// [`offload_costs`] of every `-ngl` (none, each layer count, and the output layer too) of a model
/// of `n_layer` layers at `n_ctx` tokens, and `vram` per offload device (named as they are with
/// every layer offloaded).
pub fn costs_and_budget(
    model_path: &std::path::Path,
    rpc: &[RpcDevice],
    n_layer: usize,
    n_ctx: u32,
    vram: &[u64],
) -> Result<(Vec<OffloadCost>, VramBudget), PlacementError> {
    let ngls: Vec<i32> = (0..=n_layer as i32 + 1).collect();
    let costs = offload_costs(model_path, rpc, &ngls, n_ctx)?;
    if costs.iter().all(|c| c.devices.is_empty()) {
        return Err(PlacementError::NoOffloadDevice);
    }
    let budget = VramBudget::new(vram, &costs.last().expect("-ngl 0 at least").devices)?;
    Ok((costs, budget))
}

/// What a fit must satisfy.
#[derive(Debug, Clone, Copy)]
pub struct FitTarget<'a> {
    /// Context (tokens) whose caches must fit.
    pub n_ctx: u32,
    /// One size for every offload device, or one per device.
    pub vram: &'a [u64],
    pub gpu_pairs: &'a [(CacheType, CacheType)],
    pub cpu_pairs: &'a [(CacheType, CacheType)],
    /// The largest predicted error a placement may have.
    pub max_predicted: Option<f64>,
}

/// Plans a fit of `p` (one problem layer per model layer) into `target`: each `-ngl`'s devices,
/// weights and compute buffers read back from metadata-only models of `model_path`, then the
/// most offloaded layers whose caches fit.
pub fn plan(
    p: &Problem,
    model_path: &std::path::Path,
    rpc: &[RpcDevice],
    target: FitTarget<'_>,
) -> Result<FitPlan, PlacementError> {
    let FitTarget { n_ctx, vram, gpu_pairs, cpu_pairs, max_predicted } = target;
    let (costs, budget) = costs_and_budget(model_path, rpc, p.layers.len(), n_ctx, vram)?;
    let devices = costs.last().expect("-ngl 0 at least").devices.clone();
    let placements = placements(p, gpu_pairs, cpu_pairs, &costs, &budget)?;
    let chosen =
        choose(&placements, max_predicted).map(|c| placements.iter().position(|x| x.ngl == c.ngl).expect("in"));
    let mut uniform = Vec::new();
    for &pair in gpu_pairs.iter().filter(|(k, v)| k == v) {
        if let Some(u) = uniform_at_most_layers(p, pair, cpu_pairs, &costs, &budget)? {
            uniform.push((pair, u));
        }
    }
    Ok(FitPlan { context: n_ctx, devices, budget, placements, chosen, uniform })
}

/// The most `-ngl` of `costs` at which every offload device's weights, compute buffers and f16
/// cache (at the context the costs were read at) fit its budget: where a calibration at that
/// context can run.
pub fn most_layers_fitting(costs: &[OffloadCost], budget: &VramBudget) -> Result<i32, PlacementError> {
    let mut best = 0;
    for c in costs {
        let mut fits = true;
        for d in &c.per_device {
            fits &= d.model_bytes + d.compute_bytes + d.f16_kv_bytes <= budget.of(&d.device)?;
        }
        if fits {
            best = best.max(c.ngl);
        }
    }
    Ok(best)
}
