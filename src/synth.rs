//! Random-weight GGUF models in llama.cpp's `llama` architecture, for benchmarks and tests
//! that need a model of a real shape but not a real model.
//!
//! Weights are deterministic for a seed: every run of 4096 values of a tensor has its own
//! generator, seeded from (seed, tensor index, run index), so tensors are generated in
//! parallel without the output depending on the thread count.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use half::f16;

use crate::gguf::{GgmlType, GgufWriteError, GgufWriter, TensorInfo, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SynthArch {
    /// llama.cpp's `llama` architecture (Llama 2/3 style: RMSNorm, RoPE, GQA, SwiGLU).
    Llama,
    /// `qwen2`: llama's layers with Q/K/V biases and NeoX RoPE.
    Qwen2,
    /// `gemma3`: Q/K norms, post-attention and post-FFN norms, and (with `n_swa` > 0) five
    /// sliding-window layers for every global one, each kind with its own KV cache (iSWA).
    Gemma3,
}

impl SynthArch {
    pub fn gguf_name(self) -> &'static str {
        match self {
            SynthArch::Llama => "llama",
            SynthArch::Qwen2 => "qwen2",
            SynthArch::Gemma3 => "gemma3",
        }
    }
}

/// Storage type of the weight matrices (norms are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    F16,
    Q8_0,
}

impl WeightType {
    pub fn ggml_type(self) -> GgmlType {
        match self {
            WeightType::F16 => GgmlType::F16,
            WeightType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// llama.cpp's `enum llama_ftype` for a model of this weight type.
    pub fn file_type(self) -> u32 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q8_0 => 7,
        }
    }
}

/// The shape and content of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub arch: SynthArch,
    pub n_layer: u32,
    /// NextN/MTP layers counted in `block_count` after the `n_layer` trunk layers (as
    /// GLM-4.5 and DeepSeek's MTP models declare them, `<arch>.nextn_predict_layers`). Their
    /// weights are not written: llama/qwen2 graphs never run them, and a main context keeps no
    /// cache for them, which is what the layer-count tests need.
    pub n_layer_nextn: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_ff: u32,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f32,
    /// Sliding-window size of the local layers (gemma3 only; 0: every layer global).
    pub n_swa: u32,
    pub weight_type: WeightType,
    pub seed: u64,
    pub name: String,
}

impl SynthSpec {
    /// Llama 3.1 8B's shape: 32 layers, 32 heads, 8 KV heads of 128, FFN 14336.
    pub fn llama31_8b() -> SynthSpec {
        SynthSpec {
            arch: SynthArch::Llama,
            n_layer: 32,
            n_layer_nextn: 0,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 8,
            head_dim: 128,
            n_ff: 14336,
            n_vocab: 128256,
            n_ctx_train: 131072,
            rope_freq_base: 500000.0,
            rms_norm_eps: 1e-5,
            n_swa: 0,
            weight_type: WeightType::F16,
            seed: 0x006b_7674_756e_6572,
            name: "synthetic-llama-3.1-8b".to_string(),
        }
    }

    /// A few-hundred-KB model for tests.
    pub fn tiny() -> SynthSpec {
        SynthSpec {
            arch: SynthArch::Llama,
            n_layer: 4,
            n_layer_nextn: 0,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 256,
            n_vocab: 512,
            n_ctx_train: 4096,
            rope_freq_base: 10000.0,
            rms_norm_eps: 1e-5,
            n_swa: 0,
            weight_type: WeightType::F16,
            seed: 1,
            name: "synthetic-tiny".to_string(),
        }
    }

    /// Qwen2.5-7B(-Instruct): 28 layers, 28 heads, 4 KV heads of 128 (GQA 7).
    pub fn qwen25_7b() -> SynthSpec {
        SynthSpec {
            arch: SynthArch::Qwen2,
            n_layer: 28,
            n_embd: 3584,
            n_head: 28,
            n_head_kv: 4,
            n_ff: 18944,
            n_vocab: 152064,
            n_ctx_train: 32768,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            name: "synthetic-qwen2.5-7b".to_string(),
            ..SynthSpec::llama31_8b()
        }
    }

