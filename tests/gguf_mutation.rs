//! The GGUF header reader against a mutation corpus on the stable toolchain (issue 20): the
//! cargo-fuzz target (fuzz/fuzz_targets/gguf_header.rs) needs nightly, so this runs the same
//! entry point and the same checks on at least 100 000 deterministic mutants of real headers.
//!
//! Seeds: a model written by the synth writer, a header with every value type (nested arrays, a
//! non-default alignment, several tensor types) in GGUF v3 and v2, and, when the kvtuner cache
//! has it, Gemma 3 270M's first 256 KiB (its 262k-token vocabulary is cut there; once as it is,
//! once repaired into a complete header with the tokens that fit).
//!
//! Mutations (1 to 4 stacked per input, from a seeded SplitMix64): bit flips, bytes set to
//! 0/0xff/0x7f/0x80/1/random, the header's u32/u64 length, count and type fields set to
//! 0/1/off-by-one/the remaining size/2^31/2^60/2^63/MAX/random, truncation, splicing from another
//! seed, duplicated and deleted chunks, inserted bytes.
//!
//! Pass: every mutant reads as Ok or a GgufReadError, never a panic; a header that reads is
//! self-consistent (the fuzz target's checks); no input takes 10 s (a hang); memory held while
//! reading stays within 64 x the input's size + 16 MiB and no single allocation exceeds 1 GiB (a
//! counting allocator: a 2^60 length must be an error, not an allocation attempt).
//!
//!   KVTUNER_MUTATION_INPUTS=N (default 100000)   KVTUNER_MUTATION_SEED=S (default fixed)

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvtuner::gguf::{encode_kv, read_header, GgmlType, GgufWriter, Value, ValueType};
use kvtuner::synth::{self, SynthSpec, WeightType};

// ----------------------------------------------------------------------------------------
// Allocation accounting (this test binary has this one test, so the counts are the reader's)

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicBool = AtomicBool::new(false);
/// Where the mutant being read is.
static INPUT: OnceLock<PathBuf> = OnceLock::new();
/// A single allocation above this is refused: no input here justifies it. The process then
/// aborts ("memory allocation of N bytes failed"), after [`refuse`] names the input.
const MAX_ALLOCATION: usize = 1 << 30;

/// Says which input asked for `size` bytes, without allocating (straight to stderr, which the
/// test harness does not capture), and returns null.
fn refuse(size: usize) -> *mut u8 {
    use std::io::Write as _;
    use std::os::unix::ffi::OsStrExt as _;
    REFUSED.store(true, Ordering::SeqCst);
    let (mut digits, mut n, mut i) = ([0u8; 20], size, 20);
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = std::io::stderr();
    let _ = err.write_all(b"gguf mutation: refused an allocation of ");
    let _ = err.write_all(&digits[i..]);
    let _ = err.write_all(b" bytes while reading ");
    let _ = err.write_all(INPUT.get().map_or(&b"?"[..], |p| p.as_os_str().as_bytes()));
    let _ = err.write_all(b"\n");
    std::ptr::null_mut()
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return refuse(layout.size());
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return refuse(new_size);
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ----------------------------------------------------------------------------------------
// PRNG

/// SplitMix64: tiny, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

// ----------------------------------------------------------------------------------------
// The structure of a seed: where its u32/u64 fields are, so mutations can aim at them

#[derive(Debug, Clone, Copy, PartialEq)]
enum Width {
    U32,
    U64,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: Width,
    /// Inside an array's elements (a vocabulary has thousands of these).
    element: bool,
}

/// Walks GGUF bytes as far as they are well formed, recording the offsets of the u32 and u64
/// fields (counts, lengths, value types, tensor dims, types and offsets).
struct Walk<'a> {
    b: &'a [u8],
    p: usize,
    fields: Vec<Field>,
    element: bool,
}

