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
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            delivery_limit: 10,
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
        args.insert("x-overflow".into(), long("reject-publish"));
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

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("quorum"));
    t
}
