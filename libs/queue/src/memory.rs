//! The in-process backend, for one machine without a broker (`luna up`).
//!
//! Same semantics as the RabbitMQ backend, minus durability: tasks wait in a FIFO queue,
//! a delivery is settled explicitly (ack, requeue, park with a reason), a delivery dropped
//! unsettled goes back to the queue (as when a consumer's channel closes), and a task delivered
//! more than the delivery limit is parked. Events fan out to every subscriber; a subscriber that
//! falls too far behind loses the oldest events rather than slowing publishers. Everything lives
//! in memory: queued tasks are lost if the process dies (files already written stay written).
//!
//! The queue is bounded ([`MemoryBounds`]) by tasks and by bytes, counting both waiting tasks
//! and tasks delivered but not yet settled (both are held in memory). A publish beyond either
//! bound fails with [`QueueError::Full`] at once, so the gateway answers 429 instead of the
//! process growing with the backlog. A returned or redelivered task is never refused: it is
//! already counted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use luna_job::codec::{DecodeError, from_msgpack, to_msgpack};
use luna_job::{Event, SaveTask};
use tokio::sync::{Notify, broadcast};

use crate::{Headers, PARK_REASON_HEADER, QueueError};

/// How many events a slow subscriber may lag before it loses the oldest.
const EVENT_BUFFER: usize = 4096;

#[derive(Debug, Clone)]
struct Message {
    body: Arc<Vec<u8>>,
    message_id: String,
    headers: Headers,
    /// Deliveries so far.
    deliveries: u32,
}

/// A message moved aside with its reason.
#[derive(Debug, Clone)]
pub struct ParkedMessage {
    pub body: Vec<u8>,
    pub headers: Headers,
}

/// How much the in-process queue may hold: tasks waiting plus tasks being saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBounds {
    /// Most tasks held.
    pub max_tasks: usize,
    /// Most bytes of encoded tasks held. A task larger than this alone is still taken when the
    /// queue holds nothing else, so a single large frame is never refused for ever.
    pub max_bytes: u64,
}

impl MemoryBounds {
    /// No bound (tests that want the old behaviour).
    pub const UNBOUNDED: Self = Self {
        max_tasks: usize::MAX,
        max_bytes: u64::MAX,
    };
}

impl Default for MemoryBounds {
    /// Sized for `luna up` on a 2-core, 24 GB machine: 2 to 4 save slots work through a few
    /// images a second, so 256 tasks are a minute or more of work, and 1 GiB is 40 4K RGB frames.
    fn default() -> Self {
        Self {
            max_tasks: 256,
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default)]
struct Queues {
    ready: VecDeque<Message>,
    parked: Vec<ParkedMessage>,
    /// Tasks ready or delivered and not yet settled, and their bytes.
    held_tasks: usize,
    held_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    queues: Mutex<Queues>,
    ready: Notify,
    events: broadcast::Sender<(Arc<Vec<u8>>, Headers)>,
    delivery_limit: u32,
    bounds: MemoryBounds,
}

/// The in-process broker; cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(10)
    }
}

impl MemoryBroker {
    /// A broker that parks a task on its `delivery_limit + 1`-th delivery, with the default
    /// [`MemoryBounds`].
    pub fn new(delivery_limit: u32) -> Self {
        Self::bounded(delivery_limit, MemoryBounds::default())
    }

