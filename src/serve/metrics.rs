//! Counters the engine and the HTTP layer update, rendered as Prometheus text for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::cache_type::CacheType;
use crate::llama::Context;

#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP responses by (route, status code).
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens found in a slot's cache (prefix reuse), not decoded again.
    pub prompt_tokens_cached: AtomicU64,
    pub prompt_tokens_decoded: AtomicU64,
    /// Prompt prefixes taken from another slot's sequence (copied, not decoded).
    pub prefix_copies: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Time spent in decode calls.
    pub decode_micros: AtomicU64,
    pub completed: AtomicU64,
    /// Requests whose client went away before the reply was done.
    pub cancelled: AtomicU64,
    pub slots_total: AtomicU64,
    pub slots_active: AtomicU64,
    pub queued: AtomicU64,
    /// Bytes of K/V cache holding tokens, by cache type.
    kv_in_use: Mutex<BTreeMap<CacheType, u64>>,
    /// Bytes of K/V cache allocated, by cache type.
    kv_allocated: Mutex<BTreeMap<CacheType, u64>>,
}

impl Metrics {
    pub fn record_response(&self, route: &str, status: u16) {
        let mut r = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn set_kv_in_use(&self, bytes: BTreeMap<CacheType, u64>) {
        *self.kv_in_use.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
    }

    pub fn set_kv_allocated(&self, bytes: BTreeMap<CacheType, u64>) {
        *self.kv_allocated.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP kvtuner_requests_total HTTP responses by route and status code.\n");
        out.push_str("# TYPE kvtuner_requests_total counter\n");
        for ((route, status), n) in self.responses.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "kvtuner_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let counters = [
            ("kvtuner_prompt_tokens_total", "Prompt tokens of admitted requests.", get(&self.prompt_tokens)),
            (
                "kvtuner_prompt_tokens_cached_total",
                "Prompt tokens reused from a slot's cache (not decoded again).",
                get(&self.prompt_tokens_cached),
            ),
            ("kvtuner_prompt_tokens_decoded_total", "Prompt tokens decoded.", get(&self.prompt_tokens_decoded)),
            (
                "kvtuner_prefix_copies_total",
                "Cached prompt prefixes copied from another slot's sequence.",
                get(&self.prefix_copies),
            ),
            ("kvtuner_generated_tokens_total", "Tokens generated.", get(&self.generated_tokens)),
            ("kvtuner_completions_total", "Replies finished.", get(&self.completed)),
            ("kvtuner_cancelled_total", "Replies abandoned by their client.", get(&self.cancelled)),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let decode_s = get(&self.decode_micros) as f64 / 1e6;
        let _ = writeln!(
            out,
            "# HELP kvtuner_decode_seconds_total Time in decode calls.\n# TYPE kvtuner_decode_seconds_total counter\nkvtuner_decode_seconds_total {decode_s:.6}"
        );
        let rate = if decode_s > 0.0 { get(&self.generated_tokens) as f64 / decode_s } else { 0.0 };
        let _ = writeln!(
            out,
            "# HELP kvtuner_generation_tokens_per_second Generated tokens per second of decode time (all slots together).\n# TYPE kvtuner_generation_tokens_per_second gauge\nkvtuner_generation_tokens_per_second {rate:.3}"
        );
        let gauges = [
            ("kvtuner_slots_total", "Slots (sequences decoded side by side).", get(&self.slots_total)),
            ("kvtuner_slots_active", "Slots answering a request.", get(&self.slots_active)),
            ("kvtuner_requests_queued", "Requests waiting for a slot.", get(&self.queued)),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        for (name, help, map) in [
            ("kvtuner_kv_bytes_in_use", "K/V cache bytes holding tokens, by cache type.", &self.kv_in_use),
            ("kvtuner_kv_bytes_allocated", "K/V cache bytes allocated, by cache type.", &self.kv_allocated),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (ty, bytes) in map.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = writeln!(out, "{name}{{cache_type=\"{}\"}} {bytes}", ty.name());
            }
        }
        out
    }
}

/// Per-cell K and V bytes of every layer, as the runtime allocated them, to turn the tokens each
/// slot holds into bytes in use.
#[derive(Debug, Clone)]
pub struct KvAccounting {
    /// (type, bytes per cell, cells per sequence) for every K and V cache.
    caches: Vec<(CacheType, u64, u64)>,
}

impl KvAccounting {
    pub fn of(ctx: &Context<'_>) -> KvAccounting {
        let streams = ctx.n_seq_max().max(1) as u64;
        let mut caches = Vec::new();
        for info in ctx.layers().into_iter().flatten() {
            // a layer's tensor holds n_cells rows per sequence's stream
            let rows = info.n_cells as u64 * streams;
            caches.push((info.type_k, info.bytes_k / rows.max(1), info.n_cells as u64));
            caches.push((info.type_v, info.bytes_v / rows.max(1), info.n_cells as u64));
        }
        KvAccounting { caches }
    }

    /// Bytes in use by cache type when the slots hold `tokens` tokens each (a sliding-window
    /// cache holds at most its cells).
    pub fn in_use(&self, tokens: &[usize]) -> BTreeMap<CacheType, u64> {
        let mut out = BTreeMap::new();
        for &(ty, per_cell, cells) in &self.caches {
            let used: u64 = tokens.iter().map(|&t| (t as u64).min(cells)).sum();
            *out.entry(ty).or_default() += used * per_cell;
        }
        out
    }

    /// Bytes allocated by cache type (every cell of every slot).
    pub fn allocated(&self, n_seq: usize) -> BTreeMap<CacheType, u64> {
        let mut out = BTreeMap::new();
        for &(ty, per_cell, cells) in &self.caches {
            *out.entry(ty).or_default() += per_cell * cells * n_seq as u64;
        }
        out
    }
}
