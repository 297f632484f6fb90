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
//!
//! A task from this process's own gateway is queued as it is ([`MemoryBroker::publish_task`]):
//! never encoded, its pixels never copied between gateway and saver. Its size for the byte
//! bound is what its MessagePack encoding would take, counted without writing it. Encoded
//! tasks (other producers, republished tasks) are kept as bytes and decoded on delivery.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use luna_job::codec::{DecodeError, from_msgpack, to_msgpack};
use luna_job::{Event, SaveTask};
use tokio::sync::{Notify, broadcast};

use crate::{Headers, PARK_REASON_HEADER, QueueError};

/// How many events a slow subscriber may lag before it loses the oldest.
const EVENT_BUFFER: usize = 4096;

/// A queued task: as it was built, or as the bytes a producer sent.
#[derive(Debug, Clone)]
enum Payload {
    Typed(Arc<SaveTask>),
    Encoded(Arc<Vec<u8>>),
}

#[derive(Debug, Clone)]
struct Message {
    payload: Payload,
    /// Bytes counted against the bound: the encoded size.
    size: u64,
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
        self.enqueue(Payload::Encoded(Arc::new(body)), size, message_id, headers)
    }

    /// Queues a task as it is, for a consumer in this process.
    ///
    /// # Errors
    /// [`QueueError::Full`] when the task does not fit the bounds; [`QueueError::Encode`] when
    /// it could not be encoded (so could not be sent to any broker either).
    pub fn publish_task(
        &self,
        task: SaveTask,
        message_id: &str,
        headers: &Headers,
    ) -> Result<(), QueueError> {
        let size = encoded_len(&task)?;
        self.enqueue(Payload::Typed(Arc::new(task)), size, message_id, headers)
    }

    fn enqueue(
        &self,
        payload: Payload,
        size: u64,
        message_id: &str,
        headers: &Headers,
    ) -> Result<(), QueueError> {
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
            payload,
            size,
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
        queues.held_bytes = queues.held_bytes.saturating_sub(message.size);
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
        let body = match message.payload {
            Payload::Encoded(body) => Arc::unwrap_or_clone(body),
            Payload::Typed(task) => encode_or_log(&task),
        };
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

    /// The task's MessagePack bytes: as queued, or encoded now for a task queued as it is
    /// (for a child process or a republish, both rare).
    pub fn body(&self) -> Cow<'_, [u8]> {
        match &self.message().payload {
            Payload::Encoded(body) => Cow::Borrowed(body.as_slice()),
            Payload::Typed(task) => Cow::Owned(encode_or_log(task)),
        }
    }

    /// Bytes of the task encoded, without encoding it.
    pub fn body_len(&self) -> usize {
        usize::try_from(self.message().size).unwrap_or(usize::MAX)
    }

    pub fn headers(&self) -> Headers {
        self.message().headers.clone()
    }

    pub fn message_id(&self) -> Option<String> {
        Some(self.message().message_id.clone())
    }

    /// # Errors
    /// [`DecodeError`] naming the field that did not decode.
    pub fn task(&self) -> Result<Arc<SaveTask>, DecodeError> {
        match &self.message().payload {
            Payload::Typed(task) => Ok(task.clone()),
            Payload::Encoded(body) => from_msgpack(body).map(Arc::new),
        }
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

/// Bytes of `task` in MessagePack, counted by serialising it into a counter (nothing is
/// copied, the pixels included).
fn encoded_len(task: &SaveTask) -> Result<u64, QueueError> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    luna_job::codec::write_msgpack(&mut count, task)?;
    Ok(count.0)
}

/// `task` in MessagePack; empty (and logged) if it cannot be encoded, which a task that was
/// counted at publish cannot be.
fn encode_or_log(task: &SaveTask) -> Vec<u8> {
    to_msgpack(task).unwrap_or_else(|e| {
        tracing::error!(error = %e, job_id = %task.job_id, "a queued task could not be encoded");
        Vec::new()
    })
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
        assert_eq!(&*first.body(), b"a");
        drop(first); // unsettled: back to the front
        let again = stream.next().await.expect("some").expect("ok");
        assert_eq!(
            (&*again.body(), again.delivery_count(), again.redelivered()),
            (&b"a"[..], 1, true)
        );
        again.ack();
        let b = stream.next().await.expect("some").expect("ok");
        b.park("bad");
        assert_eq!(broker.task_queue_depth(), 0);
        assert_eq!(broker.parked()[0].headers[PARK_REASON_HEADER], "bad");
    }

    /// A one-image task of `pixels` bytes, from the sample request.
    fn task(pixels: usize) -> SaveTask {
        let json = include_str!("../../../docs/examples/request.json");
        let mut request: luna_job::SaveRequest =
            luna_job::codec::from_json(json.as_bytes()).expect("the sample request decodes");
        request.images.truncate(1);
        let job = luna_job::JobId::new();
        let mut task = request
            .into_tasks(&job, chrono::Local::now().fixed_offset())
            .remove(0);
        task.image.pixels = vec![7u8; pixels].into();
        task
    }

    #[tokio::test]
    async fn a_typed_task_reaches_its_consumer_uncopied_and_counted_at_its_encoded_size() {
        let broker = bounded(10, u64::MAX);
        let task = task(3 << 20);
        let encoded = to_msgpack(&task).expect("encodes");
        let pixels_at = task.image.pixels.as_slice().as_ptr();
        broker
            .publish_task(task, "t/0", &Headers::new())
            .expect("room");
        assert_eq!(broker.held(), (1, encoded.len() as u64));
        let mut stream = broker.consume_tasks();
        let delivery = stream.next().await.expect("some").expect("ok");
        let got = delivery.task().expect("typed");
        assert_eq!(
            got.image.pixels.as_slice().as_ptr(),
            pixels_at,
            "the very same pixels"
        );
        assert_eq!(delivery.body_len(), encoded.len());
        assert!(
            *delivery.body() == encoded[..],
            "encoded on demand as a producer would"
        );
        delivery.park("kept for inspection");
        assert!(broker.parked()[0].body == encoded, "parked as bytes");
        assert_eq!(broker.held(), (0, 0));
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
