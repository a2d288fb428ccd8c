//! GGUF reader/writer/rewriter and synthetic model tests, cross-checked with gguf-rs.

use std::fs;
use std::path::{Path, PathBuf};

use kvtuner::gguf::{
    encode_kv, encode_str, read_header, rewrite, rewrite_with, GgmlType, GgufReadError, GgufWriter, MetadataEdits,
    RewriteError, RewriteOptions, Value, ValueType, COPY_GRANULE,
};
use kvtuner::synth::{self, SynthSpec, WeightType};
use proptest::prelude::*;

// ----------------------------------------------------------------------------------------
// Helpers

fn plain_fixture_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").unwrap();
    w.add_kv("general.name", "fixture ✓").unwrap();
    w.add_kv("llama.block_count", 3u32).unwrap();
    w.add_kv("llama.rope.freq_base", 10000.0f32).unwrap();
    w.add_kv("tokenizer.ggml.tokens", Value::str_array(["<unk>", "a", "▁b"])).unwrap();
    w.add_tensor("token_embd.weight", &[64, 5], GgmlType::Q8_0).unwrap();
    w.add_tensor("blk.0.attn_norm.weight", &[7], GgmlType::F32).unwrap();
    w.add_tensor("blk.0.ffn_down.weight", &[256, 2, 1], GgmlType(14)).unwrap(); // q6_K
    w.add_tensor("output.weight", &[3, 3], GgmlType::F16).unwrap();
    w
}

fn fixture_writer() -> GgufWriter {
    let mut w = plain_fixture_writer();
    // Arrays of arrays: valid GGUF (and kept by rewrite), though gguf-rs cannot read them.
    let nested = Value::Array(
        ValueType::Array,
        vec![Value::Array(ValueType::I64, vec![Value::I64(-1)]), Value::Array(ValueType::String, vec![])],
    );
    w.add_kv("x.nested", nested).unwrap();
    w
}

fn tensor_bytes(t: &kvtuner::gguf::TensorInfo) -> Vec<u8> {
    (0..t.n_bytes()).map(|i| (i as u8).wrapping_mul(31).wrapping_add(t.name.len() as u8)).collect()
}

