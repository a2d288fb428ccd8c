use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{SynthArgs, SynthPreset, SynthWeights};
use kvtuner::synth::{self, SynthSpec, WeightType};

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let mut spec = match args.preset {
        SynthPreset::Llama31_8b => SynthSpec::llama31_8b(),
        SynthPreset::Qwen25_7b => SynthSpec::qwen25_7b(),
        SynthPreset::Qwen25_14b => SynthSpec::qwen25_14b(),
        SynthPreset::Gemma3_12b => SynthSpec::gemma3_12b(),
        SynthPreset::Smollm2_360m => SynthSpec::smollm2_360m(),
        SynthPreset::Phi3Mini => SynthSpec::phi3_mini(),
        SynthPreset::Tiny => SynthSpec::tiny(),
    };
    if let Some(n) = args.sliding_window {
        spec.n_swa = n;
    }
    if let Some(n) = args.layers {
        spec.n_layer = n;
    }
    if let Some(n) = args.heads {
        spec.n_head = n;
    }
    if let Some(n) = args.kv_heads {
        spec.n_head_kv = n;
    }
    if let Some(n) = args.head_dim {
        spec.head_dim = n;
    }
    if args.heads.is_some() || args.head_dim.is_some() {
        spec.n_embd = spec.n_head * spec.head_dim;
    }
    if let Some(n) = args.ffn {
        spec.n_ff = n;
    }
    if let Some(n) = args.vocab {
        spec.n_vocab = n;
    }
    spec.weight_type = match args.weights {
        SynthWeights::F16 => WeightType::F16,
        SynthWeights::Q8_0 => WeightType::Q8_0,
    };
    spec.seed = args.seed;
    spec.validate()?;

    let bar = ProgressBar::new(spec.file_size()?);
    bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").unwrap());
    let stats = synth::write_model(&spec, &args.output, &mut |done, _| bar.set_position(done))
        .with_context(|| format!("writing {}", args.output.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} tensors, {:.2} GiB) in {:.1} s ({:.0} MiB/s, {} threads)",
        stats.path.display(),
        stats.n_tensors,
        stats.file_bytes as f64 / (1u64 << 30) as f64,
        stats.elapsed.as_secs_f64(),
        stats.bytes_per_sec / (1u64 << 20) as f64,
        stats.threads
    );
    Ok(())
}
