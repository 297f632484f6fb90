//! The events log: a RabbitMQ stream bound to the events exchange, read from an offset.
//!
//! Every event published to `<p>.events` is also appended to the stream `<p>.events.log`
//! (declared by [`crate::Topology::declare_events_stream`]), which RabbitMQ keeps for its retention
//! window ([`EventRetention`]). Reading a stream consumes nothing: any number of readers each
//! see every event, and each picks where it starts ([`StreamStart`]). That is what lets a
//! status instance rebuild its job table after a restart (read from [`StreamStart::First`])
//! and miss nothing across a reconnect (resume at [`StreamStart::Offset`] of the last offset
//! it applied plus one).
//!
//! A subscription owns a connection of its own, without lapin's automatic recovery: recovery
//! would re-issue the consumer with the offset it was first opened at, replaying from there
//! behind the reader's back. Here a lost connection ends the subscription instead, and the
//! reader opens a new one at the offset it chooses. The connection carries a
//! `connection_name`, so an operator can tell it apart in `rabbitmqctl list_connections`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use luna_job::Event;
use luna_job::codec::{DecodeError, from_msgpack};

use crate::amqp::{AmqpConfig, bounded};
use crate::topology::EventRetention;
use crate::{Headers, QueueError};

/// Deliveries the broker may have in flight to one reader before it waits for acks. Streams
/// require a prefetch; acks only pace delivery here (nothing is removed from a stream).
pub const STREAM_PREFETCH: u16 = 512;

/// The delivery header that holds a message's offset in the stream (and the consumer argument
/// that says where to start).
pub const OFFSET_HEADER: &str = "x-stream-offset";

/// Where a reader starts in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// The oldest event still retained.
    First,
    /// This offset, or the oldest retained one if it has been dropped already, or the next one
    /// to be appended if it lies beyond the end.
    Offset(u64),
    /// Events appended at or after this time (RabbitMQ starts at the chunk holding it, so a
    /// few earlier ones may come too).
    Since(SystemTime),
    /// Only events appended from now on.
    Next,
}

impl StreamStart {
    fn argument(self) -> AMQPValue {
        match self {
            Self::First => AMQPValue::LongString(LongString::from("first")),
            Self::Next => AMQPValue::LongString(LongString::from("next")),
            Self::Offset(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            Self::Since(at) => {
                let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                AMQPValue::Timestamp(secs)
            }
        }
    }
}

/// Why reading the stream failed. Every case ends the subscription; open a new one.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("events stream unavailable")]
    Queue(#[from] QueueError),
    #[error("a delivery from the events stream has no {OFFSET_HEADER} header")]
    NoOffset,
}

impl From<lapin::Error> for StreamError {
    fn from(error: lapin::Error) -> Self {
        Self::Queue(QueueError::Broker(error))
    }
}

/// One event read from the stream.
#[derive(Debug)]
pub struct StreamEvent {
    /// Its position in the stream: unique, increasing, never reused while the stream exists.
    pub offset: u64,
    /// The event, or why its body does not decode.
    pub event: Result<Event, DecodeError>,
    /// Its string headers (trace context).
    pub headers: Headers,
}

/// A reader of the events stream, on a connection of its own.
pub struct EventLogReader {
    connection: Connection,
    _channel: Channel,
    consumer: lapin::Consumer,
    timeout: Duration,
}

impl std::fmt::Debug for EventLogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLogReader").finish_non_exhaustive()
    }
}

/// Connects to the first node of `config.url` (comma-separated, the nodes of a cluster) that
/// answers, with the configured heartbeat.
async fn connect(config: &AmqpConfig, connection_name: &str) -> Result<Connection, QueueError> {
    let mut last = None;
    for uri in crate::amqp::parse_nodes(config)? {
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
        match bounded(config.timeout, Connection::connect_uri(uri, properties)).await {
            Ok(connection) => return Ok(connection),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| QueueError::InvalidUrl("no broker URL given".to_owned())))
}