fn write_fixture(dir: &Path, name: &str) -> PathBuf {
    let bytes = fixture_writer().write_all(Vec::new(), tensor_bytes).unwrap();
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn noop() -> impl FnMut(u64, u64) {
    |_, _| {}
}

/// Names in `dir`, sorted.
fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// A raw GGUF header: magic, version, counts, then `body`.
fn raw_gguf(version: u32, n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn kv(key: &str, value: impl Into<Value>) -> Vec<u8> {
    let mut v = Vec::new();
    encode_kv(key, &value.into(), &mut v);
    v
}

fn tinfo(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut v = Vec::new();
    encode_str(name, &mut v);
    v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v
}

/// Pads to 32 and appends `data_len` bytes of data.
fn with_data(mut v: Vec<u8>, data_len: usize) -> Vec<u8> {
    v.resize(v.len().div_ceil(32) * 32 + data_len, 0xab);
    v
}

fn gguf_rs_model(p: &Path) -> gguf_rs::GGUFModel {
    let mut c = gguf_rs::get_gguf_container_array_size(p.to_str().unwrap(), u64::MAX).unwrap();
    c.decode().unwrap()
}

// ----------------------------------------------------------------------------------------
// Malformed inputs

/// (description, file bytes, expected error).
type Case = (&'static str, Vec<u8>, fn(&GgufReadError) -> bool);

fn malformed_cases() -> Vec<Case> {
    let good = fixture_writer().write_all(Vec::new(), tensor_bytes).unwrap();
    let h_len = {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.gguf");
        fs::write(&p, &good).unwrap();
        read_header(&p).unwrap().tensor_info_range.end as usize
    };
    let mut unknown_type = kv("k", 1u8);
    unknown_type[9..13].copy_from_slice(&13u32.to_le_bytes()); // after 8+1 key bytes
    let mut huge_array = Vec::new();
    encode_str("arr", &mut huge_array);
    huge_array.extend_from_slice(&9u32.to_le_bytes());
    huge_array.extend_from_slice(&0u32.to_le_bytes());
    huge_array.extend_from_slice(&(1u64 << 60).to_le_bytes());
    huge_array.extend_from_slice(&[0; 64]);
    let mut long_string = Vec::new();
    encode_str("s", &mut long_string);
    long_string.extend_from_slice(&8u32.to_le_bytes());
    long_string.extend_from_slice(&1000u64.to_le_bytes());
    long_string.extend_from_slice(b"short");
    let mut long_key = Vec::new();
    long_key.extend_from_slice(&u64::MAX.to_le_bytes());
    long_key.extend_from_slice(b"key");

    vec![
        ("bad magic", b"GGML\x03\0\0\0".to_vec(), |e| matches!(e, GgufReadError::BadMagic { .. })),
        ("empty file", vec![], |e| matches!(e, GgufReadError::BadMagic { .. })),
        ("version 1", raw_gguf(1, 0, 0, &[]), |e| matches!(e, GgufReadError::UnsupportedVersion { version: 1, .. })),
        ("version 4", raw_gguf(4, 0, 0, &[]), |e| matches!(e, GgufReadError::UnsupportedVersion { version: 4, .. })),
        ("truncated counts", raw_gguf(3, 0, 0, &[])[..12].to_vec(), |e| matches!(e, GgufReadError::Truncated { .. })),
        ("truncated metadata", good[..100].to_vec(), |e| {
            matches!(e, GgufReadError::Truncated { .. } | GgufReadError::StringPastEnd { .. })
        }),
        ("truncated tensor infos", good[..h_len - 3].to_vec(), |e| matches!(e, GgufReadError::Truncated { .. })),
        ("string past end", raw_gguf(3, 0, 1, &long_string), |e| {
            matches!(e, GgufReadError::StringPastEnd { len: 1000, .. })
        }),
        ("key length past end", raw_gguf(3, 0, 1, &long_key), |e| matches!(e, GgufReadError::StringPastEnd { .. })),
        (
            "array count 2^60",
            raw_gguf(3, 0, 1, &huge_array),
            |e| matches!(e, GgufReadError::CountTooLarge { count, .. } if *count == 1 << 60),
        ),
        ("kv count 2^60", raw_gguf(3, 0, 1 << 60, &kv("a", 1u8)), |e| matches!(e, GgufReadError::CountTooLarge { .. })),
        ("tensor count 2^60", raw_gguf(3, 1 << 60, 0, &[0; 64]), |e| matches!(e, GgufReadError::CountTooLarge { .. })),
        (
            "duplicate key",
            raw_gguf(3, 0, 2, &[kv("a", 1u8), kv("a", 2u32)].concat()),
            |e| matches!(e, GgufReadError::DuplicateKey { key, .. } if key == "a"),
        ),
        ("unknown value type", raw_gguf(3, 0, 1, &unknown_type), |e| {
            matches!(e, GgufReadError::UnknownValueType { type_id: 13, .. })
        }),
        ("tensor past end", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[16, 4], 0, 0)), 255), |e| {
            matches!(e, GgufReadError::TensorPastEnd { .. })
        }),
        ("tensor offset past end", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[1], 0, 1 << 62)), 64), |e| {
            matches!(e, GgufReadError::TensorPastEnd { .. })
        }),
        ("tensor size overflows", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[1 << 40, 1 << 40], 0, 0)), 64), |e| {
            matches!(e, GgufReadError::BadShape { .. })
        }),
        ("unknown tensor type", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[32], 4, 0)), 64), |e| {
            matches!(e, GgufReadError::UnknownTensorType { type_id: 4, .. })
        }),
        ("row not whole blocks", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[33], 8, 0)), 64), |e| {
            matches!(e, GgufReadError::BadShape { .. })
        }),
        ("misaligned tensor", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[4], 0, 8)), 64), |e| {
            matches!(e, GgufReadError::MisalignedTensor { offset: 8, .. })
        }),
        ("alignment 48", with_data(raw_gguf(3, 0, 1, &kv("general.alignment", 48u32)), 0), |e| {
            matches!(e, GgufReadError::BadAlignment { alignment: 48, .. })
        }),
        ("alignment 0", with_data(raw_gguf(3, 0, 1, &kv("general.alignment", 0u32)), 0), |e| {
            matches!(e, GgufReadError::BadAlignment { alignment: 0, .. })
        }),
        ("alignment not u32", with_data(raw_gguf(3, 0, 1, &kv("general.alignment", 32u64)), 0), |e| {
            matches!(e, GgufReadError::AlignmentType { found: ValueType::U64, .. })
        }),
        (
            "duplicate tensor",
            with_data(raw_gguf(3, 2, 0, &[tinfo("t", &[8], 0, 0), tinfo("t", &[8], 0, 32)].concat()), 64),
            |e| matches!(e, GgufReadError::DuplicateTensor { .. }),
        ),
        ("five dims", with_data(raw_gguf(3, 1, 0, &tinfo("t", &[1, 1, 1, 1, 1], 0, 0)), 64), |e| {
            matches!(e, GgufReadError::BadDims { n_dims: 5, .. })
        }),
    ]
}

