//! Builds the pinned llama.cpp with kvtuner's patch series and generates its bindings.
//!
//! resolve source (vendor pin, checksum) → copy + apply `patches/series` → cmake → the C shim over
//! `common/` (chat templates, tool-call parsers, schema grammars, sampling) → bindgen → link.
//!
//! The patched tree and its build live in `target/kvtuner-llama/<key>/`, where the key hashes
//! the source checksum, the patches and the cmake options. Debug and release builds of kvtuner
//! therefore share one llama.cpp build, and `cargo clean -p kvtuner` keeps it.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Parts of the llama.cpp tree the build needs; everything else in the crate is left behind.
const TREE_PARTS: &[&str] =
    &["CMakeLists.txt", "LICENSE", "cmake", "include", "src", "common", "vendor", "ggml", "tools/CMakeLists.txt"];

fn main() {
    let root = PathBuf::from(var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=patches");
    println!("cargo:rerun-if-changed=vendor");
    println!("cargo:rerun-if-changed=src/cuda_fa_pairs.txt");
    println!("cargo:rerun-if-changed=shim");

    let source = resolve_source(&root);
    let options = cmake_options(&root);
    let key = build_key(&source, &root, &options);
    let work = cache_root().join(&key[..16]);

    let _lock = lock(&work);
    let tree = prepare_tree(&source, &root, &work);
    let install = build_with_cmake(&tree, &work, &options);
    build_shim(&root, &tree);
    // Rebuild if someone deletes the cached build.
    println!("cargo:rerun-if-changed={}", work.join("built.stamp").display());
    // The patched tree and its libraries, for tests that build host-side kernel models against ggml.
    println!("cargo:rustc-env=KVTUNER_LLAMA_BUILD={}", work.display());
    generate_bindings(&root, &tree);
    link(&install);
}

/// Reads an environment variable and tells cargo to rerun when it changes.
fn var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok()
}

fn feature(name: &str) -> bool {
    env::var_os(format!("CARGO_FEATURE_{}", name.to_uppercase().replace('-', "_"))).is_some()
}

struct Source {
    dir: PathBuf,
    /// sha256 over the copied parts (relative path + contents, sorted by path).
    checksum: String,
}

/// The vendor pin (or `KVTUNER_LLAMA_SRC`) → a llama.cpp tree whose checksum is verified.
fn resolve_source(root: &Path) -> Source {
    if let Some(dir) = var("KVTUNER_LLAMA_SRC") {
        let dir = PathBuf::from(dir);
        if !dir.join("include/llama.h").is_file() {
            panic!("KVTUNER_LLAMA_SRC={} is not a llama.cpp tree (no include/llama.h)", dir.display());
        }
        let checksum = tree_checksum(&dir);
        println!("cargo:warning=building against KVTUNER_LLAMA_SRC={} (tree sha256 {checksum}); the pin's checksum is not enforced", dir.display());
        return Source { dir, checksum };
    }

    let manifest = root.join("vendor/llama-cpp-pin/Cargo.toml");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--manifest-path"])
        .arg(&manifest)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("running `{cargo} metadata` for {}: {e}", manifest.display()));
    if !out.status.success() {
        panic!(
            "`cargo metadata --manifest-path {}` failed:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let pkg = meta["packages"]
        .as_array()
        .and_then(|pkgs| pkgs.iter().find(|p| p["name"] == "llama-cpp-sys-2"))
        .expect("vendor/llama-cpp-pin depends on llama-cpp-sys-2");
    let crate_dir = Path::new(pkg["manifest_path"].as_str().expect("manifest_path is a string"))
        .parent()
        .expect("a manifest lives in a folder")
        .to_path_buf();
    let dir = crate_dir.join("llama.cpp");

    let recorded_file = root.join("vendor/llama-cpp-pin/tree.sha256");
    let recorded = fs::read_to_string(&recorded_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", recorded_file.display()))
        .trim()
        .to_string();
    let checksum = tree_checksum(&dir);
    if checksum != recorded {
        panic!(
            "llama.cpp tree at {} has sha256 {checksum}, but {} records {recorded}: the pinned source changed",
            dir.display(),
            recorded_file.display()
        );
    }
    Source { dir, checksum }
}

fn tree_checksum(dir: &Path) -> String {
    let mut files = BTreeMap::new();
    for part in TREE_PARTS {
        collect_files(dir, &dir.join(part), &mut files);
    }
    let mut hasher = Sha256::new();
    for (rel, path) in &files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        hasher.update(rel.as_bytes());
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(&data);
    }
    hex(&hasher.finalize())
}

fn collect_files(base: &Path, path: &Path, out: &mut BTreeMap<String, PathBuf>) {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return, // optional part (e.g. `common` in a trimmed checkout)
    };
    if meta.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(path)
            .unwrap_or_else(|e| panic!("listing {}: {e}", path.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            collect_files(base, &entry, out);
        }
    } else if meta.is_file() {
        let rel = path.strip_prefix(base).expect("inside the tree").to_string_lossy().replace('\\', "/");
        out.insert(rel, path.to_path_buf());
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Patch files in `patches/series` order (blank lines and `#` comments skipped).
fn patch_series(root: &Path) -> Vec<PathBuf> {
    let series = root.join("patches/series");
    let text = fs::read_to_string(&series).unwrap_or_else(|e| panic!("reading {}: {e}", series.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| root.join("patches").join(l))
        .collect()
}

/// K-V pairs the CUDA build compiles flash-attention kernels for (shared with `src/`).
fn cuda_fa_pairs(root: &Path) -> Vec<String> {
    let path = root.join("src/cuda_fa_pairs.txt");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) =
                l.split_once(char::is_whitespace).unwrap_or_else(|| panic!("{}: `{l}` is not `K V`", path.display()));
            format!("{}-{}", k.trim(), v.trim())
        })
        .collect()
}

