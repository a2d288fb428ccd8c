use anyhow::{bail, Context as _};
use comfy_table::Table;
use serde::Serialize;

use crate::cli::CapacityArgs;
use kvtuner::bench::Stat;
use kvtuner::capacity::{measure_capacity, Capacity};
use kvtuner::kv_layout::Sizer;
use kvtuner::runtime::{cache_configs, load_for_comparison};

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    is_profile: bool,
    /// The last repetition's fit (slot counts do not change between repetitions).
    capacity: Capacity,
    /// Aggregate decode tok/s of all slots, over the repetitions.
    aggregate: Option<Stat>,
    per_slot: Option<Stat>,
}

pub fn run(args: CapacityArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let depth = args.depth.unwrap_or(args.ctx_size.saturating_sub(256));
    let (header, identity, model, base) = load_for_comparison(&args.model, &args.devices.devices())?;
    let sizer = Sizer::new(&args.model)?;
    let no_key_text = ""; // keys are refused below
    let configs = cache_configs(&args.against, &args.profiles, no_key_text, &header, &identity, &args.model, &base)?;
    anyhow::ensure!(!configs.is_empty(), "nothing to measure: give --against or --profile");
    // a key shift or scale (+ks, +kc) is measured on text by `ab`; capacity has none to measure it on
    if let Some(c) = configs.iter().find(|c| c.keys.is_some()) {
        bail!("--against {}: a key shift or scale (+ks, +kc) is measured on text by `kvtuner ab`; capacity compares sizes and speed without one", c.name);
    }
    eprintln!(
        "capacity: slots of {} tokens within {:.2} GiB of KV cache, decode timed at depth {depth}, {} repetition(s)",
        args.ctx_size,
        args.kv_budget as f64 / (1u64 << 30) as f64,
        args.reps
    );

    let mut fits: Vec<Option<Capacity>> = vec![None; configs.len()];
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); configs.len()];
    for rep in 0..args.reps {
        // every other repetition in reverse order: no configuration always runs first
        let order: Vec<usize> =
            if rep % 2 == 0 { (0..configs.len()).collect() } else { (0..configs.len()).rev().collect() };
        for ci in order {
            let c = &configs[ci];
            let cap = measure_capacity(&model, &sizer, &c.params, args.ctx_size, args.kv_budget, args.max_slots, depth)
                .with_context(|| format!("configuration {}", c.name))?;
            if let Some(s) = &cap.speed {
                samples[ci].0.push(s.aggregate_tokens_per_s);
                samples[ci].1.push(s.per_sequence_tokens_per_s);
            }
            eprintln!("  rep {}/{} {}: {} slot(s)", rep + 1, args.reps, c.name, cap.slots);
            fits[ci] = Some(cap);
        }
    }
    let rows: Vec<Row> = configs
        .iter()
        .zip(fits)
        .zip(samples)
        .map(|((c, cap), (agg, per))| Row {
            name: c.name.clone(),
            is_profile: c.is_profile,
            capacity: cap.expect("every configuration ran at least once"),
            aggregate: (!agg.is_empty()).then(|| Stat::of(&agg)),
            per_slot: (!per.is_empty()).then(|| Stat::of(&per)),
        })
        .collect();
    print_table(&rows);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&rows)?;
        kvtuner::atomic_write(path, json.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("capacity finished in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn print_table(rows: &[Row]) {
    let mib = |b: u64| format!("{:.1}", b as f64 / 1048576.0);
    // ratios against the first uniform configuration (f16 by default)
    let base = rows.iter().find(|r| !r.is_profile);
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN).set_header(vec![
        "config",
        "bits/value",
        "KV MiB per slot",
        "slots",
        "KV MiB allocated",
        "tok/s all slots",
        "tok/s per slot",
        "slots vs base",
        "tok/s vs base",
    ]);
    for r in rows {
        let c = &r.capacity;
        let stat =
            |s: &Option<Stat>| s.map_or("-".to_string(), |s| format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "-".to_string(),
        };
        table.add_row(vec![
            r.name.clone(),
            format!("{:.2}", c.bits_per_value),
            mib(c.kv_bytes_per_slot),
            c.slots.to_string(),
            mib(c.kv_bytes),
            stat(&r.aggregate),
            stat(&r.per_slot),
            ratio(Some(f64::from(c.slots)), base.map(|b| f64::from(b.capacity.slots))),
            ratio(r.aggregate.map(|s| s.median), base.and_then(|b| b.aggregate.map(|s| s.median))),
        ]);
    }
    println!("{table}");
    if let Some(b) = base {
        println!(
            "base: {} (ratios); budget {} MiB of KV cache, {} tokens per slot",
            b.name,
            mib(b.capacity.budget_bytes),
            b.capacity.slot_ctx
        );
    }
}