    /// Qwen2.5-14B(-Instruct): 48 layers, 40 heads, 8 KV heads of 128 (GQA 5).
    pub fn qwen25_14b() -> SynthSpec {
        SynthSpec {
            n_layer: 48,
            n_embd: 5120,
            n_head: 40,
            n_head_kv: 8,
            n_ff: 13824,
            name: "synthetic-qwen2.5-14b".to_string(),
            ..SynthSpec::qwen25_7b()
        }
    }

    /// Gemma-3-12B: 48 layers, 16 heads, 8 KV heads of 256 (GQA 2); five layers with a
    /// 1024-token sliding window for every global layer.
    pub fn gemma3_12b() -> SynthSpec {
        SynthSpec {
            arch: SynthArch::Gemma3,
            n_layer: 48,
            n_embd: 3840,
            n_head: 16,
            n_head_kv: 8,
            head_dim: 256,
            n_ff: 15360,
            n_vocab: 262144,
            n_ctx_train: 131072,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            n_swa: 1024,
            name: "synthetic-gemma-3-12b".to_string(),
            ..SynthSpec::llama31_8b()
        }
    }

    /// SmolLM2-360M: 32 layers, 15 heads, 5 KV heads of 64 (GQA 3).
    pub fn smollm2_360m() -> SynthSpec {
        SynthSpec {
            n_layer: 32,
            n_embd: 960,
            n_head: 15,
            n_head_kv: 5,
            head_dim: 64,
            n_ff: 2560,
            n_vocab: 49152,
            n_ctx_train: 8192,
            rope_freq_base: 100_000.0,
            name: "synthetic-smollm2-360m".to_string(),
            ..SynthSpec::llama31_8b()
        }
    }

    /// Phi-3-mini's attention in the llama architecture (phi3's fused QKV and its own graph
    /// aside): 32 layers, 32 heads of 96, no GQA, FFN 8192, vocabulary 32064, 128k context.
    pub fn phi3_mini() -> SynthSpec {
        SynthSpec {
            n_layer: 32,
            n_embd: 3072,
            n_head: 32,
            n_head_kv: 32,
            head_dim: 96,
            n_ff: 8192,
            n_vocab: 32064,
            n_ctx_train: 131072,
            rope_freq_base: 10_000.0,
            // not "phi3" or "phi-3": llama.cpp sets Phi-3's special-token attributes by name and
            // looks for tokens this vocabulary does not have
            name: "synthetic-phi-mini-3.8b".to_string(),
            ..SynthSpec::llama31_8b()
        }
    }

    /// Every preset of a real model's shape, then the tiny test model.
    pub fn presets() -> Vec<SynthSpec> {
        vec![
            SynthSpec::llama31_8b(),
            SynthSpec::qwen25_7b(),
            SynthSpec::qwen25_14b(),
            SynthSpec::gemma3_12b(),
            SynthSpec::smollm2_360m(),
            SynthSpec::phi3_mini(),
            SynthSpec::tiny(),
        ]
    }

