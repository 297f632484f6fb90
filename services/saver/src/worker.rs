//! One delivery, start to finish.
//!
//! The order is what makes "nothing lost, nothing written twice" hold:
//! 1. undecodable or invalid tasks are parked at once with the reason (retrying cannot help);
//! 2. the file is written durably (idempotently, so a redelivery finds it instead of writing
//!    a second one);
//! 3. the outcome event is published and confirmed;
//! 4. only then is the task acknowledged.
//!
//! Transient failures (disk full, permissions, a blob not visible yet) are retried here with
//! backoff, each reported as `image_failed` with `final: false`; the last attempt parks the task
//! and reports `final: true`. What happens to a delivery is decided by [`crate::settle`]: a task
//! whose saver stopped while holding it is queued again with its count of unfinished attempts
//! and then saved in an isolated child process, so a task that crashes savers is parked with the
//! reason and one whose savers were preempted is not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use luna_job::{Event, EventKind, JobId, SaveTask};
use luna_queue::topology::TASK_ROUTING_KEY;
use luna_queue::{Delivery, Headers, QueueError};
use luna_store::{Outcome, Timings, save_task_timed};

use crate::isolate::{self, Failure};
use crate::settle::{self, Admission, Attempt, Settle};
use luna_telemetry::propagation;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

use crate::Context;

/// Handles one delivery and settles it, in a `process` consumer span that continues the
/// producer's trace from the message headers.
pub async fn handle(ctx: &Context, delivery: Delivery) {
    let headers = delivery.headers();
    let span = tracing::info_span!(
        "process",
        otel.kind = "consumer",
        messaging.system = ctx.broker.system(),
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = ctx.broker.tasks_destination(),
        messaging.destination.subscription.name = ctx.broker.task_queue(),
        messaging.rabbitmq.destination.routing_key = TASK_ROUTING_KEY,
        messaging.message.id = delivery.message_id(),
        messaging.message.body.size = delivery.body_len(),
        luna.attempt = delivery.delivery_count() + 1,
        luna.worker = &*ctx.worker_id,
        luna.job_id = Empty,
        luna.image.index = Empty,
        luna.image.format = Empty,
        luna.image.bytes = Empty,
        luna.outcome = Empty,
    );
    propagation::set_parent(&span, &headers);
    process(ctx, delivery, headers, &span)
        .instrument(span.clone())
        .await;
}

