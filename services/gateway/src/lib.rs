//! The Luna Saver gateway: the one door for save requests.
//!
//! `POST /v1/jobs` validates everything a request can get wrong (400 with every problem),
//! splits it into one task per image, publishes `save_job_queued` and then each task with a
//! publisher confirm, and only then answers 202 with the job id. Pixels too large to travel
//! inline go through the claim-check blob store. When the broker is down or blocked the gateway
//! answers 503 within its timeout instead of hanging.
//!
//! Bounds: the token is checked before a byte of the body is read (the shared `luna-http`
//! layer), and request bodies share one byte budget (`--max-inflight-bytes`): a request beyond
//! it is answered 503 with `Retry-After` instead of growing the gateway. A full queue is a 429
//! (in process) or a 503 (the broker refuses), both with `Retry-After`.
//!
//! # Layout
//! - [`Config`]: flags and `LUNA_*` environment variables.
//! - [`router`]: the HTTP API, kept apart from [`run`] so tests drive it without a socket.
//! - [`error`]: `ApiError`, the JSON error answer that never leaks internals.
//! - `intake`: the body byte budget, read before the handler runs.
//! - [`handoff`]: pixels a client on this machine left in shared memory (`GET /v1/handoff`,
//!   `images[].handoff`), read before the answer and counted against the same budget.
//! - `metrics`: requests, jobs, published tasks and publish-confirm latency, served as
//!   Prometheus text on `GET /metrics`.
//!
//! Every `POST /v1/jobs` runs in a server span that continues the client's `traceparent`;
//! each task is published in a child `publish` span whose context travels with the task.

pub mod config;
pub mod error;
pub mod handoff;
mod intake;
mod jobs;
mod metrics;

use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware;
use axum::routing::{get, post};
use luna_http::BearerAuth;
use luna_job::SampleType;
use luna_queue::Broker;
use luna_store::BlobStore;
use luna_telemetry::Registry;
use tokio::net::TcpListener;

pub use config::{Config, HandoffArgs, HandoffDir};
pub use error::ApiError;

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub broker: Broker,
    pub config: Arc<Config>,
    pub blobs: Option<BlobStore>,
    /// What `/metrics` shows: the process registry, or a private one in tests.
    pub registry: Registry,
    metrics: Arc<metrics::Metrics>,
    /// Bytes of request bodies held at once (`--max-inflight-bytes`).
    budget: Arc<intake::ByteBudget>,
    /// The local hand-off directory; `None` with `--handoff-dir none`.
    pub handoff: Option<Arc<handoff::Handoff>>,
}

impl AppState {
    /// Builds the state; the broker connects lazily, so the gateway starts (and answers 503)
    /// while the broker is down.
    ///
    /// # Errors
    /// When the broker configuration is malformed.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let broker =
            Broker::new(config.broker.config()).context("configuring the broker connection")?;
        Ok(Self::with_broker(config, broker))
    }

    /// The state on a given broker handle: how `luna up` shares its in-process queue.
    pub fn with_broker(config: Config, broker: Broker) -> Self {
        let blobs = config.blob_dir.clone().map(BlobStore::new);
        let registry = Registry::shared();
        let handoff = handoff::Handoff::new(&config.handoff.setting()).map(Arc::new);
        Self {
            handoff,
            broker,
            budget: intake::ByteBudget::new(config.max_inflight_bytes),
            config: Arc::new(config),
            blobs,
            metrics: Arc::new(metrics::Metrics::new(&registry)),
            registry,
        }
    }
}

impl AppState {
    /// Bytes of request bodies held right now, against `--max-inflight-bytes`.
    pub fn inflight_bytes(&self) -> u64 {
        self.budget.held()
    }
}

/// The HTTP API. On `POST /v1/jobs` the token is checked first, from the headers alone; then
/// the body is read within the byte budget; then the handler runs.
pub fn router(state: AppState) -> Router {
    let body_limit = usize::try_from(state.config.max_body_bytes).unwrap_or(usize::MAX);
    let non_empty = |t: &Option<String>| t.clone().filter(|t| !t.is_empty());
    let token = non_empty(&state.config.token);
    let metrics_token = non_empty(&state.config.metrics_token);
    // The last layer added runs first.
    let submit = post(jobs::submit)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            intake::read_body,
        ))
        .layer(BearerAuth::new(token.as_deref()))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            intake::count_refusal,
        ));
    let handoff = get(handoff_info).layer(BearerAuth::new(token.as_deref()));
    let metrics = Router::new()
        .route("/metrics", get(metrics_text))
        .route_layer(BearerAuth::new(metrics_token.as_deref()));
    Router::new()
        .route("/v1/jobs", submit)
        .route("/v1/handoff", handoff)
        .merge(metrics)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn metrics_text(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    state.registry.exposition()
}

/// `GET /v1/handoff`: where a local client may leave pixels, or 404 `handoff_unavailable`.
async fn handoff_info(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let unavailable = |message: String| {
        let mut e = ApiError::handoff_unavailable(message);
        e.status = axum::http::StatusCode::NOT_FOUND;
        e
    };
    let Some(handoff) = state.handoff.clone() else {
        return Err(unavailable(handoff::HandoffError::Disabled.to_string()));
    };
    // The directory may have been removed since start-up (a logout's IPC clean-up, say).
    let checked = Arc::clone(&handoff);
    tokio::task::spawn_blocking(move || checked.ensure())
        .await
        .map_err(|e| unavailable(format!("hand-off directory check failed: {e}")))?
        .map_err(|e| {
            tracing::warn!(error = %e, "local hand-off directory not usable");
            unavailable(e.to_string())
        })?;
    let Some(dir) = handoff.dir().to_str() else {
        return Err(unavailable(format!(
            "the hand-off directory {} is not valid UTF-8",
            handoff.dir().display()
        )));
    };
    let sample_types: Vec<&str> = [SampleType::U8, SampleType::U16, SampleType::F32]
        .iter()
        .map(|t| t.as_str())
        .collect();
    Ok(axum::Json(serde_json::json!({
        "dir": dir,
        "boot_id": handoff.boot_id(),
        "sample_types": sample_types,
    })))
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if state.broker.is_ready().await {
        Ok("ready")
    } else {
        Err(ApiError::unavailable("broker unavailable"))
    }
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
///
/// Declares the broker topology first when the broker is reachable; when it is not, the
/// gateway still starts and keeps answering 503 until it is.
///
/// # Errors
/// When serving fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve(AppState::new(config)?, listener, shutdown).await
}

/// Serves `state` until `shutdown` resolves.
///
/// # Errors
/// When serving fails.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Err(e) = state.broker.declare_topology().await {
        tracing::warn!(error = %e, "broker not reachable at start-up; answering 503 until it is");
    }
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    tracing::info!(%addr, "gateway listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}
