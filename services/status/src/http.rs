//! HTTP routes: health probes, job state, and the WebSocket upgrade.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use luna_http::BearerAuth;
use luna_job::JobId;
use luna_queue::Broker;
use luna_telemetry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::table::JobView;
use crate::ws;

/// Largest message accepted from a WebSocket client. Clients have nothing to say beyond
/// control frames, so this only bounds what a misbehaving one can make the server buffer.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// What every handler shares; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    hub: Hub,
    broker: Broker,
    /// True while the event consumer holds a live subscription; `/readyz` reports it, because
    /// without one this instance silently misses events.
    subscribed: AtomicBool,
    token: Option<String>,
    /// Required on `/metrics` when set (scrapers get their own secret).
    metrics_token: Option<String>,
    /// Cancelled on shutdown, so open WebSockets close with "going away" instead of hanging.
    shutdown: CancellationToken,
    /// What `/metrics` shows: the process registry, or a private one in tests.
    registry: Registry,
    metrics: Metrics,
}

impl AppState {
    /// State for [`router`]. `token`, when set, is required on every route but the probes and
    /// `/metrics`; `metrics_token`, when set, is required on `/metrics`.
    pub fn new(
        hub: Hub,
        broker: Broker,
        token: Option<String>,
        metrics_token: Option<String>,
    ) -> Self {
        let registry = Registry::shared();
        let inner = Arc::new_cyclic(|me: &std::sync::Weak<Shared>| {
            // Weak: the gauge must not keep the state (and its hub) alive.
            let me = me.clone();
            let metrics = Metrics::new(&registry, move || {
                me.upgrade().map_or(0, |s| s.hub.job_count())
            });
            Shared {
                hub,
                broker,
                subscribed: AtomicBool::new(false),
                token,
                metrics_token,
                shutdown: CancellationToken::new(),
                registry,
                metrics,
            }
        });
        Self { inner }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Cancelled when the service shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub(crate) fn set_subscribed(&self, subscribed: bool) {
        self.inner.subscribed.store(subscribed, Ordering::Release);
    }

    fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Acquire)
    }
}

/// An error as clients see it: a status and `{"error": "<human-readable reason>"}`. Internal
/// details (broker errors and the like) go to the log, never into the body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "no job {0} is known here: it may be older than the job TTL, or was submitted before this status service started"
    )]
    UnknownJob(JobId),
    #[error("no such endpoint")]
    NoRoute,
    #[error("not ready: not subscribed to the broker's events")]
    NotReady,
    /// The request is not a usable WebSocket handshake.
    #[error("{message}")]
    Upgrade { status: StatusCode, message: String },
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnknownJob(_) | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upgrade { status, .. } => *status,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        (self.status(), body).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> Self {
        Self::Upgrade {
            status: rejection.status(),
            message: format!(
                "this endpoint serves WebSocket clients only: {}",
                rejection.body_text()
            ),
        }
    }
}

/// All routes. The probes are never behind the token, so orchestrators can call them without
/// holding a secret; they reveal nothing about jobs. `/metrics` needs the metrics token when
/// one is set.
pub fn router(state: AppState) -> Router {
    let token = BearerAuth::new(state.inner.token.as_deref());
    let api = Router::new()
        .route("/v1/jobs/{id}", get(get_job))
        .route_layer(token.clone());
    // Browsers cannot set headers on a WebSocket handshake, hence the query-parameter token
    // here and only here (URLs end up in logs more easily than headers do).
    let websocket = Router::new()
        .route("/ws", get(websocket))
        .route("/", get(websocket))
        .route_layer(token.or_query_token());
    let metrics = Router::new()
        .route("/metrics", get(metrics_text))
        .route_layer(BearerAuth::new(state.inner.metrics_token.as_deref()));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(metrics)
        .merge(api)
        .merge(websocket)
        .fallback(|| async { ApiError::NoRoute })
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    // Checked in this order so that the cheap flag answers without a broker round trip.
    if state.is_subscribed() && state.broker().is_ready().await {
        Ok(Json(serde_json::json!({ "status": "ready" })))
    } else {
        Err(ApiError::NotReady)
    }
}

async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = JobId::parse(&id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    state
        .hub()
        .job(&id, Instant::now())
        .map(Json)
        .ok_or(ApiError::UnknownJob(id))
}

#[derive(Debug, Deserialize)]
struct WsParams {
    /// Only this job's events, after a replay of those seen so far.
    job_id: Option<String>,
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    state.inner.registry.exposition().into_response()
}