#[test]
fn malformed_inputs_give_specific_errors_and_rewrite_writes_nothing() {
    for (what, bytes, check) in malformed_cases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.gguf");
        fs::write(&p, &bytes).unwrap();
        let err = read_header(&p).expect_err(what);
        assert!(check(&err), "{what}: unexpected error {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("bad.gguf"), "{what}: message does not name the file: {msg}");

        let out = dir.path().join("out.gguf");
        let edits = MetadataEdits::new().set("kvtuner.x", 1u32);
        let r = rewrite(&p, &out, &edits, &mut noop());
        assert!(matches!(r, Err(RewriteError::Read(_))), "{what}: {r:?}");
        assert_eq!(dir_names(dir.path()), ["bad.gguf"], "{what}");
        assert_eq!(fs::read(&p).unwrap(), bytes);
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let e = read_header(Path::new("/nonexistent/x.gguf")).unwrap_err();
    assert!(matches!(e, GgufReadError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/x.gguf"));
}

#[test]
fn deeply_nested_arrays_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut body = Vec::new();
    encode_str("deep", &mut body);
    body.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100 {
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
    }
    body.extend_from_slice(&[0; 16]);
    let p = dir.path().join("deep.gguf");
    fs::write(&p, raw_gguf(3, 0, 1, &body)).unwrap();
    assert!(matches!(read_header(&p), Err(GgufReadError::ArrayTooDeep { .. })));
}

// ----------------------------------------------------------------------------------------
// Rewrite

#[test]
fn rewrite_set_then_remove_is_identity_and_set_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let x = write_fixture(dir.path(), "x.gguf");
    let original = fs::read(&x).unwrap();
    let h0 = read_header(&x).unwrap();

    let set = MetadataEdits::new()
        .set("kvtuner.cache_types", Value::str_array(["q8_0", "f16", "q4_0"]))
        .set("kvtuner.version", 1u32)
        .set("kvtuner.note", "héllo ✓");
    let a = dir.path().join("a.gguf");
    let mut calls = Vec::new();
    let stats = rewrite(&x, &a, &set, &mut |d, t| calls.push((d, t))).unwrap();
    assert_eq!((stats.appended, stats.replaced, stats.removed), (3, 0, 0));
    assert_eq!(stats.kv_after, stats.kv_before + 3);
    assert_eq!(calls.last().copied(), Some((h0.data_len(), h0.data_len())));
    assert_eq!(fs::metadata(&a).unwrap().len(), stats.file_bytes);

    let ha = read_header(&a).unwrap();
    assert_eq!(ha.tensor_fingerprint(), h0.tensor_fingerprint());
    assert_eq!(ha.tensors, h0.tensors);
    let keys: Vec<_> = ha.keys().collect();
    let mut expected: Vec<_> = h0.keys().collect();
    expected.extend(["kvtuner.cache_types", "kvtuner.version", "kvtuner.note"]);
    assert_eq!(keys, expected);
    assert_eq!(ha.get_str_array("kvtuner.cache_types").unwrap(), ["q8_0", "f16", "q4_0"]);
    for e in &h0.metadata {
        assert_eq!(ha.entry(e.key()).unwrap().raw(), e.raw(), "{} changed", e.key());
    }
    // Tensor data identical.
    let ab = fs::read(&a).unwrap();
    assert_eq!(&ab[ha.data_offset as usize..], &original[h0.data_offset as usize..]);

    // Setting again changes nothing.
    let b = dir.path().join("b.gguf");
    rewrite(&a, &b, &set, &mut noop()).unwrap();
    assert_eq!(fs::read(&b).unwrap(), ab);

    // Replacing keeps the position.
    let c = dir.path().join("c.gguf");
    rewrite(&a, &c, &MetadataEdits::new().set("kvtuner.version", 2u64), &mut noop()).unwrap();
    let hc = read_header(&c).unwrap();
    assert_eq!(hc.keys().collect::<Vec<_>>(), keys);
    assert_eq!(hc.get("kvtuner.version"), Some(&Value::U64(2)));

    // Removing by prefix, in place, restores the original bytes.
    rewrite(&b, &b, &MetadataEdits::new().remove_prefix("kvtuner."), &mut noop()).unwrap();
    assert_eq!(fs::read(&b).unwrap(), original);
    assert_eq!(dir_names(dir.path()), ["a.gguf", "b.gguf", "c.gguf", "x.gguf"]);
}

#[test]
fn page_padding_keeps_data_congruent_and_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let x = write_fixture(dir.path(), "x.gguf");
    let original = fs::read(&x).unwrap();
    let h0 = read_header(&x).unwrap();
    let opts = RewriteOptions { page_pad_key: Some("kvtuner.pad".into()), durable: false, ..Default::default() };
    let set = MetadataEdits::new().set("kvtuner.note", "a longer note than before ✓");
    let a = dir.path().join("a.gguf");
    let stats = rewrite_with(&x, &a, &set, &opts, &mut noop()).unwrap();
    let ha = read_header(&a).unwrap();
    assert_eq!(ha.data_offset % COPY_GRANULE, h0.data_offset % COPY_GRANULE);
    assert_eq!(ha.keys().last(), Some("kvtuner.pad"));
    match ha.get("kvtuner.pad") {
        Some(Value::Array(ValueType::U8, zeros)) => {
            assert_eq!(zeros.len() as u64, stats.padding);
            assert!(zeros.iter().all(|z| *z == Value::U8(0)));
        }
        other => panic!("padding entry is {other:?}"),
    }
    let bytes = fs::read(&a).unwrap();
    assert_eq!(&bytes[ha.data_offset as usize..], &original[h0.data_offset as usize..]);
    // Padding again (any padding entry replaced) gives the same file.
    let b = dir.path().join("b.gguf");
    rewrite_with(&a, &b, &set, &opts, &mut noop()).unwrap();
    assert_eq!(fs::read(&b).unwrap(), bytes);
    // Removing our keys restores the input.
    let c = dir.path().join("c.gguf");
    rewrite(&b, &c, &MetadataEdits::new().remove_prefix("kvtuner."), &mut noop()).unwrap();
    assert_eq!(fs::read(&c).unwrap(), original);
}

