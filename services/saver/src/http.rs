//! The saver's small HTTP surface: liveness, readiness and metrics.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use luna_http::BearerAuth;

use crate::Context;
use crate::metrics::Live;

/// The probes are always open; `/metrics` needs `--metrics-token` when one is set.
pub fn router(ctx: Context) -> Router {
    let metrics_token = ctx
        .config
        .metrics_token
        .as_deref()
        .filter(|t| !t.is_empty());
    Router::new()
        .route("/metrics", get(metrics))
        .route_layer(BearerAuth::new(metrics_token))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, header};
    use luna_queue::Broker;
    use tower::ServiceExt as _;

    use super::*;
    use crate::Config;

    async fn status(ctx: &Context, uri: &str, auth: Option<&str>) -> StatusCode {
        let mut request = Request::get(uri);
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        router(ctx.clone())
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
            .status()
    }

    #[tokio::test]
    async fn metrics_need_the_metrics_token_when_one_is_set() {
        let open = Context::with_broker(Config::defaults(), Broker::in_process());
        assert_eq!(status(&open, "/metrics", None).await, StatusCode::OK);

        let mut config = Config::defaults();
        config.metrics_token = Some("scrape".into());
        let guarded = Context::with_broker(config, Broker::in_process());
        assert_eq!(
            status(&guarded, "/metrics", None).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(&guarded, "/metrics", Some("Bearer scrap")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(&guarded, "/metrics", Some("bearer scrape")).await,
            StatusCode::OK
        );
        assert_eq!(status(&guarded, "/healthz", None).await, StatusCode::OK);
    }
}
