use anyhow::{bail, Context as _};
use comfy_table::Table;
use serde::Serialize;

use crate::cli::AbArgs;
use kvtuner::bench::{self, Stat};
use kvtuner::cache_type::CacheType;
use kvtuner::eval::{peak_rss_bytes, Evaluator, DEFAULT_STORED_BASELINE_LIMIT};
use kvtuner::kv_layout::RuntimeKv;
use kvtuner::llama::{BufferMemory, Context, ContextParams};
use kvtuner::report::{plot_bits_vs_kld, PlotPoint};
use kvtuner::runtime::{cache_configs, load_for_comparison, load_text};

#[derive(Debug, Serialize)]
struct SpeedAtDepth {
    depth: u32,
    pp512: Stat,
    tg128: Stat,
    /// tg128 with N sequences at once (`--parallel`), one entry per N.
    parallel: Vec<ParallelAtDepth>,
    /// Drafts of N tokens of one sequence per step (`--draft`), one entry per N.
    draft: Vec<DraftAtDepth>,
}

#[derive(Debug, Clone, Serialize)]
struct DraftAtDepth {
    n_draft: u32,
    tokens_per_s: Stat,
}

#[derive(Debug, Clone, Serialize)]
struct ParallelAtDepth {
    n_seq: u32,
    /// The sequences' depths (`--np-spread`: from a quarter of the depth to the depth).
    depths: Vec<u32>,
    aggregate: Stat,
    per_sequence: Stat,
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    is_profile: bool,
    type_k: Vec<CacheType>,
    type_v: Vec<CacheType>,
    /// Bits per value and KV bytes at `size_cells` cells of context (what the runtime allocated).
    bits_per_value: f64,
    kv_bytes: u64,
    /// The context the sizes are read at: -c when quality is measured, else the speed runs'.
    size_cells: u32,
    /// KV bytes per token of context (global layers; sliding layers stop growing at their window).
    kv_bytes_per_token: f64,
    /// Quality fields are null with --no-quality.
    kld_mean: Option<f64>,
    kld_stderr: Option<f64>,
    kld_median: Option<f64>,
    kld_p99: Option<f64>,
    kld_max: Option<f64>,
    top1: Option<f64>,
    ppl: Option<f64>,
    ppl_ratio: Option<f64>,
    /// Mean KLD of each chunk (how much the text moves the number).
    kld_chunk_means: Option<Vec<f64>>,
    /// Peak resident memory of the process after the quality runs.
    eval_peak_rss_bytes: Option<u64>,
    speed: Vec<SpeedAtDepth>,
    /// Layers whose device has no native flash-attention kernel for their K-V pair (runs elsewhere
    /// or on a converted cache; read back from the runtime, patch 0007).
    gpu_pairs_without_kernel: Vec<usize>,
    /// Memory per buffer type of the speed runs' context (weights, KV, compute), read back.
    speed_memory: Vec<BufferMemory>,
    /// Passkey retrievals (`--passkey`), one per context × depth.
    passkey: Vec<kvtuner::passkey::Outcome>,
    /// Next lines of code written at long context (`--next-line`), one per cut.
    next_line: Vec<kvtuner::next_line::Outcome>,
}

/// Decode steps of each draft run.
const DRAFT_STEPS: u32 = 32;

/// Cells of each sequence's context in the speed runs: room for pp512 or tg128 after the deepest
/// depth, and for the drafts' steps.
fn speed_ctx(args: &AbArgs) -> u32 {
    let max_depth = args.depths.iter().copied().max().unwrap_or(0);
    let draft_max = args.draft.iter().copied().max().unwrap_or(0);
    (max_depth + 512).max(max_depth + (DRAFT_STEPS + 1) * draft_max).next_multiple_of(256)
}

