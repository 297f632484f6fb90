//! The one handle services use, whichever backend is behind it.

use luna_job::codec::DecodeError;
use luna_job::{Event, SaveTask};

use crate::amqp::{AmqpBroker, AmqpConfig, AmqpDelivery, AmqpEventStream, AmqpTaskStream};
use crate::memory::{MemoryBroker, MemoryDelivery, MemoryEventStream, MemoryTaskStream};
use crate::{Headers, QueueError};

/// RabbitMQ, or the in-process queue of `luna up`.
#[derive(Debug, Clone)]
pub enum Broker {
    Amqp(AmqpBroker),
    Memory(MemoryBroker),
}

impl Broker {
    /// A RabbitMQ handle that connects lazily.
    ///
    /// # Errors
    /// [`QueueError::CreatePool`] for a malformed configuration.
    pub fn new(config: AmqpConfig) -> Result<Self, QueueError> {
        AmqpBroker::new(config).map(Self::Amqp)
    }

    /// A RabbitMQ handle with the topology declared.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable or refuses the topology.
    pub async fn connect(config: AmqpConfig) -> Result<Self, QueueError> {
        AmqpBroker::connect(config).await.map(Self::Amqp)
    }

    /// The name prefix of the broker topology, or `in-process` (for logs).
    pub fn prefix(&self) -> &str {
        match self {
            Self::Amqp(b) => &b.topology().prefix,
            Self::Memory(_) => "in-process",
        }
    }

    /// A fresh in-process queue.
    pub fn in_process() -> Self {
        Self::Memory(MemoryBroker::default())
    }

    /// Declares exchanges and queues (nothing to do in process).
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable or refuses a declaration.
    pub async fn declare_topology(&self) -> Result<(), QueueError> {
        match self {
            Self::Amqp(b) => b.declare_topology().await,
            Self::Memory(_) => Ok(()),
        }
    }

    /// Deletes exchanges and queues (tests and teardown).
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        match self {
            Self::Amqp(b) => b.delete_topology().await,
            Self::Memory(_) => Ok(()),
        }
    }

    pub async fn is_ready(&self) -> bool {
        match self {
            Self::Amqp(b) => b.is_ready().await,
            Self::Memory(_) => true,
        }
    }

    /// Publishes a task and waits for the broker to take it.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm in time.
    pub async fn publish_task(&self, task: &SaveTask, headers: &Headers) -> Result<(), QueueError> {
        match self {
            Self::Amqp(b) => b.publish_task(task, headers).await,
            Self::Memory(b) => b.publish_task(task, headers),
        }
    }

    /// Publishes an encoded task.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm in time.
    pub async fn publish_task_bytes(
        &self,
        body: &[u8],
        message_id: &str,
        headers: &Headers,
    ) -> Result<(), QueueError> {
        match self {
            Self::Amqp(b) => b.publish_task_bytes(body, message_id, headers).await,
            Self::Memory(b) => {
                b.publish_task_bytes(body, headers);
                Ok(())
            }
        }
    }

    /// Publishes an event.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm in time.
    pub async fn publish_event(&self, event: &Event, headers: &Headers) -> Result<(), QueueError> {
        match self {
            Self::Amqp(b) => b.publish_event(event, headers).await,
            Self::Memory(b) => b.publish_event(event, headers),
        }
    }

    /// Starts a consumer with one unsettled task at a time.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn consume_tasks(&self, consumer_tag: &str) -> Result<TaskStream, QueueError> {
        match self {
            Self::Amqp(b) => b
                .consume_tasks(consumer_tag)
                .await
                .map(|s| TaskStream::Amqp(Box::new(s))),
            Self::Memory(b) => Ok(TaskStream::Memory(b.consume_tasks())),
        }
    }

    /// Subscribes to every event (see [`AmqpBroker::subscribe_events`] for `queue`).
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn subscribe_events(&self, queue: Option<&str>) -> Result<EventStream, QueueError> {
        match self {
            Self::Amqp(b) => b
                .subscribe_events(queue)
                .await
                .map(|s| EventStream::Amqp(Box::new(s))),
            Self::Memory(b) => Ok(EventStream::Memory(b.subscribe_events())),
        }
    }

    /// Tasks waiting to be delivered.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn task_queue_depth(&self) -> Result<u32, QueueError> {
        match self {
            Self::Amqp(b) => b.task_queue_depth().await,
            Self::Memory(b) => Ok(b.task_queue_depth()),
        }
    }

    /// Parked messages.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn parked_count(&self) -> Result<u32, QueueError> {
        match self {
            Self::Amqp(b) => b.parked_count().await,
            Self::Memory(b) => Ok(b.parked_count()),
        }
    }
}