    /// Checks that llama.cpp can load a model of this shape.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |msg: String| Err(SynthError::InvalidSpec(msg));
        if self.n_layer == 0 || self.n_head == 0 || self.n_head_kv == 0 || self.head_dim == 0 {
            return bad("layer count, head counts and head dim must be nonzero".into());
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!("{} heads is not a multiple of {} KV heads", self.n_head, self.n_head_kv));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim));
        }
        if self.n_swa > 0 && self.arch != SynthArch::Gemma3 {
            return bad(format!("a sliding window ({}) needs the gemma3 architecture", self.n_swa));
        }
        if self.n_embd == 0 || self.n_ff == 0 || self.n_ctx_train == 0 {
            return bad("embedding, FFN and context lengths must be nonzero".into());
        }
        if (self.n_vocab as usize) < min_vocab() {
            return bad(format!("vocab {} is below the minimum {}", self.n_vocab, min_vocab()));
        }
        if self.weight_type == WeightType::Q8_0 {
            for (what, n) in [
                ("embedding length", self.n_embd),
                ("FFN length", self.n_ff),
                ("head count x head dim", self.n_head * self.head_dim),
            ] {
                if !n.is_multiple_of(32) {
                    return bad(format!("{what} {n} is not a multiple of 32 (q8_0 block)"));
                }
            }
        }
        Ok(())
    }

    /// Tensors in file order, with what fills them.
    fn tensors(&self) -> Vec<(String, Vec<u64>, Fill)> {
        let (e, v, ff) = (u64::from(self.n_embd), u64::from(self.n_vocab), u64::from(self.n_ff));
        let q = u64::from(self.n_head * self.head_dim);
        let kv = u64::from(self.n_head_kv * self.head_dim);
        let w = Fill::Random(self.weight_type);
        let mut out = vec![("token_embd.weight".to_string(), vec![e, v], w)];
        let head = u64::from(self.head_dim);
        for i in 0..self.n_layer {
            let b = |n: &str| format!("blk.{i}.{n}.weight");
            let bias = |n: &str| format!("blk.{i}.{n}.bias");
            out.push((b("attn_norm"), vec![e], Fill::Ones));
            out.push((b("attn_q"), vec![e, q], w));
            out.push((b("attn_k"), vec![e, kv], w));
            out.push((b("attn_v"), vec![e, kv], w));
            if self.arch == SynthArch::Qwen2 {
                out.push((bias("attn_q"), vec![q], Fill::Zeros));
                out.push((bias("attn_k"), vec![kv], Fill::Zeros));
                out.push((bias("attn_v"), vec![kv], Fill::Zeros));
            }
            if self.arch == SynthArch::Gemma3 {
                out.push((b("attn_q_norm"), vec![head], Fill::Ones));
                out.push((b("attn_k_norm"), vec![head], Fill::Ones));
                out.push((b("post_attention_norm"), vec![e], Fill::Ones));
                out.push((b("post_ffw_norm"), vec![e], Fill::Ones));
            }
            out.push((b("attn_output"), vec![q, e], w));
            out.push((b("ffn_norm"), vec![e], Fill::Ones));
            out.push((b("ffn_gate"), vec![e, ff], w));
            out.push((b("ffn_up"), vec![e, ff], w));
            out.push((b("ffn_down"), vec![ff, e], w));
        }
        out.push(("output_norm.weight".to_string(), vec![e], Fill::Ones));
        out.push(("output.weight".to_string(), vec![e, v], w));
        out
    }

    /// The writer (metadata and tensor infos) for this model.
    pub fn gguf_writer(&self) -> Result<GgufWriter, SynthError> {
        self.validate()?;
        let arch = self.arch.gguf_name();
        let mut w = GgufWriter::new();
        let k = |s: &str| format!("{arch}.{s}");
        w.add_kv("general.architecture", arch)?;
        w.add_kv("general.name", self.name.as_str())?;
        w.add_kv("general.file_type", self.weight_type.file_type())?;
        w.add_kv("general.quantization_version", 2u32)?;
        w.add_kv("kvtuner.synth.seed", self.seed)?;
        w.add_kv(k("vocab_size"), self.n_vocab)?;
        w.add_kv(k("context_length"), self.n_ctx_train)?;
        w.add_kv(k("embedding_length"), self.n_embd)?;
        w.add_kv(k("block_count"), self.n_layer + self.n_layer_nextn)?;
        if self.n_layer_nextn > 0 {
            w.add_kv(k("nextn_predict_layers"), self.n_layer_nextn)?;
        }
        w.add_kv(k("feed_forward_length"), self.n_ff)?;
        w.add_kv(k("attention.head_count"), self.n_head)?;
        w.add_kv(k("attention.head_count_kv"), self.n_head_kv)?;
        w.add_kv(k("attention.key_length"), self.head_dim)?;
        w.add_kv(k("attention.value_length"), self.head_dim)?;
        w.add_kv(k("attention.layer_norm_rms_epsilon"), self.rms_norm_eps)?;
        w.add_kv(k("rope.freq_base"), self.rope_freq_base)?;
        w.add_kv(k("rope.dimension_count"), self.head_dim)?;
        if self.n_swa > 0 {
            w.add_kv(k("attention.sliding_window"), self.n_swa)?;
        }
        let (tokens, scores, types) = spm_vocab(self.n_vocab as usize);
        w.add_kv("tokenizer.ggml.model", "llama")?;
        w.add_kv("tokenizer.ggml.tokens", Value::str_array(&tokens))?;
        w.add_kv("tokenizer.ggml.scores", Value::f32_array(scores))?;
        w.add_kv("tokenizer.ggml.token_type", Value::i32_array(types))?;
        w.add_kv("tokenizer.ggml.unknown_token_id", 0u32)?;
        w.add_kv("tokenizer.ggml.bos_token_id", 1u32)?;
        w.add_kv("tokenizer.ggml.eos_token_id", 2u32)?;
        w.add_kv("tokenizer.ggml.add_bos_token", true)?;
        w.add_kv("tokenizer.ggml.add_eos_token", false)?;
        for (name, dims, fill) in self.tensors() {
            w.add_tensor(name, &dims, fill.ggml_type())?;
        }
        Ok(w)
    }

    /// Size in bytes of the file [`write_model`] produces.
    pub fn file_size(&self) -> Result<u64, SynthError> {
        Ok(self.gguf_writer()?.file_size())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Ones,
    Zeros,
    Random(WeightType),
}

