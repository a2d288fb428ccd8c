//! C++ test programs built against the patched tree's ggml (the CPU backend), for ops and kernel
//! models that are checked outside a model: built with g++ into a temporary folder and run; a
//! program reports its cases and exits non-zero when one fails.

use std::path::Path;
use std::process::Command;

/// Runs `program` with `args`, panics with its output unless it exits 0; returns the output.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// Builds `source` against libggml-cpu and libggml-base of the build this crate links (static, or
/// the dynamic-link feature's shared libraries), runs it, and returns its output.
pub fn build_and_run(source: &Path) -> String {
    let build = Path::new(env!("KVTUNER_LLAMA_BUILD"));
    let lib = build.join("lib");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(source.file_stem().expect("a source file"));
    let include = format!("-I{}", build.join("src/ggml/include").display());
    let mut args: Vec<String> = vec!["-O2".into(), "-std=c++17".into(), include, source.display().to_string()];
    if lib.join("libggml-cpu.a").exists() {
        args.extend([lib.join("libggml-cpu.a"), lib.join("libggml-base.a")].map(|p| p.display().to_string()));
    } else {
        args.extend([
            format!("-L{}", lib.display()),
            "-lggml-cpu".into(),
            "-lggml-base".into(),
            format!("-Wl,-rpath,{}", lib.display()),
        ]);
    }
    args.extend(["-lpthread".into(), "-o".into(), exe.display().to_string()]);
    run("g++", &args.iter().map(String::as_str).collect::<Vec<_>>());
    run(exe.to_str().unwrap(), &[])
}