impl Walk<'_> {
    fn field(&mut self, width: Width) -> Option<u64> {
        let n = if width == Width::U32 { 4 } else { 8 };
        let bytes = self.b.get(self.p..self.p + n)?;
        let mut x = [0u8; 8];
        x[..n].copy_from_slice(bytes);
        self.fields.push(Field { at: self.p, width, element: self.element });
        self.p += n;
        Some(u64::from_le_bytes(x))
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        let end = self.p.checked_add(usize::try_from(n).ok()?)?;
        (end <= self.b.len()).then(|| self.p = end)
    }

    fn string(&mut self) -> Option<()> {
        let n = self.field(Width::U64)?;
        self.skip(n)
    }

    fn value(&mut self, ty: u64, depth: usize) -> Option<()> {
        let ty = ValueType::from_id(u32::try_from(ty).ok()?)?;
        match ty {
            ValueType::String => self.string(),
            ValueType::Array if depth < 4 => {
                let elem = self.field(Width::U32)?;
                let count = self.field(Width::U64)?;
                let outer = std::mem::replace(&mut self.element, true);
                for _ in 0..count {
                    self.value(elem, depth + 1)?;
                }
                self.element = outer;
                Some(())
            }
            ValueType::Array => None,
            fixed => self.skip(fixed.fixed_size().expect("scalar")),
        }
    }
}

/// The fields of `b`, as far as it is well formed.
fn fields(b: &[u8]) -> Vec<Field> {
    let mut w = Walk { b, p: 4, fields: Vec::new(), element: false };
    let _ = (|| {
        w.field(Width::U32)?;
        let n_tensors = w.field(Width::U64)?;
        let n_kv = w.field(Width::U64)?;
        for _ in 0..n_kv {
            w.string()?;
            let ty = w.field(Width::U32)?;
            w.value(ty, 0)?;
        }
        for _ in 0..n_tensors {
            w.string()?;
            let n_dims = w.field(Width::U32)?;
            for _ in 0..n_dims.min(8) {
                w.field(Width::U64)?;
            }
            w.field(Width::U32)?;
            w.field(Width::U64)?;
        }
        Some(())
    })();
    w.fields
}

/// A header cut short (a file's first bytes) made whole: the metadata entries that fit, with
/// the string array that was cut holding the strings that fit, and no tensors.
fn complete_prefix(b: &[u8]) -> Option<Vec<u8>> {
    let mut w = Walk { b, p: 4, fields: Vec::new(), element: false };
    w.field(Width::U32)?;
    w.field(Width::U64)?;
    let n_kv = w.field(Width::U64)?;
    let (mut kept, mut end) = (0u64, w.p);
    let mut cut_array = None; // (count field offset, strings kept)
    for _ in 0..n_kv {
        // Some(None): a whole entry; Some(Some(..)): a string array cut short; None: cut elsewhere
        let entry = (|| {
            w.string()?;
            let ty = w.field(Width::U32)?;
            if ty != u64::from(ValueType::Array.id()) {
                return w.value(ty, 0).map(|_| None);
            }
            let elem = w.field(Width::U32)?;
            let count_at = w.p;
            let count = w.field(Width::U64)?;
            if elem != u64::from(ValueType::String.id()) {
                for _ in 0..count {
                    w.value(elem, 1)?;
                }
                return Some(None);
            }
            let (mut n, mut last) = (0, w.p);
            while n < count && w.string().is_some() {
                (n, last) = (n + 1, w.p);
            }
            Some((n < count).then_some((count_at, n, last)))
        })();
        match entry {
            Some(None) => (kept, end) = (kept + 1, w.p),
            Some(Some((count_at, n, last))) if n > 0 => {
                (kept, end) = (kept + 1, last);
                cut_array = Some((count_at, n));
                break;
            }
            _ => break,
        }
    }
    let mut out = b[..end].to_vec();
    out[8..16].copy_from_slice(&0u64.to_le_bytes());
    out[16..24].copy_from_slice(&kept.to_le_bytes());
    if let Some((at, n)) = cut_array {
        out[at..at + 8].copy_from_slice(&n.to_le_bytes());
    }
    Some(out)
}

