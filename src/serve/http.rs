//! The HTTP layer (axum): OpenAI's routes, server-sent events, bearer auth, body limits and
//! per-route response counts. Generation requests go to the engine through a bounded queue.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{ApiError, CompletionRequest, Endpoint, Responder, Usage};
use super::engine::{Event, GenRequest, Rejection};
use super::metrics::Metrics;

const PAGE: &str = include_str!("page.html");

pub struct AppState {
    pub queue: SyncSender<GenRequest>,
    pub metrics: Arc<Metrics>,
    /// The model's id in the API (`model` of requests, `/v1/models`).
    pub model_id: String,
    /// What `/props` shows: profile, per-layer types, KV bytes.
    pub props: Value,
    pub api_key: Option<String>,
    pub body_limit: usize,
    /// Longest wait for a request body (slow clients).
    pub body_timeout: Duration,
    pub serial: AtomicU64,
    /// False once the engine thread has stopped (then nothing can be answered).
    pub engine_alive: Arc<AtomicBool>,
    /// Origins whose pages may call the API from a browser (`--cors`; `*` = any); empty: none.
    pub cors: Vec<String>,
}

/// Serves connections until `signal`, then lets the requests in flight finish for at most the
/// drain timeout. HTTP/1.1 by hyper directly (not `axum::serve`) for its header read timeout:
/// a client that sends its headers slower than the body timeout is disconnected.
pub async fn serve_until_signal(
    listener: tokio::net::TcpListener,
    app: Router,
    options: &super::ServeOptions,
    signal: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(options.body_timeout);
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // out of file descriptors and the like: wait instead of spinning
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection: {e}");
                    }
                });
            }
            _ = &mut signal => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(options.drain_timeout) => {
            tracing::warn!("drain timeout: dropping the requests still running");
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/props", get(props))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { error(ApiError::new(404, "invalid_request_error", Some("not_found"), "no such route")) })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        // a span per request; RUST_LOG=tower_http=debug logs each with its status and time
        .layer(tower_http::trace::TraceLayer::new_for_http())
        // outermost: a browser's preflight (OPTIONS, no API key) is answered before auth
        .layer(cors_layer(&state.cors))
        .with_state(state)
}

/// Cross-origin access for browser clients served from other origins (`--cors`); with no
/// origins the layer adds no headers and browsers keep blocking cross-origin calls.
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<header::HeaderValue> =
            origins.iter().filter_map(|o| header::HeaderValue::from_str(o).ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(e.body())).into_response()
}

/// Every route but the health check and the page (which asks for the key itself) needs
/// `Authorization: Bearer KEY` when the server has one.
async fn auth(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let path = request.uri().path();
        if path != "/health" && path != "/" {
            let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if given.and_then(|g| g.strip_prefix("Bearer ")) != Some(key.as_str()) {
                return error(ApiError::new(
                    401,
                    "invalid_request_error",
                    Some("invalid_api_key"),
                    "missing or wrong API key (send `Authorization: Bearer KEY`)",
                ));
            }
        }
    }
    next.run(request).await
}

/// Counts responses by route and status for `/metrics`.
async fn count(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    let response = next.run(request).await;
    state.metrics.record_response(&route, response.status().as_u16());
    response
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine_alive.load(Ordering::Relaxed) {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        error(ApiError::new(503, "server_error", Some("engine_stopped"), "the engine thread has stopped"))
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn props(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(state.props.clone())
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "kvtuner",
            "kvtuner": state.props,
        }],
    }))
}

async fn chat(State(state): State<Arc<AppState>>, body: Body) -> Response {
    generate(state, Endpoint::Chat, body).await.unwrap_or_else(error)
}

async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    generate(state, Endpoint::Completions, body).await.unwrap_or_else(error)
}

async fn read_body(state: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, state.body_limit)).await {
        Err(_) => Err(ApiError::new(
            408,
            "invalid_request_error",
            Some("request_timeout"),
            format!("the request body did not arrive within {} s", state.body_timeout.as_secs()),
        )),
        Ok(Err(e)) => {
            let e = e.into_inner();
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(ApiError::new(
                    413,
                    "invalid_request_error",
                    Some("request_too_large"),
                    format!("the request body exceeds {} bytes", state.body_limit),
                ))
            } else {
                Err(ApiError::new(400, "invalid_request_error", Some("bad_body"), format!("reading the body: {e}")))
            }
        }
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