async fn process(ctx: &Context, delivery: Delivery, headers: Headers, span: &Span) {
    let policy = ctx.config.policy();
    let previous = headers
        .get(settle::DELIVERIES_HEADER)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let (task, isolated) = match start(&delivery, previous, &policy, span) {
        Start::Run { task, isolated } => (task, isolated),
        Start::Republish { task, deliveries } => {
            return republish(ctx, delivery, &task, &headers, deliveries).await;
        }
        Start::End {
            task,
            format,
            settle,
        } => {
            let attempt = previous + 1;
            return finish(
                ctx,
                span,
                delivery,
                task.as_deref(),
                format,
                attempt,
                settle,
                &headers,
            )
            .await;
        }
    };
    let job_id = task.job_id.clone();
    let index = task.image_index;
    let format = task.image.format.as_str();
    if isolated {
        tracing::info!(%job_id, index, previous, "redelivered task: saving it in an isolated process");
    }

    let started = Instant::now();
    let mut attempt = previous + 1;
    loop {
        let (outcome, crash) = if isolated {
            match isolate::save_isolated(ctx, &delivery.body()).await {
                Ok(report) => (Some(report.into_result()), None),
                Err(detail) => (None, Some(detail)),
            }
        } else {
            match save_here(ctx, &task, span).await {
                Ok((result, timings)) => {
                    ctx.metrics
                        .timings(format, task.options.quality_gate.as_str(), &timings);
                    (Some(result.map_err(|e| Failure::from(&e))), None)
                }
                Err(panic) => (None, Some(panic)),
            }
        };
        let settle = match (&outcome, &crash) {
            (_, Some(detail)) => {
                tracing::error!(%job_id, index, isolated, detail, "save crashed");
                settle::settle(&Attempt::Crashed { isolated, detail }, attempt, &policy)
            }
            (Some(Ok(outcome)), None) => {
                let elapsed = started.elapsed();
                let event = outcome_event(ctx, &task, outcome, elapsed);
                let confirmed = match publish_event(ctx, &event, &headers).await {
                    Ok(()) => true,
                    Err(e) => {
                        // The file is durable; without a confirmed event the task must come
                        // back, and the redelivery will find the file instead of writing another.
                        tracing::warn!(%job_id, index, error = %e, "event not confirmed; task goes back to the queue");
                        false
                    }
                };
                if confirmed {
                    log_outcome(&job_id, index, outcome, elapsed);
                    count_outcome(ctx, span, &task, outcome);
                }
                settle::settle(&Attempt::Done { confirmed }, attempt, &policy)
            }
            (Some(Err(failure)), None) => {
                let attempt_of = Attempt::Failed {
                    transient: failure.transient,
                    kind: failure.kind,
                    reason: &failure.reason,
                };
                settle::settle(&attempt_of, attempt, &policy)
            }
            (None, None) => Settle::Requeue,
        };
        if let Settle::RetryAfter(wait) = settle {
            if let Some(Err(failure)) = &outcome {
                tracing::warn!(%job_id, index, attempt, ?wait, error = %failure.reason, "[Image Save] Job {job_id}: image {index} failed, retrying");
                ctx.metrics.retried(format);
                report_failure(ctx, &task, &failure.reason, attempt, false, &headers).await;
            }
            tokio::time::sleep(settle::jittered(wait, settle::random_unit())).await;
            attempt += 1;
            continue;
        }
        return finish(
            ctx,
            span,
            delivery,
            Some(&task),
            format,
            attempt,
            settle,
            &headers,
        )
        .await;
    }
}

/// How a delivery begins, before any saving.
enum Start {
    /// Save it, here or in an isolated child process.
    Run { task: Arc<SaveTask>, isolated: bool },
    /// Queue it again with its count of unfinished attempts.
    Republish {
        task: Arc<SaveTask>,
        deliveries: u32,
    },
    /// Settle it at once (undecodable, invalid, or too many unfinished attempts).
    End {
        task: Option<Arc<SaveTask>>,
        format: &'static str,
        settle: Settle,
    },
}

/// Decodes and validates the delivery and admits it, recording the task on the span.
fn start(delivery: &Delivery, previous: u32, policy: &settle::Policy, span: &Span) -> Start {
    let task = match delivery.task() {
        Ok(task) => task,
        Err(e) => {
            let reason = e.to_string();
            let settle = settle::settle(&Attempt::Undecodable { reason: &reason }, 1, policy);
            return Start::End {
                task: None,
                format: "unknown",
                settle,
            };
        }
    };
    let format = task.image.format.as_str();
    span.record("luna.job_id", task.job_id.as_str());
    span.record("luna.image.index", task.image_index);
    span.record("luna.image.format", format);
    if let Err(e) = task.validate() {
        let reason = e.to_string();
        let settle = settle::settle(&Attempt::Invalid { reason: &reason }, 1, policy);
        return Start::End {
            task: Some(task),
            format,
            settle,
        };
    }
    match settle::admit(previous, delivery.delivery_count() > 0, policy) {
        Admission::Republish { deliveries } => Start::Republish { task, deliveries },
        Admission::InProcess => Start::Run {
            task,
            isolated: false,
        },
        Admission::Isolated => Start::Run {
            task,
            isolated: true,
        },
        Admission::GiveUp { reason } => Start::End {
            task: Some(task),
            format,
            settle: Settle::Park {
                reason,
                kind: "redelivery_limit",
            },
        },
    }
}