// ----------------------------------------------------------------------------------------
// Seeds

struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    fields: Vec<Field>,
    /// Share of the inputs, in parts.
    weight: usize,
}

fn seed(name: &'static str, bytes: Vec<u8>, weight: usize) -> Seed {
    let fields = fields(&bytes);
    assert!(!fields.is_empty(), "seed {name} has no fields");
    Seed { name, bytes, fields, weight }
}

/// A header with every value type, nested arrays, alignment 64 and five tensor types.
fn all_types_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set_alignment(64).unwrap();
    w.add_kv("general.architecture", "llama").unwrap();
    w.add_kv("general.name", "mutation ✓ seed").unwrap();
    w.add_kv("t.u8", 7u8).unwrap();
    w.add_kv("t.i8", -7i8).unwrap();
    w.add_kv("t.u16", 700u16).unwrap();
    w.add_kv("t.i16", -700i16).unwrap();
    w.add_kv("t.u32", 70000u32).unwrap();
    w.add_kv("t.i32", -70000i32).unwrap();
    w.add_kv("t.f32", 0.5f32).unwrap();
    w.add_kv("t.bool", true).unwrap();
    w.add_kv("t.empty_string", "").unwrap();
    w.add_kv("t.u64", 1u64 << 40).unwrap();
    w.add_kv("t.i64", -(1i64 << 40)).unwrap();
    w.add_kv("t.f64", -2.25f64).unwrap();
    w.add_kv("t.strings", Value::str_array(["<unk>", "▁the", "", "é"])).unwrap();
    w.add_kv("t.bools", Value::Array(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)])).unwrap();
    w.add_kv("t.f32s", Value::f32_array([1.0, -1.0, 0.25])).unwrap();
    w.add_kv("t.u64s", Value::Array(ValueType::U64, vec![Value::U64(1), Value::U64(u64::MAX)])).unwrap();
    w.add_kv("t.empty_u16s", Value::Array(ValueType::U16, vec![])).unwrap();
    let nested = Value::Array(
        ValueType::Array,
        vec![
            Value::Array(ValueType::I64, vec![Value::I64(-1), Value::I64(2)]),
            Value::Array(ValueType::String, vec![Value::String("x".into())]),
            Value::Array(ValueType::Array, vec![Value::Array(ValueType::U8, vec![Value::U8(9)])]),
        ],
    );
    w.add_kv("t.nested", nested).unwrap();
    w.add_tensor("token_embd.weight", &[64, 3], GgmlType::Q8_0).unwrap();
    w.add_tensor("blk.0.attn_norm.weight", &[7], GgmlType::F32).unwrap();
    w.add_tensor("blk.0.ffn_down.weight", &[256, 2, 1], GgmlType(14)).unwrap(); // q6_K
    w.add_tensor("blk.0.ffn_up.weight", &[256, 1], GgmlType(12)).unwrap(); // q4_K
    w.add_tensor("output.weight", &[3, 3, 1, 2], GgmlType::F16).unwrap();
    w.write_all(Vec::new(), |t| (0..t.n_bytes()).map(|i| (i * 37 % 251) as u8).collect()).unwrap()
}

/// A whole model from the synth writer, as small as its checks allow (about 30 KB).
fn synth_gguf(dir: &Path) -> Vec<u8> {
    let spec = SynthSpec {
        n_layer: 2,
        n_embd: 32,
        n_head: 2,
        n_head_kv: 1,
        head_dim: 16,
        n_ff: 32,
        n_vocab: 291,
        weight_type: WeightType::Q8_0,
        name: "mutation-seed".into(),
        ..SynthSpec::tiny()
    };
    let path = dir.join("synth.gguf");
    synth::write_model(&spec, &path, &mut |_, _| {}).expect("writing the synthetic seed");
    std::fs::read(&path).unwrap()
}