impl Fill {
    fn ggml_type(self) -> GgmlType {
        match self {
            Fill::Ones | Fill::Zeros => GgmlType::F32,
            Fill::Random(w) => w.ggml_type(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SynthStats {
    pub path: PathBuf,
    pub n_tensors: usize,
    pub file_bytes: u64,
    pub elapsed: Duration,
    pub bytes_per_sec: f64,
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synthetic model spec: {0}")]
    InvalidSpec(String),
    #[error(transparent)]
    Gguf(#[from] GgufWriteError),
    #[error("{path}: {op}: {source}", path = .path.display())]
    Io { path: PathBuf, op: &'static str, source: io::Error },
}

// ---------------------------------------------------------------------------------------
// Vocabulary

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "I",
    "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "not", "word", "but", "what", "some",
    "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each",
    "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would",
    "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could",
    "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call",
    "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place",
    "made", "live", "where", "after", "back", "little", "only", "round", "man", "year", "came", "show", "every",
    "good", "me", "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great", "think",
    "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before", "move", "right", "boy", "old",
    "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end", "put",
    "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such",
    "follow", "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try",
    "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth", "father", "model", "cache",
    "layer", "token", "Hello", "The", "What", "In", "It", "This", "A", "We", "You",
];
const SUFFIXES: &[&str] = &["s", "ing", "ed", "er", "ly", "es", "tion", "ment", "ness", "est"];
const PUNCT: &[&str] = &[".", ",", "?", "!", ":", ";", "'", "\"", "(", ")", "-", "\n"];

fn min_vocab() -> usize {
    3 + 256 + 32
}

/// A SentencePiece-style ("llama") vocabulary of exactly `n` unique tokens: `<unk>`, `<s>`,
/// `</s>`, the 256 byte tokens, single letters, common words with and without `▁`, suffixes,
/// then `▁tokN` fillers. Returns (tokens, scores, token types).
pub fn spm_vocab(n: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    const NORMAL: i32 = 1;
    const UNKNOWN: i32 = 2;
    const CONTROL: i32 = 3;
    const BYTE: i32 = 6;
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(BYTE);
    }
    let mut pieces: Vec<String> = Vec::new();
    pieces.push("▁".into());
    for c in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
        pieces.push(c.to_string());
    }
    for c in 'a'..='z' {
        pieces.push(format!("▁{c}"));
    }
    pieces.extend(PUNCT.iter().map(|p| p.to_string()));
    for w in WORDS {
        pieces.push(format!("▁{w}"));
        pieces.push((*w).to_string());
    }
    pieces.extend(SUFFIXES.iter().map(|s| s.to_string()));
    let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let mut scores = vec![0.0f32; tokens.len()];
    let mut filler = 0usize;
    let mut pieces = pieces.into_iter();
    while tokens.len() < n {
        let p = pieces.next().unwrap_or_else(|| {
            filler += 1;
            format!("▁tok{filler}")
        });
        if seen.insert(p.clone()) {
            scores.push(-(tokens.len() as f32));
            tokens.push(p);
            types.push(NORMAL);
        }
    }
    tokens.truncate(n);
    scores.truncate(n);
    types.truncate(n);
    (tokens, scores, types)
}

// ---------------------------------------------------------------------------------------
// Weights

/// Values per independently seeded run (a multiple of the q8_0 block).
const RUN: usize = 4096;
/// Half-width of the uniform weight distribution (standard deviation 0.02).
const WEIGHT_RANGE: f32 = 0.034_641;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn run_seed(seed: u64, tensor: usize, run: u64) -> u64 {
    let mut s = seed;
    let a = splitmix64(&mut s);
    let mut t = a ^ (tensor as u64).wrapping_mul(0xd134_2543_de82_ef95);
    let b = splitmix64(&mut t);
    let mut r = b ^ run.wrapping_mul(0xa076_1d64_78bd_642f);
    splitmix64(&mut r)
}

/// Fills `out` with `n` uniform values in [-WEIGHT_RANGE, WEIGHT_RANGE], 16 random bits each.
fn random_values(mut state: u64, out: &mut [f32]) {
    let scale = WEIGHT_RANGE / 32768.0;
    for chunk in out.chunks_mut(4) {
        let r = splitmix64(&mut state);
        for (i, v) in chunk.iter_mut().enumerate() {
            let bits = (r >> (16 * i)) as u16;
            *v = (f32::from(bits) - 32768.0) * scale;
        }
    }
}

fn bytes_per_run(ty: WeightType, n: usize) -> usize {
    match ty {
        WeightType::F16 => n * 2,
        WeightType::Q8_0 => n / 32 * 34,
    }
}

/// Encodes one run of `vals` into `out` (exactly `bytes_per_run` bytes).
fn encode_run(ty: WeightType, vals: &[f32], out: &mut [u8]) {
    match ty {
        WeightType::F16 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        WeightType::Q8_0 => {
            for (block, o) in vals.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
                quantize_q8_0_block(block, o);
            }
        }
    }
}

/// One q8_0 block: f16 scale d = amax / 127, then 32 values round(x / d) as i8.
pub fn quantize_q8_0_block(x: &[f32], out: &mut [u8]) {
    debug_assert!(x.len() == 32 && out.len() == 34);
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, v) in out[2..].iter_mut().zip(x) {
        // Round half away from zero, like roundf, without the libm call.
        let s = v * id;
        *q = ((s + 0.5f32.copysign(s)) as i32).clamp(-127, 127) as i8 as u8;
    }
}

/// f16 bits of the weight for each 16-bit random draw (what `random_values` would give).
fn f16_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let scale = WEIGHT_RANGE / 32768.0;
        (0..=u16::MAX).map(|b| f16::from_f32((f32::from(b) - 32768.0) * scale).to_bits()).collect()
    })
}

