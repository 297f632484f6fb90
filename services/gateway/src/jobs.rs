//! `POST /v1/jobs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::future::try_join_all;
use luna_job::codec::{from_json, from_msgpack, to_msgpack, to_msgpack_with_capacity};
use luna_job::{Event, EventKind, JobId, Limits, Problem, SaveRequest, SaveTask, ValidationError};
use luna_queue::{Headers, QueueError, TaskLabel};
use luna_store::Placement;
use luna_telemetry::propagation;
use serde::Serialize;
use tracing::Instrument as _;

use crate::handoff::{Handoff, HandoffError};
use crate::intake::Share;
use crate::{ApiError, AppState};

/// The 202 answer.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub job_id: String,
    pub num_images: usize,
    pub message: String,
}

/// `POST /v1/jobs` in its server span, continuing the client's trace when it sent one.
pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let started = Instant::now();
    // The client's trace context: the span's parent, and what travels on when spans are off.
    let trace = propagation::trace_headers(|k| headers.get(k)?.to_str().ok());
    let span = tracing::info_span!(
        "POST /v1/jobs",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/v1/jobs",
        url.path = "/v1/jobs",
        http.request.body.size = body.as_ref().map_or(0, Bytes::len),
        http.response.status_code = tracing::field::Empty,
        luna.job_id = tracing::field::Empty,
        luna.images = tracing::field::Empty,
    );
    propagation::set_parent(&span, &trace);
    let result = accept(&state, &headers, body, &trace)
        .instrument(span.clone())
        .await;
    let status = match &result {
        Ok((status, _)) => *status,
        Err(e) => {
            // Semantic conventions: a server span fails on 5xx; a 4xx is the client's error.
            if e.status.is_server_error() {
                luna_telemetry::record_error(&span, e.status.as_str(), &e.message);
            }
            e.status
        }
    };
    span.record("http.response.status_code", status.as_u16());
    state.metrics.request(status.as_u16(), started.elapsed());
    result
}