/// The first `n` bytes of the cached Gemma 3 270M, if the cache has it (only those are read).
fn gemma_prefix(n: u64) -> Option<Vec<u8>> {
    let path = kvtuner::assets::cache_dir().join("gemma-3-270m-q4_k_m.gguf");
    let mut out = Vec::new();
    std::fs::File::open(path).ok()?.take(n).read_to_end(&mut out).ok()?;
    Some(out)
}

fn seeds(dir: &Path) -> Vec<Seed> {
    let synth = synth_gguf(dir);
    let all = all_types_gguf();
    let mut v2 = all.clone();
    v2[4] = 2;
    let mut out = vec![seed("synth", synth, 45), seed("all-types", all, 35), seed("all-types-v2", v2, 10)];
    match gemma_prefix(256 << 10) {
        Some(prefix) => {
            let whole = complete_prefix(&prefix).expect("Gemma's first 256 KiB hold a GGUF header's start");
            out.push(seed("gemma-256k-repaired", whole, 5));
            out.push(seed("gemma-256k-cut", prefix, 5));
        }
        None => report("gguf mutation: no cached Gemma 3 270M, its header is not among the seeds"),
    }
    out
}

// ----------------------------------------------------------------------------------------
// Mutations

const INTERESTING_BYTES: [u8; 5] = [0, 0xff, 0x7f, 0x80, 1];

/// A position to mutate: half the time at or just after a field of the seed, else anywhere.
fn position(rng: &mut Rng, seed: &Seed, len: usize) -> usize {
    if rng.chance(50) {
        let f = pick_field(rng, seed);
        (f.at + rng.below(9)).min(len.saturating_sub(1))
    } else {
        rng.below(len.max(1))
    }
}

/// A field, with the fields outside arrays (counts, key lengths, tensor infos) as likely as
/// all the array elements together.
fn pick_field(rng: &mut Rng, seed: &Seed) -> Field {
    loop {
        let f = seed.fields[rng.below(seed.fields.len())];
        if !f.element || rng.chance(50) {
            return f;
        }
    }
}

fn interesting_value(rng: &mut Rng, old: u64, width: Width, at: usize, len: usize) -> u64 {
    let remaining = (len - at.min(len)) as u64;
    let max = if width == Width::U32 { u64::from(u32::MAX) } else { u64::MAX };
    let v = match rng.below(14) {
        0 => 0,
        1 => 1,
        2 => old.wrapping_add(1),
        3 => old.wrapping_sub(1),
        4 => old.wrapping_mul(2),
        5 => remaining,
        6 => remaining.wrapping_sub(8),
        7 => remaining + 1,
        8 => 1 << 31,
        9 => 1 << 60,
        10 => 1 << 63,
        11 => max,
        12 => rng.below(16) as u64, // value types, n_dims, small ggml types
        _ => rng.next(),
    };
    v & max
}

