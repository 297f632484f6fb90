//! Names and declaration of the broker topology (see `docs/protocol.md`).
//!
//! ```text
//! <p>.tasks   direct exchange ──"save"──▶ <p>.save    quorum queue, delivery limit,
//!                                                      dead-letters to <p>.parked
//! <p>.events  topic exchange  ──"#"────▶ one queue per status instance
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
