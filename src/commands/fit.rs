//! `kvtuner fit`: a profile and -ngl for a GPU memory budget (kvtuner::placement).

use anyhow::{bail, Context as _};
use comfy_table::Table;

use crate::cli::FitArgs;
use kvtuner::eval::Evaluator;
use kvtuner::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use kvtuner::llama::rpc::RpcDevice;
use kvtuner::llama::{Backend, Model, ModelParams};
use kvtuner::pipeline::{self, profile_for, Choice, Chosen, ProfileMeta};
use kvtuner::placement::{self, FitPlan, Placement};
use kvtuner::runtime::load_text;
use kvtuner::runtime::Devices;
use kvtuner::search;
use kvtuner::select::{report as select_report, Candidate, HeldOut, Measurer, Problems, SelectOptions};
use kvtuner::sensitivity::Sensitivity;

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
    let target = placement::FitTarget {
        n_ctx,
        vram: &args.vram,
        gpu_pairs: &gpu_pairs,
        cpu_pairs: &cpu_pairs,
        max_predicted: args.max_kld,
    };
    let plan = placement::plan(problem, &args.model, &rpc, target)?;
    let budget_label = budget_label(&args.vram, &plan.devices);
    let chosen = plan.chosen();

    let measured = match (chosen, &args.text) {
        (Some(c), Some(_)) if c.offloaded_cache_layers == 0 => {
            eprintln!(
                "note: no cache layer is on the GPU at -ngl {}: no uniform GPU cache to measure the pick against",
                c.ngl
            );
            None
        }
        (Some(c), Some(spec)) => {
            let label = format!("fit for {budget_label} of GPU memory at -ngl {}", c.ngl);
            let meta = ProfileMeta {
                pairs: format!("{} on the GPU, {} on the CPU", args.pairs, args.cpu_pairs),
                target_ctx: n_ctx,
                name: args.name.clone(),
                label: Some(label),
                measured_on: String::new(),
            };
            let cands = placement::same_budget_candidates(
                problem,
                problems.by_estimator[0].0,
                c,
                &gpu_pairs,
                &cpu_pairs,
                &plan.budget,
            )?;
            Some(measure(&args, &sens, c, &rpc, spec, &cands, meta)?)
        }
        _ => None,
    };

    if args.json {
        let json = serde_json::json!({
            "context": n_ctx,
            "vram_bytes": args.vram,
            "vram_devices": plan.devices,
            "placements": plan.placements,
            "chosen_ngl": chosen.map(|c| c.ngl),
            "uniform": plan.uniform.iter().map(|((k, v), p)| serde_json::json!({"k": k, "v": v, "placement": p})).collect::<Vec<_>>(),
            "measured": measured.as_ref().map(|m| &m.0.selection),
            "held_out": measured.as_ref().map(|m| &m.1),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_table(&plan.placements, chosen, &budget_label, n_ctx);
        print!("{}", plan_summary(&plan));
        if let Some((choice, held)) = &measured {
            println!("\n{}{}", select_report::selection(&choice.selection), select_report::held_out(held));
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
        Some((choice, _)) => eprintln!("chosen: -ngl {}: {}", chosen.ngl, choice.selection.verdict()),
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
        let profile = match measured {
            Some((choice, _)) => choice.profile,
            None => {
                let label =
                    format!("fit for {budget_label} of GPU memory at -ngl {} (predicted, not measured)", chosen.ngl);
                let pairs_label = format!("{} on the GPU, {} on the CPU", args.pairs, args.cpu_pairs);
                let predicted_pick = Chosen {
                    types: &a.types,
                    label: &label,
                    bits_per_value: a.bits_per_value,
                    kv_bytes: a.bytes,
                    predicted: Some(a.predicted),
                    kld_calibration: None,
                };
                profile_for(&sens, predicted_pick, &pairs_label, n_ctx, args.name.clone())
            }
        };
        profile.save(out)?;
        eprintln!("wrote {} ({}); run it with -ngl {}", out.display(), profile.summary(), chosen.ngl);
    }
    Ok(())
}

/// Each uniform GPU pair at the most layers it fits, one line each.
pub fn plan_summary(plan: &FitPlan) -> String {
    let mut out = String::new();
    if let Some(c) = plan.chosen() {
        out += &format!("placement: -ngl {} ({} cache layers on the GPU)\n", c.ngl, c.offloaded_cache_layers);
    }
    for ((k, _), p) in &plan.uniform {
        let a = p.assignment.as_ref().expect("a chosen placement has a profile");
        out += &format!(
            "uniform {k}: -ngl {} ({} cache layers on the GPU), predicted KLD {:.5}\n",
            p.ngl, p.offloaded_cache_layers, a.predicted
        );
    }
    out + "\n"
}

/// The pick measured against the uniform GPU pairs of the same budget at its -ngl, through the
/// pipeline's choose (and confirm) and held-out stages.
fn measure(
    args: &FitArgs,
    sens: &Sensitivity,
    chosen: &Placement,
    rpc: &[RpcDevice],
    spec: &str,
    cands: &[Candidate],
    mut meta: ProfileMeta,
) -> anyhow::Result<(Choice, Vec<HeldOut>)> {
    let params = ModelParams { n_gpu_layers: chosen.ngl, rpc: rpc.to_vec(), ..Default::default() };
    let model = Model::load(Backend::init(), &args.model, &params)?;
    let devices = Devices { n_gpu_layers: chosen.ngl, threads: args.threads, ..Default::default() };
    meta.measured_on = pipeline::measured_on(&model, &devices, chosen.ngl)?;
    let base = devices.measuring_params();
    let (text, label) = load_text(spec, &args.model)?;
    let mut ev = Evaluator::new(&model, &text, sens.context, args.chunks, &base)?;
    let mut cal = Measurer::new(&mut ev, base.clone(), meta.target_ctx, label);
    let mut choice =
        pipeline::choose(&mut cal, sens, cands, chosen.kv_budget.unwrap_or(0), SelectOptions::default(), &meta)?;
    let mut texts = Vec::new();
    for spec in &args.verify {
        texts.push(load_text(spec, &args.model)?);
    }
    let target_ctx = meta.target_ctx;
    let held = pipeline::held_out(
        &model,
        &texts,
        sens.context,
        args.chunks,
        &base,
        None,
        target_ctx,
        &mut choice,
        None,
        &mut |_| {},
    )?;
    Ok((choice, held))
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
pub fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", gib(b))
    } else {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    }
}
