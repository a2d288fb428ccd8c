//! Empty: this crate exists only so its lock file pins the llama.cpp source.