async fn accept(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    trace: &Headers,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let started = Instant::now();
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "request body is larger than {} bytes (--max-body-bytes)",
                state.config.max_body_bytes
            ))
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    let request = decode(headers, &body)?;
    drop(body);

    let limits = Limits {
        max_images: state.config.max_images,
    };
    request
        .validate(&limits)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    for (i, image) in request.images.iter().enumerate() {
        let pixels = u64::from(image.width) * u64::from(image.height);
        if pixels > state.config.max_pixels {
            return Err(ApiError::too_large(format!(
                "images[{i}] is {}x{} = {pixels} pixels; this gateway accepts at most {} (--max-pixels)",
                image.width, image.height, state.config.max_pixels
            )));
        }
    }

    // Hand-offs are read here, before any answer, so the client may reuse its files as soon
    // as it has one; what they hold counts against the byte budget until the answer is ready.
    let (request, _handoff_share) = resolve_pixels(state, request).await?;

    let key = idempotency_key(headers)?;
    let job_id = match key {
        Some(key) => {
            JobId::for_idempotency_key(key).map_err(|e| ApiError::bad_request(e.to_string()))?
        }
        None => JobId::new(),
    };
    let submitted_at = chrono::Local::now().fixed_offset();
    let mut tasks = request.into_tasks(&job_id, submitted_at);
    for task in &mut tasks {
        task.idempotent = key.is_some();
    }
    check_placements(&tasks)?;
    let num_images = tasks.len();
    let span = tracing::Span::current();
    span.record("luna.job_id", job_id.as_str());
    span.record("luna.images", num_images);

    let bodies = encode_tasks(state, tasks).await?;
    // One deadline bounds the whole hand-over, however many round trips it takes.
    let deadline = state.config.broker.broker_timeout;
    let sent = AtomicUsize::new(0);
    let published =
        tokio::time::timeout(deadline, publish_job(state, &job_id, bodies, trace, &sent))
            .await
            .unwrap_or(Err(QueueError::Timeout(deadline)));
    if let Err(e) = published {
        let outcome = Unpublished {
            job_id: &job_id,
            keyed: key.is_some(),
            sent: sent.load(Ordering::Relaxed),
            total: num_images,
        };
        return Err(outcome.answer(&e));
    }
    state.metrics.accepted();

    tracing::info!(
        %job_id,
        num_images,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "[Image Save] Job {job_id}: queued {num_images} images"
    );
    let message = format!(
        "[Luna Daemon Image Saver] Submitted {num_images} images to daemon. Job ID: {job_id}"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            job_id: job_id.to_string(),
            num_images,
            message,
        }),
    ))
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Publishes `save_job_queued`, then every task, counting in `sent` the tasks handed to the
/// broker and not refused by it (confirmed or not: an unconfirmed one may still be queued).
///
/// The queued event goes first: status then sees it before any outcome of the job, so a
/// subscriber always gets queued -> outcomes -> completed.
async fn publish_job(
    state: &AppState,
    job_id: &JobId,
    bodies: Vec<Outgoing>,
    trace: &Headers,
    sent: &AtomicUsize,
) -> Result<(), QueueError> {
    let queued = Event::now(
        job_id.clone(),
        EventKind::SaveJobQueued {
            num_images: count(bodies.len()),
        },
    );
    let publish_started = Instant::now();
    state.broker.publish_event(&queued, trace).await?;
    state
        .metrics
        .publish_took("event", publish_started.elapsed());
    let publishes = bodies.into_iter().map(|task| async move {
        let publish_started = Instant::now();
        sent.fetch_add(1, Ordering::Relaxed);
        let (format, published) = match task {
            Outgoing::Encoded(label, body) => (
                label.format,
                state.broker.publish_task_bytes(body, &label, trace).await,
            ),
            Outgoing::Typed(task) => (
                task.image.format,
                state.broker.publish_task(*task, trace).await,
            ),
        };
        if let Err(e) = published {
            // A refusal is certain: that task is not queued. A lost confirm may still be.
            if matches!(
                e,
                QueueError::Full { .. } | QueueError::Nacked | QueueError::Unroutable(_)
            ) {
                sent.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        state
            .metrics
            .publish_took("task", publish_started.elapsed());
        state.metrics.published(format.as_str());
        Ok::<_, QueueError>(())
    });
    try_join_all(publishes).await.map(drop)
}

/// A job whose tasks did not all reach the broker, and what the client may rely on.
struct Unpublished<'a> {
    job_id: &'a JobId,
    keyed: bool,
    /// Tasks handed to the broker before the failure: each may be queued and then saved.
    sent: usize,
    total: usize,
}

impl Unpublished<'_> {
    /// The 503, saying exactly what may have happened and how to retry safely.
    fn answer(&self, e: &QueueError) -> ApiError {
        let Self {
            job_id,
            keyed,
            sent,
            total,
        } = *self;
        tracing::warn!(%job_id, sent, total, error = %e, "publishing failed");
        let cause = if matches!(e, QueueError::Full { .. }) {
            format!("{e}; slow down and retry after Retry-After")
        } else {
            format!("the message broker is unavailable ({e})")
        };
        let message = match (keyed, sent) {
            (true, _) => format!(
                "{cause}; job {job_id}: {sent} of {total} images \
                 may already be queued and will then be saved. Retry with the same \
                 Idempotency-Key: the job keeps its id and no image is saved twice"
            ),
            (false, 0) => {
                format!("{cause}; nothing was queued, try again")
            }
            (false, _) => format!(
                "{cause}; job {job_id}: up to {sent} of \
                 {total} images may already be queued and will then be saved, and a retry \
                 makes a new job. Send an Idempotency-Key header to make retries safe"
            ),
        };
        if matches!(e, QueueError::Full { .. }) {
            ApiError::queue_full(message)
        } else {
            ApiError::unavailable(message)
        }
    }
}

/// The `Idempotency-Key` header, if sent.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    value
        .to_str()
        .map(Some)
        .map_err(|_| ApiError::bad_request(luna_job::id::InvalidIdempotencyKey.to_string()))
}

fn decode(headers: &HeaderMap, body: &[u8]) -> Result<SaveRequest, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let decoded = match mime.as_str() {
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            from_msgpack(body)
        }
        "application/json" => from_json(body),
        other => {
            let shown = if other.is_empty() { "none" } else { other };
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type {shown} is not supported; send application/msgpack or application/json"
                ),
            ));
        }
    };
    decoded.map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Brings every image's samples into the request in its format's sample type, so a task
/// carries the narrowest one (an 8-bit format travels as `u8` whatever the client sent): reads
/// each hand-off and narrows (or widens) inline samples. Returns the budget share that the
/// hand-off bytes hold.
async fn resolve_pixels(
    state: &AppState,
    request: SaveRequest,
) -> Result<(SaveRequest, Option<Share>), ApiError> {
    let needs_work = request
        .images
        .iter()
        .any(|i| i.handoff.is_some() || i.sample != i.format.sample_type());
    if !needs_work {
        return Ok((request, None));
    }
    let handoff_bytes: u64 = request
        .images
        .iter()
        .filter(|i| i.handoff.is_some())
        .map(|i| i.expected_len())
        .sum();
    let share = if handoff_bytes > 0 {
        if state.handoff.is_none() {
            return Err(ApiError::handoff_unavailable(
                HandoffError::Disabled.to_string(),
            ));
        }
        let Some(share) = Share::take(&state.budget, handoff_bytes) else {
            tracing::warn!(
                handoff_bytes,
                held = state.budget.held(),
                limit = state.budget.limit(),
                "hand-off refused: the gateway holds as many request bytes as it may"
            );
            return Err(ApiError::busy(format!(
                "the gateway is reading or publishing as many bytes as it may hold                  ({} bytes, --max-inflight-bytes); nothing of the hand-off was read, try again",
                state.budget.limit()
            )));
        };
        Some(share)
    } else {
        None
    };
    let handoff = state.handoff.clone();
    let request =
        tokio::task::spawn_blocking(move || resolve_blocking(handoff.as_deref(), request))
            .await
            .map_err(|e| internal(&e))??;
    Ok((request, share))
}

