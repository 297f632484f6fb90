//! Names and declaration of the broker topology (see `docs/protocol.md`).
//!
//! ```text
//! <p>.tasks   direct exchange ──"save"──▶ <p>.save    quorum queue, delivery limit,
//!                                                      dead-letters to <p>.parked
//! <p>.events  topic exchange  ──"#"────▶ <p>.events.log  stream, read by every status instance
//! <p>.parked  fanout exchange ─────────▶ <p>.parked  quorum queue, kept until an operator acts
//! ```
//!
//! Declaration is idempotent: every process declares what it uses at start-up with the same
//! arguments, so services can start in any order. Changing a queue argument (for example the
//! delivery limit) on an existing queue is refused by RabbitMQ; use a policy for that instead.
//!
//! The task queue overflows with `reject-publish`: once it holds its length limit, RabbitMQ
//! nacks further publishes and the gateway answers 503 with `Retry-After`. The limit is opt-in
//! ([`Topology::max_length`], [`Topology::max_length_bytes`]) because it is a queue argument:
//! a queue declared before it existed, or with another value, refuses the declaration. For
//! such a queue (or to change the limit later), set it as a policy instead, which RabbitMQ
//! applies to existing queues:
//! `rabbitmqctl set_policy luna-save-bounds '^luna\.save$' '{"max-length-bytes":4294967296}' --apply-to queues`.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::QueueError;

/// Routing key of tasks on the task exchange.
pub const TASK_ROUTING_KEY: &str = "save";

/// Every name in the topology, derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub prefix: String,
    /// Deliveries after which RabbitMQ itself dead-letters a task (a safety net for tasks that
    /// crash savers; savers park a task themselves, with a reason, before this is reached).
    pub delivery_limit: u32,
    /// Most ready tasks in the task queue (`x-max-length`); none: no limit of ours.
    pub max_length: Option<u64>,
    /// Most bytes of ready task bodies in the task queue (`x-max-length-bytes`).
    pub max_length_bytes: Option<u64>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            delivery_limit: 10,
            max_length: None,
            max_length_bytes: None,
        }
    }

    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }
    pub fn task_queue(&self) -> String {
        format!("{}.save", self.prefix)
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn parked_exchange(&self) -> String {
        format!("{}.parked", self.prefix)
    }
    pub fn parked_queue(&self) -> String {
        format!("{}.parked", self.prefix)
    }
    /// The stream that keeps every event for the retention window (see [`EventRetention`]).
    pub fn events_stream(&self) -> String {
        format!("{}.events.log", self.prefix)
    }

    /// Declares the events exchange and the events stream bound to it with `#`.
    ///
    /// RabbitMQ compares the arguments of a redeclaration; a stream declared earlier with
    /// another retention makes this fail with `406 PRECONDITION_FAILED` and closes the channel
    /// (see [`Self::bind_existing_events_stream`]; retention of an existing stream is changed
    /// with a policy, see `docs/protocol.md`).
    ///
    /// # Errors
    /// [`QueueError::Broker`], for example when the stream exists with other arguments.
    pub async fn declare_events_stream(
        &self,
        channel: &Channel,
        retention: &EventRetention,
    ) -> Result<(), QueueError> {
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.events_stream().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                retention.arguments(),
            )
            .await?;
        self.bind_events_stream(channel).await
    }

    /// Binds the events stream, which must exist already (as declared, whatever its
    /// retention), to the events exchange.
    ///
    /// # Errors
    /// [`QueueError::Broker`] when the stream does not exist (404) or the broker fails.
    pub async fn bind_existing_events_stream(&self, channel: &Channel) -> Result<(), QueueError> {
        channel
            .queue_declare(
                self.events_stream().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.bind_events_stream(channel).await
    }

    async fn bind_events_stream(&self, channel: &Channel) -> Result<(), QueueError> {
        channel
            .queue_bind(
                self.events_stream().into(),
                self.events_exchange().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Declares exchanges, queues and bindings.
    ///
    /// # Errors
    /// [`QueueError::Broker`], for example when a queue exists with other arguments.
    pub async fn declare(&self, channel: &Channel) -> Result<(), QueueError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let none = FieldTable::default;
        channel
            .exchange_declare(
                self.tasks_exchange().into(),
                ExchangeKind::Direct,
                durable,
                none(),
            )
            .await?;
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable,
                none(),
            )
            .await?;
        channel
            .exchange_declare(
                self.parked_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                none(),
            )
            .await?;

        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(self.parked_queue().into(), durable_queue, quorum())
            .await?;
        channel
            .queue_bind(
                self.parked_queue().into(),
                self.parked_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                none(),
            )
            .await?;

        let mut args = quorum();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            long(&self.parked_exchange()),
        );
        // At-least-once dead-lettering: a parked task is never lost between the two queues.
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        // Beyond a length limit (an argument here, or a policy), publishes are nacked: the
        // gateway answers 503 instead of RabbitMQ dropping the oldest tasks.
        args.insert("x-overflow".into(), long("reject-publish"));
        if let Some(n) = self.max_length {
            args.insert("x-max-length".into(), long_long(n));
        }
        if let Some(n) = self.max_length_bytes {
            args.insert("x-max-length-bytes".into(), long_long(n));
        }
        channel
            .queue_declare(self.task_queue().into(), durable_queue, args)
            .await?;
        channel
            .queue_bind(
                self.task_queue().into(),
                self.tasks_exchange().into(),
                TASK_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                none(),
            )
            .await?;
        Ok(())
    }
}

/// How long, and how much, the events stream keeps. RabbitMQ drops whole segments once they are
/// older than `max_age` or once the stream is larger than `max_bytes`, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRetention {
    /// `x-max-age`, rounded down to whole seconds (at least one).
    pub max_age: Duration,
    /// `x-max-length-bytes`.
    pub max_bytes: u64,
}

impl EventRetention {
    /// Segments are the unit RabbitMQ deletes, so they are kept at most an eighth of the size
    /// cap (and at most RabbitMQ's default of 500 MB): retention then never keeps much more
    /// than asked for.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(1024 * 1024, 500_000_000)
    }

    /// The queue arguments of the stream.
    pub fn arguments(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long("stream"));
        t.insert(
            "x-max-age".into(),
            long(&format!("{}s", self.max_age.as_secs().max(1))),
        );
        t.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.max_bytes).unwrap_or(i64::MAX)),
        );
        t.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.segment_bytes()).unwrap_or(i64::MAX)),
        );
        t
    }
}

impl Default for EventRetention {
    /// A day, or 1 GiB.
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn long_long(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("quorum"));
    t
}