/// Publishes a redelivered task anew with `deliveries` unfinished attempts, then acknowledges
/// the old copy: the new one is confirmed first, so a crash in between leaves two copies (the
/// store makes the second find the first's file), never none.
async fn republish(
    ctx: &Context,
    delivery: Delivery,
    task: &SaveTask,
    headers: &Headers,
    deliveries: u32,
) {
    let mut headers: Headers = headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("x-delivery")
                && !k.starts_with("x-death")
                && !k.starts_with("x-first-death")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.insert(settle::DELIVERIES_HEADER.to_owned(), deliveries.to_string());
    let label = luna_queue::TaskLabel::of(task);
    match ctx
        .broker
        .publish_task_bytes(delivery.body(), &label, &headers)
        .await
    {
        Ok(()) => {
            tracing::info!(job_id = %task.job_id, index = task.image_index, deliveries, "a saver stopped while holding this task; queued it again with its attempt count");
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack of the old copy failed; it comes back and is counted again");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not queue the task again; it goes back as it is");
            requeue_later(ctx, delivery).await;
        }
    }
}

/// Saves in this process, on a thread of lowered priority. `Err` when the save panicked.
async fn save_here(
    ctx: &Context,
    task: &Arc<SaveTask>,
    span: &Span,
) -> Result<(Result<Outcome, luna_store::SaveError>, Timings), String> {
    let (task, store, blobs) = (task.clone(), ctx.store.clone(), ctx.blobs.clone());
    let span = span.clone();
    crate::priority::run_lowered(ctx.config.priority.save_nice, move || {
        span.in_scope(|| {
            let mut timings = Timings::default();
            let result = save_task_timed(&task, store.as_ref(), blobs.as_ref(), &mut timings);
            (result, timings)
        })
    })
    .await
}

/// Carries out a settle decision that ends this delivery.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Context,
    span: &Span,
    delivery: Delivery,
    task: Option<&SaveTask>,
    format: &'static str,
    attempt: u32,
    settle: Settle,
    headers: &Headers,
) {
    match settle {
        Settle::Ack => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack failed; the redelivery will find the saved file");
            }
            if let Some(task) = task {
                remove_blob(ctx, task);
            }
        }
        Settle::Requeue | Settle::RetryAfter(_) => requeue_later(ctx, delivery).await,
        Settle::Park { reason, kind } => {
            if let Some(task) = task {
                tracing::error!(job_id = %task.job_id, index = task.image_index, attempt, error = %reason, "[Image Save] Job {}: image {} failed for good", task.job_id, task.image_index);
                fail(ctx, span, format, kind, &reason);
                report_failure(ctx, task, &reason, attempt, true, headers).await;
            } else {
                fail(ctx, span, format, kind, &reason);
            }
            // The blob stays with a parked task, so it can be replayed; the sweep removes it
            // after --blob-ttl.
            park(ctx, delivery, &reason, kind).await;
        }
    }
}

/// "outer: inner: innermost", so the event says what actually went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn outcome_event(ctx: &Context, task: &SaveTask, outcome: &Outcome, elapsed: Duration) -> Event {
    let kind = match outcome {
        Outcome::Saved {
            stored,
            quality_score,
        } => EventKind::ImageSaved {
            index: task.image_index,
            affix: task.image.affix.clone(),
            format: task.image.format.as_str().to_owned(),
            path: stored.path.clone(),
            bytes: stored.bytes,
            width: task.image.width,
            height: task.image.height,
            quality_score: *quality_score,
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            worker: ctx.worker_id.to_string(),
        },
        Outcome::Rejected {
            gate,
            score,
            threshold,
            stored,
        } => EventKind::ImageRejected {
            index: task.image_index,
            gate: gate.as_str().to_owned(),
            quality_score: *score,
            threshold: *threshold,
            path: stored.as_ref().map(|s| s.path.clone()),
        },
    };
    Event::now(task.job_id.clone(), kind)
}

