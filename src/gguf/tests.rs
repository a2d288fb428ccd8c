use std::io::Write;

use super::*;

fn tiny_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", "llama").unwrap();
    w.add_kv("llama.block_count", 2u32).unwrap();
    w.add_kv("x.empty", Value::Array(ValueType::U16, vec![])).unwrap();
    w.add_tensor("a", &[64, 2], GgmlType::Q8_0).unwrap();
    w.add_tensor("b", &[3], GgmlType::F32).unwrap();
    w
}

fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

#[test]
fn header_fields_and_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny_writer();
    let bytes = w.write_all(Vec::new(), |t| vec![7u8; t.n_bytes() as usize]).unwrap();
    assert_eq!(bytes.len() as u64, w.file_size());
    let p = write_file(dir.path(), "t.gguf", &bytes);
    let h = read_header(&p).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.architecture(), Some("llama"));
    assert_eq!(h.block_count(), Some(2));
    assert_eq!(h.keys().collect::<Vec<_>>(), ["general.architecture", "llama.block_count", "x.empty"]);
    assert_eq!(h.get("x.empty"), Some(&Value::Array(ValueType::U16, vec![])));
    assert_eq!(h.tensors[1].offset, 160); // 2*68 = 136, padded to 160
    assert_eq!(h.data_offset % 32, 0);
    assert_eq!(h.file_len, h.data_offset + 160 + 32);
    for e in &h.metadata {
        let mut raw = Vec::new();
        encode_kv(e.key(), e.value(), &mut raw);
        assert_eq!(raw, e.raw());
    }
    let info = &bytes[h.tensor_info_range.start as usize..h.tensor_info_range.end as usize];
    let mut expected = Vec::new();
    for t in w.tensors() {
        encode_tensor_info(t, &mut expected);
    }
    assert_eq!(info, expected.as_slice());
    assert_eq!(h.tensor_fingerprint().len(), 64);
}

#[test]
fn version_2_is_read_and_kept_by_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = tiny_writer().write_all(Vec::new(), |t| vec![1u8; t.n_bytes() as usize]).unwrap();
    bytes[4] = 2;
    let p = write_file(dir.path(), "v2.gguf", &bytes);
    assert_eq!(read_header(&p).unwrap().version, 2);
    let out = dir.path().join("out.gguf");
    rewrite(&p, &out, &MetadataEdits::new().set("k", 1u8), &mut |_, _| {}).unwrap();
    let h = read_header(&out).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.get("k"), Some(&Value::U8(1)));
}

#[test]
fn no_tensor_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.add_kv("a", 1u32).unwrap();
    let bytes = w.write_all(Vec::new(), |_| vec![]).unwrap();
    let p = write_file(dir.path(), "n.gguf", &bytes);
    let h = read_header(&p).unwrap();
    assert!(h.tensors.is_empty());
    let mid = dir.path().join("m.gguf");
    rewrite(&p, &mid, &MetadataEdits::new().set("bbbbbbbbbbbb", "x"), &mut |_, _| {}).unwrap();
    rewrite(&mid, &mid, &MetadataEdits::new().remove_key("bbbbbbbbbbbb"), &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&mid).unwrap(), bytes);
    // An unpadded file without tensors is read, and padded by a rewrite as ggml would.
    let unpadded = &bytes[..h.tensor_info_range.end as usize];
    let p2 = write_file(dir.path(), "u.gguf", unpadded);
    assert_eq!(read_header(&p2).unwrap().data_offset, unpadded.len() as u64);
    rewrite(&p2, &mid, &MetadataEdits::new(), &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&mid).unwrap(), bytes);
}

#[test]
fn alignment_edits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny_writer();
    w.add_kv("general.name", "x").unwrap();
    let bytes = w.write_all(Vec::new(), |t| vec![1u8; t.n_bytes() as usize]).unwrap();
    let p = write_file(dir.path(), "a.gguf", &bytes);
    let out = dir.path().join("o.gguf");
    let e = rewrite(&p, &out, &MetadataEdits::new().set(ALIGNMENT_KEY, 64u32), &mut |_, _| {});
    assert!(matches!(e, Err(RewriteError::AlignmentEdit)));

    let mut w = GgufWriter::new();
    w.set_alignment(64).unwrap();
    w.add_tensor("t", &[16], GgmlType::F32).unwrap();
    let bytes = w.write_all(Vec::new(), |t| vec![1u8; t.n_bytes() as usize]).unwrap();
    let p = write_file(dir.path(), "b.gguf", &bytes);
    assert_eq!(read_header(&p).unwrap().alignment, 64);
    let e = rewrite(&p, &out, &MetadataEdits::new().remove_prefix("general."), &mut |_, _| {});
    assert!(matches!(e, Err(RewriteError::AlignmentEdit)));
    assert!(!out.exists());
}
