//! HTTP pieces every Luna Saver service shares.
//!
//! One bearer-token check for gateway, status and saver, as a tower layer, so the services
//! cannot drift apart again (they once disagreed on the letter case of `Bearer`).
//!
//! # Layout
//! - [`BearerAuth`]: the layer. Without a token it lets everything through; with one it answers
//!   `401` with `WWW-Authenticate: Bearer` and `{"error": ...}` to any request that lacks it.
//!   It runs before the inner service, so a refused request's body is never read.
//! - [`bearer_token`]: the token of an `Authorization` header, scheme in any letter case.
//! - [`constant_time_eq`]: the comparison, whose time tells nothing about the expected token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Json;
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use tower::{Layer, Service};

/// Requires `Authorization: Bearer <token>` (any letter case of `Bearer`) on every request of
/// the routes it wraps, when a token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
    /// Also accept `?token=<token>`: browsers cannot set headers on a WebSocket handshake.
    query: bool,
}

// By hand, so that logging a service's state never prints the token.
impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("query", &self.query)
            .finish()
    }
}

impl BearerAuth {
    /// Checks `token` when it is `Some`; lets every request through when it is `None`.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.as_bytes())),
            query: false,
        }
    }

    /// Also accepts the token as the `token` query parameter (for WebSocket handshakes only:
    /// URLs end up in logs more easily than headers do).
    #[must_use]
    pub fn or_query_token(mut self) -> Self {
        self.query = true;
        self
    }

    /// True when a request needs a token.
    pub fn is_required(&self) -> bool {
        self.token.is_some()
    }

    /// True when `request` may pass.
    pub fn allows(&self, request: &Request) -> bool {
        let Some(expected) = self.token.as_deref() else {
            return true;
        };
        if bearer_token(request.headers()).is_some_and(|t| constant_time_eq(t.as_bytes(), expected))
        {
            return true;
        }
        self.query
            && query_token(request.uri()).is_some_and(|t| constant_time_eq(t.as_bytes(), expected))
    }

    /// The `401` answer.
    pub fn unauthorized(&self) -> Response {
        let message = if self.query {
            "missing or wrong token: send `Authorization: Bearer <token>` (WebSocket clients may use `?token=<token>`)"
        } else {
            "missing or wrong token: send `Authorization: Bearer <token>`"
        };
        let mut response = (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({ "error": message })),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

impl<S> Layer<S> for BearerAuth {
    type Service = RequireBearer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireBearer {
            inner,
            auth: self.clone(),
        }
    }
}

/// The service [`BearerAuth`] wraps around another.
#[derive(Debug, Clone)]
pub struct RequireBearer<S> {
    inner: S,
    auth: BearerAuth,
}

impl<S> Service<Request> for RequireBearer<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if self.auth.allows(&request) {
            Either::Left(self.inner.call(request))
        } else {
            // Answered from the headers alone: the body stays unread, however large it claims
            // to be.
            Either::Right(ready(Ok(self.auth.unauthorized())))
        }
    }
}

/// The credentials of `Authorization: Bearer <token>`. The scheme is matched in any letter case
/// (RFC 7235, section 2.1); blanks around the token are ignored.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The `token` query parameter, percent-decoded.
fn query_token(uri: &axum::http::Uri) -> Option<String> {
    let Query(mut params) = Query::<HashMap<String, String>>::try_from_uri(uri).ok()?;
    params.remove("token")
}