#[test]
fn rewrite_replaces_and_removes_original_keys() {
    let dir = tempfile::tempdir().unwrap();
    let x = write_fixture(dir.path(), "x.gguf");
    let edits = MetadataEdits::new()
        .set("general.name", "renamed")
        .remove_key("llama.rope.freq_base")
        .remove_prefix("tokenizer.");
    let out = dir.path().join("o.gguf");
    let s = rewrite(&x, &out, &edits, &mut noop()).unwrap();
    assert_eq!((s.replaced, s.removed, s.appended), (1, 2, 0));
    let h = read_header(&out).unwrap();
    assert_eq!(h.keys().collect::<Vec<_>>(), ["general.architecture", "general.name", "llama.block_count", "x.nested"]);
    assert_eq!(h.get_str("general.name"), Some("renamed"));
    assert_eq!(h.block_count(), Some(3));
    assert_eq!(h.get_f64("llama.block_count"), Some(3.0));
}

#[test]
fn rewrite_output_is_read_by_gguf_rs() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.gguf");
    fs::write(&x, plain_fixture_writer().write_all(Vec::new(), tensor_bytes).unwrap()).unwrap();
    let out = dir.path().join("o.gguf");
    let edits =
        MetadataEdits::new().set("kvtuner.layers", Value::i32_array([1, 2, 3])).set("kvtuner.long", "x".repeat(1000));
    rewrite(&x, &out, &edits, &mut noop()).unwrap();
    let ours = read_header(&out).unwrap();
    let theirs = gguf_rs_model(&out);
    assert_eq!(theirs.num_tensor(), ours.tensors.len() as u64);
    assert_eq!(theirs.data_offset(), ours.data_offset);
    for (a, b) in ours.tensors.iter().zip(theirs.tensors()) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.dims, b.shape);
        assert_eq!(a.offset, b.offset);
        assert_eq!(a.ggml_type.0, b.kind);
    }
    let mut ours_keys: Vec<_> = ours.keys().map(str::to_string).collect();
    ours_keys.sort();
    assert_eq!(theirs.metadata().keys().cloned().collect::<Vec<_>>(), ours_keys);
}

