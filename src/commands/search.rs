use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Context as _};
use comfy_table::Table;
use serde::Serialize;

use super::runtime::load_text;
use crate::cli::SearchArgs;
use kvtuner::cache_type::CacheType;
use kvtuner::eval::{Evaluator, Summary};
use kvtuner::llama::{Backend, ContextParams, LayerCacheTypes, Model, ModelParams};
use kvtuner::profile::{Calibration, LayerTypes, Measured, Profile};
use kvtuner::search::{self, Assignment, Problem};
use kvtuner::sensitivity::Sensitivity;

/// One end-to-end verified configuration.
#[derive(Debug, Clone, Serialize)]
struct Verified {
    name: String,
    kind: &'static str,
    bits_per_value: f64,
    kv_bytes: u64,
    predicted_kld: f64,
    measured: Summary,
}

/// A uniform configuration and what the search and the heuristic do at its size.
#[derive(Debug, Clone, Serialize)]
struct Comparison {
    uniform: Verified,
    profile: Verified,
    heuristic: Option<Verified>,
    /// profile KLD / uniform KLD
    ratio: f64,
}

pub fn run(args: SearchArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let sens = Sensitivity::load(&args.sensitivity)?;
    let n_ctx = args.ctx_size.unwrap_or(sens.context) as u64;
    let pairs = search::parse_pairs(&args.pairs, &sens.types, search::CUDA_FA_PAIRS)?;
    let problem = sens.problem(n_ctx, pairs);
    let frontier = search::frontier(&problem)?;
    if let Some(path) = &args.frontier {
        kvtuner::atomic_write(path, serde_json::to_string_pretty(&frontier)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let chosen = match (args.budget, args.max_kld) {
        (Some(bits), _) => Some(search::best_within_bits(&problem, bits)?.with_context(|| {
            format!("no profile fits {bits} bits per value (the smallest needs {:.2})", frontier[0].bits_per_value)
        })?),
        (None, Some(kld)) => Some(
            search::cheapest_within_error(&problem, kld)?
                .with_context(|| format!("no profile reaches a predicted KLD of {kld}"))?,
        ),
        (None, None) => None,
    };

    if !args.json {
        print_frontier(&frontier, n_ctx);
    }
    let search_seconds = start.elapsed().as_secs_f64();

    let mut verified_chosen = None;
    let mut comparisons = Vec::new();
    let mut eval_label = None;
    if let Some(text_spec) = &args.verify {
        let model_path = args.model.as_ref().expect("clap requires -m with --verify");
        let (text, label) = load_text(text_spec)?;
        let model = Model::load(
            Backend::init(),
            model_path,
            &ModelParams { n_gpu_layers: args.n_gpu_layers, ..Default::default() },
        )?;
        if model.n_layer() as usize != sens.layout.layers.len() {
            bail!(
                "{} has {} layers, the sensitivity table {}",
                model_path.display(),
                model.n_layer(),
                sens.layout.layers.len()
            );
        }
        let base = ContextParams { n_threads: args.threads, no_kv_profile: true, ..Default::default() };
        eprintln!("verifying on {label} ({} chunks of {} tokens)", args.chunks, sens.context);
        let mut ev = Evaluator::new(&model, &text, sens.context, args.chunks, &base)?;
        let mut measure = |name: String, kind: &'static str, a: &Assignment| -> anyhow::Result<Verified> {
            let types = LayerCacheTypes::from_pairs(a.types.iter().copied());
            let summary = ev.score(&ContextParams { layer_types: Some(types), ..base.clone() })?.summary();
            eprintln!("  {name}: measured KLD {:.5} (predicted {:.5})", summary.kld_mean, a.predicted);
            Ok(Verified {
                name,
                kind,
                bits_per_value: a.bits_per_value,
                kv_bytes: a.bytes,
                predicted_kld: a.predicted,
                measured: summary,
            })
        };
        if let Some(a) = &chosen {
            verified_chosen = Some(measure(format!("chosen ({:.2} bpv)", a.bits_per_value), "profile", a)?);
        }
        let all_q4 = uniform(&problem, CacheType::Q4_0, CacheType::Q4_0)?;
        let all_q8 = uniform(&problem, CacheType::Q8_0, CacheType::Q8_0)?;
        for &(k, v) in &problem.pairs {
            if k == CacheType::F16 || v == CacheType::F16 {
                continue;
            }
            let u = uniform(&problem, k, v)?;
            if u.bytes <= all_q4.bytes || u.bytes >= all_q8.bytes {
                continue;
            }
            let Some(p) = search::best_within_bytes(&problem, u.bytes)? else { continue };
            let uv = measure(format!("uniform {k}/{v}"), "uniform", &u)?;
            let pv = measure(format!("profile ≤ {k}/{v} bytes"), "profile", &p)?;
            let hv = match search::heuristic_at_bytes(&problem, u.bytes)? {
                Some(h) => Some(measure(format!("first/last ≤ {k}/{v} bytes"), "heuristic", &h)?),
                None => None,
            };
            let ratio = pv.measured.kld_mean / uv.measured.kld_mean;
            comparisons.push(Comparison { uniform: uv, profile: pv, heuristic: hv, ratio });
        }
        eval_label = Some(label);
    }

    if let (Some(a), Some(out)) = (&chosen, &args.output) {
        let name = args.name.clone().unwrap_or_else(|| {
            format!(
                "{}-{:.1}bpv",
                sens.model.name.as_deref().unwrap_or(&sens.model.architecture).replace(' ', "-").to_lowercase(),
                a.bits_per_value
            )
        });
        let profile = Profile {
            name,
            description: Some(format!(
                "kvtuner search over {} pairs ({}) at context {n_ctx}, from {}",
                problem.pairs.len(),
                args.pairs,
                args.sensitivity.display()
            )),
            layers: a.types.iter().map(|&(k, v)| LayerTypes { k, v }).collect(),
            measured: Some(Measured {
                bits_per_value: a.bits_per_value,
                kv_bytes: a.bytes,
                context: n_ctx as u32,
                kld_mean: verified_chosen.as_ref().map(|v| v.measured.kld_mean),
                kld_eval_text: eval_label.clone(),
                predicted_kld: Some(a.predicted),
            }),
            calibration: Some(Calibration {
                text: sens.text.clone(),
                context: sens.context,
                chunks: sens.chunks,
                types: sens.types.clone(),
                pairs: Some(args.pairs.clone()),
            }),
            ..Profile::uniform(&sens.model, CacheType::F16, CacheType::F16, "")
        };
        profile.save(out)?;
        let msg = format!(
            "wrote {} ({}, {:.2} bits/value, predicted KLD {:.5})",
            out.display(),
            profile.summary(),
            a.bits_per_value,
            a.predicted
        );
        // with --json, stdout carries only the JSON document
        if args.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }

    let report = render_report(
        &sens,
        &args,
        n_ctx,
        &frontier,
        verified_chosen.as_ref(),
        &comparisons,
        eval_label.as_deref(),
        search_seconds,
    );
    if args.json {
        let out = serde_json::json!({
            "context": n_ctx,
            "pairs": problem.pairs,
            "frontier": frontier,
            "chosen": chosen,
            "verified": verified_chosen,
            "comparisons": comparisons,
            "eval_text": eval_label,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if !comparisons.is_empty() || verified_chosen.is_some() {
        println!("{report}");
    }
    if let Some(path) = &args.report {
        kvtuner::atomic_write(path, report.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("search {:.2} s, total {:.1} s", search_seconds, start.elapsed().as_secs_f64());
    Ok(())
}

fn uniform(p: &Problem, k: CacheType, v: CacheType) -> anyhow::Result<Assignment> {
    Ok(search::evaluate(p, &vec![(k, v); p.layers.len()])?)
}

fn print_frontier(frontier: &[Assignment], n_ctx: u64) {
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

/// Pearson correlation of predicted and measured KLD.
fn correlation(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let (vx, vy): (f64, f64) =
        (points.iter().map(|p| (p.0 - mx).powi(2)).sum(), points.iter().map(|p| (p.1 - my).powi(2)).sum());
    Some(cov / (vx * vy).sqrt())
}

#[allow(clippy::too_many_arguments)]
fn render_report(
    sens: &Sensitivity,
    args: &SearchArgs,
    n_ctx: u64,
    frontier: &[Assignment],
    chosen: Option<&Verified>,
    comparisons: &[Comparison],
    eval_label: Option<&str>,
    search_seconds: f64,
) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "## kvtuner search: {}\n", sens.model.name.as_deref().unwrap_or(&sens.model.architecture));
    let _ = writeln!(
        r,
        "- calibration: {} ({} chunk(s) of {} tokens, {} forward passes, {:.0} s); {}",
        sens.text, sens.chunks, sens.context, sens.forward_passes, sens.seconds, sens.method
    );
    let _ = writeln!(
        r,
        "- search: pairs `{}`, target context {n_ctx}, {} frontier points, {:.2} s",
        args.pairs,
        frontier.len(),
        search_seconds
    );
    if let Some(label) = eval_label {
        let _ = writeln!(
            r,
            "- verification text (held out): {label}, {} chunk(s) of {} tokens\n",
            args.chunks, sens.context
        );
    }
    let row = |v: &Verified| {
        format!(
            "| {} | {:.2} | {:.2} | {:.5} | {:.5} ± {:.5} | {:.5} | {:.2}% | {:.3} |",
            v.name,
            v.bits_per_value,
            v.kv_bytes as f64 / 1048576.0,
            v.predicted_kld,
            v.measured.kld_mean,
            v.measured.kld_stderr,
            v.measured.kld_p99,
            v.measured.top1 * 100.0,
            v.measured.ppl
        )
    };
    let header = "| configuration | bits/value | KV MiB | predicted KLD | measured KLD | p99 KLD | top-1 same | PPL |\n|---|---|---|---|---|---|---|---|";
    if let Some(c) = chosen {
        let _ = writeln!(r, "{header}\n{}\n", row(c));
    }
    if !comparisons.is_empty() {
        let _ = writeln!(r, "### At the size of each uniform configuration between q4_0 and q8_0\n\n{header}");
        for c in comparisons {
            let _ = writeln!(r, "{}", row(&c.uniform));
            let _ = writeln!(r, "{}", row(&c.profile));
            if let Some(h) = &c.heuristic {
                let _ = writeln!(r, "{}", row(h));
            }
        }
        let _ = writeln!(r, "\n| uniform | profile KLD / uniform KLD | profile KLD / first-last KLD |\n|---|---|---|");
        for c in comparisons {
            let vs_h = c
                .heuristic
                .as_ref()
                .map_or("-".into(), |h| format!("{:.3}", c.profile.measured.kld_mean / h.measured.kld_mean));
            let _ = writeln!(r, "| {} | {:.3} | {} |", c.uniform.name, c.ratio, vs_h);
        }
        let mut points: Vec<(f64, f64)> = comparisons
            .iter()
            .flat_map(|c| [Some(&c.uniform), Some(&c.profile), c.heuristic.as_ref()])
            .flatten()
            .chain(chosen)
            .map(|v| (v.predicted_kld, v.measured.kld_mean))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points.dedup();
        if let Some(rho) = correlation(&points) {
            let _ = writeln!(
                r,
                "\nPredicted vs measured KLD over the {} verified configurations: Pearson r = {rho:.3}",
                points.len()
            );
        }
    }
    r
}
