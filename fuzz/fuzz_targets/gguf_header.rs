//! The GGUF header reader on arbitrary bytes: it must return Ok or a GgufReadError, never
//! panic, hang or allocate beyond what the input can justify.
//!
//!   KVTUNER_LLAMA_BUILD_DIR=$PWD/target/kvtuner-llama RUSTC_BOOTSTRAP=1 \
//!       cargo fuzz run gguf_header -- -max_total_time=600
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // read_header reads files (as the CLI does); a per-process file in tmpfs keeps it cheap.
    thread_local! {
        static FILE: tempfile::NamedTempFile = tempfile::NamedTempFile::new_in("/dev/shm").or_else(|_| tempfile::NamedTempFile::new()).expect("temp file");
    }
    FILE.with(|f| {
        let mut w = std::fs::File::create(f.path()).expect("rewrite temp file");
        w.write_all(data).expect("write input");
        drop(w);
        if let Ok(header) = kvtuner::gguf::read_header(f.path()) {
            // a header that parses must be self-consistent
            assert!(header.data_offset <= header.file_len);
            assert!(header.alignment.is_power_of_two());
            // values are decoded lazily from the checked bytes: decoding must not panic and
            // must encode back to those bytes (a bool byte other than 0/1 reads as true and
            // encodes as 1; the rewriter copies raw bytes, so that never changes a file)
            for e in &header.metadata {
                let mut raw = Vec::new();
                kvtuner::gguf::encode_kv(e.key(), e.value(), &mut raw);
                assert_eq!(raw.len(), e.raw().len());
                if !has_bool(e.value()) {
                    assert_eq!(raw, e.raw());
                }
            }
            for t in &header.tensors {
                assert!(header.data_offset + t.offset <= header.file_len);
            }
        }
    });
});

fn has_bool(v: &kvtuner::gguf::Value) -> bool {
    use kvtuner::gguf::{Value, ValueType};
    match v {
        Value::Bool(_) => true,
        Value::Array(ValueType::Bool, _) => true,
        Value::Array(_, items) => items.iter().any(has_bool),
        _ => false,
    }
}
