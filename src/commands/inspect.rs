use comfy_table::Table;
use serde::Serialize;

use crate::cli::InspectArgs;
use kvtuner::cache_type::CacheType;
use kvtuner::gguf::GgufHeader;
use kvtuner::kv_layout::{KvLayout, RuntimeKv, Sizer};
use kvtuner::llama::{Backend, ContextParams, FlashAttn, LayerCacheTypes, Model, ModelParams};
use kvtuner::profile::EmbeddedProfile;
use kvtuner::runtime::read_model_header;

/// Contexts the memory table is shown at.
const CONTEXTS: [u32; 3] = [1024, 8192, 32768];

#[derive(Serialize)]
struct KvRow {
    config: String,
    bits_per_value: f64,
    /// MiB of K/V tensors at each of CONTEXTS, as the runtime sizes them.
    mib: Vec<f64>,
}

#[derive(Serialize)]
struct Inspection {
    path: String,
    architecture: String,
    name: Option<String>,
    file_bytes: u64,
    tensors: usize,
    fingerprint: String,
    layers: usize,
    n_embd: Option<u64>,
    n_head: Option<u64>,
    n_head_kv: Option<u64>,
    key_length: Option<u64>,
    value_length: Option<u64>,
    context_length: Option<u64>,
    sliding_window: u32,
    sliding_layers: Vec<usize>,
    global_layers: Vec<usize>,
    layout: KvLayout,
    embedded_profile: Option<EmbeddedProfile>,
    contexts: Vec<u32>,
    kv: Vec<KvRow>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let header = read_model_header(&args.model)?;
    let arch = header.architecture().unwrap_or("unknown").to_string();
    let key = |k: &str| header.get_u64(&format!("{arch}.{k}"));
    let model = Model::load(Backend::init(), &args.model, &ModelParams::default())?;
    let layout = KvLayout::probe(&model)?;
    let embedded = EmbeddedProfile::from_header(&header);

    let sized = |types: Vec<(CacheType, CacheType)>, profile: bool| ContextParams {
        flash_attn: FlashAttn::On,
        no_kv_profile: !profile,
        layer_types: (!profile).then(|| LayerCacheTypes::from_pairs(types)),
        ..Default::default()
    };
    let mut configs: Vec<(String, ContextParams)> = [
        ("f16", CacheType::F16, CacheType::F16),
        ("q8_0", CacheType::Q8_0, CacheType::Q8_0),
        ("q8_0/q4_0", CacheType::Q8_0, CacheType::Q4_0),
        ("q4_0", CacheType::Q4_0, CacheType::Q4_0),
    ]
    .into_iter()
    .map(|(n, k, v)| (n.to_string(), sized(layout.uniform(k, v), false)))
    .collect();
    if let Some(p) = embedded.as_ref().filter(|p| p.problems.is_empty()) {
        // the runtime applies it (types and recent window) as it would for a user
        let window = p.window.as_ref().map_or(String::new(), |w| format!(" ({})", w.describe()));
        configs.push((format!("profile {}{window}", p.name.as_deref().unwrap_or("unnamed")), sized(Vec::new(), true)));
    }
    // sizes as the runtime allocates them (its cell padding, sliding windows of window + ubatch,
    // recent windows), read from contexts it sizes without allocating
    let sizer = Sizer::new(&args.model)?;
    let mut kv = Vec::new();
    for (name, params) in &configs {
        let at: Vec<RuntimeKv> = CONTEXTS.iter().map(|&c| sizer.kv_with(params, c, 1)).collect::<Result<_, _>>()?;
        kv.push(KvRow {
            config: name.clone(),
            bits_per_value: at[0].bits_per_value(),
            mib: at.iter().map(|k| k.tensor_bytes as f64 / 1048576.0).collect(),
        });
    }

    let which = |sliding: bool| -> Vec<usize> {
        layout
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_some_and(|s| s.sliding == sliding))
            .map(|(i, _)| i)
            .collect()
    };
    let report = Inspection {
        path: args.model.display().to_string(),
        name: header.get_str("general.name").map(str::to_string),
        file_bytes: header.file_len,
        tensors: header.tensors.len(),
        fingerprint: header.tensor_fingerprint().to_string(),
        layers: header.block_count().unwrap_or(0) as usize,
        n_embd: key("embedding_length"),
        n_head: key("attention.head_count"),
        n_head_kv: key("attention.head_count_kv"),
        key_length: key("attention.key_length"),
        value_length: key("attention.value_length"),
        context_length: key("context_length"),
        sliding_window: layout.window,
        sliding_layers: which(true),
        global_layers: which(false),
        architecture: arch,
        layout,
        embedded_profile: embedded,
        contexts: CONTEXTS.to_vec(),
        kv,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, &header);
    }
    Ok(())
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn print_text(r: &Inspection, header: &GgufHeader) {
    println!("{}", r.path);
    println!("  architecture   {} ({})", r.architecture, r.name.as_deref().unwrap_or("unnamed"));
    println!(
        "  file           {:.1} MiB, GGUF v{}, {} tensors",
        r.file_bytes as f64 / 1048576.0,
        header.version,
        r.tensors
    );
    println!("  fingerprint    {}", r.fingerprint);
    println!("  layers         {}", r.layers);
    println!(
        "  attention      {} heads, {} KV heads, key length {}, value length {}, n_embd {}",
        opt(r.n_head),
        opt(r.n_head_kv),
        opt(r.key_length),
        opt(r.value_length),
        opt(r.n_embd)
    );
    println!("  context        {} (trained)", opt(r.context_length));
    if r.sliding_window > 0 {
        println!(
            "  sliding window {} tokens; sliding layers {:?}; global layers {:?}",
            r.sliding_window, r.sliding_layers, r.global_layers
        );
    } else {
        println!("  sliding window none");
    }
    match &r.embedded_profile {
        None => println!("  profile        none embedded"),
        Some(p) => {
            println!(
                "  profile        {} ({} layers{}{})",
                p.name.as_deref().unwrap_or("unnamed"),
                p.layers.len(),
                p.bits_per_value.map_or(String::new(), |b| format!(", {b:.2} bits/value")),
                p.kld_mean.map_or(String::new(), |k| format!(", KLD {k:.4}"))
            );
            if let Some(w) = &p.window {
                println!("  recent window  {}", w.describe());
            }
            if let Some(k) = &p.keys {
                let what = [k.shift.then_some("shift"), k.scale.then_some("scale")].into_iter().flatten();
                println!(
                    "  keys           {} per layer (measured on {})",
                    what.collect::<Vec<_>>().join(" + "),
                    k.text.as_deref().unwrap_or("unnamed text")
                );
            }
            for problem in &p.problems {
                println!("    problem: {problem} — the runtime ignores this profile and uses uniform types");
            }
        }
    }
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    let mut head = vec!["KV cache".to_string(), "bits/value".to_string()];
    head.extend(r.contexts.iter().map(|c| format!("MiB @ {}", c)));
    table.set_header(head);
    for row in &r.kv {
        let mut cells = vec![row.config.clone(), format!("{:.2}", row.bits_per_value)];
        cells.extend(row.mib.iter().map(|m| format!("{m:.2}")));
        table.add_row(cells);
    }
    println!("{table}");
}