#[test]
fn failing_mid_copy_leaves_input_intact_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let x = write_fixture(dir.path(), "x.gguf");
    let original = fs::read(&x).unwrap();
    let opts = RewriteOptions { chunk_size: 16, fail_after_bytes: Some(100), ..Default::default() };
    let edits = MetadataEdits::new().set("kvtuner.k", 5u8);
    let mut seen = 0;
    for out in [dir.path().join("o.gguf"), x.clone()] {
        let r = rewrite_with(&x, &out, &edits, &opts, &mut |d, _| seen = seen.max(d));
        assert!(matches!(r, Err(RewriteError::InjectedFault(100))), "{r:?}");
        assert_eq!(fs::read(&x).unwrap(), original);
        assert_eq!(dir_names(dir.path()), ["x.gguf"]);
    }
    assert_eq!(seen, 100);
    // The same options without the fault work and report chunked progress.
    let mut calls = 0;
    let opts = RewriteOptions { chunk_size: 16, ..Default::default() };
    rewrite_with(&x, &x, &edits, &opts, &mut |_, _| calls += 1).unwrap();
    assert!(calls > 10);
    assert_eq!(read_header(&x).unwrap().get("kvtuner.k"), Some(&Value::U8(5)));
}

#[test]
fn rewrite_into_missing_folder_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let x = write_fixture(dir.path(), "x.gguf");
    let out = dir.path().join("nope/o.gguf");
    let r = rewrite(&x, &out, &MetadataEdits::new(), &mut noop());
    assert!(matches!(r, Err(RewriteError::Io { .. })));
    assert_eq!(dir_names(dir.path()), ["x.gguf"]);
}

// ----------------------------------------------------------------------------------------
// Property tests

fn scalar(t: ValueType) -> BoxedStrategy<Value> {
    match t {
        ValueType::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        ValueType::I8 => any::<i8>().prop_map(Value::I8).boxed(),
        ValueType::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        ValueType::I16 => any::<i16>().prop_map(Value::I16).boxed(),
        ValueType::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        ValueType::I32 => any::<i32>().prop_map(Value::I32).boxed(),
        ValueType::F32 => (-1e30f32..1e30).prop_map(Value::F32).boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::String => ".{0,12}".prop_map(Value::String).boxed(),
        ValueType::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        ValueType::I64 => any::<i64>().prop_map(Value::I64).boxed(),
        ValueType::F64 => (-1e300f64..1e300).prop_map(Value::F64).boxed(),
        ValueType::Array => unreachable!(),
    }
}