/// Generates runs `first_run..` of tensor `tensor` (with `n_values` values in all) into `out`.
fn generate(seed: u64, tensor: usize, ty: WeightType, n_values: u64, first_run: u64, out: &mut [u8]) {
    let full = bytes_per_run(ty, RUN);
    let mut vals = vec![0f32; RUN];
    let table = f16_table();
    let mut run = first_run;
    let mut rest = out;
    while !rest.is_empty() {
        let n = (n_values - run * RUN as u64).min(RUN as u64) as usize;
        let len = bytes_per_run(ty, n).min(full);
        let (head, tail) = rest.split_at_mut(len);
        let mut state = run_seed(seed, tensor, run);
        match ty {
            // Same values as `random_values` + `encode_run`, through a lookup table.
            WeightType::F16 => {
                for chunk in head.chunks_mut(8) {
                    let r = splitmix64(&mut state);
                    for (i, o) in chunk.chunks_exact_mut(2).enumerate() {
                        o.copy_from_slice(&table[(r >> (16 * i)) as u16 as usize].to_le_bytes());
                    }
                }
            }
            WeightType::Q8_0 => {
                random_values(state, &mut vals[..n]);
                encode_run(ty, &vals[..n], head);
            }
        }
        rest = tail;
        run += 1;
    }
}