impl EventLogReader {
    /// Connects, declares the events exchange and stream with `retention` (idempotent), and
    /// starts reading at `start`.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable within the timeout or refuses the
    /// declaration (for example a stream declared with another retention).
    pub async fn open(
        config: &AmqpConfig,
        retention: &EventRetention,
        connection_name: &str,
        start: StreamStart,
    ) -> Result<Self, QueueError> {
        let limit = config.timeout;
        let connection = connect(config, connection_name).await?;
        let opened = async {
            let topology = &config.topology;
            let mut channel = bounded(limit, connection.create_channel()).await?;
            let declared =
                bounded(limit, topology.declare_events_stream(&channel, retention)).await;
            match declared {
                Ok(()) => {}
                Err(error) if is_precondition_failed(&error) => {
                    // Another instance, or an earlier start, declared it with other flags. The
                    // stream it has is still the one to read; refusing would leave this
                    // instance blind until someone deletes the stream and its history.
                    tracing::warn!(
                        stream = %topology.events_stream(),
                        error = %error_text(&error),
                        "the events stream exists with another retention; reading it as it is \
                         (change retention with a policy)"
                    );
                    // The refused declaration closed the channel.
                    channel = bounded(limit, connection.create_channel()).await?;
                    bounded(limit, topology.bind_existing_events_stream(&channel)).await?;
                }
                Err(error) => return Err(error),
            }
            bounded(
                limit,
                channel.basic_qos(STREAM_PREFETCH, BasicQosOptions::default()),
            )
            .await?;
            let mut arguments = FieldTable::default();
            arguments.insert(OFFSET_HEADER.into(), start.argument());
            let consumer = bounded(
                limit,
                channel.basic_consume(
                    config.topology.events_stream().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    arguments,
                ),
            )
            .await?;
            Ok::<_, QueueError>((channel, consumer))
        }
        .await;
        match opened {
            Ok((channel, consumer)) => Ok(Self {
                connection,
                _channel: channel,
                consumer,
                timeout: limit,
            }),
            Err(error) => {
                let _ = bounded(limit, connection.close(200, "open failed".into())).await;
                Err(error)
            }
        }
    }

    /// The next event, acknowledged already; `None` once the consumer was cancelled (the
    /// stream was deleted) or the connection is gone.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, StreamError>> {
        let delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error.into())),
        };
        if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
            return Some(Err(error.into()));
        }
        let Some(offset) = offset_of(&delivery.properties) else {
            return Some(Err(StreamError::NoOffset));
        };
        Some(Ok(StreamEvent {
            offset,
            event: from_msgpack(&delivery.data),
            headers: string_headers(&delivery.properties),
        }))
    }

    /// Closes the reader's connection.
    pub async fn close(self) {
        let _ = bounded(
            self.timeout,
            self.connection.close(200, "reader stopped".into()),
        )
        .await;
    }
}

/// Whether the broker refused a declaration as inequivalent to what exists.
fn is_precondition_failed(error: &QueueError) -> bool {
    let QueueError::Broker(error) = error else {
        return false;
    };
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

fn error_text(error: &QueueError) -> String {
    match error {
        QueueError::Broker(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

/// The stream offset RabbitMQ puts in every delivery from a stream.
fn offset_of(properties: &BasicProperties) -> Option<u64> {
    let headers = properties.headers().as_ref()?;
    let value = headers.inner().get(OFFSET_HEADER)?;
    let offset = match value {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        _ => return None,
    };
    u64::try_from(offset).ok()
}

/// The string headers of a message (the trace context travels in them); others are skipped.
fn string_headers(properties: &BasicProperties) -> Headers {
    let mut out = Headers::new();
    if let Some(table) = properties.headers() {
        for (key, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => continue,
            };
            out.insert(key.as_str().to_owned(), text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn the_offset_comes_from_its_header() {
        let props = with_headers(&[
            (OFFSET_HEADER, AMQPValue::LongLongInt(41)),
            (
                "traceparent",
                AMQPValue::LongString(LongString::from("00-ab-cd-01")),
            ),
        ]);
        assert_eq!(offset_of(&props), Some(41));
        let headers = string_headers(&props);
        assert_eq!(
            headers.get("traceparent").map(String::as_str),
            Some("00-ab-cd-01")
        );
        assert!(!headers.contains_key(OFFSET_HEADER));
        assert_eq!(offset_of(&BasicProperties::default()), None);
        let negative = with_headers(&[(OFFSET_HEADER, AMQPValue::LongLongInt(-1))]);
        assert_eq!(offset_of(&negative), None);
    }

    #[test]
    fn start_arguments_follow_rabbitmq() {
        assert_eq!(
            StreamStart::First.argument(),
            AMQPValue::LongString(LongString::from("first"))
        );
        assert_eq!(StreamStart::Offset(7).argument(), AMQPValue::LongLongInt(7));
        assert_eq!(
            StreamStart::Since(UNIX_EPOCH + Duration::from_secs(1_750_000_000)).argument(),
            AMQPValue::Timestamp(1_750_000_000)
        );
    }

    #[test]
    fn retention_arguments() {
        let retention = EventRetention {
            max_age: Duration::from_millis(90_500),
            max_bytes: 64 << 20,
        };
        let args = retention.arguments();
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString(LongString::from("stream")))
        );
        assert_eq!(
            get("x-max-age"),
            Some(AMQPValue::LongString(LongString::from("90s")))
        );
        assert_eq!(
            get("x-max-length-bytes"),
            Some(AMQPValue::LongLongInt(64 << 20))
        );
        assert_eq!(
            get("x-stream-max-segment-size-bytes"),
            Some(AMQPValue::LongLongInt(8 << 20))
        );
        let tiny = EventRetention {
            max_age: Duration::ZERO,
            max_bytes: 10,
        };
        assert_eq!(tiny.segment_bytes(), 1024 * 1024);
    }
}