/// Applies one mutation to `b` and says which.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>, seed: &Seed, seeds: &[Seed]) -> &'static str {
    if b.is_empty() {
        b.extend_from_slice(b"GGUF");
        return "restore magic";
    }
    let len = b.len();
    match rng.below(11) {
        0 => {
            let p = position(rng, seed, len);
            b[p] ^= 1 << rng.below(8);
            "bit flip"
        }
        1 => {
            let p = position(rng, seed, len);
            b[p] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            "interesting byte"
        }
        2 => {
            let p = position(rng, seed, len);
            b[p] = rng.next() as u8;
            "random byte"
        }
        3..=5 => {
            let f = pick_field(rng, seed);
            let n = if f.width == Width::U32 { 4 } else { 8 };
            if f.at + n > len {
                b.truncate(f.at);
                return "truncation at a field";
            }
            let mut x = [0u8; 8];
            x[..n].copy_from_slice(&b[f.at..f.at + n]);
            let v = interesting_value(rng, u64::from_le_bytes(x), f.width, f.at + n, len);
            b[f.at..f.at + n].copy_from_slice(&v.to_le_bytes()[..n]);
            "length/count/type field"
        }
        6 => {
            let p = if rng.chance(50) { pick_field(rng, seed).at + rng.below(12) } else { rng.below(len + 1) };
            b.truncate(p.min(len));
            "truncation"
        }
        7 => {
            let other = &seeds[rng.below(seeds.len())].bytes;
            let from = rng.below(other.len());
            let n = (1 + rng.below(64)).min(other.len() - from);
            let at = position(rng, seed, len);
            let chunk = other[from..from + n].to_vec();
            if rng.chance(50) {
                let end = (at + n).min(len);
                b[at..end].copy_from_slice(&chunk[..end - at]);
            } else {
                b.splice(at..at, chunk);
            }
            "splice"
        }
        8 => {
            let at = position(rng, seed, len);
            let n = (1 + rng.below(96)).min(len - at);
            let chunk = b[at..at + n].to_vec();
            b.splice(at + n..at + n, chunk);
            "duplicated chunk"
        }
        9 => {
            let at = position(rng, seed, len);
            let n = (1 + rng.below(32)).min(len - at);
            b.drain(at..at + n);
            "deleted chunk"
        }
        _ => {
            let at = position(rng, seed, len);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n)
                .map(|_| if rng.chance(50) { INTERESTING_BYTES[rng.below(5)] } else { rng.next() as u8 })
                .collect();
            b.splice(at..at, bytes);
            "inserted bytes"
        }
    }
}

// ----------------------------------------------------------------------------------------
// The checks of fuzz/fuzz_targets/gguf_header.rs

/// Reads `path`; Ok(true) if it parsed, Ok(false) if the reader refused it. Panics when a
/// header that parsed is inconsistent.
fn check(path: &Path) -> bool {
    let Ok(header) = read_header(path) else { return false };
    assert!(header.data_offset <= header.file_len, "data offset past the end");
    assert!(header.alignment.is_power_of_two(), "alignment {}", header.alignment);
    for e in &header.metadata {
        let mut raw = Vec::new();
        encode_kv(e.key(), e.value(), &mut raw);
        assert_eq!(raw.len(), e.raw().len(), "re-encoded length of `{}`", e.key());
        if !has_bool(e.value()) {
            assert_eq!(raw, e.raw(), "re-encoded bytes of `{}`", e.key());
        }
    }
    for t in &header.tensors {
        let end = header.data_offset.checked_add(t.offset);
        assert!(end.is_some_and(|end| end <= header.file_len), "tensor `{}` starts past the end", t.name);
    }
    true
}

fn has_bool(v: &Value) -> bool {
    match v {
        Value::Bool(_) => true,
        Value::Array(ValueType::Bool, _) => true,
        Value::Array(_, items) => items.iter().any(has_bool),
        _ => false,
    }
}

// ----------------------------------------------------------------------------------------
// The run

#[derive(Debug, Default)]
struct Counts {
    inputs: u64,
    rejected: u64,
    parsed: u64,
    max_held: usize,
}