fn cmake_options(root: &Path) -> BTreeMap<String, String> {
    let mut o = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        o.insert(k.to_string(), v.to_string());
    };
    set("CMAKE_BUILD_TYPE", "Release");
    // common/: Jinja chat templates, tool-call parsers, JSON schema → grammar, the sampler chain
    // llama-server uses; the shim (`shim/`) exposes the parts `serve` and `chat` need
    set("LLAMA_BUILD_COMMON", "ON");
    set("LLAMA_BUILD_TESTS", "OFF");
    set("LLAMA_BUILD_EXAMPLES", "OFF");
    set("LLAMA_BUILD_TOOLS", "OFF");
    set("LLAMA_BUILD_SERVER", "OFF");
    set("LLAMA_BUILD_APP", "OFF");
    set("LLAMA_CURL", "OFF");
    set("LLAMA_OPENSSL", "OFF");
    set("LLAMA_ALL_WARNINGS", "OFF");
    set("GGML_OPENMP", "OFF");
    set("GGML_BLAS", "OFF");
    set("GGML_CCACHE", "ON");
    // ggml's RPC backend: layers on other processes or machines (`kvtuner rpc-server`, `--rpc`)
    set("GGML_RPC", "ON");
    let native = var("KVTUNER_PORTABLE").is_none();
    set("GGML_NATIVE", if native { "ON" } else { "OFF" });
    if native && env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        // -march=native on Sapphire Rapids and later turns on ggml's AMX weight buffers, whose
        // matmul crashes on Gemma 3 and Qwen2.5 Q4_K_M files (SIGSEGV in ggml_backend_amx_mul_mat,
        // upstream llama.cpp#20824, unfixed). Everything else -march=native brings stays.
        let no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";
        set("CMAKE_C_FLAGS", no_amx);
        set("CMAKE_CXX_FLAGS", no_amx);
    }
    set("BUILD_SHARED_LIBS", if feature("dynamic-link") { "ON" } else { "OFF" });
    if feature("dynamic-link") {
        // libllama finds libggml* next to itself (kvtuner's own RUNPATH does not reach them)
        set("CMAKE_INSTALL_RPATH", "$ORIGIN");
    }
    if feature("cuda") {
        set("GGML_CUDA", "ON");
        set("GGML_CUDA_NCCL", "OFF");
        let archs = var("CMAKE_CUDA_ARCHITECTURES").unwrap_or_else(|| "native".into());
        set("CMAKE_CUDA_ARCHITECTURES", &archs);
        set("GGML_CUDA_FA_QUANTS", &cuda_fa_pairs(root).join(";"));
    }
    o
}

