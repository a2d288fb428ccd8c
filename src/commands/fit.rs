//! `kvtuner fit`: a profile and -ngl for a GPU memory budget (kvtuner::placement).

use anyhow::{bail, Context as _};
use comfy_table::Table;

use super::runtime::load_text;
use crate::cli::FitArgs;
use kvtuner::cache_type::CacheType;
use kvtuner::eval::Evaluator;
use kvtuner::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use kvtuner::llama::rpc::RpcDevice;
use kvtuner::llama::{Backend, ContextParams, Model, ModelParams};
use kvtuner::placement::{self, Placement, VramBudget};
use kvtuner::search;
use kvtuner::select::{self, report as select_report, HeldOut, Measurer, Problems, Selection};
use kvtuner::sensitivity::Sensitivity;
use kvtuner::tune::{profile_for, Chosen};

pub fn run(args: FitArgs) -> anyhow::Result<()> {
    let sens = Sensitivity::load(&args.sensitivity)?;
    let n_ctx = args.ctx_size.unwrap_or(sens.context);
    let gpu_pairs = search::parse_pairs(&args.pairs, &sens.types, search::CUDA_FA_PAIRS).context("--pairs")?;
    let cpu_pairs = search::parse_pairs(&args.cpu_pairs, &sens.types, search::CUDA_FA_PAIRS).context("--cpu-pairs")?;
    let backend = Backend::init();
    let rpc = kvtuner::llama::rpc::add_servers(backend, &args.rpc)?;
    let meta = Model::load(backend, &args.model, &ModelParams { metadata_only: true, ..Default::default() })?;
    let n_layer = meta.n_layer() as usize;
    if n_layer != sens.layout.layers.len() {
        bail!("{} has {n_layer} layers, the sensitivity table {}", args.model.display(), sens.layout.layers.len());
    }
    let cells = runtime_cells(&meta, n_ctx, RUNTIME_UBATCH)?;
    let problems = Problems::new(&sens, &cells, &gpu_pairs)?;
    let problem = problems.main(); // one layer per model layer: the table was checked against the model

    // every -ngl: none, each layer count, and the output layer too
    let ngls: Vec<i32> = (0..=n_layer as i32 + 1).collect();
    let costs = placement::offload_costs(&args.model, &rpc, &ngls, n_ctx)?;
    if costs.iter().all(|c| c.devices.is_empty()) {
        bail!("no layer leaves the CPU at any -ngl: this build or machine has no GPU (or give --rpc servers)");
    }
    // the budget per device, named as they are with every layer offloaded
    let all_devices = &costs.last().expect("-ngl 0 at least").devices;
    let budget = VramBudget::new(&args.vram, all_devices)?;
    let budget_label = budget_label(&args.vram, all_devices);
    let all = placement::placements(problem, &gpu_pairs, &cpu_pairs, &costs, &budget)?;
    let chosen = placement::choose(&all, args.max_kld);
    // baselines: each uniform GPU pair with one type for K and V, at the most layers it fits
    let mut uniform = Vec::new();
    for &pair in gpu_pairs.iter().filter(|(k, v)| k == v) {
        if let Some(p) = placement::uniform_at_most_layers(problem, pair, &cpu_pairs, &costs, &budget)? {
            uniform.push((pair, p));
        }
    }

    let measured = match (chosen, &args.text) {
        (Some(c), Some(_)) if c.offloaded_cache_layers == 0 => {
            eprintln!(
                "note: no cache layer is on the GPU at -ngl {}: no uniform GPU cache to measure the pick against",
                c.ngl
            );
            None
        }
        (Some(c), Some(spec)) => {
            let searched = Searched {
                sens: &sens,
                problems: &problems,
                gpu_pairs: &gpu_pairs,
                cpu_pairs: &cpu_pairs,
                budget: &budget,
                n_ctx,
            };
            Some(measure(&args, &searched, c, &rpc, spec)?)
        }
        _ => None,
    };

    if args.json {
        let json = serde_json::json!({
            "context": n_ctx,
            "vram_bytes": args.vram,
            "vram_devices": all_devices,
            "placements": all,
            "chosen_ngl": chosen.map(|c| c.ngl),
            "uniform": uniform.iter().map(|((k, v), p)| serde_json::json!({"k": k, "v": v, "placement": p})).collect::<Vec<_>>(),
            "measured": measured.as_ref().map(|m| &m.selection),
            "held_out": measured.as_ref().map(|m| &m.held_out),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&all, chosen, &budget_label, n_ctx);
        for ((k, _), p) in &uniform {
            let a = p.assignment.as_ref().expect("a chosen placement has a profile");
            println!(
                "uniform {k}: -ngl {} ({} cache layers on the GPU), predicted KLD {:.5}",
                p.ngl, p.offloaded_cache_layers, a.predicted
            );
        }
        if let Some(m) = &measured {
            println!("\n{}{}", select_report::selection(&m.selection), select_report::held_out(&m.held_out));
        }
    }
    let Some(chosen) = chosen else {
        match args.max_kld {
            Some(m) => {
                bail!("no -ngl has a profile within {budget_label} at a predicted KLD of at most {m}")
            }
            None => bail!("not even -ngl 0 fits {budget_label}"),
        }
    };
    let a = chosen.assignment.as_ref().expect("a chosen placement has a profile");
    match &measured {
        Some(m) => eprintln!("chosen: -ngl {}: {}", chosen.ngl, m.selection.verdict()),
        None => eprintln!(
            "chosen: -ngl {} ({} of {} cache layers on the GPU), {:.2} bits per value on them, predicted KLD {:.5} (predicted, not measured: pass --text, or compare with `kvtuner ab`)",
            chosen.ngl,
            chosen.offloaded_cache_layers,
            problem.layers.iter().flatten().count(),
            gpu_bits(chosen, problem),
            a.predicted
        ),
    }
    if let Some(out) = &args.output {
        let label = format!("fit for {budget_label} of GPU memory at -ngl {}", chosen.ngl);
        let pairs_label = format!("{} on the GPU, {} on the CPU", args.pairs, args.cpu_pairs);
        let predicted_pick = Chosen {
            types: &a.types,
            label: &label,
            bits_per_value: a.bits_per_value,
            kv_bytes: a.bytes,
            predicted: Some(a.predicted),
            kld_calibration: None,
        };
        let (pick, check) = match &measured {
            Some(m) => (Chosen { label: &label, ..Chosen::from(&m.selection.chosen) }, m.held_out.first()),
            None => (predicted_pick, None),
        };
        let profile = profile_for(&sens, pick, check, &pairs_label, n_ctx, args.name.clone());
        profile.save(out)?;
        eprintln!("wrote {} ({}); run it with -ngl {}", out.display(), profile.summary(), chosen.ngl);
    }
    Ok(())
}

/// The pick measured against the uniform GPU pairs of the same budget at its -ngl.
struct MeasuredPick {
    selection: Selection,
    held_out: Vec<HeldOut>,
}

/// What the fit searched with, for measuring its pick.
struct Searched<'a> {
    sens: &'a Sensitivity,
    problems: &'a Problems,
    gpu_pairs: &'a [(CacheType, CacheType)],
    cpu_pairs: &'a [(CacheType, CacheType)],
    budget: &'a VramBudget,
    n_ctx: u32,
}