fn log_outcome(job_id: &JobId, index: u32, outcome: &Outcome, elapsed: Duration) {
    let ms = elapsed.as_millis() as u64;
    match outcome {
        Outcome::Saved { stored, .. } => tracing::info!(
            %job_id, index, path = %stored.path, bytes = stored.bytes, ms, redelivery = stored.already_stored,
            "[Image Save] Job {job_id}: image {index} saved to {}", stored.path
        ),
        Outcome::Rejected {
            score,
            threshold,
            stored,
            ..
        } => tracing::info!(
            %job_id, index, score, threshold, kept = stored.is_some(),
            "[Image Save] Job {job_id}: image {index} rejected by the quality gate ({score:.3} < {threshold})"
        ),
    }
}

/// Counts a confirmed outcome (once per image: the event is confirmed only once per delivery
/// that reaches here) and records it on the `process` span.
fn count_outcome(ctx: &Context, span: &Span, task: &SaveTask, outcome: &Outcome) {
    let format = task.image.format.as_str();
    match outcome {
        Outcome::Saved { stored, .. } => {
            span.record("luna.outcome", "saved");
            span.record("luna.image.bytes", stored.bytes);
            ctx.metrics.saved(format, written(stored));
        }
        Outcome::Rejected { gate, stored, .. } => {
            span.record("luna.outcome", "rejected");
            let bytes = stored.as_ref().map_or(0, written);
            if bytes > 0 {
                span.record("luna.image.bytes", bytes);
            }
            ctx.metrics.rejected(format, gate.as_str(), bytes);
        }
    }
}

/// Bytes this delivery wrote: none when a redelivery found the file already stored.
fn written(stored: &luna_store::Stored) -> u64 {
    if stored.already_stored {
        0
    } else {
        stored.bytes
    }
}

/// Counts a final failure and marks the `process` span failed.
fn fail(ctx: &Context, span: &Span, format: &'static str, reason: &'static str, message: &str) {
    span.record("luna.outcome", "failed");
    luna_telemetry::record_error(span, reason, &message);
    ctx.metrics.failed(format, reason);
}

/// Publishes an event and records how long the confirm took.
async fn publish_event(ctx: &Context, event: &Event, headers: &Headers) -> Result<(), QueueError> {
    let started = Instant::now();
    ctx.broker.publish_event(event, headers).await?;
    ctx.metrics.event_published(started.elapsed());
    Ok(())
}

async fn report_failure(
    ctx: &Context,
    task: &SaveTask,
    error: &str,
    attempt: u32,
    is_final: bool,
    headers: &Headers,
) {
    let kind = EventKind::ImageFailed {
        index: task.image_index,
        error: error.to_owned(),
        attempt,
        is_final,
    };
    if let Err(e) = publish_event(ctx, &Event::now(task.job_id.clone(), kind), headers).await {
        tracing::warn!(job_id = %task.job_id, index = task.image_index, error = %e, "image_failed event not confirmed");
    }
}

async fn park(ctx: &Context, delivery: Delivery, reason: &str, kind: &'static str) {
    tracing::warn!(reason, "parking task");
    match delivery.park(reason).await {
        Ok(()) => ctx.metrics.parked(kind),
        Err(e) => tracing::error!(error = %e, "parking failed; the task stays queued"),
    }
}

/// Gives the task back after a pause, so a broker outage does not become a hot loop.
async fn requeue_later(ctx: &Context, delivery: Delivery) {
    let pause = ctx.config.policy().backoff(1);
    tokio::time::sleep(settle::jittered(pause, settle::random_unit())).await;
    if let Err(e) = delivery.requeue().await {
        tracing::warn!(error = %e, "requeue failed; the broker redelivers when the channel closes");
    }
}

fn remove_blob(ctx: &Context, task: &SaveTask) {
    if let (Some(blobs), Some(blob)) = (&ctx.blobs, &task.image.blob)
        && let Err(e) = blobs.remove(blob)
    {
        tracing::warn!(blob = %blob.name, error = %e, "could not remove blob; the sweeper will");
    }
}
