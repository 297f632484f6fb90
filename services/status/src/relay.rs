//! The event consumer: broker events into the hub, resubscribing whenever the stream breaks.
//!
//! Against RabbitMQ, events are read from the events stream (`luna_queue::stream`): from its
//! start when the service starts, which rebuilds the job table of the whole retention window,
//! then, after any break, from the offset after the last one applied, so nothing is missed
//! and nothing applied twice. In process (`luna up` without a broker) events come from the
//! in-process bus as they are published; there is nothing to rebuild from.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use luna_job::{Event, EventKind};
use luna_queue::{AmqpConfig, EventLogReader, EventRetention, EventStream, Headers, StreamStart};
use luna_telemetry::propagation;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;

/// First wait before resubscribing; doubled after each failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts, so a recovered broker is noticed within half a minute.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the events come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// The broker's events stream, read on a connection of its own named `connection_name`.
    Log {
        config: AmqpConfig,
        retention: EventRetention,
        connection_name: String,
    },
    /// The broker handle's own event subscription (the in-process bus).
    Bus,
}

enum Ended {
    Cancelled,
    StreamClosed,
    Failed(Box<dyn StdError + Send + Sync>),
}

/// Where this instance stands in the events stream: the last offset it applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    last_applied: Option<u64>,
}

impl Position {
    /// Where the next subscription starts: the stream's start the first time (to rebuild the
    /// table), right after the last applied event afterwards (to miss nothing).
    pub(crate) fn start(self) -> StreamStart {
        match self.last_applied {
            None => StreamStart::First,
            Some(last) => StreamStart::Offset(last.saturating_add(1)),
        }
    }

    /// Whether the event at `offset` is still to be applied, moving past it if so. RabbitMQ
    /// may start a reader at the beginning of the chunk holding the offset asked for, so
    /// events already applied can come again after a resubscription.
    pub(crate) fn advance(&mut self, offset: u64) -> bool {
        if self.last_applied.is_some_and(|last| offset <= last) {
            return false;
        }
        self.last_applied = Some(offset);
        true
    }
}

/// Runs until `cancel` fires.
pub(crate) async fn run(state: AppState, source: Source, cancel: CancellationToken) {
    let prefix = state.broker().prefix().to_owned();
    let mut position = Position::default();
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let ended = tokio::select! {
            () = cancel.cancelled() => return,
            ended = subscribe_and_consume(&state, &source, &mut position, &cancel, &mut backoff) => ended,
        };
        match ended {
            Ended::Cancelled => return,
            Ended::StreamClosed => tracing::warn!(
                prefix,
                retry_in = ?backoff,
                last_offset = position.last_applied,
                "event subscription ended; resubscribing"
            ),
            Ended::Failed(error) => tracing::warn!(
                prefix,
                retry_in = ?backoff,
                last_offset = position.last_applied,
                error = %chain(error.as_ref()),
                "event subscription failed; resubscribing"
            ),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One subscription, from opening it until it ends. A subscription that opened resets the
/// backoff, so a broker that comes back is used again at once.
async fn subscribe_and_consume(
    state: &AppState,
    source: &Source,
    position: &mut Position,
    cancel: &CancellationToken,
    backoff: &mut Duration,
) -> Ended {
    let prefix = state.broker().prefix();
    // The rest of the topology (task queues) is declared as before, so that a status instance
    // started first leaves a usable broker behind; the events stream is declared by the
    // reader itself.
    if let Err(error) = state.broker().declare_topology().await {
        return Ended::Failed(Box::new(error));
    }
    match source {
        Source::Log {
            config,
            retention,
            connection_name,
        } => {
            let start = position.start();
            let mut reader =
                match EventLogReader::open(config, retention, connection_name, start).await {
                    Ok(reader) => reader,
                    Err(error) => return Ended::Failed(Box::new(error)),
                };
            tracing::info!(prefix, ?start, stream = %config.topology.events_stream(), "reading the events stream");
            state.set_subscribed(true);
            *backoff = INITIAL_BACKOFF;
            let ended = consume_log(state, &mut reader, position, cancel).await;
            state.set_subscribed(false);
            reader.close().await;
            ended
        }
        Source::Bus => {
            let mut stream = match state.broker().subscribe_events(None).await {
                Ok(stream) => stream,
                Err(error) => return Ended::Failed(Box::new(error)),
            };
            tracing::info!(prefix, "subscribed to events");
            state.set_subscribed(true);
            *backoff = INITIAL_BACKOFF;
            let ended = consume_bus(state, &mut stream, cancel).await;
            state.set_subscribed(false);
            ended
        }
    }
}

async fn consume_log(
    state: &AppState,
    reader: &mut EventLogReader,
    position: &mut Position,
    cancel: &CancellationToken,
) -> Ended {
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return Ended::Cancelled,
            next = reader.next() => next,
        };
        match next {
            Some(Ok(delivered)) => {
                if !position.advance(delivered.offset) {
                    continue;
                }
                match delivered.event {
                    Ok(event) => relay(state, event, &delivered.headers),
                    // A message that does not decode never will; it is skipped for good.
                    Err(error) => tracing::warn!(
                        offset = delivered.offset,
                        %error,
                        "skipping an event that does not decode"
                    ),
                }
            }
            Some(Err(error)) => return Ended::Failed(Box::new(error)),
            None => return Ended::StreamClosed,
        }
    }
}

async fn consume_bus(
    state: &AppState,
    stream: &mut EventStream,
    cancel: &CancellationToken,
) -> Ended {
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return Ended::Cancelled,
            next = stream.next() => next,
        };
        match next {
            Some(Ok((Ok(event), headers))) => relay(state, event, &headers),
            Some(Ok((Err(error), _headers))) => {
                tracing::warn!(%error, "skipping an event that does not decode");
            }
            Some(Err(error)) => return Ended::Failed(Box::new(error)),
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
    // How long ago the event happened, by its own timestamp: replayed events date their job's
    // activity back by that much. A publisher's clock running ahead counts as "just now".
    let age = (chrono::Utc::now() - event.timestamp)
        .to_std()
        .unwrap_or(Duration::ZERO);
    if let Some(done) = state.hub().publish_aged(event, Instant::now(), age) {
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
fn chain(error: &(dyn StdError + Send + Sync + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_instance_reads_from_the_start_then_resumes_after_the_last_applied() {
        let mut position = Position::default();
        assert_eq!(position.start(), StreamStart::First);
        assert!(position.advance(0));
        assert!(position.advance(1));
        assert!(
            position.advance(5),
            "offsets may skip (other messages, retention)"
        );
        assert_eq!(position.start(), StreamStart::Offset(6));
        // A resubscription that starts at the chunk before: the applied ones are skipped.
        assert!(!position.advance(1));
        assert!(!position.advance(5));
        assert!(position.advance(6));
        assert_eq!(position.start(), StreamStart::Offset(7));
    }
}