    /// A broker that holds at most `bounds`.
    pub fn bounded(delivery_limit: u32, bounds: MemoryBounds) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            inner: Arc::new(Inner {
                queues: Mutex::new(Queues::default()),
                ready: Notify::new(),
                events,
                delivery_limit,
                bounds,
            }),
        }
    }

    pub fn bounds(&self) -> MemoryBounds {
        self.inner.bounds
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.inner
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues an encoded task.
    ///
    /// # Errors
    /// [`QueueError::Full`] when the task does not fit the bounds; nothing is queued then.
    pub fn publish_task_bytes(
        &self,
        body: impl Into<Vec<u8>>,
        message_id: &str,
        headers: &Headers,
    ) -> Result<(), QueueError> {
        let body = body.into();
        let size = body.len() as u64;
        {
            let mut queues = self.queues();
            let bounds = self.inner.bounds;
            let fits = queues.held_tasks == 0
                || (queues.held_tasks < bounds.max_tasks
                    && queues.held_bytes.saturating_add(size) <= bounds.max_bytes);
            if !fits {
                return Err(QueueError::Full {
                    tasks: queues.held_tasks,
                    bytes: queues.held_bytes,
                });
            }
            // Counted before the message is queued, so concurrent publishers cannot overshoot.
            queues.held_tasks += 1;
            queues.held_bytes += size;
        }
        let message = Message {
            body: Arc::new(body),
            message_id: message_id.to_owned(),
            headers: headers.clone(),
            deliveries: 0,
        };
        self.queues().ready.push_back(message);
        self.inner.ready.notify_one();
        Ok(())
    }

    /// Tasks held (waiting or being saved) and their bytes.
    pub fn held(&self) -> (usize, u64) {
        let queues = self.queues();
        (queues.held_tasks, queues.held_bytes)
    }

    /// A task left the queue for good (acknowledged or parked).
    fn release(&self, message: &Message) {
        let mut queues = self.queues();
        queues.held_tasks = queues.held_tasks.saturating_sub(1);
        queues.held_bytes = queues.held_bytes.saturating_sub(message.body.len() as u64);
    }

    /// Sends an event to every subscriber.
    ///
    /// # Errors
    /// [`QueueError::Encode`] if the event cannot be encoded.
    pub fn publish_event(&self, event: &Event, headers: &Headers) -> Result<(), QueueError> {
        let body = Arc::new(to_msgpack(event)?);
        // No subscriber is fine: events are not kept, as with the broker's topic exchange.
        let _ = self.inner.events.send((body, headers.clone()));
        Ok(())
    }

    pub fn consume_tasks(&self) -> MemoryTaskStream {
        MemoryTaskStream {
            broker: self.clone(),
        }
    }

    pub fn subscribe_events(&self) -> MemoryEventStream {
        MemoryEventStream {
            rx: self.inner.events.subscribe(),
        }
    }

    pub fn task_queue_depth(&self) -> u32 {
        u32::try_from(self.queues().ready.len()).unwrap_or(u32::MAX)
    }

    pub fn parked_count(&self) -> u32 {
        u32::try_from(self.queues().parked.len()).unwrap_or(u32::MAX)
    }

    /// The parked messages, oldest first.
    pub fn parked(&self) -> Vec<ParkedMessage> {
        self.queues().parked.clone()
    }

    fn requeue(&self, mut message: Message) {
        if message.deliveries > self.inner.delivery_limit {
            message.headers.insert(
                PARK_REASON_HEADER.into(),
                format!("delivery limit of {} reached", self.inner.delivery_limit),
            );
            self.park(message);
            return;
        }
        // At the front: a returned task keeps its place, as RabbitMQ requeues it.
        self.queues().ready.push_front(message);
        self.inner.ready.notify_one();
    }

    fn park(&self, message: Message) {
        self.release(&message);
        let body = Arc::unwrap_or_clone(message.body);
        self.queues().parked.push(ParkedMessage {
            body,
            headers: message.headers,
        });
    }
}

/// Tasks for one consumer.
#[derive(Debug)]
pub struct MemoryTaskStream {
    broker: MemoryBroker,
}

impl MemoryTaskStream {
    /// Waits for the next task.
    pub async fn next(&mut self) -> Option<Result<MemoryDelivery, QueueError>> {
        loop {
            // Register interest before looking, so a publish in between is not missed.
            let notified = self.broker.inner.ready.notified();
            let popped = self.broker.queues().ready.pop_front();
            if let Some(mut message) = popped {
                message.deliveries += 1;
                return Some(Ok(MemoryDelivery {
                    message: Some(message),
                    broker: self.broker.clone(),
                }));
            }
            notified.await;
        }
    }
}

/// One task delivery; dropped unsettled, it returns to the queue.
#[derive(Debug)]
pub struct MemoryDelivery {
    message: Option<Message>,
    broker: MemoryBroker,
}

impl MemoryDelivery {
    fn message(&self) -> &Message {
        // Only settling takes the message, and settling consumes `self`.
        self.message
            .as_ref()
            .unwrap_or_else(|| unreachable!("settled delivery used"))
    }

    pub fn body(&self) -> &[u8] {
        &self.message().body
    }

    pub fn headers(&self) -> Headers {
        self.message().headers.clone()
    }

    pub fn message_id(&self) -> Option<String> {
        Some(self.message().message_id.clone())
    }

    /// # Errors
    /// [`DecodeError`] naming the field that did not decode.
    pub fn task(&self) -> Result<SaveTask, DecodeError> {
        from_msgpack(self.body())
    }

    /// Deliveries before this one.
    pub fn delivery_count(&self) -> u32 {
        self.message().deliveries.saturating_sub(1)
    }

    pub fn redelivered(&self) -> bool {
        self.message().deliveries > 1
    }

    pub fn ack(mut self) {
        if let Some(message) = self.message.take() {
            self.broker.release(&message);
        }
    }

    pub fn requeue(mut self) {
        if let Some(message) = self.message.take() {
            self.broker.requeue(message);
        }
    }