/// Deliveries to one consumer.
#[derive(Debug)]
pub enum TaskStream {
    Amqp(Box<AmqpTaskStream>),
    Memory(MemoryTaskStream),
}

impl TaskStream {
    /// The next delivery; `None` once the consumer has ended.
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        match self {
            Self::Amqp(s) => s
                .next()
                .await
                .map(|r| r.map(|d| Delivery::Amqp(Box::new(d)))),
            Self::Memory(s) => s.next().await.map(|r| r.map(Delivery::Memory)),
        }
    }

    /// Stops consuming; unsettled deliveries go back to the queue.
    pub async fn cancel(self) {
        match self {
            Self::Amqp(s) => s.cancel().await,
            Self::Memory(_) => {}
        }
    }
}

/// One task delivery, to be settled explicitly (dropped unsettled, it is redelivered).
#[derive(Debug)]
pub enum Delivery {
    Amqp(Box<AmqpDelivery>),
    Memory(MemoryDelivery),
}

impl Delivery {
    pub fn body(&self) -> &[u8] {
        match self {
            Self::Amqp(d) => d.body(),
            Self::Memory(d) => d.body(),
        }
    }

    pub fn headers(&self) -> Headers {
        match self {
            Self::Amqp(d) => d.headers(),
            Self::Memory(d) => d.headers(),
        }
    }

    /// # Errors
    /// [`DecodeError`] naming the field that did not decode.
    pub fn task(&self) -> Result<SaveTask, DecodeError> {
        match self {
            Self::Amqp(d) => d.task(),
            Self::Memory(d) => d.task(),
        }
    }

    /// Deliveries before this one.
    pub fn delivery_count(&self) -> u32 {
        match self {
            Self::Amqp(d) => d.delivery_count(),
            Self::Memory(d) => d.delivery_count(),
        }
    }

    /// Settles the delivery as done.
    ///
    /// # Errors
    /// [`QueueError`] when the channel is gone (the task is then redelivered).
    pub async fn ack(self) -> Result<(), QueueError> {
        match self {
            Self::Amqp(d) => d.ack().await,
            Self::Memory(d) => {
                d.ack();
                Ok(())
            }
        }
    }

    /// Returns the delivery to the queue now.
    ///
    /// # Errors
    /// [`QueueError`] when the channel is gone (which requeues it too).
    pub async fn requeue(self) -> Result<(), QueueError> {
        match self {
            Self::Amqp(d) => d.requeue().await,
            Self::Memory(d) => {
                d.requeue();
                Ok(())
            }
        }
    }

    /// Parks the message with `reason`, then acknowledges it.
    ///
    /// # Errors
    /// [`QueueError`] when parking fails; the task then stays queued.
    pub async fn park(self, reason: &str) -> Result<(), QueueError> {
        match self {
            Self::Amqp(d) => d.park(reason).await,
            Self::Memory(d) => {
                d.park(reason);
                Ok(())
            }
        }
    }
}

/// Events for one subscriber.
#[derive(Debug)]
pub enum EventStream {
    Amqp(Box<AmqpEventStream>),
    Memory(MemoryEventStream),
}

impl EventStream {
    /// The next event with its headers; `None` when the subscription ended.
    pub async fn next(
        &mut self,
    ) -> Option<Result<(Result<Event, DecodeError>, Headers), QueueError>> {
        match self {
            Self::Amqp(s) => s.next().await,
            Self::Memory(s) => s.next().await.map(Ok),
        }
    }
}