fn build_key(source: &Source, root: &Path, options: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(source.checksum.as_bytes());
    for patch in patch_series(root) {
        h.update(patch.file_name().unwrap().to_string_lossy().as_bytes());
        h.update(fs::read(&patch).unwrap_or_else(|e| panic!("reading patch {}: {e}", patch.display())));
    }
    for (k, v) in options {
        h.update(format!("{k}={v}\n").as_bytes());
    }
    hex(&h.finalize())
}

/// `target/kvtuner-llama`, found from OUT_DIR (`target/<profile>/build/<pkg>/out`).
fn cache_root() -> PathBuf {
    if let Some(dir) = var("KVTUNER_LLAMA_BUILD_DIR") {
        return PathBuf::from(dir);
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = out
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|b| b.parent()) // <profile>
        .and_then(|p| p.parent()) // target (or target/<triple>)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.clone());
    target.join("kvtuner-llama")
}

/// Serialises concurrent builds (e.g. `cargo build` and `cargo test`) of one cache entry.
fn lock(work: &Path) -> fs::File {
    fs::create_dir_all(work).unwrap_or_else(|e| panic!("creating {}: {e}", work.display()));
    let file = fs::File::create(work.join(".lock")).expect("creating the build lock");
    file.lock().expect("locking the llama.cpp build folder");
    file
}