/// A line on stderr that shows in `cargo test`'s output although the test passes (the harness
/// captures only the print macros).
fn report(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn save_failure(input: &Path, i: u64) -> PathBuf {
    let saved = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-mutation-failure-{i}.gguf"));
    let _ = std::fs::copy(input, &saved);
    saved
}

fn run(seeds: &[Seed], input: &Path, n_inputs: u64, rng_seed: u64, progress: &AtomicU64) -> Result<Counts, String> {
    let mut rng = Rng(rng_seed);
    let total_weight: usize = seeds.iter().map(|s| s.weight).sum();
    let mut counts = Counts::default();
    let mut ops = Vec::new();
    for i in 0..n_inputs {
        let mut pick = rng.below(total_weight);
        let mut k = 0;
        while pick >= seeds[k].weight {
            pick -= seeds[k].weight;
            k += 1;
        }
        let seed = &seeds[k];
        let mut b = seed.bytes.clone();
        ops.clear();
        for _ in 0..1 + rng.below(4) {
            ops.push(mutate(&mut rng, &mut b, seed, seeds));
        }
        std::fs::write(input, &b).map_err(|e| format!("writing {}: {e}", input.display()))?;
        progress.store(i + 1, Ordering::SeqCst);

        let base = LIVE.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let parsed = std::panic::catch_unwind(|| check(input));
        let held = PEAK.load(Ordering::SeqCst).saturating_sub(base);
        let what = || format!("input {i} (seed {}, mutations {ops:?}, {} bytes)", seed.name, b.len());
        match parsed {
            Ok(true) => counts.parsed += 1,
            Ok(false) => counts.rejected += 1,
            Err(_) => {
                return Err(format!(
                    "read_header panicked on {}; saved as {}",
                    what(),
                    save_failure(input, i).display()
                ))
            }
        }
        if held > 64 * b.len() + (16 << 20) {
            return Err(format!(
                "reading {} held {held} bytes at its peak; saved as {}",
                what(),
                save_failure(input, i).display()
            ));
        }
        counts.max_held = counts.max_held.max(held);
        counts.inputs += 1;
    }
    Ok(counts)
}

#[test]
fn gguf_reader_survives_a_mutation_corpus() {
    let n_inputs = env_u64("KVTUNER_MUTATION_INPUTS", 100_000);
    let rng_seed = env_u64("KVTUNER_MUTATION_SEED", 0x6b76_7475_6e65_7220);
    let dir = tempfile::tempdir().unwrap();
    let seeds = Arc::new(seeds(dir.path()));
    for s in seeds.iter() {
        // the unmutated seeds: all read except the cut Gemma header
        let p = dir.path().join(format!("{}.gguf", s.name));
        std::fs::write(&p, &s.bytes).unwrap();
        assert_eq!(read_header(&p).is_ok(), s.name != "gemma-256k-cut", "seed {}: {:?}", s.name, read_header(&p).err());
    }
    // each mutant overwrites this file, in tmpfs where there is one (as in the fuzz target; ten
    // times faster than a disk here); when an allocation is refused the input is left there
    let shm = tempfile::Builder::new().prefix("gguf-mutation").tempdir_in("/dev/shm").ok();
    let input = shm.as_ref().map_or(dir.path(), |d| d.path()).join("input.gguf");
    INPUT.set(input.clone()).expect("set once");

    let progress = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let worker = {
        let (seeds, progress, input) = (seeds.clone(), progress.clone(), input.clone());
        std::thread::spawn(move || run(&seeds, &input, n_inputs, rng_seed, &progress))
    };
    // the watchdog: an input that takes 10 s is a hang
    let (mut last, mut since) = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let now = progress.load(Ordering::SeqCst);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(10) {
            let saved = save_failure(&input, now - 1);
            panic!("read_header hangs on input {} (10 s without returning); saved as {}", now - 1, saved.display());
        }
    }
    let counts = match worker.join().expect("the mutation loop does not panic") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let secs = start.elapsed().as_secs_f64();
    assert!(!REFUSED.load(Ordering::SeqCst));
    report(&format!(
        "gguf mutation: {} inputs, {} rejected with errors, {} parsed, in {secs:.1} s \
         (seeds: {}; most memory held while reading one: {} KiB)",
        counts.inputs,
        counts.rejected,
        counts.parsed,
        seeds.iter().map(|s| format!("{} {} B", s.name, s.bytes.len())).collect::<Vec<_>>().join(", "),
        counts.max_held >> 10,
    ));
    assert_eq!(counts.inputs, n_inputs);
    assert!(counts.inputs >= 100_000 || std::env::var_os("KVTUNER_MUTATION_INPUTS").is_some());
    assert!(counts.parsed > 0 && counts.rejected > 0, "the corpus should hold both kinds of input: {counts:?}");
}