pub fn run(args: AbArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let (text, label) = match (&args.text, args.no_quality) {
        (Some(t), _) => load_text(t, &args.model)?,
        (None, true) => (String::new(), String::from("(no text: --no-quality)")),
        (None, false) => bail!("--text is required unless --no-quality"),
    };
    let named = args.text.as_deref().and_then(kvtuner::assets::NamedText::parse);
    if named.is_some_and(|t| t.name().ends_with("-calibration")) {
        eprintln!("warning: {label} is a calibration half; quality measured on it is not held out");
    }
    let (header, identity, model, base) = load_for_comparison(&args.model, &args.devices.devices())?;

    let mut configs =
        cache_configs(&args.against, &args.profiles, &args.key_shift_text, &header, &identity, &args.model, &base)?;
    // the key shift and scale (+ks, +kc, a profile's `keys`): never measured on the evaluated text
    for (c, keys) in configs.iter().filter_map(|c| Some((c, c.keys.as_ref()?))) {
        anyhow::ensure!(
            args.text.as_deref() != Some(keys.text.as_str()),
            "{}: the keys would be measured on the evaluated --text {} (not held out); see --key-shift-text",
            c.name,
            keys.text
        );
    }
    let n_keys = kvtuner::runtime::KEY_TOKENS.min(args.ctx_size as usize).max(kvtuner::key_treatment::MIN_TOKENS);
    kvtuner::runtime::measure_config_keys(&mut configs, &model, &args.model, n_keys, &base)?;

    let (summaries, base_ppl) = if args.no_quality {
        (vec![None; configs.len()], f64::NAN)
    } else {
        let eval_base = ContextParams { n_ubatch: args.eval_ubatch, ..base.clone() };
        let limit = args.eval_memory_mib.map_or(DEFAULT_STORED_BASELINE_LIMIT, |m| m << 20);
        let mut ev = Evaluator::with_limit(&model, &text, args.ctx_size, args.chunks, &eval_base, limit)?;
        eprintln!(
            "quality: {} chunk(s) of {} tokens of {label} (baseline {:?})",
            ev.chunks(),
            args.ctx_size,
            ev.mode()
        );
        let params: Vec<ContextParams> = configs.iter().map(|c| c.params.clone()).collect();
        let scores = ev.score_many(&params)?;
        for (c, s) in configs.iter().zip(&scores) {
            eprintln!("  {}: KLD {:.5}", c.name, s.summary().kld_mean);
        }
        if let Some(peak) = peak_rss_bytes() {
            eprintln!("quality runs: peak resident memory {:.0} MiB", peak as f64 / 1048576.0);
        }
        (scores.iter().map(|s| Some(s.summary())).collect(), ev.baseline_ppl())
    };
    let eval_peak_rss = if args.no_quality { None } else { peak_rss_bytes() };

    // Sizes at the context the numbers beside them are about: a window's ring (a fixed number of
    // cells) is a large share of a 1024-token chunk and a small one at 32768.
    let size_cells = if args.no_quality && !args.no_speed { speed_ctx(&args) } else { args.ctx_size };
    let mut rows = Vec::new();
    for (c, s) in configs.iter().zip(summaries) {
        let ctx = Context::new(&model, &ContextParams { n_ctx: size_cells, ..c.params.clone() })?;
        let infos: Vec<_> = ctx.layers();
        let type_k: Vec<CacheType> = infos.iter().map(|i| i.map_or(CacheType::F16, |i| i.type_k)).collect();
        let type_v: Vec<CacheType> = infos.iter().map(|i| i.map_or(CacheType::F16, |i| i.type_v)).collect();
        // what the runtime found at context creation (patch 0007; it also warned)
        let missing: Vec<usize> =
            infos.iter().enumerate().filter(|(_, i)| i.is_some_and(|i| i.attn_fallback)).map(|(il, _)| il).collect();
        // Per token of context: layers that hold every token (sliding ones stop at their window).
        let per_token = infos
            .iter()
            .flatten()
            .filter(|i| !i.is_swa)
            .map(|i| (i.bytes_k + i.bytes_v) as f64 / i.n_cells.max(1) as f64)
            .sum();
        let kv = RuntimeKv::of(&ctx);
        rows.push(Row {
            name: c.name.clone(),
            is_profile: c.is_profile,
            bits_per_value: kv.bits_per_value(),
            kv_bytes: kv.buffer_bytes,
            size_cells,
            kv_bytes_per_token: per_token,
            type_k,
            type_v,
            kld_mean: s.as_ref().map(|s| s.kld_mean),
            kld_stderr: s.as_ref().map(|s| s.kld_stderr),
            kld_median: s.as_ref().map(|s| s.kld_median),
            kld_p99: s.as_ref().map(|s| s.kld_p99),
            kld_max: s.as_ref().map(|s| s.kld_max),
            top1: s.as_ref().map(|s| s.top1),
            ppl: s.as_ref().map(|s| s.ppl),
            ppl_ratio: s.as_ref().map(|s| s.ppl / base_ppl),
            kld_chunk_means: s.map(|s| s.kld_chunk_means),
            eval_peak_rss_bytes: eval_peak_rss,
            speed: Vec::new(),
            gpu_pairs_without_kernel: missing,
            speed_memory: Vec::new(),
            passkey: Vec::new(),
            next_line: Vec::new(),
        });
    }

    if !args.passkey.is_empty() {
        let (hay_text, hay_label) = load_text(&args.passkey_text, &args.model)?;
        let haystack = model.tokenize(&hay_text, false, false)?;
        let cases = kvtuner::passkey::cases(&args.passkey, &args.passkey_depths, 42);
        eprintln!(
            "passkey: {} case(s) (contexts {:?}, depths {:?}) in {hay_label}",
            cases.len(),
            args.passkey,
            args.passkey_depths
        );
        for case in &cases {
            for (row, c) in rows.iter_mut().zip(&configs) {
                let o = kvtuner::passkey::answer(&model, &haystack, (&c.name, &c.params), case)?;
                eprintln!(
                    "  {} @ {} depth {:.2}: key {} answer {:?} {} ({:.1} s)",
                    c.name,
                    case.n_ctx,
                    case.depth,
                    case.key,
                    o.answer,
                    if o.correct { "ok" } else { "WRONG" },
                    o.seconds
                );
                row.passkey.push(o);
            }
        }
    }

    if !args.next_line.is_empty() {
        let (source, source_label) = load_text(&args.next_line_text, &args.model)?;
        let tokens = model.tokenize(&source, false, false)?;
        for &n_ctx in &args.next_line {
            let cases = kvtuner::next_line::cases(&model, &tokens, n_ctx, args.next_line_cases)
                .with_context(|| format!("next-line cases in {source_label}"))?;
            eprintln!("next line: {} cut(s) in tokens {}..{} of {source_label}", cases.len(), cases[0].at, n_ctx);
            for (row, c) in rows.iter_mut().zip(&configs) {
                let t0 = std::time::Instant::now();
                let outcomes = kvtuner::next_line::answer_all(&model, &tokens, (&c.name, &c.params), &cases)?;
                let right = outcomes.iter().filter(|o| o.correct).count();
                eprintln!(
                    "  {} @ {n_ctx}: {right}/{} lines exact ({:.1} s)",
                    c.name,
                    outcomes.len(),
                    t0.elapsed().as_secs_f64()
                );
                row.next_line.extend(outcomes);
            }
            // the first configuration's lines are the reference each other's are compared with
            let reference: Vec<String> =
                rows[0].next_line.iter().filter(|o| o.case.n_ctx == n_ctx).map(|o| o.answer.clone()).collect();
            for row in &mut rows {
                for (o, r) in row.next_line.iter_mut().filter(|o| o.case.n_ctx == n_ctx).zip(&reference) {
                    o.same_as_reference = &o.answer == r;
                }
            }
        }
    }

    // Speed, configurations interleaved within each repetition.
    if !args.no_speed {
        let n_ctx = speed_ctx(&args);
        eprintln!("speed: pp512 and tg128 at depths {:?}, {} repetitions", args.depths, args.reps);
        let mut samples = vec![vec![(Vec::new(), Vec::new()); args.depths.len()]; configs.len()];
        // [config][depth][parallel] aggregate tok/s
        let mut par_samples = vec![vec![vec![Vec::new(); args.parallel.len()]; args.depths.len()]; configs.len()];
        let par_max = args.parallel.iter().copied().max().unwrap_or(1).max(1);
        // [config][depth][draft] tokens/s
        let mut draft_samples = vec![vec![vec![Vec::new(); args.draft.len()]; args.depths.len()]; configs.len()];
        if !args.parallel.is_empty() {
            let each = if args.np_spread {
                "at depths spread from a quarter of each depth to it"
            } else {
                "each at every depth"
            };
            eprintln!("speed: tg128 of {:?} sequences at once, {each}", args.parallel);
        }
        // One untimed run first: the first decode of a process pays one-off costs (GPU kernel
        // loading, allocations) that would otherwise land on whichever configuration runs first.
        if let Some(first) = configs.first() {
            let mut ctx = Context::new(
                &model,
                &ContextParams { n_ctx: 1024, n_batch: 512, n_ubatch: 512, ..first.params.clone() },
            )?;
            bench::measure(&mut ctx, 0, 512, 16, 512)?;
        }
        for rep in 0..args.reps {
            for (ci, c) in configs.iter().enumerate() {
                let mut ctx =
                    Context::new(&model, &ContextParams { n_ctx, n_batch: 512, n_ubatch: 512, ..c.params.clone() })?;
                if rep == 0 {
                    rows[ci].speed_memory = ctx.memory();
                }
                for (di, &depth) in args.depths.iter().enumerate() {
                    let s = bench::measure(&mut ctx, depth, 512, 128, 512)?;
                    samples[ci][di].0.push(s.pp_tokens_per_s);
                    samples[ci][di].1.push(s.tg_tokens_per_s);
                    for (ki, &n_draft) in args.draft.iter().enumerate() {
                        let d = bench::measure_draft(&mut ctx, depth, n_draft, DRAFT_STEPS, 512)?;
                        draft_samples[ci][di][ki].push(d.tokens_per_s);
                    }
                }
                if !args.parallel.is_empty() {
                    // a context of its own: par_max streams of n_ctx cells each
                    drop(ctx);
                    let mut pctx = Context::new(
                        &model,
                        &ContextParams {
                            n_ctx: n_ctx * par_max,
                            n_seq_max: par_max,
                            n_batch: 512,
                            n_ubatch: 512,
                            ..c.params.clone()
                        },
                    )?;
                    for (di, &depth) in args.depths.iter().enumerate() {
                        for (pi, &n_seq) in args.parallel.iter().enumerate() {
                            let s = bench::measure_parallel(&mut pctx, n_seq, depth, args.np_spread, 128, 512)?;
                            par_samples[ci][di][pi].push(s.aggregate_tokens_per_s);
                        }
                    }
                }
                eprintln!("  rep {}/{} {}", rep + 1, args.reps, c.name);
            }
        }
        for (((row, per_depth), par), drafts) in rows.iter_mut().zip(samples).zip(par_samples).zip(draft_samples) {
            row.speed = args
                .depths
                .iter()
                .zip(per_depth)
                .zip(par)
                .zip(drafts)
                .map(|(((&depth, (pp, tg)), par), drafts)| SpeedAtDepth {
                    depth,
                    pp512: Stat::of(&pp),
                    tg128: Stat::of(&tg),
                    parallel: args
                        .parallel
                        .iter()
                        .zip(par)
                        .map(|(&n_seq, agg)| {
                            let per: Vec<f64> = agg.iter().map(|a| a / f64::from(n_seq)).collect();
                            ParallelAtDepth {
                                n_seq,
                                depths: bench::sequence_depths(n_seq, depth, args.np_spread),
                                aggregate: Stat::of(&agg),
                                per_sequence: Stat::of(&per),
                            }
                        })
                        .collect(),
                    draft: args
                        .draft
                        .iter()
                        .zip(drafts)
                        .map(|(&n_draft, tps)| DraftAtDepth { n_draft, tokens_per_s: Stat::of(&tps) })
                        .collect(),
                })
                .collect();
        }
    }

    print_table(&rows, &args, base_ppl, &label);
    if !args.passkey.is_empty() {
        print_passkey(&rows, &args);
    }
    if !args.next_line.is_empty() {
        print_next_line(&rows, &args);
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&rows)?;
        kvtuner::atomic_write(path, json.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    if let (Some(path), false) = (&args.plot, args.no_quality) {
        let points: Vec<PlotPoint> = rows
            .iter()
            .map(|r| PlotPoint {
                label: r.name.clone(),
                bits_per_value: r.bits_per_value,
                kld_mean: r.kld_mean.unwrap_or(f64::NAN),
                is_profile: r.is_profile,
            })
            .collect();
        let title = format!(
            "{}: KV cache bits vs KL divergence ({label})",
            identity.name.as_deref().unwrap_or(&identity.architecture)
        );
        plot_bits_vs_kld(path, &title, &points)?;
    }
    eprintln!("ab finished in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Keys retrieved per configuration and context, out of the depths tried.
fn print_passkey(rows: &[Row], args: &AbArgs) {
    let table = task_table(rows, &args.passkey, "passkey", |r, n_ctx| {
        let at: Vec<_> = r.passkey.iter().filter(|o| o.case.n_ctx == n_ctx).collect();
        format!("{}/{}", at.iter().filter(|o| o.correct).count(), at.len())
    });
    println!("\nPasskey retrieval (keys found / depths {:?}, greedy, {}):", args.passkey_depths, args.passkey_text);
    println!("{table}");
}

/// Lines written exactly per configuration and context, out of the cuts.
fn print_next_line(rows: &[Row], args: &AbArgs) {
    let table = task_table(rows, &args.next_line, "next line", |r, n_ctx| {
        let at: Vec<_> = r.next_line.iter().filter(|o| o.case.n_ctx == n_ctx).collect();
        let same = at.iter().filter(|o| o.same_as_reference).count();
        format!("{}/{} ({same} as {})", at.iter().filter(|o| o.correct).count(), at.len(), rows[0].name)
    });
    println!(
        "\nNext line of code (lines written exactly / cuts in the second half of each context, each line seen before in it; in brackets: answers equal to the first configuration's; greedy, {}):",
        args.next_line_text
    );
    println!("{table}");
}

/// A long-context task's table: a row per configuration, a column per context (`TASK @ N`).
fn task_table(rows: &[Row], contexts: &[u32], task: &str, cell: impl Fn(&Row, u32) -> String) -> Table {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    let mut header = vec!["config".to_string()];
    header.extend(contexts.iter().map(|c| format!("{task} @ {c}")));
    table.set_header(header);
    for r in rows {
        let mut cells = vec![r.name.clone()];
        cells.extend(contexts.iter().map(|&n_ctx| cell(r, n_ctx)));
        table.add_row(cells);
    }
    table
}

fn print_table(rows: &[Row], args: &AbArgs, base_ppl: f64, label: &str) {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    let cells = rows.first().map_or(args.ctx_size, |r| r.size_cells);
    let mut header: Vec<String> = vec!["config".into(), format!("bits/value @ {cells}"), format!("KV MiB @ {cells}")];
    header.extend(["KLD mean ± se", "median", "p99", "max", "top-1", "PPL (ratio)"].into_iter().map(String::from));
    // memory off the host (GPU, RPC devices) in the speed runs, when there is any
    let offload = |r: &Row| r.speed_memory.iter().filter(|m| !m.is_host).map(BufferMemory::total).sum::<u64>();
    let show_offload = !args.no_speed && rows.iter().any(|r| offload(r) > 0);
    if show_offload {
        header.push("offload MiB (weights + KV + compute)".into());
    }
    if !args.no_speed {
        for d in &args.depths {
            header.push(format!("pp512 @ d{d}"));
            header.push(format!("tg128 @ d{d}"));
            for n in &args.parallel {
                let at = if args.np_spread { format!("d{}..{d}", d / 4) } else { format!("d{d}") };
                header.push(format!("tg128 ×{n} @ {at} (all / each)"));
            }
            for n in &args.draft {
                header.push(format!("draft {n} @ d{d} (tok/s)"));
            }
        }
    }
    table.set_header(header);
    for r in rows {
        let q = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
        let mut cells = vec![
            r.name.clone(),
            format!("{:.2}", r.bits_per_value),
            format!("{:.2}", r.kv_bytes as f64 / 1048576.0),
            match (r.kld_mean, r.kld_stderr) {
                (Some(m), Some(se)) => format!("{m:.5} ± {se:.5}"),
                _ => "-".into(),
            },
            q(r.kld_median, &|v| format!("{v:.5}")),
            q(r.kld_p99, &|v| format!("{v:.4}")),
            q(r.kld_max, &|v| format!("{v:.3}")),
            q(r.top1, &|v| format!("{:.2}%", v * 100.0)),
            match (r.ppl, r.ppl_ratio) {
                (Some(p), Some(ratio)) => format!("{p:.3} ({ratio:.4})"),
                _ => "-".into(),
            },
        ];
        if show_offload {
            cells.push(format!("{:.0}", offload(r) as f64 / 1048576.0));
        }
        // median (range); `-` where nothing was measured (--reps 0: the sizes alone)
        let stat = |s: &Stat| {
            if s.median.is_nan() {
                "-".to_string()
            } else {
                format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
            }
        };
        let median = |s: &Stat| if s.median.is_nan() { "-".to_string() } else { format!("{:.1}", s.median) };
        for s in &r.speed {
            cells.push(stat(&s.pp512));
            cells.push(stat(&s.tg128));
            for p in &s.parallel {
                cells.push(format!("{} / {}", median(&p.aggregate), median(&p.per_sequence)));
            }
            for k in &s.draft {
                cells.push(stat(&k.tokens_per_s));
            }
        }
        table.add_row(cells);
    }
    println!(
        "{} chunk(s) × {} tokens of {label}; baseline = f16 cache (PPL {base_ppl:.3}); KLD over the second half of each chunk",
        args.chunks, args.ctx_size
    );
    println!("{table}");
}