fn resolve_blocking(
    handoff: Option<&Handoff>,
    mut request: SaveRequest,
) -> Result<SaveRequest, ApiError> {
    for (i, image) in request.images.iter_mut().enumerate() {
        let to = image.format.sample_type();
        let count = u64::from(image.width) * u64::from(image.height) * u64::from(image.channels);
        if let Some(at) = image.handoff.take() {
            let pixels = handoff
                .ok_or(HandoffError::Disabled)
                .and_then(|h| h.read(&at.name, at.offset, count, image.sample, to))
                .map_err(|e| handoff_refusal(i, &e))?;
            image.pixels = pixels.into();
        } else if image.sample != to {
            let pixels = luna_imaging::samples::convert(image.pixels.as_slice(), image.sample, to)
                .map_err(|e| ApiError::bad_request(format!("images[{i}].pixels: {e}")))?;
            image.pixels = pixels.into();
        } else {
            continue;
        }
        image.sample = to;
    }
    Ok(request)
}

/// 422 `handoff_unavailable` when the client can send the pixels inline instead; 400 when
/// what it pointed at cannot be its image.
fn handoff_refusal(index: usize, e: &HandoffError) -> ApiError {
    let message = format!("images[{index}].handoff: {e}");
    match e {
        HandoffError::Io { .. } => {
            tracing::warn!(error = %e, index, "hand-off not readable");
            ApiError::bad_request(message)
        }
        e if e.is_unavailable() => ApiError::handoff_unavailable(message),
        _ => ApiError::bad_request(message),
    }
}

/// Renders every task's path now, so a bad template is a 400 and never a parked task.
fn check_placements(tasks: &[SaveTask]) -> Result<(), ApiError> {
    let mut problems: Vec<Problem> = Vec::new();
    for task in tasks {
        if let Err(e) = Placement::for_task(task) {
            let problem = e.to_problem(&format!("images[{}]", task.image_index));
            if !problems.contains(&problem) {
                problems.push(problem);
            }
        }
    }
    ValidationError::check(problems).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// A task ready for the broker.
#[derive(Debug)]
enum Outgoing {
    /// Encoded for RabbitMQ, its pixels moved to the blob store when over the inline limit.
    Encoded(TaskLabel, Vec<u8>),
    /// As built, for the in-process queue of `luna up`, which hands it to the saver as it is.
    Typed(Box<SaveTask>),
}

/// Bytes reserved beyond the pixels when a task is encoded.
const TASK_HEADROOM: usize = 64 << 10;

/// Makes each task ready for the broker: as it is for the in-process queue; else encoded,
/// with pixels of oversized ones moved to the blob store.
async fn encode_tasks(state: &AppState, tasks: Vec<SaveTask>) -> Result<Vec<Outgoing>, ApiError> {
    if state.broker.is_in_process() {
        return Ok(tasks
            .into_iter()
            .map(|task| Outgoing::Typed(Box::new(task)))
            .collect());
    }
    let limit = state.config.max_inline_bytes;
    let mut out = Vec::with_capacity(tasks.len());
    for mut task in tasks {
        let label = TaskLabel::of(&task);
        // The pixels and room for the rest (options, metadata, a ComfyUI workflow).
        let capacity = task.image.pixels.len() + TASK_HEADROOM;
        let mut body = to_msgpack_with_capacity(&task, capacity).map_err(|e| internal(&e))?;
        if body.len() as u64 > limit {
            let Some(blobs) = state.blobs.clone() else {
                return Err(ApiError::too_large(format!(
                    "images[{}] makes a {} byte task, over the {limit} byte inline limit; \
                     start the gateway and the savers with --blob-dir on shared storage to accept large frames",
                    task.image_index,
                    body.len()
                )));
            };
            drop(body);
            let pixels = std::mem::take(&mut task.image.pixels);
            let name = format!("{}-{}.pixels", task.job_id, task.image_index);
            let blob = tokio::task::spawn_blocking(move || blobs.put(&name, pixels.as_slice()))
                .await
                .map_err(|e| internal(&e))?
                .map_err(|e| {
                    tracing::error!(error = %e, "blob store write failed");
                    ApiError::unavailable(
                        "the blob store is not writable; nothing was saved, try again",
                    )
                })?;
            task.image.blob = Some(blob);
            body = to_msgpack(&task).map_err(|e| internal(&e))?;
        }
        out.push(Outgoing::Encoded(label, body));
    }
    Ok(out)
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "internal error");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the gateway log",
    )
}
