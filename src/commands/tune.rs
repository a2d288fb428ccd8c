//! `kvtuner tune`: the other commands in sequence, with the defaults of the README's main job.

use anyhow::Context as _;

use crate::cli::{AnnotateArgs, CalibrateArgs, OutputTarget, RuntimeArgs, SearchArgs, TextArgs, TuneArgs};
use kvtuner::llama::FlashAttn;

pub fn run(args: TuneArgs) -> anyhow::Result<()> {
    let model = match args.model {
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
    let sens = work.join(format!("{stem}.sensitivity.yaml"));
    let profile = work.join(format!("{stem}.profile.yaml"));
    let report = work.join(format!("{stem}.report.md"));

    println!("== 1/3 calibrate on {} ==", args.text);
    let runtime = RuntimeArgs {
        model: model.clone(),
        ctx_size: args.ctx_size,
        n_gpu_layers: 0,
        flash_attn: FlashAttn::Auto,
        cache_type_k: kvtuner::cache_type::CacheType::F16,
        cache_type_v: kvtuner::cache_type::CacheType::F16,
        threads: args.threads,
        kv_profile: "off".into(),
    };
    super::calibrate::run(CalibrateArgs {
        runtime,
        text: TextArgs { text: args.text.clone() },
        chunks: 1,
        types: vec![
            kvtuner::cache_type::CacheType::F16,
            kvtuner::cache_type::CacheType::Q8_0,
            kvtuner::cache_type::CacheType::Q5_0,
            kvtuner::cache_type::CacheType::Q4_0,
        ],
        output: sens.clone(),
    })?;

    println!("== 2/3 search ≤ {} bits/value, verify on {} ==", args.budget, args.eval_text);
    super::search::run(SearchArgs {
        sensitivity: sens,
        budget: Some(args.budget),
        max_kld: None,
        pairs: args.pairs.clone(),
        ctx_size: None,
        name: None,
        output: Some(profile.clone()),
        frontier: None,
        verify: Some(args.eval_text.clone()),
        model: Some(model.clone()),
        chunks: 2,
        threads: args.threads,
        n_gpu_layers: 0,
        report: Some(report.clone()),
        json: false,
    })?;

    println!("== 3/3 annotate ==");
    super::annotate::run_annotate(AnnotateArgs {
        model,
        profile,
        force: false,
        target: OutputTarget { output: Some(args.output.clone()), in_place: false },
    })?;
    println!("report: {}", report.display());
    Ok(())
}