fn scalar_type() -> impl Strategy<Value = ValueType> {
    prop::sample::select(ValueType::ALL.iter().copied().filter(|t| *t != ValueType::Array).collect::<Vec<_>>())
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = scalar_type().prop_flat_map(scalar);
    leaf.prop_recursive(3, 40, 6, |_inner| {
        // Arrays of one element type: scalars, or arrays (each with its own element type).
        prop_oneof![
            scalar_type()
                .prop_flat_map(|t| { prop::collection::vec(scalar(t), 0..6).prop_map(move |v| Value::Array(t, v)) }),
            prop::collection::vec(
                scalar_type().prop_flat_map(|t| {
                    prop::collection::vec(scalar(t), 0..4).prop_map(move |v| Value::Array(t, v))
                }),
                0..4
            )
            .prop_map(|v| Value::Array(ValueType::Array, v)),
        ]
    })
}

fn metadata() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::btree_map("[a-z.]{1,8}|\\PC{1,6}", value(), 0..12).prop_map(|m| m.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn metadata_round_trips(kvs in metadata(), n_tensors in 0usize..3) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in &kvs {
            w.add_kv(k.clone(), v.clone()).unwrap();
        }
        for i in 0..n_tensors {
            w.add_tensor(format!("t{i}"), &[32, i as u64 + 1], GgmlType::Q8_0).unwrap();
        }
        let bytes = w.write_all(Vec::new(), |t| vec![1; t.n_bytes() as usize]).unwrap();
        let p = dir.path().join("p.gguf");
        fs::write(&p, &bytes).unwrap();
        let h = read_header(&p).unwrap();
        prop_assert_eq!(h.metadata.len(), kvs.len());
        for (e, (k, v)) in h.metadata.iter().zip(&kvs) {
            prop_assert_eq!(e.key(), k.as_str());
            prop_assert_eq!(e.value(), v);
            let mut raw = Vec::new();
            encode_kv(k, v, &mut raw);
            prop_assert_eq!(e.raw(), &raw[..]);
        }
        prop_assert_eq!(h.file_len, bytes.len() as u64);

        // Set-then-remove through rewrite restores the bytes.
        let q = dir.path().join("q.gguf");
        let edits = MetadataEdits::new().set("zz.added", Value::U8(1));
        rewrite(&p, &q, &edits, &mut noop()).unwrap();
        rewrite(&q, &q, &MetadataEdits::new().remove_key("zz.added"), &mut noop()).unwrap();
        if !kvs.iter().any(|(k, _)| k == "zz.added") {
            prop_assert_eq!(fs::read(&q).unwrap(), bytes);
        }
    }

    #[test]
    fn read_header_never_panics_on_mutated_bytes(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = fixture_writer().write_all(Vec::new(), tensor_bytes).unwrap();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if do_cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        fs::write(&p, &bytes).unwrap();
        let _ = read_header(&p);
    }

    #[test]
    fn read_header_never_panics_on_random_bytes(tail in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.gguf");
        fs::write(&p, [b"GGUF\x03\0\0\0".as_slice(), &tail].concat()).unwrap();
        let _ = read_header(&p);
        fs::write(&p, &tail).unwrap();
        let _ = read_header(&p);
    }
}

// ----------------------------------------------------------------------------------------
// Synthetic models

