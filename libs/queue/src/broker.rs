//! The one handle services use, whichever backend is behind it.

use std::borrow::Cow;
use std::sync::Arc;

use luna_job::codec::{DecodeError, to_msgpack};
use luna_job::{Event, EventKind, ImageFormat, JobId, SaveTask};
use luna_telemetry::propagation;
use tracing::Instrument as _;

use crate::amqp::{AmqpBroker, AmqpConfig, AmqpDelivery, AmqpEventStream, AmqpTaskStream};
use crate::memory::{MemoryBroker, MemoryDelivery, MemoryEventStream, MemoryTaskStream};
use crate::topology::TASK_ROUTING_KEY;
use crate::{Headers, QueueError};

/// Which image a task message carries: its message id (`<job>/<index>`) and span attributes.
#[derive(Debug, Clone)]
pub struct TaskLabel {
    pub job_id: JobId,
    pub image_index: u32,
    pub format: ImageFormat,
}

impl TaskLabel {
    pub fn of(task: &SaveTask) -> Self {
        Self {
            job_id: task.job_id.clone(),
            image_index: task.image_index,
            format: task.image.format,
        }
    }

    /// The task's attributes on a `publish` span.
    fn record(&self, span: &tracing::Span) {
        span.record("luna.job_id", self.job_id.as_str());
        span.record("luna.image.index", self.image_index);
        span.record("luna.image.format", self.format.as_str());
    }

    /// The AMQP `message_id`, the same on every redelivery.
    pub fn message_id(&self) -> String {
        format!("{}/{}", self.job_id, self.image_index)
    }
}

/// The message id of an event: `<job>/<event>`, with the image index for image events and the
/// attempt for `image_failed`, so each message a job produces has its own.
pub fn event_message_id(event: &Event) -> String {
    match &event.kind {
        EventKind::ImageFailed { index, attempt, .. } => {
            format!("{}/{index}/image_failed/{attempt}", event.job_id)
        }
        kind => match kind.image_index() {
            Some(index) => format!("{}/{index}/{}", event.job_id, kind.name()),
            None => format!("{}/{}", event.job_id, kind.name()),
        },
    }
}

/// The `publish` producer span, with the OpenTelemetry messaging attributes.
fn publish_span(
    system: &'static str,
    destination: &str,
    routing_key: &str,
    message_id: &str,
    body_size: usize,
) -> tracing::Span {
    tracing::info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = destination,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.id = message_id,
        messaging.message.body.size = (body_size > 0).then_some(body_size),
        luna.job_id = tracing::field::Empty,
        luna.image.index = tracing::field::Empty,
        luna.image.format = tracing::field::Empty,
        luna.event = tracing::field::Empty,
    )
}