    pub fn park(mut self, reason: &str) {
        if let Some(mut message) = self.message.take() {
            message
                .headers
                .insert(PARK_REASON_HEADER.into(), reason.to_owned());
            message
                .headers
                .insert("x-luna-attempts".into(), message.deliveries.to_string());
            self.broker.park(message);
        }
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            self.broker.requeue(message);
        }
    }
}

/// Events for one subscriber.
#[derive(Debug)]
pub struct MemoryEventStream {
    rx: broadcast::Receiver<(Arc<Vec<u8>>, Headers)>,
}

impl MemoryEventStream {
    /// The next event; `None` when the broker is gone.
    pub async fn next(&mut self) -> Option<(Result<Event, DecodeError>, Headers)> {
        loop {
            match self.rx.recv().await {
                Ok((body, headers)) => return Some((from_msgpack(&body), headers)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "event subscriber fell behind; oldest events dropped"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deliveries_are_settled_explicitly() {
        let broker = MemoryBroker::new(2);
        broker
            .publish_task_bytes(b"a", "a", &Headers::new())
            .expect("room");
        broker
            .publish_task_bytes(b"b", "b", &Headers::new())
            .expect("room");
        let mut stream = broker.consume_tasks();
        let first = stream.next().await.expect("some").expect("ok");
        assert_eq!(first.body(), b"a");
        drop(first); // unsettled: back to the front
        let again = stream.next().await.expect("some").expect("ok");
        assert_eq!(
            (again.body(), again.delivery_count(), again.redelivered()),
            (&b"a"[..], 1, true)
        );
        again.ack();
        let b = stream.next().await.expect("some").expect("ok");
        b.park("bad");
        assert_eq!(broker.task_queue_depth(), 0);
        assert_eq!(broker.parked()[0].headers[PARK_REASON_HEADER], "bad");
    }

    #[tokio::test]
    async fn the_delivery_limit_parks_a_task_that_keeps_coming_back() {
        let broker = MemoryBroker::new(2);
        broker
            .publish_task_bytes(b"crashy", "crashy", &Headers::new())
            .expect("room");
        let mut stream = broker.consume_tasks();
        for _ in 0..3 {
            stream.next().await.expect("some").expect("ok").requeue();
        }
        assert_eq!(broker.task_queue_depth(), 0);
        assert!(broker.parked()[0].headers[PARK_REASON_HEADER].contains("delivery limit"));
    }

    fn bounded(max_tasks: usize, max_bytes: u64) -> MemoryBroker {
        MemoryBroker::bounded(
            10,
            MemoryBounds {
                max_tasks,
                max_bytes,
            },
        )
    }

    #[tokio::test]
    async fn a_full_queue_refuses_until_a_task_is_settled() {
        let broker = bounded(2, u64::MAX);
        let none = Headers::new();
        broker.publish_task_bytes(b"a", "a", &none).expect("room");
        broker.publish_task_bytes(b"b", "b", &none).expect("room");
        let full = broker.publish_task_bytes(b"c", "c", &none);
        assert!(
            matches!(full, Err(QueueError::Full { tasks: 2, bytes: 2 })),
            "{full:?}"
        );
        // Being saved still counts: the task is still in memory.
        let mut stream = broker.consume_tasks();
        let a = stream.next().await.expect("some").expect("ok");
        assert!(broker.publish_task_bytes(b"c", "c", &none).is_err());
        // Returned unsettled, it is taken back even though the queue is full.
        drop(a);
        assert_eq!((broker.task_queue_depth(), broker.held()), (2, (2, 2)));
        stream.next().await.expect("some").expect("ok").ack();
        broker
            .publish_task_bytes(b"c", "c", &none)
            .expect("room again");
        stream.next().await.expect("some").expect("ok").park("bad");
        assert_eq!(broker.held(), (1, 1), "parked tasks leave the bound");
    }

    #[test]
    fn bytes_are_bounded_too_but_one_large_task_always_fits_an_empty_queue() {
        let broker = bounded(100, 10);
        let none = Headers::new();
        broker.publish_task_bytes([0; 6], "a", &none).expect("room");
        assert!(matches!(
            broker.publish_task_bytes([0; 5], "b", &none),
            Err(QueueError::Full { tasks: 1, bytes: 6 })
        ));
        broker
            .publish_task_bytes([0; 4], "b", &none)
            .expect("exactly full");

        let empty = bounded(100, 10);
        empty
            .publish_task_bytes([0; 50], "big", &none)
            .expect("alone, a task larger than the bound is taken");
        assert!(empty.publish_task_bytes([0; 1], "more", &none).is_err());
    }
}