/// Compares `given` with `expected` in time that depends only on the length of `expected`: it
/// neither stops at the first differing byte nor returns early when the lengths differ, so
/// response times tell an attacker nothing about how much of a guess was right, or how long
/// the token is.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    // Every byte of `expected` is visited whatever `given` is; a missing byte compares as 0,
    // and a length difference is folded into the result instead of being tested first.
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(g ^ e);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::routing::get;
    use tower::ServiceExt as _;

    use super::*;

    fn app(auth: BearerAuth) -> Router {
        Router::new()
            .route("/guarded", get(|| async { "in" }))
            .route_layer(auth)
            .route("/open", get(|| async { "open" }))
    }

    async fn call(app: &Router, uri: &str, auth: Option<&str>) -> (StatusCode, String) {
        let mut request = axum::http::Request::get(uri);
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                response.headers().get(header::WWW_AUTHENTICATE),
                Some(&HeaderValue::from_static("Bearer"))
            );
        }
        let body = to_bytes(response.into_body(), 1 << 16).await.expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_scheme_matches_in_any_letter_case() {
        let app = app(BearerAuth::new(Some("s3cret")));
        for header in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR  s3cret ",
        ] {
            assert_eq!(
                call(&app, "/guarded", Some(header)).await,
                (StatusCode::OK, "in".to_owned()),
                "{header:?}"
            );
        }
    }

    #[tokio::test]
    async fn missing_wrong_and_wrong_length_tokens_are_refused() {
        let app = app(BearerAuth::new(Some("s3cret")));
        for header in [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer s3cre"),
            Some("Bearer s3cret!"),
            Some("Bearer s3creT"),
            Some("Basic s3cret"),
            Some("s3cret"),
            Some("Bearers3cret"),
        ] {
            let (status, body) = call(&app, "/guarded", header).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{header:?}");
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
            assert!(
                json["error"].as_str().is_some_and(|e| e.contains("token")),
                "{body}"
            );
        }
        // Routes outside the layer stay open.
        assert_eq!(
            call(&app, "/open", None).await,
            (StatusCode::OK, "open".to_owned())
        );
    }

    #[tokio::test]
    async fn no_token_configured_lets_everything_through() {
        let auth = BearerAuth::new(None);
        assert!(!auth.is_required());
        let app = app(auth);
        assert_eq!(call(&app, "/guarded", None).await.0, StatusCode::OK);
        assert_eq!(
            call(&app, "/guarded", Some("Bearer anything")).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_metrics_token_guards_metrics_only_when_set() {
        // How every service wires its optional `--metrics-token`.
        let metrics = |token: Option<&str>| {
            Router::new()
                .route("/metrics", get(|| async { "luna_up 1" }))
                .route_layer(BearerAuth::new(token))
                .route("/healthz", get(|| async { "ok" }))
        };
        let open = metrics(None);
        assert_eq!(call(&open, "/metrics", None).await.0, StatusCode::OK);
        let guarded = metrics(Some("scrape"));
        assert_eq!(
            call(&guarded, "/metrics", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&guarded, "/metrics", Some("Bearer nope")).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&guarded, "/metrics", Some("bearer scrape")).await,
            (StatusCode::OK, "luna_up 1".to_owned())
        );
        assert_eq!(call(&guarded, "/healthz", None).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn query_tokens_only_where_allowed() {
        let header_only = app(BearerAuth::new(Some("s3cret")));
        assert_eq!(
            call(&header_only, "/guarded?token=s3cret", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        let with_query = app(BearerAuth::new(Some("s3cret")).or_query_token());
        assert_eq!(
            call(&with_query, "/guarded?job_id=j&token=s3cret", None)
                .await
                .0,
            StatusCode::OK
        );
        let (status, body) = call(&with_query, "/guarded?token=s3cre", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("?token="), "{body}");
        let odd = app(BearerAuth::new(Some("a+b/c=")).or_query_token());
        assert_eq!(
            call(&odd, "/guarded?token=a%2Bb%2Fc%3D", None).await.0,
            StatusCode::OK
        );
    }

    #[test]
    fn constant_time_eq_compares_whole_tokens_of_any_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        // A prefix padded with the zero bytes a short guess is compared as.
        assert!(!constant_time_eq(b"ab\0", b"ab"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn debug_hides_the_token() {
        let shown = format!("{:?}", BearerAuth::new(Some("s3cret")));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
