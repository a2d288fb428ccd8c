//! `kvtuner tune`: the library's pipeline with the defaults of the README's main job, then the
//! annotated model.

use anyhow::Context as _;

use super::annotate::write_annotated;
use super::calibrate::calibrate_options;
use crate::cli::TuneArgs;
use kvtuner::assets::NamedText;
use kvtuner::pipeline::{self, Budget, Stage, TuneOptions};
use kvtuner::profile::ModelIdentity;
use kvtuner::runtime::{load_text, read_model_header};
use kvtuner::select::{report, SelectOptions};
use kvtuner::sensitivity::Sensitivity;

pub fn run(args: TuneArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    // the measurements' progress (chunks scored, passkeys answered) between the stages' notes
    super::init_logging("kvtuner=info", true);
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

    let (text, label) = load_text(&args.text, &model_path)?;
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
        held.push(load_text(spec, &model_path)?);
    }

    let header = read_model_header(&model_path)?;
    let identity = ModelIdentity::from_header(&header)?;
    let devices = args.device.devices();
    let target_ctx = args.ctx_size.unwrap_or(args.calib_ctx);
    let budget = if args.vram.is_empty() {
        Budget::Bits(args.budget)
    } else {
        Budget::Vram { sizes: args.vram.clone(), cpu_pairs: args.cpu_pairs.clone(), max_kld: args.max_kld }
    };
    let opts = TuneOptions {
        calibrate: calibrate_options(&args.plan, args.calib_ctx, devices.measuring_params(), label.clone()),
        pairs: args.pairs.clone(),
        budget: budget.clone(),
        target_ctx,
        eval_chunks: args.eval_chunks,
        select: SelectOptions { screen_chunks: args.screen_chunks, ..Default::default() },
        name: args.name.clone(),
        sensitivity: match &args.sensitivity {
            Some(path) => Some(Sensitivity::load(path)?),
            None => None,
        },
        sensitivity_window: match &args.sensitivity_window {
            Some(path) => Some(Sensitivity::load(path)?),
            None => None,
        },
        devices: devices.clone(),
        keys: args.keys.then(|| kvtuner::profile::ProfileKeys::shift_and_scale(&args.text)),
        window: args.window.map(|size| kvtuner::profile::ProfileWindow {
            size,
            k: args.window_type,
            v: args.window_type,
            layers: None,
            sinks: args.sinks.unwrap_or(0),
        }),
        window_per_layer: args.window_per_layer,
        select_ctx: args.select_ctx,
        passkey_depths: if args.passkey_veto { args.passkey_depths.clone() } else { Vec::new() },
    };
    let what = match &budget {
        Budget::Bits(b) => format!("≤ {b} bits/value"),
        Budget::Vram { sizes, .. } => format!("{} of GPU memory per device at {target_ctx} tokens", sizes_label(sizes)),
    };
    println!(
        "== tune {} on {} at {what}: calibrate on {label}, choose by measurement there, check on {} ==",
        model_path.display(),
        devices.describe(),
        held.iter().map(|h| h.1.as_str()).collect::<Vec<_>>().join(", ")
    );
    let partial = sens_path.with_extension("partial");
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_shown = 0.0f64;
    let tuned =
        pipeline::tune(
            &model_path,
            &identity,
            (&text, &label),
            &held,
            &opts,
            Some(&partial),
            &mut |stage| match stage {
                Stage::Calibrate { done, total, what, eta } => {
                    let t = start.elapsed().as_secs_f64();
                    if plain || t - last_shown > 5.0 || done == total {
                        let eta = eta.map_or(String::new(), |e| format!(", about {e:.0} s left"));
                        eprintln!("[{t:>6.1}s] calibrate: {done}/{total} tokens{eta}; {what}");
                        last_shown = t;
                    }
                }
                Stage::Note(what) => eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64()),
            },
        )?;
    eprintln!(
        "[{:>6.1}s] confirmed: the profile measured again on {label}: KLD {:.6}",
        start.elapsed().as_secs_f64(),
        tuned.choice.confirmed_kld()
    );
    tuned.sensitivity.save(&sens_path)?;
    // with the window searched per layer, the second calibration (with it on every layer) too
    let window_sens_path = work.join(format!("{stem}.sensitivity-window.yaml"));
    if let Some(table) = &tuned.sensitivity_window {
        table.save(&window_sens_path)?;
    }
    let _ = std::fs::remove_file(&partial);
    let profile = &tuned.choice.profile;
    profile.save(&profile_path)?;

    let s = tuned.seconds;
    let measured_on = profile.measured.as_ref().and_then(|m| m.measured_on.clone()).unwrap_or_default();
    let mut md = format!(
        "## kvtuner tune: {}\n\n- calibration: {}; {} forward passes\n- budget: {what} (sizes read from the runtime)\n- measured on {measured_on}\n- time: load {:.1} s, calibrate {:.1} s (decode {:.1} s, scoring {:.1} s), select {:.1} s, held-out check {:.1} s, total {:.1} s\n\n",
        identity.name.as_deref().unwrap_or(&identity.architecture),
        tuned.sensitivity.method,
        tuned.sensitivity.forward_passes,
        s.load,
        s.calibrate,
        s.calibrate_decode,
        s.calibrate_scoring,
        s.select,
        s.held_out,
        s.total(),
    );
    if let Some(plan) = &tuned.fit {
        md += &super::fit::plan_summary(plan);
    }
    md += &report::selection(&tuned.choice.selection);
    md += &report::held_out(&tuned.held_out);
    kvtuner::atomic_write(&report_path, md.as_bytes()).with_context(|| format!("writing {}", report_path.display()))?;
    println!("{md}");
    write_annotated(&header, profile, &super::annotate::key_metadata(profile, &model_path)?, &args.output)?;
    let run_with = match tuned.n_gpu_layers {
        0 => String::new(),
        n => format!("; run it with -ngl {n}"),
    };
    let tables = match tuned.sensitivity_window {
        Some(_) => format!("tables {} and {} (with the window)", sens_path.display(), window_sens_path.display()),
        None => format!("table {}", sens_path.display()),
    };
    println!(
        "wrote {} (profile {}: {}{run_with}); {tables}, profile {}, report {}",
        args.output.display(),
        profile.name,
        profile.summary(),
        profile_path.display(),
        report_path.display()
    );
    println!(
        "tune finished in {:.1} s (load {:.1} s, calibrate {:.1} s, select {:.1} s, held-out check {:.1} s)",
        start.elapsed().as_secs_f64(),
        s.load,
        s.calibrate,
        s.select,
        s.held_out
    );
    Ok(())
}

/// `24.00 GiB` or `24.00 GiB, 12.00 GiB`.
fn sizes_label(sizes: &[u64]) -> String {
    sizes.iter().map(|b| super::fit::size(*b)).collect::<Vec<_>>().join(", ")
}