async fn websocket(
    State(state): State<AppState>,
    params: Result<Query<WsParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let job_id = params
        .job_id
        .map(|id| JobId::parse(&id))
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("invalid job_id: {e}")))?;
    let upgrade = upgrade?;
    // Subscribe before answering the handshake: once the client sees 101, every later event
    // reaches it, even one published before the upgraded connection's task gets to run.
    let subscription = state.hub().subscribe(job_id, Instant::now());
    let shutdown = state.shutdown_token();
    Ok(upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| async move {
            let _counted = state.metrics().subscriber();
            ws::session(socket, subscription, shutdown).await;
        }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::{Body, to_bytes};
    use axum::http::{Request, header};
    use luna_job::{Event, EventKind};
    use luna_queue::AmqpConfig;
    use tower::ServiceExt;

    use super::*;
    use crate::table::JobTable;

    /// No broker needed: `Broker::new` connects lazily, and nothing here reaches it.
    fn state(token: Option<&str>) -> AppState {
        let broker = Broker::new(AmqpConfig::new("amqp://127.0.0.1:1/%2f", "router-test"))
            .expect("lazy broker");
        let hub = Hub::new(JobTable::new(Duration::from_secs(60), 10), 8);
        AppState::new(
            hub,
            broker,
            token.map(str::to_owned),
            Some("scrape".to_owned()),
        )
    }

    async fn call(
        state: &AppState,
        uri: &str,
        auth: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let mut request = Request::get(uri);
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let response = router(state.clone())
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    #[tokio::test]
    async fn healthz_is_always_ok_even_with_a_token() {
        let (status, _) = call(&state(Some("t")), "/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn readyz_is_503_until_subscribed() {
        let (status, body) = call(&state(None), "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("not ready"))
        );
    }

    #[tokio::test]
    async fn unknown_job_is_404_with_an_error() {
        let (status, body) = call(&state(None), "/v1/jobs/nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("nope")),
            "{body}"
        );
        let (status, body) = call(&state(None), "/v1/jobs/a%20b", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, body) = call(&state(None), "/nowhere", None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::NOT_FOUND, Some("no such endpoint"))
        );
    }

    #[tokio::test]
    async fn known_job_is_served_as_json() {
        let state = state(None);
        let job = JobId::parse("j1").expect("valid id");
        state.hub().publish(
            Event::now(job, EventKind::SaveJobQueued { num_images: 2 }),
            Instant::now(),
        );
        let (status, body) = call(&state, "/v1/jobs/j1", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["job_id"], "j1");
        assert_eq!(body["state"], "queued");
        assert_eq!(body["num_images"], 2);
        assert_eq!(body["images"][1]["outcome"], "pending");
        assert_eq!(body["events"][0]["event"], "save_job_queued");
    }

    #[tokio::test]
    async fn token_is_required_when_configured() {
        let state = state(Some("s3cret"));
        let (status, body) = call(&state, "/v1/jobs/j1", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body["error"].as_str().is_some_and(|e| e.contains("token")));
        let (status, _) = call(&state, "/v1/jobs/j1", Some("Bearer wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&state, "/v1/jobs/j1", Some("Bearer s3cret")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "authorised, then unknown");
        let (status, _) = call(&state, "/v1/jobs/j1?token=s3cret", None).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "query tokens are for WebSockets only"
        );

        for uri in ["/ws", "/", "/ws?token=wrong"] {
            let (status, _) = call(&state, uri, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
        }
        // Past the token check, a plain GET is refused as a non-WebSocket request.
        let (status, body) = call(&state, "/ws?token=s3cret", None).await;
        assert!(
            status.is_client_error() && status != StatusCode::UNAUTHORIZED,
            "{status}"
        );
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("WebSocket")),
            "{body}"
        );
    }

    #[tokio::test]
    async fn websocket_rejects_a_malformed_job_id() {
        let (status, body) = call(&state(None), "/ws?job_id=../x", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("job_id")),
            "{body}"
        );
    }

    #[tokio::test]
    async fn every_route_shares_one_auth_layer() {
        let state = state(Some("s3cret"));
        // The scheme in any letter case, for the API and the WebSocket handshake alike.
        let (status, _) = call(&state, "/v1/jobs/j1", Some("bEARER s3cret")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "authorised, then unknown");
        let (status, _) = call(&state, "/v1/jobs/j1", Some("Bearer s3cre")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "a prefix of the token");
        // `/metrics` takes its own token, not the API's.
        let (status, _) = call(&state, "/metrics", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&state, "/metrics", Some("Bearer s3cret")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&state, "/metrics", Some("bearer scrape")).await;
        assert_eq!(status, StatusCode::OK);
    }
}
