//! Reading a request body within the gateway's memory budget.
//!
//! The token layer runs first (see [`crate::router`]), so nothing here happens for a request
//! without the token. Then a body is read only into bytes the budget grants: a declared
//! `Content-Length` is reserved whole before the first byte is read, and a body without one
//! reserves as it arrives. When the budget is spent the request is refused at once with 503
//! and `Retry-After`, instead of the gateway growing with every concurrent upload. What a
//! request reserved stays reserved until its answer is ready, because the decoded request and
//! its encoded tasks live that long too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use futures_util::StreamExt as _;

use crate::{ApiError, AppState};

/// Bytes of request bodies the gateway may hold at once.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    held: AtomicU64,
}

impl ByteBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: AtomicU64::new(0),
        })
    }

    /// Bytes held right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes `bytes` if they fit beside what is held; never waits.
    fn try_take(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Share {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl Share {
    pub(crate) fn take(budget: &Arc<ByteBudget>, bytes: u64) -> Option<Self> {
        budget.try_take(bytes).then(|| Self {
            budget: Arc::clone(budget),
            bytes,
        })
    }

    /// Grows the share to `bytes`, if the budget has them.
    fn grow_to(&mut self, bytes: u64) -> bool {
        let more = bytes.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        if self.budget.try_take(more) {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Middleware of `POST /v1/jobs`: reads the body within the budget, then hands it on.
pub async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    match buffer(&state, request).await {
        Ok((request, share)) => {
            let response = next.run(request).await;
            drop(share);
            response
        }
        Err(e) => {
            // The handler never ran, so it did not count this answer.
            state.metrics.request(e.status.as_u16(), started.elapsed());
            e.into_response()
        }
    }
}

/// Counts the answers of the token layer, which come before the handler.
pub async fn count_refusal(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    // Only the token layer answers 401 on this route.
    if response.status() == StatusCode::UNAUTHORIZED {
        state
            .metrics
            .request(response.status().as_u16(), started.elapsed());
    }
    response
}

async fn buffer(state: &AppState, request: Request) -> Result<(Request, Share), ApiError> {
    let max_body = state.config.max_body_bytes;
    let budget = &state.budget;
    let too_large = |what: &str| {
        ApiError::too_large(format!(
            "request body {what} larger than {max_body} bytes (--max-body-bytes)"
        ))
    };
    let busy = || {
        tracing::warn!(
            held = budget.held(),
            limit = budget.limit(),
            "request refused: the gateway holds as many request bytes as it may"
        );
        ApiError::busy(format!(
            "the gateway is reading or publishing {} bytes of other requests, its limit \
             (--max-inflight-bytes); nothing of this request was read, try again",
            budget.limit()
        ))
    };

    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large("is"));
    }
    if declared.is_some_and(|n| n > budget.limit()) {
        return Err(ApiError::too_large(format!(
            "request body is larger than {} bytes, all the gateway may hold at once \
             (--max-inflight-bytes)",
            budget.limit()
        )));
    }
    // A client that sent `Expect: 100-continue` waits for our go-ahead, so a refusal reaches
    // it before it sends the body. Any other is already sending: closing on it would reset the
    // connection and lose the answer, so its body is read and thrown away, holding nothing.
    let waits_for_go_ahead = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut chunks = body.into_data_stream();
    let Some(mut share) = Share::take(budget, declared.unwrap_or(0)) else {
        if !waits_for_go_ahead {
            discard(&mut chunks, max_body).await;
        }
        return Err(busy());
    };

    let capacity = usize::try_from(declared.unwrap_or(0)).unwrap_or(0);
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        let total = (buf.len() + chunk.len()) as u64;
        if total > max_body {
            return Err(too_large("is"));
        }
        if !share.grow_to(total) {
            drop(buf);
            discard(&mut chunks, max_body).await;
            return Err(busy());
        }
        buf.extend_from_slice(&chunk);
    }
    let body = Body::from(Bytes::from(buf));
    Ok((Request::from_parts(parts, body), share))
}

/// Reads the rest of a refused body without keeping it, up to `limit` bytes.
async fn discard(chunks: &mut axum::body::BodyDataStream, limit: u64) {
    let mut seen = 0u64;
    while let Some(Ok(chunk)) = chunks.next().await {
        seen += chunk.len() as u64;
        if seen > limit {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_fit_the_budget_and_come_back_when_dropped() {
        let budget = ByteBudget::new(100);
        let a = Share::take(&budget, 60).expect("fits");
        assert!(Share::take(&budget, 41).is_none());
        let mut b = Share::take(&budget, 30).expect("fits");
        assert!(!b.grow_to(41));
        assert!(b.grow_to(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        drop(b);
        assert_eq!(budget.held(), 0);
        assert!(Share::take(&budget, u64::MAX).is_none(), "no overflow");
    }
}
