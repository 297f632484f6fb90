//! The saver's small HTTP surface: liveness, readiness and metrics.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::Context;

pub fn router(ctx: Context) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(ctx): State<Context>| async move { ctx.metrics.render() }),
        )
        .with_state(ctx)
}

/// Ready while at least one slot consumes tasks: that needs the broker and the task queue.
async fn readyz(State(ctx): State<Context>) -> (StatusCode, &'static str) {
    if ctx
        .metrics
        .consumers
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not consuming tasks (broker unavailable?)",
        )
    }
}
