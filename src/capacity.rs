//! How many sequences of a given context a KV memory budget holds (a server's slots), and the
//! decode rate they reach together: the capacity a cache type or profile buys, measured on the
//! runtime rather than computed from bits per value.
//!
//! The slot count comes from the runtime's own sizes: [`Sizer`] contexts (nothing allocated) give
//! the cache tensor bytes of N slots, a search finds the largest N within the budget, and then a real
//! context of N slots is created and its allocation read back; if that exceeds the budget (a
//! device's buffers may pad differently from the sizer's), N is lowered until it fits.

use serde::Serialize;

use crate::bench::{self, BenchError, ParallelSpeed};
use crate::kv_layout::{RuntimeKv, Sizer};
use crate::llama::{Context, ContextParams, CreateContextError, Model};

/// Tokens generated per sequence in the timed steps.
pub const CAPACITY_TG: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    #[error("slot context of {slot_ctx} tokens leaves no room for depth {depth} + {CAPACITY_TG} generated tokens")]
    TooDeep { slot_ctx: u32, depth: u32 },
    #[error("{slots} slots of {slot_ctx} tokens exceed a context's 32-bit token count")]
    Overflow { slots: u32, slot_ctx: u32 },
    #[error("sizing {slots} slots of {slot_ctx} tokens: {source}")]
    Size { slots: u32, slot_ctx: u32, source: CreateContextError },
    #[error("creating a context of {slots} slots of {slot_ctx} tokens: {source}")]
    Create { slots: u32, slot_ctx: u32, source: CreateContextError },
    #[error(transparent)]
    Bench(#[from] BenchError),
}

/// Slots that fit, and what the runtime allocated for them.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// Slots of `slot_ctx` tokens within the budget (0: not even one fits).
    pub slots: u32,
    pub slot_ctx: u32,
    pub budget_bytes: u64,
    /// KV buffer bytes the runtime allocated for `slots` slots (read back from the real context).
    pub kv_bytes: u64,
    /// KV tensor bytes of one slot, as the runtime sizes it.
    pub kv_bytes_per_slot: u64,
    /// Storage bits per cached value.
    pub bits_per_value: f64,
    /// Decode with every slot at `depth` tokens, one token per slot per step (`None`: no slot).
    pub speed: Option<ParallelSpeed>,
}

/// The largest number of slots (at most `max_slots`) whose cache tensors, as the runtime sizes
/// them, are within `budget` bytes, with those bytes; `(0, 0)` if one slot is already too large.
/// (A sizer allocates nothing, so it knows tensor bytes, not the buffers' padding: the real
/// context's allocation is checked after.)
pub fn slots_within(
    sizer: &Sizer,
    params: &ContextParams,
    slot_ctx: u32,
    budget: u64,
    max_slots: u32,
) -> Result<(u32, u64), CapacityError> {
    let size = |slots: u32| -> Result<u64, CapacityError> {
        let n_ctx = slots.checked_mul(slot_ctx).ok_or(CapacityError::Overflow { slots, slot_ctx })?;
        sizer.kv_with(params, n_ctx, slots).map(|kv| kv.tensor_bytes).map_err(|source| CapacityError::Size {
            slots,
            slot_ctx,
            source,
        })
    };
    // bytes grow with the slot count: the largest fitting count by bisection over [lo, hi)
    let (mut lo, mut lo_bytes) = (0u32, 0u64);
    let mut hi = max_slots.saturating_add(1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let bytes = size(mid)?;
        if bytes <= budget {
            (lo, lo_bytes) = (mid, bytes);
        } else {
            hi = mid;
        }
    }
    Ok((lo, lo_bytes))
}

/// Fits slots of `slot_ctx` tokens into `budget` bytes of KV cache with the cache types of
/// `params` (see the module docs), then measures decode with all of them at `depth` tokens each.
pub fn measure_capacity(
    model: &Model,
    sizer: &Sizer,
    params: &ContextParams,
    slot_ctx: u32,
    budget: u64,
    max_slots: u32,
    depth: u32,
) -> Result<Capacity, CapacityError> {
    if depth + CAPACITY_TG + 1 > slot_ctx {
        return Err(CapacityError::TooDeep { slot_ctx, depth });
    }
    let one =
        sizer.kv_with(params, slot_ctx, 1).map_err(|source| CapacityError::Size { slots: 1, slot_ctx, source })?;
    let (mut slots, _) = slots_within(sizer, params, slot_ctx, budget, max_slots)?;
    let mut capacity = Capacity {
        slots: 0,
        slot_ctx,
        budget_bytes: budget,
        kv_bytes: 0,
        kv_bytes_per_slot: one.tensor_bytes,
        bits_per_value: one.bits_per_value(),
        speed: None,
    };
    while slots > 0 {
        let ctx_params =
            ContextParams { n_ctx: slots * slot_ctx, n_seq_max: slots, n_batch: 512, n_ubatch: 512, ..params.clone() };
        let mut ctx =
            Context::new(model, &ctx_params).map_err(|source| CapacityError::Create { slots, slot_ctx, source })?;
        let allocated = RuntimeKv::of(&ctx).buffer_bytes;
        if allocated > budget {
            slots -= 1; // the device padded more than the sizer: measured, one fewer
            continue;
        }
        capacity.slots = slots;
        capacity.kv_bytes = allocated;
        capacity.speed = Some(bench::measure_parallel(&mut ctx, slots, depth, false, CAPACITY_TG, 512)?);
        break;
    }
    Ok(capacity)
}
