//! `kvtuner search`: the frontier of a sensitivity table and, with -m, the measured choice.

use anyhow::{bail, Context as _};
use comfy_table::Table;

use crate::cli::SearchArgs;
use kvtuner::cache_type::CacheType;
use kvtuner::eval::Evaluator;
use kvtuner::kv_layout::{runtime_cells, RUNTIME_UBATCH};
use kvtuner::pipeline::{self, profile_for, Chosen, ProfileMeta};
use kvtuner::runtime::load_text;
use kvtuner::runtime::Devices;
use kvtuner::search::{self, Assignment};
use kvtuner::select::{self, report, Measurer, Problems, SelectOptions};
use kvtuner::sensitivity::Sensitivity;

pub fn run(args: SearchArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let sens = Sensitivity::load(&args.sensitivity)?;
    let n_ctx = args.ctx_size.unwrap_or(sens.context);
    let pairs = search::parse_pairs(&args.pairs, &sens.types, search::CUDA_FA_PAIRS)?;
    let model = match &args.model {
        Some(path) => {
            let model = kvtuner::runtime::load_model(path, args.n_gpu_layers, &args.rpc)?;
            if model.n_layer() as usize != sens.layout.layers.len() {
                bail!(
                    "{} has {} layers, the sensitivity table {}",
                    path.display(),
                    model.n_layer(),
                    sens.layout.layers.len()
                );
            }
            Some(model)
        }
        None => None,
    };
    let cells = match &model {
        Some(m) => runtime_cells(m, n_ctx, RUNTIME_UBATCH)?,
        None if n_ctx == sens.context && !sens.cells.is_empty() => sens.cells.clone(),
        None => bail!(
            "the sizes at context {n_ctx} come from the runtime: pass -m MODEL ({} records them at context {} only)",
            args.sensitivity.display(),
            sens.context
        ),
    };
    let mut problems = Problems::new(&sens, &cells, &pairs)?;
    if let (Some(spec), Some(m)) = (&args.cpu_pairs, &model) {
        // each layer's device, read back from a context of the model at this -ngl
        let cpu_pairs = search::parse_pairs(spec, &sens.types, search::CUDA_FA_PAIRS).context("--cpu-pairs")?;
        let devices = pipeline::layer_devices(m)?;
        let mut on_cpu = 0;
        for (_, p) in problems.by_estimator.iter_mut() {
            on_cpu = kvtuner::placement::restrict_cpu_layers(p, &devices, &cpu_pairs);
        }
        eprintln!("--cpu-pairs: {on_cpu} layer(s) on the CPU take `{spec}`, the others `{}`", args.pairs);
    }
    let frontier = search::frontier(problems.main())?;
    if let Some(path) = &args.frontier {
        kvtuner::atomic_write(path, serde_json::to_string_pretty(&frontier)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !args.json {
        print_frontier(&frontier, n_ctx);
    }
    let predicted: Option<Assignment> = match (args.budget, args.max_kld) {
        (Some(bits), _) => Some(search::best_within_bits(problems.main(), bits)?.with_context(|| {
            format!("no profile fits {bits} bits per value (the smallest needs {:.2})", frontier[0].bits_per_value)
        })?),
        (None, Some(kld)) => Some(
            search::cheapest_within_error(problems.main(), kld)?
                .with_context(|| format!("no profile reaches a predicted KLD of {kld}"))?,
        ),
        (None, None) => None,
    };
    let search_seconds = start.elapsed().as_secs_f64();

    let Some(model) = model else {
        // Predictions only: say so wherever the result goes.
        if let (Some(a), Some(out)) = (&predicted, &args.output) {
            let chosen = Chosen {
                types: &a.types,
                label: "predicted pick (not measured)",
                bits_per_value: a.bits_per_value,
                kv_bytes: a.bytes,
                predicted: Some(a.predicted),
                kld_calibration: None,
            };
            let profile = profile_for(&sens, chosen, &args.pairs, n_ctx, args.name.clone());
            profile.save(out)?;
            eprintln!(
                "wrote {} ({}): predicted, not measured; pass -m MODEL to choose by measurement",
                out.display(),
                profile.summary()
            );
        }
        if args.json {
            let json =
                serde_json::json!({ "context": n_ctx, "pairs": pairs, "frontier": frontier, "chosen": predicted });
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        return Ok(());
    };

    let devices =
        Devices { n_gpu_layers: args.n_gpu_layers, rpc: args.rpc.clone(), threads: args.threads, ..Default::default() };
    let base = devices.measuring_params();
    let (text, label) = load_text(&args.text, model.path())?;
    let mut cal_ev = Evaluator::new(&model, &text, sens.context, args.chunks, &base)?;
    let mut cal = Measurer::new(&mut cal_ev, base.clone(), n_ctx, label.clone());
    let opts = SelectOptions { neighbours: args.neighbours, screen_chunks: args.screen_chunks, ..Default::default() };
    let meta = ProfileMeta {
        pairs: args.pairs.clone(),
        target_ctx: n_ctx,
        name: args.name.clone(),
        label: None,
        measured_on: pipeline::measured_on(&model, &devices, args.n_gpu_layers)?,
    };
    let mut choice = match &predicted {
        Some(a) => {
            let max_bytes = match args.budget {
                Some(bits) => select::bytes_at_bits(problems.main(), bits),
                None => a.bytes,
            };
            let candidates = select::candidates(&problems, max_bytes, opts)?;
            let c = pipeline::choose(&mut cal, &sens, &candidates, max_bytes, opts, &meta)?;
            eprintln!("{}", c.selection.verdict());
            eprintln!("confirmed: the chosen types measured again on {label}: KLD {:.6}", c.confirmed_kld());
            Some(c)
        }
        None => None,
    };

    let mut held_texts = Vec::new();
    for spec in &args.verify {
        held_texts.push(load_text(spec, model.path())?);
    }
    let mut held_evs = Vec::new();
    for (text, _) in &held_texts {
        held_evs.push(Evaluator::new(&model, text, sens.context, args.chunks, &base)?);
    }
    let mut held: Vec<Measurer> = held_evs
        .iter_mut()
        .zip(&held_texts)
        .map(|(ev, (_, label))| Measurer::new(ev, base.clone(), n_ctx, label.clone()))
        .collect();
    let checks = match choice.as_mut() {
        Some(c) => {
            let heuristic = problems.heuristic(c.selection.max_bytes)?;
            pipeline::held_out_on(&mut held, c, heuristic)?
        }
        None => Vec::new(),
    };
    let sizes = if held.is_empty() {
        Vec::new()
    } else {
        let uniforms = select::uniform_sizes(&problems, CacheType::Q4_0, CacheType::Q8_0)?;
        select::verify_sizes(&mut cal, &mut held, &problems, &uniforms, opts, &mut |m| eprintln!("{m}"))?
    };
    let selection = choice.as_ref().map(|c| &c.selection);

    let mut md = format!(
        "## kvtuner search: {}\n\n- calibration: {} ({} chunk(s) of {} tokens, {} forward passes, {:.0} s); {}\n- search: pairs `{}`, target context {n_ctx} (sizes read from the runtime), {} frontier points, {search_seconds:.2} s\n- choice measured on {label}, {} chunk(s); held out: {}\n\n",
        sens.model.name.as_deref().unwrap_or(&sens.model.architecture),
        sens.text,
        sens.chunks,
        sens.context,
        sens.forward_passes,
        sens.seconds,
        sens.method,
        args.pairs,
        frontier.len(),
        args.chunks,
        if held_texts.is_empty() { "none".to_string() } else { held_texts.iter().map(|t| t.1.as_str()).collect::<Vec<_>>().join("; ") },
    );
    if let Some(s) = &selection {
        md += &format!("### At the budget\n\n{}{}\n", report::selection(s), report::held_out(&checks));
    }
    if !sizes.is_empty() {
        md += &report::sizes(&sizes);
    }

    if let (Some(c), Some(out)) = (&choice, &args.output) {
        c.profile.save(out)?;
        let msg = format!(
            "wrote {} ({}, {:.2} bits/value)",
            out.display(),
            c.profile.summary(),
            c.selection.chosen.kv.bits_per_value()
        );
        if args.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    if args.json {
        let json = serde_json::json!({
            "context": n_ctx,
            "pairs": pairs,
            "frontier": frontier,
            "predicted": predicted,
            "selection": selection,
            "held_out": checks,
            "sizes": sizes,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else if selection.is_some() || !sizes.is_empty() {
        println!("{md}");
    }
    if let Some(path) = &args.report {
        kvtuner::atomic_write(path, md.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("search {search_seconds:.2} s, total {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn print_frontier(frontier: &[Assignment], n_ctx: u32) {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    table.set_header(["bits/value", &format!("KV MiB @ {n_ctx}"), "predicted KLD", "layers (K/V)"]);
    // The frontier can have thousands of points; show about 16 spread over it.
    let step = (frontier.len() / 16).max(1);
    for (i, a) in frontier.iter().enumerate() {
        if i % step != 0 && i + 1 != frontier.len() {
            continue;
        }
        table.add_row([
            format!("{:.2}", a.bits_per_value),
            format!("{:.2}", a.bytes as f64 / 1048576.0),
            format!("{:.5}", a.predicted),
            summarize(&a.types),
        ]);
    }
    println!("Pareto frontier: {} profiles (showing {})", frontier.len(), table.row_count());
    println!("{table}");
}

fn summarize(types: &[(CacheType, CacheType)]) -> String {
    let mut counts: Vec<((CacheType, CacheType), usize)> = Vec::new();
    for t in types {
        match counts.iter_mut().find(|(x, _)| x == t) {
            Some((_, n)) => *n += 1,
            None => counts.push((*t, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    counts.iter().map(|((k, v), n)| format!("{n}×{k}/{v}")).collect::<Vec<_>>().join(", ")
}
