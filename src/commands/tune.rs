//! `kvtuner tune`: the library's pipeline with the defaults of the README's main job, then the
//! annotated model.

use anyhow::Context as _;

use super::annotate::write_annotated;
use super::calibrate::calibrate_options;
use super::runtime::{load_text, read_model_header};
use crate::cli::TuneArgs;
use kvtuner::assets::NamedText;
use kvtuner::llama::{Backend, ContextParams, Model, ModelParams};
use kvtuner::profile::ModelIdentity;
use kvtuner::select::{report, SelectOptions};
use kvtuner::tune::{self, Stage, TuneOptions};

pub fn run(args: TuneArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let model_path = match args.model {
        Some(m) => m,
        None => kvtuner::assets::ensure_model(&kvtuner::assets::cache_dir()).context("fetching Gemma 3 270M")?,
    };
    let work = args.work_dir.clone().unwrap_or_else(|| {
        args.output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| ".".into())
    });
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let stem = args.output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let sens_path = work.join(format!("{stem}.sensitivity.yaml"));
    let profile_path = work.join(format!("{stem}.profile.yaml"));
    let report_path = work.join(format!("{stem}.report.md"));

    let (text, label) = load_text(&args.text)?;
    // Held out by default: the other half of a named text (never the calibration text itself).
    let eval_specs: Vec<String> = if args.eval_text.is_empty() {
        let other = NamedText::parse(&args.text).map_or(NamedText::LeeEvaluation, NamedText::held_out);
        vec![other.name().to_string()]
    } else {
        args.eval_text.clone()
    };
    let mut held = Vec::new();
    for spec in &eval_specs {
        if spec == &args.text {
            anyhow::bail!(
                "--eval-text {spec} is the calibration text: quality must be reported on text the choice never saw"
            );
        }
        held.push(load_text(spec)?);
    }

    let header = read_model_header(&model_path)?;
    let identity = ModelIdentity::from_header(&header)?;
    let model = Model::load(Backend::init(), &model_path, &ModelParams { n_gpu_layers: 0, ..Default::default() })?;
    let base = ContextParams { n_threads: args.threads, no_kv_profile: true, ..Default::default() };
    let opts = TuneOptions {
        calibrate: calibrate_options(&args.plan, args.ctx_size, base, label.clone()),
        pairs: args.pairs.clone(),
        budget_bits: args.budget,
        target_ctx: args.ctx_size,
        eval_chunks: args.eval_chunks,
        select: SelectOptions::default(),
        name: None,
    };
    println!(
        "== tune {} at ≤ {} bits/value: calibrate on {label}, choose by measurement there, check on {} ==",
        model_path.display(),
        args.budget,
        held.iter().map(|h| h.1.as_str()).collect::<Vec<_>>().join(", ")
    );
    let partial = sens_path.with_extension("partial");
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_shown = 0.0f64;
    let tuned =
        tune::tune(&model, &identity, (&text, &label), &held, &opts, Some(&partial), &mut |stage| match stage {
            Stage::Calibrate(done, total, what) => {
                let t = start.elapsed().as_secs_f64();
                if plain || t - last_shown > 5.0 || done == total {
                    eprintln!("[{t:>6.1}s] calibrate {done}/{total} {what}");
                    last_shown = t;
                }
            }
            Stage::Note(what) => eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64()),
        })?;
    tuned.sensitivity.save(&sens_path)?;
    let _ = std::fs::remove_file(&partial);
    tuned.profile.save(&profile_path)?;

    let s = tuned.seconds;
    let md = format!(
        "## kvtuner tune: {}\n\n- calibration: {}; {} forward passes\n- budget {} bits per value at context {} (sizes read from the runtime)\n- time: calibrate {:.1} s, select {:.1} s, held-out check {:.1} s, total {:.1} s\n\n{}{}",
        identity.name.as_deref().unwrap_or(&identity.architecture),
        tuned.sensitivity.method,
        tuned.sensitivity.forward_passes,
        args.budget,
        args.ctx_size,
        s.calibrate,
        s.select,
        s.held_out,
        s.total(),
        report::selection(&tuned.selection),
        report::held_out(&tuned.held_out)
    );
    kvtuner::atomic_write(&report_path, md.as_bytes()).with_context(|| format!("writing {}", report_path.display()))?;
    println!("{md}");
    write_annotated(&header, &tuned.profile, &args.output)?;
    println!(
        "wrote {} (profile {}: {}); table {}, profile {}, report {}",
        args.output.display(),
        tuned.profile.name,
        tuned.profile.summary(),
        sens_path.display(),
        profile_path.display(),
        report_path.display()
    );
    println!(
        "tune finished in {:.1} s (calibrate {:.1} s, select {:.1} s, held-out check {:.1} s)",
        start.elapsed().as_secs_f64(),
        s.calibrate,
        s.select,
        s.held_out
    );
    Ok(())
}
