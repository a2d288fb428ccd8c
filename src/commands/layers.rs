use comfy_table::Table;

use crate::cli::LayersArgs;
use kvtuner::llama::Context;
use kvtuner::runtime::{open, ProfileChoice};

pub fn run(args: LayersArgs) -> anyhow::Result<()> {
    let opened = open(&args.runtime.options())?;
    let ctx = Context::new(&opened.model, &opened.params)?;
    let layers = ctx.layers();
    if args.json {
        let out = serde_json::json!({
            "model": opened.model.path(),
            "profile": opened.applied_profile(&ctx),
            "n_ctx": ctx.n_ctx(),
            "kv_buffer_bytes": ctx.kv_buffer_bytes(),
            "layers": layers,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    // the recent window's column only when a layer has one (patch 0014)
    let any_recent = layers.iter().flatten().any(|i| i.window > 0);
    let mut head = vec!["layer", "device", "window", "cells", "K", "V", "K MiB", "V MiB"];
    if any_recent {
        head.push("recent window");
    }
    // the key treatment's column only when a layer has one (patches 0018/0019)
    let any_keys = layers.iter().flatten().any(|i| i.k_shifted || i.k_scaled);
    if any_keys {
        head.push("keys");
    }
    table.set_header(head);
    for (il, info) in layers.iter().enumerate() {
        let mut row: Vec<String> = match info {
            Some(i) => vec![
                il.to_string(),
                i.device.to_string(),
                if i.is_swa { "sliding".into() } else { "global".into() },
                i.n_cells.to_string(),
                i.type_k.to_string(),
                i.type_v.to_string(),
                format!("{:.2}", i.bytes_k as f64 / 1048576.0),
                format!("{:.2}", i.bytes_v as f64 / 1048576.0),
            ],
            None => vec![il.to_string(), "-".into(), "-".into(), "-".into(), "(no KV cache)".into()],
        };
        row.resize(8, String::new());
        if any_recent {
            row.push(match info {
                Some(i) if i.window > 0 => format!(
                    "{}{} in {}/{}, {:.2} MiB",
                    i.window,
                    if i.window_sinks > 0 { format!(" + first {}", i.window_sinks) } else { String::new() },
                    i.type_k_window.map_or("?", |t| t.name()),
                    i.type_v_window.map_or("?", |t| t.name()),
                    i.bytes_window as f64 / 1048576.0
                ),
                _ => String::new(),
            });
        }
        if any_keys {
            let keys = info.as_ref().map(|i| [i.k_shifted.then_some("shift"), i.k_scaled.then_some("scale")]);
            row.push(keys.into_iter().flatten().flatten().collect::<Vec<_>>().join(" + "));
        }
        table.add_row(row);
    }
    println!("{table}");
    let fallback: Vec<String> = layers
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is_some_and(|i| i.attn_fallback))
        .map(|(il, _)| il.to_string())
        .collect();
    if !fallback.is_empty() {
        println!(
            "layers {}: their device has no native flash-attention kernel for their K-V pair (the attention runs elsewhere or on a converted cache; see the warning above)",
            fallback.join(",")
        );
    }
    // KV bytes per device (layers split over GPUs, the CPU and RPC servers), in first-seen order
    let mut per_device: Vec<(String, usize, u64)> = Vec::new();
    for i in layers.iter().flatten() {
        let name = i.device.to_string();
        let bytes = i.bytes_k + i.bytes_v + i.bytes_window;
        match per_device.iter_mut().find(|(d, _, _)| *d == name) {
            Some((_, n, b)) => {
                *n += 1;
                *b += bytes;
            }
            None => per_device.push((name, 1, bytes)),
        }
    }
    if per_device.len() > 1 {
        let parts: Vec<String> =
            per_device.iter().map(|(d, n, b)| format!("{d}: {n} layers, {:.2} MiB", *b as f64 / 1048576.0)).collect();
        println!("KV per device: {}", parts.join("; "));
    }
    println!(
        "profile: {}; n_ctx {}; KV buffer {:.2} MiB",
        opened.applied_profile(&ctx),
        ctx.n_ctx(),
        ctx.kv_buffer_bytes() as f64 / 1048576.0
    );
    if let ProfileChoice::File(p) = &opened.choice {
        println!("({})", p.summary());
    }
    Ok(())
}