fn check_synth(spec: &SynthSpec) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    let mut last = (0, 0);
    let stats = synth::write_model(spec, &p, &mut |d, t| last = (d, t)).unwrap();
    let len = fs::metadata(&p).unwrap().len();
    assert_eq!(stats.file_bytes, len);
    assert_eq!(len, spec.file_size().unwrap());
    assert_eq!(last, (len, len));
    assert!(stats.bytes_per_sec > 0.0);

    let h = read_header(&p).unwrap();
    let n_layer = spec.n_layer as usize;
    assert_eq!(h.tensors.len(), 3 + 9 * n_layer);
    assert_eq!(stats.n_tensors, h.tensors.len());
    assert_eq!(h.architecture(), Some("llama"));
    assert_eq!(h.block_count(), Some(spec.n_layer.into()));
    assert_eq!(h.get_u64("llama.attention.head_count_kv"), Some(spec.n_head_kv.into()));
    assert_eq!(h.get_u64("llama.context_length"), Some(spec.n_ctx_train.into()));
    assert_eq!(h.get("llama.rope.freq_base").map(Value::value_type), Some(ValueType::F32));
    let tokens = h.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), spec.n_vocab as usize);
    assert_eq!(&tokens[..3], ["<unk>", "<s>", "</s>"]);
    let (e, kv) = (u64::from(spec.n_embd), u64::from(spec.n_head_kv * spec.head_dim));
    let find = |n: &str| h.tensors.iter().find(|t| t.name == n).unwrap_or_else(|| panic!("{n}"));
    let wt = match spec.weight_type {
        WeightType::F16 => GgmlType::F16,
        WeightType::Q8_0 => GgmlType::Q8_0,
    };
    assert_eq!(find("token_embd.weight").dims, [e, spec.n_vocab.into()]);
    assert_eq!(find("output.weight").dims, [e, spec.n_vocab.into()]);
    assert_eq!(find("output_norm.weight").ggml_type, GgmlType::F32);
    let last = n_layer - 1;
    assert_eq!(find(&format!("blk.{last}.attn_k.weight")).dims, [e, kv]);
    assert_eq!(find(&format!("blk.{last}.attn_v.weight")).ggml_type, wt);
    assert_eq!(find(&format!("blk.{last}.ffn_down.weight")).dims, [spec.n_ff.into(), e]);
    assert_eq!(find("blk.0.attn_output.weight").dims, [u64::from(spec.n_head * spec.head_dim), e]);

    // Norm weights are 1.0, the rest small and finite.
    let bytes = fs::read(&p).unwrap();
    let norm = find("blk.0.attn_norm.weight");
    let at = (h.data_offset + norm.offset) as usize;
    assert_eq!(f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 1.0);
    if spec.weight_type == WeightType::F16 {
        let q = find("blk.0.attn_q.weight");
        let at = (h.data_offset + q.offset) as usize;
        let vals: Vec<f32> = bytes[at..at + q.n_bytes() as usize]
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert!(vals.iter().all(|v| v.is_finite() && v.abs() < 0.05));
        let mean_sq = vals.iter().map(|v| v * v).sum::<f32>() / vals.len() as f32;
        assert!((mean_sq.sqrt() - 0.02).abs() < 0.002, "rms {}", mean_sq.sqrt());
    }

    let theirs = gguf_rs_model(&p);
    assert_eq!(theirs.num_tensor(), h.tensors.len() as u64);
    for (a, b) in h.tensors.iter().zip(theirs.tensors()) {
        assert_eq!((&a.name, &a.dims, a.offset), (&b.name, &b.shape, b.offset));
    }
    assert_eq!(theirs.model_family(), "llama");

    // Deterministic, whatever the thread count.
    let p2 = dir.path().join("again.gguf");
    synth::write_model_with_threads(spec, &p2, 3, &mut noop()).unwrap();
    assert_eq!(fs::read(&p2).unwrap(), bytes);
    let mut other = spec.clone();
    other.seed += 1;
    synth::write_model_with_threads(&other, &p2, 1, &mut noop()).unwrap();
    assert_ne!(fs::read(&p2).unwrap(), bytes);
    assert_eq!(dir_names(dir.path()), ["again.gguf", "tiny.gguf"]);
}

#[test]
fn synth_tiny_f16() {
    check_synth(&SynthSpec::tiny());
}

#[test]
fn synth_tiny_q8_0() {
    let mut spec = SynthSpec::tiny();
    spec.weight_type = WeightType::Q8_0;
    spec.n_layer = 2;
    spec.n_vocab = 333; // not a multiple of the generator's run length
    check_synth(&spec);
}

#[test]
fn synth_8b_header_has_the_expected_size() {
    let spec = SynthSpec::llama31_8b();
    let w = spec.gguf_writer().unwrap();
    assert_eq!(w.tensors().len(), 3 + 9 * 32);
    let params: u64 = w.tensors().iter().map(|t| t.n_elements()).sum();
    assert_eq!(params, 8_030_261_248);
    let size = spec.file_size().unwrap();
    assert!((16_000_000_000..16_100_000_000).contains(&size), "{size}");
}
