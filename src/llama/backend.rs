//! Process-wide llama.cpp initialisation and log capture.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use super::sys;

/// Proof that `llama_backend_init` ran. Cheap to copy; get it with [`Backend::init`].
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    _private: (),
}

static INIT: OnceLock<()> = OnceLock::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
const RECENT_LINES: usize = 32;

/// Runtime warnings meant for the user, not for a failed call's error message: layers whose
/// K/V pair has no kernel on their device (patch 0007). They go to stderr even when the log is
/// quiet, each distinct line once per process (calibration creates hundreds of contexts). (An
/// embedded profile the runtime ignored is reported by kvtuner itself, with its reasons.)
const USER_WARNINGS: [&str; 1] = ["check_kv_pair_kernels: "];
static SHOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// Warnings and errors llama.cpp logged on this thread. Per thread, so that a call's error
    /// message carries its own lines even while other threads (parallel tests, a server's
    /// workers) load models and create contexts: llama.cpp logs on the calling thread.
    static RECENT: RefCell<VecDeque<String>> = const { RefCell::new(VecDeque::new()) };
}

impl Backend {
    /// Initialises llama.cpp once per process (later calls are free) and routes its log
    /// through kvtuner: quiet unless [`Backend::set_verbose`], warnings and errors kept for
    /// error messages.
    pub fn init() -> Backend {
        INIT.get_or_init(|| {
            // Safety: the callback is a plain function valid for the whole program; user data is unused.
            unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
            // Safety: called once, before any other llama.cpp call (guarded by the OnceLock).
            unsafe { sys::llama_backend_init() };
            // Safety: loads dynamically built backends (e.g. CUDA) if any; a no-op for static builds.
            unsafe { sys::ggml_backend_load_all() };
        });
        Backend { _private: () }
    }

    /// Echo llama.cpp's own log on stderr (kvtuner `-v`, or `KVTUNER_LOG=1`).
    pub fn set_verbose(on: bool) {
        VERBOSE.store(on, Ordering::Relaxed);
    }
}

/// The llama.cpp warnings and errors logged on this thread since the last call, oldest first;
/// used to explain a failed call (llama.cpp reports the reason only in its log).
pub(crate) fn take_recent_log() -> String {
    RECENT.with(|r| r.borrow_mut().drain(..).collect::<Vec<String>>().join("\n"))
}

/// `…: layers 0-3, 7: rest` → `…: layers …: rest` (patch 0007's warnings name the layers first).
fn without_layer_list(line: &str) -> String {
    match line.split_once("layers ") {
        Some((head, tail)) => match tail.split_once(": ") {
            Some((list, rest)) if list.chars().all(|c| c.is_ascii_digit() || matches!(c, ',' | '-' | ' ')) => {
                format!("{head}layers …: {rest}")
            }
            _ => line.to_string(),
        },
        None => line.to_string(),
    }
}

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // Safety: llama.cpp passes a NUL-terminated string valid for this call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    if VERBOSE.load(Ordering::Relaxed) || std::env::var_os("KVTUNER_LOG").is_some() {
        eprint!("{text}");
    }
    if level == sys::GGML_LOG_LEVEL_WARN || level == sys::GGML_LOG_LEVEL_ERROR {
        let line = text.trim_end().to_string();
        if line.is_empty() {
            return;
        }
        if USER_WARNINGS.iter().any(|p| line.starts_with(p)) {
            // once per cause: the same missing kernel for other layers (a calibration makes a
            // context per layer) is the same news
            let cause = without_layer_list(&line);
            let mut shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner());
            if !shown.contains(&cause) {
                if !VERBOSE.load(Ordering::Relaxed) && std::env::var_os("KVTUNER_LOG").is_none() {
                    eprintln!("warning (llama.cpp): {line}");
                }
                shown.push(cause);
            }
        }
        // try_with: a thread that is being torn down has no buffer left; its lines are dropped.
        let _ = RECENT.try_with(|r| {
            let mut recent = r.borrow_mut();
            if recent.len() == RECENT_LINES {
                recent.pop_front();
            }
            recent.push_back(line);
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_kernel_is_said_once_whatever_the_layers() {
        let a = "check_kv_pair_kernels: layers 0: CUDA0 has no decode kernel for K q4_0 / V f16";
        let b = "check_kv_pair_kernels: layers 3-5, 9: CUDA0 has no decode kernel for K q4_0 / V f16";
        assert_eq!(super::without_layer_list(a), super::without_layer_list(b));
        let c = "check_kv_pair_kernels: layers 0: CUDA0 has no decode kernel for K q8_0 / V f16";
        assert_ne!(super::without_layer_list(a), super::without_layer_list(c));
    }
}
