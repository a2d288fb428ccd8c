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
use kvtuner::placement::{self, Placement};
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
    let all = placement::placements(problem, &gpu_pairs, &cpu_pairs, &costs, args.vram)?;
    let chosen = placement::choose(&all, args.max_kld);
    // baselines: each uniform GPU pair with one type for K and V, at the most layers it fits
    let mut uniform = Vec::new();
    for &pair in gpu_pairs.iter().filter(|(k, v)| k == v) {
        if let Some(p) = placement::uniform_at_most_layers(problem, pair, &cpu_pairs, &costs, args.vram)? {
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
        (Some(c), Some(spec)) => Some(measure(&args, &sens, &problems, c, &gpu_pairs, &cpu_pairs, &rpc, n_ctx, spec)?),
        _ => None,
    };

    if args.json {
        let json = serde_json::json!({
            "context": n_ctx,
            "vram_bytes": args.vram,
            "placements": all,
            "chosen_ngl": chosen.map(|c| c.ngl),
            "uniform": uniform.iter().map(|((k, v), p)| serde_json::json!({"k": k, "v": v, "placement": p})).collect::<Vec<_>>(),
            "measured": measured.as_ref().map(|m| &m.selection),
            "held_out": measured.as_ref().map(|m| &m.held_out),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&all, chosen, args.vram, n_ctx);
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
                bail!("no -ngl has a profile within {:.2} GiB at a predicted KLD of at most {m}", gib(args.vram))
            }
            None => bail!("not even -ngl 0 fits {:.2} GiB", gib(args.vram)),
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
        let label = format!("fit for {:.2} GiB of GPU memory at -ngl {}", gib(args.vram), chosen.ngl);
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
struct Measured {
    selection: Selection,
    held_out: Vec<HeldOut>,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    args: &FitArgs,
    sens: &Sensitivity,
    problems: &Problems,
    chosen: &Placement,
    gpu_pairs: &[(CacheType, CacheType)],
    cpu_pairs: &[(CacheType, CacheType)],
    rpc: &[RpcDevice],
    n_ctx: u32,
    spec: &str,
) -> anyhow::Result<Measured> {
    let estimator = problems.by_estimator[0].0;
    let cands = placement::same_budget_candidates(problems.main(), estimator, chosen, gpu_pairs, cpu_pairs, args.vram)?;
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
            let mut m = Measurer::new(&mut ev, base.clone(), n_ctx, label.clone());
            let both = m.measure(&[selection.chosen.candidate.clone(), uniform.candidate.clone()])?;
            let [chosen, uniform] = <[_; 2]>::try_from(both).expect("two measured");
            held_out.push(HeldOut { text: label, chosen, uniform, heuristic: None });
        }
    }
    Ok(Measured { selection, held_out })
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Bits per value of the offloaded layers' caches.
fn gpu_bits(p: &Placement, problem: &search::Problem) -> f64 {
    let values: u64 = placement::offloaded_layers(problem.layers.len(), p.ngl)
        .filter_map(|il| problem.layers[il].as_ref())
        .map(|l| (l.k_dim + l.v_dim) * l.cells)
        .sum();
    if values == 0 {
        0.0
    } else {
        p.offloaded_kv_bytes as f64 * 8.0 / values as f64
    }
}

fn print_table(all: &[Placement], chosen: Option<&Placement>, vram: u64, n_ctx: u32) {
    let mib = |b: u64| format!("{:.0}", b as f64 / 1048576.0);
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
    let mut devices: Vec<&str> = all.iter().flat_map(|p| p.cost.devices.iter().map(String::as_str)).collect();
    devices.sort_unstable();
    devices.dedup();
    println!("budget {} MiB on {} at context {n_ctx}", mib(vram), devices.join(", "));
}