fn finish(span: &tracing::Span, result: &Result<(), QueueError>) {
    if let Err(e) = result {
        luna_telemetry::record_error(span, e.kind(), e);
    }
}

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
    /// [`QueueError::InvalidUrl`] for a malformed URL.
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

    /// `messaging.system` of spans: `rabbitmq`, or `in_process` for `luna up`'s queue.
    pub fn system(&self) -> &'static str {
        match self {
            Self::Amqp(_) => "rabbitmq",
            Self::Memory(_) => "in_process",
        }
    }

    /// Where tasks are published: the tasks exchange (or `tasks` in process).
    pub fn tasks_destination(&self) -> String {
        match self {
            Self::Amqp(b) => b.topology().tasks_exchange(),
            Self::Memory(_) => "tasks".to_owned(),
        }
    }

    /// Where events are published: the events exchange (or `events` in process).
    pub fn events_destination(&self) -> String {
        match self {
            Self::Amqp(b) => b.topology().events_exchange(),
            Self::Memory(_) => "events".to_owned(),
        }
    }

    /// The queue savers consume (or `tasks` in process).
    pub fn task_queue(&self) -> String {
        match self {
            Self::Amqp(b) => b.topology().task_queue(),
            Self::Memory(_) => "tasks".to_owned(),
        }
    }

    /// Publishes a task and waits for the broker to take it: encoded for RabbitMQ, as it is
    /// for the in-process queue (its consumer gets this very task, pixels uncopied).
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm in time.
    pub async fn publish_task(&self, task: SaveTask, headers: &Headers) -> Result<(), QueueError> {
        let label = TaskLabel::of(&task);
        match self {
            Self::Amqp(_) => {
                let body = to_msgpack(&task)?;
                drop(task);
                self.publish_task_bytes(body, &label, headers).await
            }
            Self::Memory(b) => {
                let (id, span, headers) = self.task_publish(&label, 0, headers);
                let result = span.in_scope(|| b.publish_task(task, &id, &headers));
                finish(&span, &result);
                result
            }
        }
    }

    /// Whether tasks go to a consumer in this process ([`Self::publish_task`] then never
    /// encodes them), rather than over the network.
    pub fn is_in_process(&self) -> bool {
        matches!(self, Self::Memory(_))
    }

    /// Publishes an encoded task, in a `publish` span whose context travels in its headers.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm in time.
    pub async fn publish_task_bytes(
        &self,
        body: impl Into<Vec<u8>>,
        label: &TaskLabel,
        headers: &Headers,
    ) -> Result<(), QueueError> {
        // Owned, so the in-process queue keeps the bytes without copying them.
        let body: Vec<u8> = body.into();
        let (id, span, headers) = self.task_publish(label, body.len(), headers);
        let result = match self {
            Self::Amqp(b) => {
                b.publish_task_bytes(&body, &id, &headers)
                    .instrument(span.clone())
                    .await
            }
            Self::Memory(b) => b.publish_task_bytes(body, &id, &headers),
        };
        finish(&span, &result);
        result
    }

    /// A task's message id, its `publish` span (`body_size` 0: not known) and the headers
    /// carrying that span's context.
    fn task_publish(
        &self,
        label: &TaskLabel,
        body_size: usize,
        headers: &Headers,
    ) -> (String, tracing::Span, Headers) {
        let id = label.message_id();
        let span = publish_span(
            self.system(),
            &self.tasks_destination(),
            TASK_ROUTING_KEY,
            &id,
            body_size,
        );
        label.record(&span);
        let mut headers = headers.clone();
        propagation::inject(&span, &mut headers);
        (id, span, headers)
    }

    /// Publishes an event, in a `publish` span whose context travels in its headers.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm in time.
    pub async fn publish_event(&self, event: &Event, headers: &Headers) -> Result<(), QueueError> {
        let id = event_message_id(event);
        let span = publish_span(
            self.system(),
            &self.events_destination(),
            event.name(),
            &id,
            0,
        );
        span.record("luna.job_id", event.job_id.as_str());
        span.record("luna.event", event.name());
        if let Some(index) = event.kind.image_index() {
            span.record("luna.image.index", index);
        }
        let mut headers = headers.clone();
        propagation::inject(&span, &mut headers);
        let result = match self {
            Self::Amqp(b) => {
                b.publish_event(event, &headers)
                    .instrument(span.clone())
                    .await
            }
            Self::Memory(b) => b.publish_event(event, &headers),
        };
        finish(&span, &result);
        result
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
    /// The task's MessagePack bytes (encoded now for a task the in-process queue holds as it
    /// is; see [`Self::body_len`] for the size alone).
    pub fn body(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Amqp(d) => Cow::Borrowed(d.body()),
            Self::Memory(d) => d.body(),
        }
    }

    /// Bytes of the body, without encoding anything.
    pub fn body_len(&self) -> usize {
        match self {
            Self::Amqp(d) => d.body().len(),
            Self::Memory(d) => d.body_len(),
        }
    }

    pub fn headers(&self) -> Headers {
        match self {
            Self::Amqp(d) => d.headers(),
            Self::Memory(d) => d.headers(),
        }
    }

    /// The producer's message id (`<job>/<index>` for tasks), when it set one.
    pub fn message_id(&self) -> Option<String> {
        match self {
            Self::Amqp(d) => d.message_id(),
            Self::Memory(d) => d.message_id(),
        }
    }

    /// # Errors
    /// [`DecodeError`] naming the field that did not decode.
    pub fn task(&self) -> Result<Arc<SaveTask>, DecodeError> {
        match self {
            Self::Amqp(d) => d.task().map(Arc::new),
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
