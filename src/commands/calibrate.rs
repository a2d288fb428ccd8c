use std::time::Instant;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{CalibrateArgs, CalibrationPlan};
use kvtuner::calibrate::{self, CalibrateOptions};
use kvtuner::runtime::{load_text, open};

/// The library's options from the command line's calibration plan.
pub fn calibrate_options(
    plan: &CalibrationPlan,
    n_ctx: u32,
    base: kvtuner::llama::ContextParams,
    text_label: String,
) -> CalibrateOptions {
    CalibrateOptions {
        n_ctx,
        chunks: plan.chunks,
        layer_chunks: plan.layer_chunks.min(plan.chunks),
        layer_stride: plan.layer_stride,
        layer_ctx: plan.layer_ctx,
        background: plan.background,
        types: plan.types.clone(),
        base,
        text_label,
    }
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let (text, label) = load_text(&args.text.text, &args.runtime.model)?;
    let mut runtime = args.runtime.options();
    runtime.kv_profile = "off".into();
    let opened = open(&runtime)?;
    let n_layer = opened.model.n_layer() as usize;
    let opts = calibrate_options(&args.plan, args.runtime.ctx_size, opened.params.clone(), label.clone());
    let passes = calibrate::cost(n_layer, &args.plan.types, &opts);
    eprintln!(
        "calibrating {} layers × K/V on {label}: {} chunks of {} tokens ({} of at most {} tokens for single-layer runs), about {passes} forward passes",
        n_layer, args.plan.chunks, args.runtime.ctx_size, opts.layer_chunks, opts.layer_ctx
    );
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} tokens, {elapsed} elapsed, eta {eta}  {msg}").unwrap(),
    );
    let partial = args.output.with_extension("partial");
    // Without a terminal (CI logs), print one line per trial instead of a bar.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let table = calibrate::calibrate(
        &opened.model,
        &opened.identity,
        &text,
        &opts,
        Some(&partial),
        &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
            if plain {
                eprintln!("[{:>6.1}s] {done}/{total} {what}", start.elapsed().as_secs_f64());
            }
        },
    )?;
    bar.finish_and_clear();
    table.save(&args.output).with_context(|| format!("writing {}", args.output.display()))?;
    let _ = std::fs::remove_file(&partial);

    println!(
        "wrote {} ({} forward passes, {:.1} s)",
        args.output.display(),
        table.forward_passes,
        start.elapsed().as_secs_f64()
    );
    println!("uniform runs (they set each type's scale; single-layer runs set each layer's share):");
    for a in &table.anchors {
        let (is_v, ty) = if a.k == kvtuner::cache_type::CacheType::F16 { (true, a.v) } else { (false, a.k) };
        let key = format!("{}:{ty}", if is_v { "v" } else { "k" });
        let single: f64 = table.layers.iter().filter_map(|l| l.measured.get(&key)).map(|q| q.kld_mean).sum();
        let note = if single > 0.0 {
            format!("; the {} single-layer runs at {ty} sum to {single:.5}", table.layers.len())
        } else {
            String::new()
        };
        println!("  K {:<5} V {:<5} KLD {:.5}{note}", a.k.name(), a.v.name(), a.quality.kld_mean);
    }
    Ok(())
}
