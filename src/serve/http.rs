//! The HTTP layer (axum): OpenAI's routes, server-sent events, bearer auth, body limits and
//! per-route response counts. Generation requests go to the engine through a bounded queue.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

use crate::chat::Template;

use super::api::{ApiError, CompletionRequest, Endpoint, ReplyMessage, Responder, Usage};
use super::engine::{Event, FinishReason, GenRequest, Rejection, TokenLogprob};
use super::metrics::Metrics;
use super::ollama;
use super::prepare::prepare;
use super::reply::{ReplyAssembler, ReplyDelta};

const PAGE: &str = include_str!("page.html");

pub struct AppState {
    pub queue: SyncSender<GenRequest>,
    pub metrics: Arc<Metrics>,
    /// The model's id in the API (`/v1/models`, the `model` of replies).
    pub model_id: String,
    /// How chat requests become prompts.
    pub template: Template,
    /// The model as Ollama's API describes it.
    pub ollama: super::ollama::OllamaModel,
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
    /// Requests being answered.
    pub in_flight: AtomicUsize,
    /// Set when the drain timeout passes: replies still running end with an error.
    pub cut: tokio::sync::watch::Sender<bool>,
}

/// Serves connections until `signal`, then lets the requests in flight finish for at most the
/// drain timeout; returns how many replies the timeout cut (each got an error first). HTTP/1.1
/// by hyper directly (not `axum::serve`) for its header read timeout: a client that sends its
/// headers slower than the body timeout is disconnected.
pub async fn serve_until_signal(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    options: &super::ServeOptions,
    signal: impl std::future::Future<Output = ()>,
) -> usize {
    let app = router(state.clone());
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
    let mut shutdown = std::pin::pin!(graceful.shutdown());
    tokio::select! {
        _ = &mut shutdown => 0,
        _ = tokio::time::sleep(options.drain_timeout) => {
            let cut = state.in_flight.load(Ordering::Relaxed);
            tracing::warn!("drain timeout: cutting the {cut} replies still running (each gets an error)");
            let _ = state.cut.send(true);
            // let the handlers send their error and close
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut shutdown).await;
            cut
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
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::not_served))
        .route("/api/embeddings", post(ollama::not_served))
        .route("/api/pull", post(ollama::not_served))
        .route("/api/push", post(ollama::not_served))
        .route("/api/create", post(ollama::not_served))
        .route("/api/copy", post(ollama::not_served))
        .route("/api/delete", axum::routing::delete(ollama::not_served))
        .fallback(|| async { error(ApiError::new(404, "invalid_request_error", Some("not_found"), "no such route")) })
        .method_not_allowed_fallback(|request: Request| async move {
            error(ApiError::new(
                405,
                "invalid_request_error",
                Some("method_not_allowed"),
                format!("{} is not allowed on {}", request.method(), request.uri().path()),
            ))
        })
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
    let mut response = (status, Json(e.body())).into_response();
    if e.code == Some("overloaded") {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
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

pub async fn read_body(state: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
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

/// Counts a request in flight until dropped (the drain reports how many it cut).
pub struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(state: &Arc<AppState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a reply stream yields to its handler: events, or the drain cutting it.
pub enum Step {
    Event(Event),
    Cut,
    EngineGone,
}

/// The next engine event, unless the drain timeout cuts the reply first.
pub async fn next_event(rx: &mut UnboundedReceiver<Event>, cut: &mut tokio::sync::watch::Receiver<bool>) -> Step {
    if *cut.borrow() {
        return Step::Cut;
    }
    tokio::select! {
        e = rx.recv() => e.map_or(Step::EngineGone, Step::Event),
        _ = cut.changed() => Step::Cut,
    }
}

/// The error a reply cut by the drain timeout gets.
pub fn cut_error() -> ApiError {
    ApiError::new(
        503,
        "server_error",
        Some("shutting_down"),
        "the server is shutting down and its drain timeout cut this reply",
    )
}

/// A request sent to the engine: the prepared prompt and sampling, and the reply's first news.
pub struct Submitted {
    pub rx: UnboundedReceiver<Event>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub parser: Option<crate::llama::ChatParser>,
    pub guard: InFlight,
}

/// Renders, queues and waits for the engine to start `request` (shared by OpenAI's and
/// Ollama's routes). A full queue is 503 `overloaded` (sent with Retry-After).
pub async fn submit(state: &Arc<AppState>, request: &CompletionRequest) -> Result<Submitted, ApiError> {
    let prepared = prepare(&state.template, request)?;
    let (tx, mut rx) = unbounded_channel();
    let job = GenRequest {
        prompt: prepared.prompt,
        max_tokens: request.max_tokens,
        sampler: prepared.sampler,
        preserved_tokens: prepared.preserved_tokens,
        grammar_field: prepared.grammar_field,
        stop: prepared.stop,
        ignore_eos: request.ignore_eos,
        logprobs: request.logprobs,
        cache_prompt: request.cache_prompt && !request.fixed_seed,
        events: tx,
    };
    let guard = InFlight::new(state);
    state.metrics.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = state.queue.try_send(job) {
        state.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        let message = match e {
            TrySendError::Full(_) => "all slots are busy and the queue is full; retry shortly",
            TrySendError::Disconnected(_) => "the server is shutting down",
        };
        return Err(ApiError::new(503, "server_error", Some("overloaded"), message));
    }
    match rx.recv().await {
        Some(Event::Started { prompt_tokens, cached_tokens }) => {
            Ok(Submitted { rx, prompt_tokens, cached_tokens, parser: prepared.parser, guard })
        }
        Some(Event::Rejected(r)) => {
            let (code, param) = match &r {
                Rejection::PromptTooLong { field, .. } => ("context_length_exceeded", *field),
                Rejection::BadPrompt { field, .. } | Rejection::BadGrammar { field, .. } => ("invalid_value", *field),
            };
            Err(ApiError {
                status: 400,
                message: r.to_string(),
                kind: "invalid_request_error",
                code: Some(code),
                param: Some(param.into()),
            })
        }
        _ => Err(ApiError::new(503, "server_error", None, "the engine stopped")),
    }
}

async fn generate(state: Arc<AppState>, endpoint: Endpoint, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body).await?;
    // any model name is accepted while one model is served (as llama-server does); replies
    // name the served one
    let request = CompletionRequest::parse(&bytes, endpoint)?;
    let submitted = submit(&state, &request).await?;
    let responder = Responder::new(endpoint, &state.model_id, state.serial.fetch_add(1, Ordering::Relaxed));
    let usage =
        Usage { prompt_tokens: submitted.prompt_tokens, cached_tokens: submitted.cached_tokens, completion_tokens: 0 };
    let cut = state.cut.subscribe();
    if request.stream {
        return Ok(stream(submitted, responder, usage, request.include_usage, cut));
    }
    let Submitted { mut rx, parser, guard: _guard, .. } = submitted;
    let mut cut = cut;
    let mut assembler = ReplyAssembler::new(parser);
    let mut logprobs = Vec::new();
    loop {
        match next_event(&mut rx, &mut cut).await {
            Step::Event(Event::Text(t)) => assembler.append(&t),
            Step::Event(Event::Logprob(l)) => logprobs.push(l),
            Step::Event(Event::Done { finish_reason, completion_tokens, .. }) => {
                let (_, message) = assembler.finish();
                let finish = finish_with_calls(finish_reason, &message);
                let usage = Usage { completion_tokens, ..usage };
                let logprobs = request.logprobs.map(|_| logprobs.as_slice());
                return Ok(Json(responder.complete(&message, finish, usage, logprobs)).into_response());
            }
            Step::Event(Event::Failed(message)) => return Err(ApiError::new(500, "server_error", None, message)),
            Step::Cut => return Err(cut_error()),
            _ => return Err(ApiError::new(500, "server_error", None, "the engine stopped mid-reply")),
        }
    }
}

/// A reply that made tool calls finishes with `tool_calls` (OpenAI's reason), unless cut by length.
pub fn finish_with_calls(finish: FinishReason, message: &ReplyMessage) -> FinishReason {
    if finish == FinishReason::Stop && !message.tool_calls.is_empty() {
        FinishReason::ToolCalls
    } else {
        finish
    }
}

/// The reply as server-sent events: chunks, the finishing chunk, the usage chunk if asked, `[DONE]`.
fn stream(
    submitted: Submitted,
    responder: Responder,
    usage: Usage,
    include_usage: bool,
    cut: tokio::sync::watch::Receiver<bool>,
) -> Response {
    struct State {
        rx: UnboundedReceiver<Event>,
        cut: tokio::sync::watch::Receiver<bool>,
        responder: Responder,
        usage: Usage,
        include_usage: bool,
        assembler: ReplyAssembler,
        /// Log-probabilities not sent yet (they go with the next chunk).
        logprobs: Vec<TokenLogprob>,
        out: VecDeque<SseEvent>,
        finished: bool,
        _guard: InFlight,
    }
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut out = VecDeque::new();
    if responder.endpoint == Endpoint::Chat {
        out.push_back(data(responder.delta_chunk(json!({ "role": "assistant", "content": "" }), None, None)));
    }
    let Submitted { rx, parser, guard, .. } = submitted;
    let state = State {
        rx,
        cut,
        responder,
        usage,
        include_usage,
        assembler: ReplyAssembler::new(parser),
        logprobs: Vec::new(),
        out,
        finished: false,
        _guard: guard,
    };
    // one chunk for a delta (chat) or a text piece (completions), with the pending logprobs
    fn piece(s: &mut State, delta: &ReplyDelta, text: &str, finish: Option<FinishReason>) -> Option<Value> {
        let logprobs = if s.logprobs.is_empty() { None } else { Some(std::mem::take(&mut s.logprobs)) };
        match s.responder.endpoint {
            Endpoint::Chat if !delta.is_empty() || finish.is_some() => {
                Some(s.responder.delta_chunk(delta.openai(), finish, logprobs.as_deref()))
            }
            Endpoint::Completions if !text.is_empty() || finish.is_some() => {
                Some(s.responder.text_chunk(text, finish, logprobs.as_deref()))
            }
            _ => {
                // nothing to show yet: keep the logprobs for the next chunk
                s.logprobs = logprobs.unwrap_or_default();
                None
            }
        }
    }
    let events = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.finished {
                return None;
            }
            match next_event(&mut s.rx, &mut s.cut).await {
                Step::Event(Event::Text(t)) => {
                    let delta = s.assembler.push(&t);
                    if let Some(chunk) = piece(&mut s, &delta, &t, None) {
                        s.out.push_back(data(chunk));
                    }
                }
                Step::Event(Event::Logprob(l)) => s.logprobs.push(l),
                Step::Event(Event::Done { finish_reason, completion_tokens, .. }) => {
                    s.usage.completion_tokens = completion_tokens;
                    let (delta, message) = s.assembler.finish();
                    if let Some(chunk) = piece(&mut s, &delta, &delta.content, None) {
                        s.out.push_back(data(chunk));
                    }
                    let finish = finish_with_calls(finish_reason, &message);
                    if let Some(chunk) = piece(&mut s, &ReplyDelta::default(), "", Some(finish)) {
                        s.out.push_back(data(chunk));
                    }
                    if s.include_usage {
                        s.out.push_back(data(s.responder.usage_chunk(s.usage)));
                    }
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.finished = true;
                }
                Step::Event(Event::Failed(message)) => {
                    s.out.push_back(data(ApiError::new(500, "server_error", None, message).body()));
                    s.finished = true;
                }
                Step::Event(Event::Started { .. } | Event::Rejected(_)) => {}
                Step::Cut => {
                    s.out.push_back(data(cut_error().body()));
                    s.finished = true;
                }
                Step::EngineGone => {
                    let e = ApiError::new(500, "server_error", None, "the engine stopped mid-reply");
                    s.out.push_back(data(e.body()));
                    s.finished = true;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
