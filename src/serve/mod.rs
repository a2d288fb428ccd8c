//! `kvtuner serve`: an OpenAI-compatible HTTP server. One engine thread owns the context (one
//! sequence per slot, continuous batching, `engine`); axum serves the API (`http`, shapes in
//! `api`) and Prometheus counters (`metrics`) on a tokio runtime; the model's cache profile is
//! applied by the runtime and shown by `/props`, `/v1/models`, the startup log and the page.

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod ollama;
pub mod prepare;
pub mod reply;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cache_type::CacheType;
use crate::chat::Template;
use crate::kv_layout::{RuntimeKv, Sizer};
use crate::llama::{Context, ContextParams, CreateContextError, LoadModelError, Model};

use engine::{Engine, EngineConfig};
use metrics::{KvAccounting, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Context(#[from] CreateContextError),
    #[error("sizing the f16 comparison: {0}")]
    Sizer(#[from] LoadModelError),
    #[error("listening on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("the HTTP server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the engine thread panicked")]
    EnginePanicked,
    #[error(transparent)]
    Template(#[from] crate::llama::TemplateError),
    #[error("the drain timeout cut {0} replies short")]
    DrainCut(usize),
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0 = any free port (the log says which).
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests that may wait for a slot before new ones get 503.
    pub queue: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Longest wait for a request body.
    pub body_timeout: Duration,
    /// After SIGINT/SIGTERM, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
    pub template: Option<String>,
    /// The applied profile, as the caller describes it (e.g. `name (embedded in the model)`).
    pub profile: String,
    /// Origins allowed to call the API from a browser (`*` = any).
    pub cors: Vec<String>,
}

/// The model's id in the API: its file name without `.gguf`.
pub fn model_id(model: &Model) -> String {
    let path = model.path();
    path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned())
}

/// What `/props` and the startup log say about the cache: the profile, every layer's types, and
/// the KV bytes the runtime allocated for all slots at full load against an f16 cache.
pub fn describe(ctx: &Context<'_>, profile: &str, queue: usize) -> Result<Value, ServeError> {
    let model = ctx.model();
    let infos = ctx.layers();
    let types: Vec<(CacheType, CacheType)> =
        infos.iter().map(|i| i.map_or((CacheType::F16, CacheType::F16), |i| (i.type_k, i.type_v))).collect();
    let runtime = RuntimeKv::of(ctx);
    let f16 = Sizer::new(model.path())?.kv_sequences(
        &vec![(CacheType::F16, CacheType::F16); types.len()],
        ctx.n_ctx(),
        ctx.n_seq_max(),
    )?;
    let layers: Vec<Value> = infos
        .iter()
        .enumerate()
        .map(|(il, info)| match info {
            Some(i) => json!({
                "layer": il, "k": i.type_k, "v": i.type_v, "sliding": i.is_swa, "cells": i.n_cells,
                // the recent window (patch 0014): positions kept also in the wider types, 0 = none
                "window": i.window, "window_sinks": i.window_sinks, "window_k": i.type_k_window, "window_v": i.type_v_window,
                // the key shift and scale (patches 0018/0019)
                "k_shifted": i.k_shifted, "k_scaled": i.k_scaled,
            }),
            None => json!({ "layer": il, "k": null, "v": null }),
        })
        .collect();
    Ok(json!({
        "model": model_id(model),
        "description": model.description(),
        "slots": ctx.n_seq_max(),
        "ctx_per_slot": ctx.n_ctx_seq(),
        "queue": queue,
        "profile": {
            "name": profile,
            "bits_per_value": runtime.bits_per_value(),
            "recent_window": recent_window(&infos),
            "type_k": types.iter().map(|t| t.0).collect::<Vec<_>>(),
            "type_v": types.iter().map(|t| t.1).collect::<Vec<_>>(),
            "layers": layers,
            "kv_bytes_full_load": runtime.tensor_bytes,
            "kv_buffer_bytes": runtime.buffer_bytes,
            "kv_bytes_f16": f16.tensor_bytes,
            "ratio_to_f16": runtime.tensor_bytes as f64 / f16.tensor_bytes.max(1) as f64,
        },
    }))
}

/// The recent window the layers keep (`{"positions", "k", "v", "layers"}`), or null for none.
fn recent_window(infos: &[Option<crate::llama::KvLayerInfo>]) -> Value {
    let with: Vec<(usize, &crate::llama::KvLayerInfo)> =
        infos.iter().enumerate().filter_map(|(il, i)| i.as_ref().filter(|i| i.window > 0).map(|i| (il, i))).collect();
    match with.first() {
        None => Value::Null,
        Some((_, i)) => json!({
            "positions": i.window,
            "sinks": i.window_sinks,
            "k": i.type_k_window,
            "v": i.type_v_window,
            "layers": with.iter().map(|(il, _)| il).collect::<Vec<_>>(),
            "bytes": with.iter().map(|(_, i)| i.bytes_window).sum::<u64>(),
        }),
    }
}

/// Serves `model` until SIGINT/SIGTERM, then lets in-flight requests finish (up to the drain
/// timeout). `params.n_seq_max` is the slot count, `params.n_ctx` the context of all slots.
pub fn serve(model: &Model, params: &ContextParams, options: &ServeOptions) -> Result<(), ServeError> {
    let ctx = Context::new(model, params)?;
    let props = describe(&ctx, &options.profile, options.queue)?;
    log_startup(&props);
    let metrics = Arc::new(Metrics::default());
    metrics.set_kv_allocated(KvAccounting::of(&ctx).allocated(ctx.n_seq_max() as usize));
    let template = Template::for_model(model, options.template.as_deref())?;
    if template.is_plain() && options.template.is_none() {
        tracing::info!("the model has no chat template: chat requests get a plain `User:`/`Assistant:` transcript");
    } else {
        tracing::info!("chat template: {}", template.describe());
    }
    let n_batch = params.n_batch.max(1) as usize;
    let engine = Engine::new(ctx, EngineConfig { n_batch }, metrics.clone());
    let (queue_tx, queue_rx) = std::sync::mpsc::sync_channel(options.queue);

    let addr = format!("{}:{}", options.host, options.port);
    let listener =
        std::net::TcpListener::bind(&addr).map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    listener.set_nonblocking(true)?;
    let local: SocketAddr = listener.local_addr()?;

    let ollama = ollama_model(model, &template);
    let state = Arc::new(http::AppState {
        queue: queue_tx,
        metrics,
        model_id: model_id(model),
        template,
        ollama,
        props,
        api_key: options.api_key.clone(),
        body_limit: options.body_limit,
        body_timeout: options.body_timeout,
        serial: AtomicU64::new(1),
        engine_alive: Arc::new(AtomicBool::new(true)),
        cors: options.cors.clone(),
        in_flight: AtomicUsize::new(0),
        cut: tokio::sync::watch::channel(false).0,
    });
    let alive = EngineAlive(state.engine_alive.clone());
    std::thread::scope(|scope| {
        let engine_thread = scope.spawn(move || {
            let _alive = alive;
            engine.run(queue_rx)
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let served = runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!("listening on http://{local}");
            Ok::<usize, std::io::Error>(http::serve_until_signal(listener, state, options, shutdown_signal()).await)
        });
        // dropping the runtime drops every handler, its channel and the queue's sender: the
        // engine frees their slots and stops
        drop(runtime);
        engine_thread.join().map_err(|_| ServeError::EnginePanicked)?;
        let cut = served.map_err(ServeError::Io)?;
        if cut > 0 {
            return Err(ServeError::DrainCut(cut));
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// The model as Ollama's `/api/tags` and `/api/show` describe one.
fn ollama_model(model: &Model, template: &Template) -> ollama::OllamaModel {
    let arch = model.meta("general.architecture").unwrap_or_default();
    let description = model.description();
    // llama.cpp's description: "<arch> <size> <file type>", e.g. "qwen2 1B Q4_K - Medium"
    let mut words = description.splitn(3, ' ');
    let (_, size_label, quantization) = (words.next(), words.next().unwrap_or(""), words.next().unwrap_or(""));
    let parameter_size = model.meta("general.size_label").unwrap_or_else(|| size_label.to_string());
    let (source, tools) = match template {
        Template::Chat { templates, .. } => (templates.source().to_string(), templates.caps().supports_tool_calls),
        Template::Plain => (String::new(), false),
    };
    let mut capabilities = vec!["completion"];
    if tools {
        capabilities.push("tools");
    }
    ollama::OllamaModel {
        details: json!({
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": parameter_size,
            "quantization_level": quantization,
        }),
        size: std::fs::metadata(model.path()).map_or(0, |m| m.len()),
        template: source,
        capabilities,
        model_info: json!({
            "general.architecture": arch,
            format!("{arch}.context_length"): model.n_ctx_train(),
            format!("{arch}.block_count"): model.n_layer(),
            format!("{arch}.embedding_length"): model.n_embd(),
        }),
        warned: Default::default(),
    }
}

/// Marks the engine stopped when its thread ends, by return or by panic.
struct EngineAlive(Arc<AtomicBool>);

impl Drop for EngineAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn log_startup(props: &Value) {
    let p = &props["profile"];
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
    tracing::info!(
        "profile: {} — {:.2} bits/value; KV {:.2} MiB for {} slots × {} tokens at full load (f16: {:.2} MiB, {:.2}×)",
        p["name"].as_str().unwrap_or("?"),
        p["bits_per_value"].as_f64().unwrap_or(0.0),
        mib(&p["kv_bytes_full_load"]),
        props["slots"],
        props["ctx_per_slot"],
        mib(&p["kv_bytes_f16"]),
        p["ratio_to_f16"].as_f64().unwrap_or(0.0),
    );
    let w = &p["recent_window"];
    if !w.is_null() {
        tracing::info!(
            "recent window: the last {} positions of each slot also in {}/{} on {} layers ({:.2} MiB, included above)",
            w["positions"],
            w["k"].as_str().unwrap_or("?"),
            w["v"].as_str().unwrap_or("?"),
            w["layers"].as_array().map_or(0, Vec::len),
            mib(&w["bytes"]),
        );
    }
    let per_layer: Vec<String> = p["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| match (l["k"].as_str(), l["v"].as_str()) {
                    (Some(k), Some(v)) => format!("{k}/{v}"),
                    _ => "-".into(),
                })
                .collect()
        })
        .unwrap_or_default();
    tracing::info!("K/V types per layer: {}", per_layer.join(" "));
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
