use anyhow::Context as _;
use comfy_table::Table;
use kvtuner::cache_type::CacheType;

use crate::cli::ProfileCommand;
use kvtuner::profile::{import_kvtuner, Profile};
use kvtuner::runtime::read_identity;

pub fn run(cmd: ProfileCommand) -> anyhow::Result<()> {
    match cmd {
        ProfileCommand::Show { profile, model, json } => show(&profile, model.as_deref(), json),
        ProfileCommand::ImportKvtuner { preset, model, name, output } => {
            let identity = model.as_deref().map(read_identity).transpose()?;
            let (mut profile, mappings) = import_kvtuner(&preset, identity.as_ref())?;
            if let Some(name) = name {
                profile.name = name;
            }
            println!("bits → llama.cpp cache type:");
            for m in &mappings {
                println!(
                    "  {:>2} bits → {:<5} ({} K layers, {} V layers){}",
                    m.from_bits,
                    m.to_type.name(),
                    m.k_layers,
                    m.v_layers,
                    if m.raised {
                        "  raised: no KV cache type is this narrow"
                    } else if matches!(m.to_type, CacheType::Kv2 | CacheType::Kv3) {
                        "  kvtuner's narrow type for rotated caches (patch 0006), no longer raised to q4_0"
                    } else {
                        ""
                    }
                );
            }
            profile.save(&output)?;
            println!("wrote {} ({})", output.display(), profile.summary());
            warn_cuda_pairs(&profile);
            Ok(())
        }
    }
}

fn show(path: &std::path::Path, model: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    let profile = Profile::load(path)?;
    if let Some(m) = model {
        let identity = read_identity(m)?;
        profile.check_model(&identity).with_context(|| format!("{} does not fit {}", path.display(), m.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
        return Ok(());
    }
    println!("{} — {}", profile.name, profile.summary());
    if let Some(d) = &profile.description {
        println!("  {d}");
    }
    println!(
        "  model: {} ({} layers){}",
        profile.model.architecture,
        profile.model.layers,
        profile.model.name.as_ref().map_or(String::new(), |n| format!(", {n}"))
    );
    if let Some(m) = &profile.measured {
        println!(
            "  measured: {:.2} bits/value, {:.2} MiB KV at context {}{}{}",
            m.bits_per_value,
            m.kv_bytes as f64 / 1048576.0,
            m.context,
            m.kld_mean.map_or(String::new(), |k| format!(", mean KLD {k:.5}")),
            m.kld_eval_text.as_ref().map_or(String::new(), |t| format!(" on {t}"))
        );
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    table.set_header(["layer", "K", "V"]);
    for (il, l) in profile.layers.iter().enumerate() {
        table.add_row([il.to_string(), l.k.to_string(), l.v.to_string()]);
    }
    println!("{table}");
    Ok(())
}

/// Says once which layers' K-V pairs the CUDA build has no flash-attention kernel for.
pub fn warn_cuda_pairs(profile: &Profile) {
    let types: Vec<_> = profile.layers.iter().map(|l| Some((l.k, l.v))).collect();
    if let Some(w) = kvtuner::search::cuda_kernel_warning(&kvtuner::search::layers_without_cuda_kernel(&types)) {
        eprintln!("warning: profile {}: {w}", profile.name);
    }
}