fn measure(
    args: &FitArgs,
    searched: &Searched,
    chosen: &Placement,
    rpc: &[RpcDevice],
    spec: &str,
) -> anyhow::Result<MeasuredPick> {
    let Searched { sens, problems, gpu_pairs, cpu_pairs, budget, n_ctx } = *searched;
    let estimator = problems.by_estimator[0].0;
    let cands = placement::same_budget_candidates(problems.main(), estimator, chosen, gpu_pairs, cpu_pairs, budget)?;
    let params = ModelParams { n_gpu_layers: chosen.ngl, rpc: rpc.to_vec(), ..Default::default() };
    let model = Model::load(Backend::init(), &args.model, &params)?;
    let base = ContextParams { n_threads: args.threads, no_kv_profile: true, ..Default::default() };
    let (text, label) = load_text(spec)?;
    let mut ev = Evaluator::new(&model, &text, sens.context, args.chunks, &base)?;
    let mut cal = Measurer::new(&mut ev, base.clone(), n_ctx, label);
    let selection = select::select_among(&mut cal, &cands, chosen.kv_budget.unwrap_or(0))?;
    let mut held_out = Vec::new();
    if let Some(uniform) = &selection.best_uniform {
        for spec in &args.verify {
            let (text, label) = load_text(spec)?;
            let mut ev = Evaluator::new(&model, &text, sens.context, args.chunks, &base)?;
            let mut m = Measurer::new(&mut ev, base.clone(), n_ctx, label);
            held_out.push(select::held_out_with(&mut m, &selection, &uniform.candidate, None)?);
        }
    }
    Ok(MeasuredPick { selection, held_out })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Bits per value of the offloaded layers' caches.
fn gpu_bits(p: &Placement, problem: &search::Problem) -> f64 {
    let values: u64 = p
        .cost
        .per_device
        .iter()
        .flat_map(|d| d.layers.iter())
        .filter_map(|&il| problem.layers[il].as_ref())
        .map(|l| (l.k_dim + l.v_dim) * l.cells)
        .sum();
    if values == 0 {
        0.0
    } else {
        p.offloaded_kv_bytes as f64 * 8.0 / values as f64
    }
}

fn print_table(all: &[Placement], chosen: Option<&Placement>, budget_label: &str, n_ctx: u32) {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN).set_header(vec![
        "-ngl",
        "cache layers on GPU",
        "weights MiB",
        "compute MiB",
        "KV budget MiB",
        "KV MiB on GPU",
        "predicted KLD",
        "",
    ]);
    for p in all {
        let mark = if chosen.is_some_and(|c| c.ngl == p.ngl) { "← chosen" } else { "" };
        table.add_row(vec![
            p.ngl.to_string(),
            p.offloaded_cache_layers.to_string(),
            mib(p.cost.model_bytes),
            mib(p.cost.compute_bytes),
            p.kv_budget.map_or("over".to_string(), mib),
            p.assignment.as_ref().map_or("-".to_string(), |_| mib(p.offloaded_kv_bytes)),
            p.assignment.as_ref().map_or("does not fit".to_string(), |a| format!("{:.5}", a.predicted)),
            mark.to_string(),
        ]);
    }
    println!("{table}");
    println!("budget {budget_label} at context {n_ctx}");
    // with several devices, each one's share of the chosen placement
    if let Some(c) = chosen.filter(|c| c.per_device.len() > 1) {
        for (d, cost) in c.per_device.iter().zip(&c.cost.per_device) {
            println!(
                "  {}: layers {}, weights {} + compute {} + KV {} of {} MiB",
                d.device,
                layer_ranges(&cost.layers),
                mib(cost.model_bytes),
                mib(cost.compute_bytes),
                mib(d.kv_bytes),
                mib(d.budget)
            );
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / 1048576.0)
}

/// `0-3, 7`.
fn layer_ranges(layers: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        out.push(if i == j { layers[i].to_string() } else { format!("{}-{}", layers[i], layers[j]) });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// The budget in words: `17.00 GiB on CUDA0`, `24.00 GiB on each of CUDA0, CUDA1` or
/// `CUDA0 24.00 GiB, CUDA1 12.00 GiB`.
fn budget_label(sizes: &[u64], devices: &[String]) -> String {
    match (sizes, devices.len()) {
        ([one], 1) => format!("{} on {}", size(*one), devices[0]),
        ([one], _) => format!("{} on each of {}", size(*one), devices.join(", ")),
        _ => devices.iter().zip(sizes).map(|(d, b)| format!("{d} {}", size(*b))).collect::<Vec<_>>().join(", "),
    }
}

/// GiB with two decimals, or MiB below one GiB.
fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", gib(b))
    } else {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    }
}
