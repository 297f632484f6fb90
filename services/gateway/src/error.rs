//! The gateway's error answer: a status and `{"error": "<human-readable reason>"}` (plus a
//! machine-readable `code` where a client acts on the kind of error), with `Retry-After` when
//! trying again later can succeed.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// What a 503 asks for when its cause does not say better: long enough for a broker to come
/// back from a blip, short enough not to stall a client that could go on.
pub const RETRY_UNAVAILABLE: Duration = Duration::from_secs(2);

/// What a refusal for lack of room (a full queue, the body budget spent) asks for: room comes
/// back as soon as a save or an upload finishes.
pub const RETRY_BUSY: Duration = Duration::from_secs(1);

/// An error a client can act on. Internal details stay in the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds). Every 503 carries one, [`RETRY_UNAVAILABLE`]
    /// unless set.
    pub retry_after: Option<Duration>,
    /// Sent as `code` beside `error`, for the few refusals a client handles by itself.
    pub code: Option<&'static str>,
}

/// `code` of a hand-off the gateway cannot read here (disabled, or the file is not on its
/// machine): the client sends the same images inline instead.
pub const HANDOFF_UNAVAILABLE: &str = "handoff_unavailable";

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            code: None,
        }
    }

    /// 422 `handoff_unavailable`: send the pixels inline.
    pub fn handoff_unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, message);
        e.code = Some(HANDOFF_UNAVAILABLE);
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// 503: the broker (or the blob store) cannot take the job now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message).retry_after(RETRY_UNAVAILABLE)
    }

    /// 503: the gateway holds as many request bytes as it may (`--max-inflight-bytes`).
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message).retry_after(RETRY_BUSY)
    }

    /// 429: a bounded queue is full (`luna up`'s in-process queue).
    pub fn queue_full(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, message).retry_after(RETRY_BUSY)
    }

    #[must_use]
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.retry_after.or_else(|| {
            (self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_UNAVAILABLE)
        });
        let body = match self.code {
            Some(code) => serde_json::json!({ "error": self.message, "code": code }),
            None => serde_json::json!({ "error": self.message }),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(after) = retry_after {
            // Whole seconds, at least 1: `Retry-After: 0` would invite a tight retry loop.
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after(e: ApiError) -> Option<String> {
        e.into_response()
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    #[test]
    fn every_503_and_429_says_when_to_retry() {
        assert_eq!(
            retry_after(ApiError::unavailable("x")).as_deref(),
            Some("2")
        );
        assert_eq!(retry_after(ApiError::busy("x")).as_deref(), Some("1"));
        let full = ApiError::queue_full("x");
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry_after(full).as_deref(), Some("1"));
        // Even a 503 built by hand.
        let by_hand = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "x");
        assert_eq!(retry_after(by_hand).as_deref(), Some("2"));
        let rounded = ApiError::busy("x").retry_after(Duration::from_millis(1500));
        assert_eq!(retry_after(rounded).as_deref(), Some("2"));
        assert_eq!(retry_after(ApiError::bad_request("x")), None);
    }
}
