//! The saver's small HTTP surface: liveness, readiness and metrics.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::Context;
use crate::metrics::Live;

pub fn router(ctx: Context) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Context>) -> impl axum::response::IntoResponse {
    ctx.registry.exposition()
}

/// Ready while at least one slot consumes tasks and the broker answers a probe: a consumer
/// lives on until its connection's heartbeat fails, so the probe is what notices a stalled
/// broker within seconds.
async fn readyz(State(ctx): State<Context>) -> (StatusCode, &'static str) {
    if Live::get(&ctx.metrics.live.consumers) == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not consuming tasks (broker unavailable?)",
        )
    } else if !ctx.broker.is_ready().await {
        (StatusCode::SERVICE_UNAVAILABLE, "broker does not answer")
    } else {
        (StatusCode::OK, "ready")
    }
}
