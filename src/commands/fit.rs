//! `kvtuner fit`: a profile and -ngl for a GPU memory budget (kvtuner::placement).

use anyhow::{bail, Context as _};
use comfy_table::Table;

use crate::cli::FitArgs;
use kvtuner::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use kvtuner::llama::{Backend, Model, ModelParams};
use kvtuner::placement::{self, Placement};
use kvtuner::search;
use kvtuner::select::Problems;
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

    if args.json {
        let json = serde_json::json!({
            "context": n_ctx,
            "vram_bytes": args.vram,
            "placements": all,
            "chosen_ngl": chosen.map(|c| c.ngl),
            "uniform": uniform.iter().map(|((k, v), p)| serde_json::json!({"k": k, "v": v, "placement": p})).collect::<Vec<_>>(),
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
    eprintln!(
        "chosen: -ngl {} ({} of {} cache layers on the GPU), {:.2} bits per value on them, predicted KLD {:.5} (predicted, not measured: compare with `kvtuner ab`)",
        chosen.ngl,
        chosen.offloaded_cache_layers,
        problem.layers.iter().flatten().count(),
        gpu_bits(chosen, problem),
        a.predicted
    );
    if let Some(out) = &args.output {
        let label = format!("fit for {:.2} GiB of GPU memory at -ngl {}", gib(args.vram), chosen.ngl);
        let pairs_label = format!("{} on the GPU, {} on the CPU", args.pairs, args.cpu_pairs);
        let profile = profile_for(
            &sens,
            Chosen {
                types: &a.types,
                label: &label,
                bits_per_value: a.bits_per_value,
                kv_bytes: a.bytes,
                predicted: Some(a.predicted),
                kld_calibration: None,
            },
            None,
            &pairs_label,
            n_ctx,
            args.name.clone(),
        );
        profile.save(out)?;
        eprintln!("wrote {} ({}); run it with -ngl {}", out.display(), profile.summary(), chosen.ngl);
    }
    Ok(())
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