/// Copies the source parts into `work/src` and applies the patch series once.
fn prepare_tree(source: &Source, root: &Path, work: &Path) -> PathBuf {
    let tree = work.join("src");
    let stamp = work.join("patched.stamp");
    if stamp.exists() {
        return tree;
    }
    if tree.exists() {
        fs::remove_dir_all(&tree).unwrap_or_else(|e| panic!("clearing {}: {e}", tree.display()));
    }
    let mut files = BTreeMap::new();
    for part in TREE_PARTS {
        collect_files(&source.dir, &source.dir.join(part), &mut files);
    }
    for (rel, from) in &files {
        let to = tree.join(rel);
        fs::create_dir_all(to.parent().unwrap()).expect("creating a source folder");
        fs::copy(from, &to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    }
    for patch in patch_series(root) {
        apply_patch(&tree, &patch);
    }
    fs::write(&stamp, b"").expect("writing the patch stamp");
    tree
}

fn apply_patch(tree: &Path, patch: &Path) {
    let run = |extra: &[&str]| {
        Command::new("git")
            .current_dir(tree)
            // The tree sits inside kvtuner's own checkout (target/); without a ceiling, git apply
            // would resolve paths against that repository and silently skip every file.
            .env("GIT_CEILING_DIRECTORIES", tree.parent().expect("tree has a parent"))
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .args(["apply", "-p1", "--whitespace=nowarn"])
            .args(extra)
            .arg(patch)
            .output()
            .unwrap_or_else(|e| panic!("running `git apply` for {}: {e} (is git installed?)", patch.display()))
    };
    if run(&["--check"]).status.success() {
        let out = run(&[]);
        // Proof it landed: the reverse patch must now apply.
        if out.status.success() && run(&["--check", "--reverse"]).status.success() {
            return;
        }
    }
    // Show which hunks are rejected: `--reject` applies what it can and writes `.rej` files.
    let out = run(&["--reject", "--verbose"]);
    let mut rejects = String::new();
    let mut rej_files = BTreeMap::new();
    collect_files(tree, tree, &mut rej_files);
    for (rel, path) in rej_files.iter().filter(|(r, _)| r.ends_with(".rej")) {
        rejects.push_str(&format!("--- {rel}\n{}\n", fs::read_to_string(path).unwrap_or_default()));
    }
    panic!(
        "patch {} does not apply to the llama.cpp tree:\n{}{}\nrejected hunks:\n{rejects}",
        patch.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build_with_cmake(tree: &Path, work: &Path, options: &BTreeMap<String, String>) -> PathBuf {
    let stamp = work.join("built.stamp");
    if stamp.exists() {
        return work.to_path_buf();
    }
    // Relative paths in the ccache key let one cache serve every build folder.
    env::set_var("CCACHE_BASEDIR", work);
    env::set_var("CCACHE_NOHASHDIR", "1");
    let mut cfg = cmake::Config::new(tree);
    cfg.out_dir(work).no_default_flags(true).profile("Release");
    for (k, v) in options {
        cfg.define(k, v);
    }
    if let Some(jobs) = var("NUM_JOBS") {
        env::set_var("CMAKE_BUILD_PARALLEL_LEVEL", jobs);
    }
    let install = cfg.build();
    fs::write(&stamp, b"").expect("writing the build stamp");
    install
}

/// `shim/kvtuner_common.cpp`: a C interface over the C++ of `common/`, compiled against the
/// patched tree (static, linked before llama-common).
fn build_shim(root: &Path, tree: &Path) {
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file(root.join("shim/kvtuner_common.cpp"))
        .include(root.join("shim"))
        .include(tree.join("common"))
        .include(tree.join("include"))
        .include(tree.join("ggml/include"))
        .include(tree.join("vendor"))
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        .compile("kvtuner_shim");
}

fn generate_bindings(root: &Path, tree: &Path) {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    let header = tree.join("include/llama.h");
    let gguf = tree.join("ggml/include/gguf.h");
    let rpc = tree.join("ggml/include/ggml-rpc.h");
    let shim = root.join("shim/kvtuner_common.h");
    let wrapper = format!(
        "#include \"{}\"\n#include \"{}\"\n#include \"{}\"\n#include \"{}\"\n",
        header.display(),
        gguf.display(),
        rpc.display(),
        shim.display()
    );
    let bindings = bindgen::Builder::default()
        .header_contents("kvtuner_wrapper.h", &wrapper)
        .clang_arg(format!("-I{}", tree.join("include").display()))
        .clang_arg(format!("-I{}", tree.join("ggml/include").display()))
        .allowlist_function("llama_.*|kvt_.*")
        .allowlist_function("gguf_.*")
        .allowlist_function(
            "ggml_type_name|ggml_type_size|ggml_blck_size|ggml_row_size|ggml_is_quantized|ggml_quantize_chunk",
        )
        .allowlist_function("ggml_backend_load_all|ggml_log_set")
        .allowlist_function("ggml_backend_rpc_start_server|ggml_backend_rpc_add_server|ggml_set_abort_callback")
        .allowlist_function("ggml_backend_reg_dev_count|ggml_backend_reg_dev_get|ggml_backend_dev_by_type")
        .allowlist_function("ggml_backend_dev_name|ggml_backend_dev_description|ggml_backend_dev_type")
        .allowlist_function("ggml_backend_dev_count|ggml_backend_dev_get")
        .allowlist_type("llama_.*|gguf_.*|kvt_.*|ggml_type|ggml_log_level|ggml_backend_dev_type")
        .allowlist_var("LLAMA_.*|GGUF_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .expect("bindgen on llama.h, gguf.h and ggml-rpc.h");
    let mut f = fs::File::create(&out).expect("creating bindings.rs");
    f.write_all(bindings.to_string().as_bytes()).expect("writing bindings.rs");
}

fn link(install: &Path) {
    let mut dirs = vec![install.join("lib"), install.join("lib64")];
    dirs.retain(|d| d.is_dir());
    for d in &dirs {
        println!("cargo:rustc-link-search=native={}", d.display());
    }
    let kind = if feature("dynamic-link") { "dylib" } else { "static" };
    // common/ before what it uses; as shared libraries, llama-common carries its static parts
    let mut libs = vec!["llama-common"];
    if !feature("dynamic-link") {
        for dir in ["build/common", "build/vendor/cpp-httplib"] {
            println!("cargo:rustc-link-search=native={}", install.join(dir).display());
        }
        libs.extend(["cpp-httplib", "llama-common-base"]);
    }
    libs.extend(["llama", "ggml", "ggml-cpu", "ggml-rpc"]);
    if feature("cuda") {
        libs.push("ggml-cuda");
    }
    libs.push("ggml-base");
    for lib in libs {
        println!("cargo:rustc-link-lib={kind}={lib}");
    }
    if feature("dynamic-link") {
        for d in &dirs {
            // A RUNPATH (not RPATH): LD_LIBRARY_PATH still wins, so a CUDA build can be swapped in.
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", d.display());
        }
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
        if feature("cuda") {
            let cuda = var("CUDA_PATH").unwrap_or_else(|| "/usr/local/cuda".into());
            println!("cargo:rustc-link-search=native={cuda}/lib64");
            println!("cargo:rustc-link-search=native={cuda}/lib64/stubs");
            for lib in ["cudart", "cublas", "cublasLt", "cuda"] {
                println!("cargo:rustc-link-lib=dylib={lib}");
            }
        }
    }
    println!("cargo:include={}", install.join("include").display());
}