async fn generate(state: Arc<AppState>, endpoint: Endpoint, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body).await?;
    let request = CompletionRequest::parse(&bytes, endpoint)?;
    if request.model != state.model_id {
        return Err(ApiError {
            status: 404,
            message: format!("the model `{}` does not exist; this server has `{}`", request.model, state.model_id),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model".into()),
        });
    }
    let (tx, mut rx) = unbounded_channel();
    let job = GenRequest {
        prompt: request.prompt.clone(),
        max_tokens: request.max_tokens,
        sampling: request.sampling.clone(),
        stop: request.stop.clone(),
        ignore_eos: request.ignore_eos,
        events: tx,
    };
    state.metrics.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = state.queue.try_send(job) {
        state.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        let message = match e {
            TrySendError::Full(_) => "all slots are busy and the queue is full; retry shortly",
            TrySendError::Disconnected(_) => "the server is shutting down",
        };
        let mut response = error(ApiError::new(503, "server_error", Some("overloaded"), message));
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(response);
    }
    let (prompt_tokens, cached_tokens) = match rx.recv().await {
        Some(Event::Started { prompt_tokens, cached_tokens }) => (prompt_tokens, cached_tokens),
        Some(Event::Rejected(r)) => {
            let (code, param) = match &r {
                Rejection::PromptTooLong { field, .. } => ("context_length_exceeded", *field),
                Rejection::BadPrompt { field, .. } => ("invalid_value", *field),
            };
            return Err(ApiError {
                status: 400,
                message: r.to_string(),
                kind: "invalid_request_error",
                code: Some(code),
                param: Some(param.into()),
            });
        }
        _ => return Err(ApiError::new(503, "server_error", None, "the engine stopped")),
    };
    let responder = Responder::new(endpoint, &state.model_id, state.serial.fetch_add(1, Ordering::Relaxed));
    let usage = Usage { prompt_tokens, cached_tokens, completion_tokens: 0 };
    if request.stream {
        Ok(stream(rx, responder, usage, request.include_usage))
    } else {
        let mut text = String::new();
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done { finish_reason, completion_tokens, .. }) => {
                    let usage = Usage { completion_tokens, ..usage };
                    return Ok(Json(responder.complete(&text, finish_reason, usage)).into_response());
                }
                Some(Event::Failed(message)) => return Err(ApiError::new(500, "server_error", None, message)),
                _ => return Err(ApiError::new(500, "server_error", None, "the engine stopped mid-reply")),
            }
        }
    }
}

/// The reply as server-sent events: chunks, the finishing chunk, the usage chunk if asked, `[DONE]`.
fn stream(rx: UnboundedReceiver<Event>, responder: Responder, usage: Usage, include_usage: bool) -> Response {
    struct State {
        rx: UnboundedReceiver<Event>,
        responder: Responder,
        usage: Usage,
        include_usage: bool,
        out: VecDeque<SseEvent>,
        finished: bool,
    }
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut out = VecDeque::new();
    if responder.endpoint == Endpoint::Chat {
        out.push_back(data(responder.chunk("", true, None)));
    }
    let state = State { rx, responder, usage, include_usage, out, finished: false };
    let events = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.finished {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Text(t)) => s.out.push_back(data(s.responder.chunk(&t, false, None))),
                Some(Event::Done { finish_reason, completion_tokens, .. }) => {
                    s.usage.completion_tokens = completion_tokens;
                    s.out.push_back(data(s.responder.chunk("", false, Some(finish_reason))));
                    if s.include_usage {
                        s.out.push_back(data(s.responder.usage_chunk(s.usage)));
                    }
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.finished = true;
                }
                Some(Event::Failed(message)) => {
                    s.out.push_back(data(ApiError::new(500, "server_error", None, message).body()));
                    s.finished = true;
                }
                Some(Event::Started { .. } | Event::Rejected(_)) => {}
                None => {
                    let e = ApiError::new(500, "server_error", None, "the engine stopped mid-reply");
                    s.out.push_back(data(e.body()));
                    s.finished = true;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
