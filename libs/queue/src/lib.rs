//! The work-queue seam between Luna Saver's services and the broker.
//!
//! Services publish tasks and events and consume deliveries through [`Broker`]; they never
//! touch a broker client directly. Every delivery is settled explicitly: [`Delivery::ack`]
//! after the work is durable, [`Delivery::park`] with a reason when it can never succeed, or
//! dropped unsettled (shutdown, crash) so the broker hands it to another consumer.
//!
//! # Layout
//! - [`topology`]: exchange and queue names derived from the prefix, and their declaration.
//! - [`broker`]: [`Broker`], the handle services use, over either backend.
//! - [`amqp`]: the RabbitMQ backend (lapin; one publishing and one consuming connection,
//!   replaced when they fail, across the nodes of a cluster; short heartbeats; publisher
//!   confirms under timeouts).
//! - [`stream`]: the events log, a RabbitMQ stream every status instance reads from an offset.
//! - [`memory`]: the in-process backend of `luna up`: same settling, retry and parking
//!   semantics, no durability.
//!
//! # Headers and traces
//! Messages carry string headers ([`Headers`]): W3C trace context (`traceparent`,
//! `tracestate`), and on parked messages [`PARK_REASON_HEADER`]. Every publish runs in a
//! `publish` producer span (OpenTelemetry messaging attributes) whose context is injected into
//! the message's headers, so a consumer's span continues the producer's trace on either
//! backend.

pub mod amqp;
pub mod args;
pub mod broker;
pub mod memory;
pub mod stream;
pub mod topology;

use std::collections::BTreeMap;
use std::time::Duration;

pub use amqp::AmqpConfig;
pub use args::BrokerArgs;
pub use broker::{Broker, Delivery, EventStream, TaskLabel, TaskStream, event_message_id};
pub use memory::{MemoryBounds, MemoryBroker};
pub use stream::{EventLogReader, StreamError, StreamEvent, StreamStart};
pub use topology::{EventRetention, Topology};

/// String headers of a message.
pub type Headers = BTreeMap<String, String>;

/// Header that says why a message was parked.
pub const PARK_REASON_HEADER: &str = "x-luna-park-reason";

/// Errors talking to the broker. All of them mean "the broker cannot take this right now";
/// callers answer 503 (429 for [`QueueError::Full`]) or leave the delivery for redelivery.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("broker connection or channel failed")]
    Broker(#[from] lapin::Error),
    /// A broker URL that does not parse (its password left out), or none at all.
    #[error("invalid broker URL: {0}")]
    InvalidUrl(String),
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// With a length limit on the task queue (`--max-queued-tasks`, `--max-queued-bytes`, or a
    /// policy), this is how RabbitMQ says the queue is full (`x-overflow: reject-publish`).
    #[error("broker refused the message (nack); the task queue may be full")]
    Nacked,
    /// The in-process queue holds as many tasks or bytes as it may.
    #[error(
        "the in-process task queue is full ({tasks} tasks, {bytes} bytes waiting or being saved)"
    )]
    Full { tasks: usize, bytes: u64 },
    #[error("no queue is bound for routing key {0:?}; is the topology declared?")]
    Unroutable(String),
    #[error("failed to encode the message")]
    Encode(#[from] luna_job::codec::EncodeError),
}

impl QueueError {
    /// A short class for `error.type` on spans.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Broker(_) => "broker",
            Self::InvalidUrl(_) => "config",
            Self::Timeout(_) => "timeout",
            Self::Nacked => "nacked",
            Self::Full { .. } => "full",
            Self::Unroutable(_) => "unroutable",
            Self::Encode(_) => "encode",
        }
    }
}