/// Writes the synthetic model to `path` (through a temporary file in the same folder) using
/// all available cores. `progress(done, total)` reports bytes of the file written.
pub fn write_model(
    spec: &SynthSpec,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthStats, SynthError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    write_model_with_threads(spec, path, threads, progress)
}

/// [`write_model`] with a given number of generator threads (the output does not depend on
/// it).
pub fn write_model_with_threads(
    spec: &SynthSpec,
    path: &Path,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthStats, SynthError> {
    let start = Instant::now();
    let threads = threads.max(1);
    let writer = spec.gguf_writer()?;
    let fills: Vec<Fill> = spec.tensors().into_iter().map(|t| t.2).collect();
    let total = writer.file_size();

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let io_err = |p: &Path, op: &'static str| {
        let path = p.to_path_buf();
        move |source| SynthError::Io { path, op, source }
    };
    let tmp = tempfile::Builder::new()
        .prefix(".kvtuner-synth-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err(dir, "create temporary file"))?;

    // Segments of up to SEGMENT bytes are generated in parallel into one buffer while the
    // writer thread writes the previous one.
    const SEGMENT: usize = 32 << 20;
    let file: &File = tmp.as_file();
    let tensors: Vec<TensorInfo> = writer.tensors().to_vec();
    let result: Result<(), SynthError> = std::thread::scope(|s| {
        let (to_writer, from_main) = mpsc::sync_channel::<Vec<u8>>(1);
        let (to_main, recycled) = mpsc::channel::<(Vec<u8>, u64)>();
        let writer_ref = &writer;
        let handle = s.spawn(move || -> Result<(), GgufWriteError> {
            let mut dw = writer_ref.begin(file)?;
            let _ = to_main.send((Vec::new(), dw.bytes_written()));
            for buf in from_main {
                dw.write_tensor_part(&buf)?;
                let _ = to_main.send((buf, dw.bytes_written()));
            }
            dw.finish()?;
            Ok(())
        });

        let mut spare: Vec<Vec<u8>> = vec![Vec::new()];
        let mut written = 0;
        let mut send = |buf: Vec<u8>, spare: &mut Vec<Vec<u8>>| -> bool {
            if to_writer.send(buf).is_err() {
                return false;
            }
            while let Ok((b, n)) = recycled.try_recv() {
                spare.push(b);
                written = n;
            }
            if spare.is_empty() {
                match recycled.recv() {
                    Ok((b, n)) => {
                        spare.push(b);
                        written = n;
                    }
                    Err(_) => return false,
                }
            }
            progress(written, total);
            true
        };

        'tensors: for (ti, (t, fill)) in tensors.iter().zip(&fills).enumerate() {
            match *fill {
                Fill::Ones | Fill::Zeros => {
                    let value: f32 = if *fill == Fill::Ones { 1.0 } else { 0.0 };
                    let mut buf = spare.pop().unwrap_or_default();
                    buf.clear();
                    for _ in 0..t.n_elements() {
                        buf.extend_from_slice(&value.to_le_bytes());
                    }
                    if !send(buf, &mut spare) {
                        break 'tensors;
                    }
                }
                Fill::Random(ty) => {
                    let n = t.n_elements();
                    let n_runs = n.div_ceil(RUN as u64);
                    let full = bytes_per_run(ty, RUN);
                    let runs_per_seg = (SEGMENT / full).max(1) as u64;
                    let mut run = 0;
                    while run < n_runs {
                        let seg_runs = runs_per_seg.min(n_runs - run);
                        let seg_end_values = ((run + seg_runs) * RUN as u64).min(n);
                        let len = bytes_per_run(ty, (seg_end_values - run * RUN as u64) as usize);
                        let mut buf = spare.pop().unwrap_or_default();
                        buf.resize(len, 0);
                        // Split the segment among threads at run boundaries.
                        let per_thread = seg_runs.div_ceil(threads as u64);
                        std::thread::scope(|gs| {
                            let mut rest: &mut [u8] = &mut buf;
                            let mut r = run;
                            while !rest.is_empty() {
                                let take = (per_thread as usize * full).min(rest.len());
                                let (head, tail) = rest.split_at_mut(take);
                                let first = r;
                                gs.spawn(move || generate(spec.seed, ti, ty, n, first, head));
                                rest = tail;
                                r += per_thread;
                            }
                        });
                        if !send(buf, &mut spare) {
                            break 'tensors;
                        }
                        run += seg_runs;
                    }
                }
            }
        }
        drop(to_writer);
        match handle.join() {
            Ok(r) => r.map_err(SynthError::from),
            Err(p) => std::panic::resume_unwind(p),
        }
    });
    result?;

    let mut f = tmp.as_file();
    f.flush().map_err(io_err(path, "write"))?;
    f.sync_all().map_err(io_err(path, "sync"))?;
    let file_bytes = f.metadata().map_err(io_err(path, "stat"))?.len();
    {
        // tempfile creates 0600; a model file is as readable as any other file the user writes
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io_err(path, "chmod"))?;
    }
    tmp.persist(path).map_err(|e| SynthError::Io {
        path: path.to_path_buf(),
        op: "rename temporary file",
        source: e.error,
    })?;
    progress(file_bytes, total);
    let elapsed = start.elapsed();
    Ok(SynthStats {
        path: path.to_path_buf(),
        n_tensors: tensors.len(),
        file_bytes,
        elapsed,
        bytes_per_sec: file_bytes as f64 / elapsed.as_secs_f64().max(1e-9),
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_is_unique_and_has_bytes() {
        let (tokens, scores, types) = spm_vocab(1000);
        assert_eq!(tokens.len(), 1000);
        assert_eq!(scores.len(), 1000);
        assert_eq!(types.len(), 1000);
        let set: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(set.len(), 1000);
        assert_eq!(tokens[3 + 0x0A], "<0x0A>");
        assert!(tokens.contains(&"▁the".to_string()));
    }

    #[test]
    fn q8_0_block_round_trips_closely() {
        let mut vals = [0f32; 32];
        random_values(42, &mut vals);
        let mut out = [0u8; 34];
        quantize_q8_0_block(&vals, &mut out);
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        for (q, v) in out[2..].iter().zip(vals) {
            assert!((f32::from(*q as i8) * d - v).abs() <= d * 0.51 + 1e-6);
        }
        assert!(vals.iter().all(|v| v.abs() <= WEIGHT_RANGE));
    }

    #[test]
    fn f16_table_matches_direct_encoding() {
        let n = 1000u64;
        let mut fast = vec![0u8; bytes_per_run(WeightType::F16, n as usize)];
        generate(7, 3, WeightType::F16, n, 0, &mut fast);
        let mut vals = vec![0f32; n as usize];
        random_values(run_seed(7, 3, 0), &mut vals);
        let mut slow = vec![0u8; fast.len()];
        encode_run(WeightType::F16, &vals, &mut slow);
        assert_eq!(fast, slow);
    }

    #[test]
    fn specs_validate() {
        let presets = SynthSpec::presets();
        for spec in &presets {
            spec.validate().unwrap();
        }
        // the shapes issue 22 names: query heads per KV head and head sizes
        let shapes: Vec<(u32, u32)> = presets.iter().map(|s| (s.n_head / s.n_head_kv, s.head_dim)).collect();
        assert_eq!(shapes, [(4, 128), (7, 128), (5, 128), (2, 256), (3, 64), (1, 96), (2, 64)]);
        let s = SynthSpec { n_swa: 512, ..SynthSpec::tiny() };
        assert!(s.validate().is_err(), "a sliding window needs gemma3");
        let mut s = SynthSpec::tiny();
        s.n_head_kv = 3;
        assert!(matches!(s.validate(), Err(SynthError::InvalidSpec(_))));
        let mut s = SynthSpec::tiny();
        s.weight_type = WeightType::Q8_0;
        s.n_ff = 100;
        assert!(s.validate().is_err());
    }
}
