//! The event consumer: broker events into the hub, resubscribing whenever the stream breaks.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use luna_job::{Event, EventKind};
use luna_queue::{EventStream, Headers, QueueError};
use luna_telemetry::propagation;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;

/// First wait before resubscribing; doubled after each failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts, so a recovered broker is noticed within half a minute.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

enum Ended {
    Cancelled,
    StreamClosed,
    Failed(QueueError),
}

/// Runs until `cancel` fires. Each subscription gets a private queue of its own (exclusive,
/// deleted with its connection), so every status instance sees every event.
pub(crate) async fn run(state: AppState, cancel: CancellationToken) {
    let prefix = state.broker().prefix().to_owned();
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let attempt = async {
            // The events exchange must exist before a queue can be bound to it, and the
            // status service may well start before any gateway or saver has declared it.
            state.broker().declare_topology().await?;
            state.broker().subscribe_events(None).await
        };
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            result = attempt => result,
        };
        match subscribed {
            Ok(mut stream) => {
                tracing::info!(prefix, "subscribed to events");
                state.set_subscribed(true);
                backoff = INITIAL_BACKOFF;
                let ended = consume(&state, &mut stream, &cancel).await;
                state.set_subscribed(false);
                match ended {
                    Ended::Cancelled => return,
                    Ended::StreamClosed => tracing::warn!(
                        prefix,
                        retry_in = ?backoff,
                        "event subscription ended; resubscribing"
                    ),
                    Ended::Failed(error) => tracing::warn!(
                        prefix,
                        retry_in = ?backoff,
                        error = %chain(&error),
                        "event subscription failed; resubscribing"
                    ),
                }
            }
            Err(error) => tracing::warn!(
                prefix,
                retry_in = ?backoff,
                error = %chain(&error),
                "cannot subscribe to events; retrying"
            ),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn consume(state: &AppState, stream: &mut EventStream, cancel: &CancellationToken) -> Ended {
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return Ended::Cancelled,
            next = stream.next() => next,
        };
        match next {
            Some(Ok((Ok(event), headers))) => relay(state, event, &headers),
            Some(Ok((Err(error), _headers))) => {
                // Acknowledged already; a message that does not decode never will.
                tracing::warn!(%error, "skipping an event that does not decode");
            }
            Some(Err(error)) => return Ended::Failed(error),
            None => return Ended::StreamClosed,
        }
    }
}

/// Records and fans out one event, in a `relay` consumer span continuing the publisher's trace.
fn relay(state: &AppState, event: Event, headers: &Headers) {
    let broker = state.broker();
    let span = tracing::info_span!(
        "relay",
        otel.kind = "consumer",
        messaging.system = broker.system(),
        messaging.operation.type = "process",
        messaging.operation.name = "relay",
        messaging.destination.name = broker.events_destination(),
        messaging.rabbitmq.destination.routing_key = event.name(),
        messaging.message.id = luna_queue::event_message_id(&event),
        luna.job_id = event.job_id.as_str(),
        luna.event = event.name(),
        luna.image.index = event.kind.image_index(),
        luna.subscribers = state.hub().subscriber_count(),
    );
    propagation::set_parent(&span, headers);
    let _entered = span.enter();
    tracing::debug!(job_id = %event.job_id, event = event.name(), index = event.kind.image_index(), "event");
    state.metrics().relayed(event.name());
    if let Some(done) = state.hub().publish(event, Instant::now()) {
        log_completion(&done);
    }
}

fn log_completion(event: &Event) {
    if let EventKind::SaveJobCompleted {
        saved,
        rejected,
        failed,
        duration_ms,
    } = event.kind
    {
        let job_id = &event.job_id;
        tracing::info!(
            %job_id,
            saved,
            rejected,
            failed,
            duration_ms,
            "[Image Save] Job {job_id}: completed (saved={saved} rejected={rejected} failed={failed}) in {duration_ms} ms"
        );
    }
}

/// An error with its causes, `outer: inner: root`, for one log field.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
