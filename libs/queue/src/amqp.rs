//! The RabbitMQ backend.
//!
//! Connections come from a deadpool-lapin pool and have lapin's automatic recovery enabled,
//! so a dropped TCP connection is re-established with its topology and consumers. Publishing
//! goes through one shared channel in confirm mode; any error on it discards the channel and
//! the next publish opens a fresh one, which is how a channel-level close (a 404, a
//! precondition failure) is recovered from. Every broker round trip is bounded by the
//! configured timeout, so callers fail fast instead of hanging when the broker is down or
//! blocked (a blocked connection accepts publishes but never confirms them).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_lapin::{Pool, Runtime};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ConnectionProperties};
use luna_job::codec::{DecodeError, from_msgpack, to_msgpack};
use luna_job::{Event, SaveTask};
use tokio::sync::Mutex;

use crate::topology::{TASK_ROUTING_KEY, Topology};
use crate::{Headers, PARK_REASON_HEADER, QueueError};

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    pub topology: Topology,
    /// Bound on connecting, opening a channel, and waiting for one publish confirm.
    pub timeout: Duration,
    /// Most connections kept open. Each consumer and the publisher share them as channels.
    pub pool_size: usize,
}

impl AmqpConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            topology: Topology::new(prefix),
            timeout: Duration::from_secs(5),
            pool_size: 2,
        }
    }
}

/// A handle on the broker; cheap to clone.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    topology: Topology,
    timeout: Duration,
    publisher: Mutex<Option<Channel>>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("topology", &self.inner.topology)
            .finish_non_exhaustive()
    }
}

async fn bounded<T, E: Into<QueueError>>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(QueueError::Timeout(limit)),
    }
}

impl AmqpBroker {
    /// Connects lazily: the pool is created here, connections on first use.
    ///
    /// # Errors
    /// [`QueueError::CreatePool`] for a malformed configuration.
    pub fn new(config: AmqpConfig) -> Result<Self, QueueError> {
        let pool_config = deadpool_lapin::Config {
            url: Some(config.url.clone()),
            pool: Some(deadpool_lapin::PoolConfig {
                max_size: config.pool_size.max(1),
                timeouts: deadpool_lapin::Timeouts {
                    wait: Some(config.timeout),
                    create: Some(config.timeout),
                    recycle: Some(config.timeout),
                },
                ..Default::default()
            }),
        };
        let pool = pool_config.create_pool(
            || ConnectionProperties::default().enable_auto_recover(),
            Runtime::Tokio1,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                topology: config.topology,
                timeout: config.timeout,
                publisher: Mutex::new(None),
            }),
        })
    }

    /// Creates the handle and declares the topology, so the first publish cannot be lost to a
    /// missing queue.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable within the timeout or refuses the topology.
    pub async fn connect(config: AmqpConfig) -> Result<Self, QueueError> {
        let broker = Self::new(config)?;
        broker.declare_topology().await?;
        Ok(broker)
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Declares the topology (idempotent).
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable or refuses a declaration.
    pub async fn declare_topology(&self) -> Result<(), QueueError> {
        let channel = self.open_channel().await?;
        let result = bounded(self.inner.timeout, self.inner.topology.declare(&channel)).await;
        let _ = channel.close(200, "declared".into()).await;
        result
    }

    /// A fresh channel on a pooled connection.
    async fn open_channel(&self) -> Result<Channel, QueueError> {
        let limit = self.inner.timeout;
        let conn = bounded(limit, self.inner.pool.get()).await?;
        bounded(limit, conn.create_channel()).await
    }

    /// True when a connection to the broker is up (for `/readyz`).
    pub async fn is_ready(&self) -> bool {
        match bounded(self.inner.timeout, self.inner.pool.get()).await {
            Ok(conn) => conn.status().connected(),
            Err(_) => false,
        }
    }

    async fn publisher(&self) -> Result<Channel, QueueError> {
        let mut slot = self.inner.publisher.lock().await;
        if let Some(ch) = slot.as_ref().filter(|ch| ch.status().connected()) {
            return Ok(ch.clone());
        }
        let ch = self.open_channel().await?;
        bounded(
            self.inner.timeout,
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Publishes and waits for the broker's confirm. `mandatory` turns "no queue bound" into an
    /// error instead of a silent drop.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), QueueError> {
        let result = async {
            let ch = self.publisher().await?;
            let options = BasicPublishOptions {
                mandatory,
                ..Default::default()
            };
            let pending = bounded(
                self.inner.timeout,
                ch.basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    body,
                    properties,
                ),
            )
            .await?;
            let confirm = bounded(self.inner.timeout, pending).await?;
            if confirm.is_nack() {
                return Err(QueueError::Nacked);
            }
            if confirm.take_message().is_some() {
                return Err(QueueError::Unroutable(routing_key.to_owned()));
            }
            Ok(())
        }
        .await;
        if matches!(result, Err(QueueError::Broker(_) | QueueError::Timeout(_))) {
            // The channel may be closed or stuck; the next publish opens a new one.
            *self.inner.publisher.lock().await = None;
        }
        result
    }

    /// Publishes an already encoded task.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm within the timeout.
    pub async fn publish_task_bytes(
        &self,
        body: &[u8],
        message_id: &str,
        headers: &Headers,
    ) -> Result<(), QueueError> {
        let props = message_properties(message_id, headers);
        let exchange = self.inner.topology.tasks_exchange();
        self.publish(&exchange, TASK_ROUTING_KEY, body, props, true)
            .await
    }

    /// Publishes an event to the events exchange under its name and waits for the confirm.
    ///
    /// # Errors
    /// [`QueueError`] when the broker does not confirm within the timeout.
    pub async fn publish_event(&self, event: &Event, headers: &Headers) -> Result<(), QueueError> {
        let body = to_msgpack(event)?;
        let props = message_properties(&crate::broker::event_message_id(event), headers);
        let exchange = self.inner.topology.events_exchange();
        self.publish(&exchange, event.name(), &body, props, false)
            .await
    }

    /// Starts consuming tasks on a channel of its own with prefetch 1: one unacknowledged task
    /// at a time, so every waiting task stays available to idle consumers elsewhere.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn consume_tasks(&self, consumer_tag: &str) -> Result<AmqpTaskStream, QueueError> {
        let channel = self.open_channel().await?;
        let limit = self.inner.timeout;
        bounded(limit, channel.basic_qos(1, BasicQosOptions::default())).await?;
        let consumer = bounded(
            limit,
            channel.basic_consume(
                self.inner.topology.task_queue().into(),
                consumer_tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(AmqpTaskStream {
            channel,
            consumer,
            broker: self.clone(),
            tag: consumer_tag.to_owned(),
        })
    }

    /// Subscribes to every event. `queue` names a durable queue shared by restarts of one
    /// instance; without it the queue is private to this connection and vanishes with it.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn subscribe_events(
        &self,
        queue: Option<&str>,
    ) -> Result<AmqpEventStream, QueueError> {
        let channel = self.open_channel().await?;
        let limit = self.inner.timeout;
        let name = queue.map_or_else(
            || {
                format!(
                    "{}.status.{}",
                    self.inner.topology.prefix,
                    uuid::Uuid::now_v7().simple()
                )
            },
            str::to_owned,
        );
        let options = if queue.is_some() {
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            }
        } else {
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            }
        };
        bounded(
            limit,
            channel.queue_declare(name.as_str().into(), options, FieldTable::default()),
        )
        .await?;
        let exchange = self.inner.topology.events_exchange();
        bounded(
            limit,
            channel.queue_bind(
                name.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        bounded(limit, channel.basic_qos(256, BasicQosOptions::default())).await?;
        let consumer = bounded(
            limit,
            channel.basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(AmqpEventStream {
            _channel: channel,
            consumer,
        })
    }

    /// Tasks waiting in the task queue (ready, not yet delivered).
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn task_queue_depth(&self) -> Result<u32, QueueError> {
        self.message_count(&self.inner.topology.task_queue()).await
    }

    /// Messages in the parked queue.
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn parked_count(&self) -> Result<u32, QueueError> {
        self.message_count(&self.inner.topology.parked_queue())
            .await
    }

    async fn message_count(&self, queue: &str) -> Result<u32, QueueError> {
        let channel = self.open_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let result = bounded(
            self.inner.timeout,
            channel.queue_declare(queue.into(), passive, FieldTable::default()),
        )
        .await;
        let _ = channel.close(200, "counted".into()).await;
        Ok(result?.message_count())
    }

    /// Deletes every queue and exchange of the topology (tests and teardown).
    ///
    /// # Errors
    /// [`QueueError`] when the broker is unreachable.
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let t = &self.inner.topology;
        let channel = self.open_channel().await?;
        let limit = self.inner.timeout;
        for queue in [t.task_queue(), t.parked_queue(), t.events_stream()] {
            bounded(
                limit,
                channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
            )
            .await?;
        }
        for exchange in [t.tasks_exchange(), t.events_exchange(), t.parked_exchange()] {
            bounded(
                limit,
                channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()),
            )
            .await?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Moves a message to the parked queue with its reason, waiting for the confirm.
    async fn park_bytes(
        &self,
        body: &[u8],
        mut props: BasicProperties,
        reason: &str,
        attempts: u32,
    ) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        // The broker's delivery bookkeeping describes the old message; carried over, it would
        // get a task an operator moves back parked again at once.
        for (k, v) in props.headers().clone().unwrap_or_default().inner() {
            if !matches!(
                k.as_str(),
                "x-delivery-count"
                    | "x-death"
                    | "x-first-death-reason"
                    | "x-first-death-queue"
                    | "x-first-death-exchange"
            ) {
                headers.insert(k.clone(), v.clone());
            }
        }
        headers.insert(
            "x-luna-attempts".into(),
            AMQPValue::LongString(LongString::from(attempts.to_string())),
        );
        headers.insert(
            PARK_REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-luna-parked-at".into(),
            AMQPValue::LongString(LongString::from(now_rfc3339())),
        );
        props = props.with_headers(headers).with_delivery_mode(2);
        let exchange = self.inner.topology.parked_exchange();
        self.publish(&exchange, "", body, props, true).await
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn message_properties(message_id: &str, headers: &Headers) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BasicProperties::default()
        .with_content_type("application/msgpack".into())
        .with_delivery_mode(2) // persistent
        .with_message_id(message_id.into())
        .with_timestamp(now)
        .with_headers(table)
}

/// Reads string-like headers; other kinds are skipped.
fn headers_of(props: &BasicProperties) -> Headers {
    let mut out = Headers::new();
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::ShortUInt(n) => n.to_string(),
                _ => continue,
            };
            out.insert(k.as_str().to_owned(), value);
        }
    }
    out
}

/// Tasks delivered to one consumer.
pub struct AmqpTaskStream {
    channel: Channel,
    consumer: lapin::Consumer,
    broker: AmqpBroker,
    tag: String,
}

impl std::fmt::Debug for AmqpTaskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTaskStream")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl AmqpTaskStream {
    /// The next delivery; `None` once the consumer is cancelled or its channel is gone.
    pub async fn next(&mut self) -> Option<Result<AmqpDelivery, QueueError>> {
        let item = self.consumer.next().await?;
        Some(
            item.map(|d| AmqpDelivery {
                inner: d,
                broker: self.broker.clone(),
            })
            .map_err(QueueError::from),
        )
    }

    /// Stops consuming. Deliveries not yet settled go back to the queue when the channel closes.
    pub async fn cancel(self) {
        let limit = self.broker.inner.timeout;
        let _ = bounded(
            limit,
            self.channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
        let _ = bounded(limit, self.channel.close(200, "consumer stopped".into())).await;
    }
}

/// One task delivery, to be settled explicitly.
pub struct AmqpDelivery {
    inner: lapin::message::Delivery,
    broker: AmqpBroker,
}

impl std::fmt::Debug for AmqpDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpDelivery")
            .field("bytes", &self.inner.data.len())
            .field("redelivered", &self.inner.redelivered)
            .finish_non_exhaustive()
    }
}

impl AmqpDelivery {
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    pub fn headers(&self) -> Headers {
        headers_of(&self.inner.properties)
    }

    pub fn message_id(&self) -> Option<String> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
    }

    /// The exchange the message was published to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// The task, if the body decodes.
    ///
    /// # Errors
    /// [`DecodeError`] naming the field that did not decode.
    pub fn task(&self) -> Result<SaveTask, DecodeError> {
        from_msgpack(&self.inner.data)
    }

    /// How often this message was delivered before: RabbitMQ's `x-delivery-count` on quorum
    /// queues, read only on redeliveries. On a first delivery it is 0 whatever the header says,
    /// since a producer may have set (or copied) that header itself.
    pub fn delivery_count(&self) -> u32 {
        if !self.inner.redelivered {
            return 0;
        }
        self.headers()
            .get("x-delivery-count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }

    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// Settles the delivery as done.
    ///
    /// # Errors
    /// [`QueueError`] when the channel is gone (the broker then redelivers the task).
    pub async fn ack(self) -> Result<(), QueueError> {
        bounded(
            self.broker.inner.timeout,
            self.inner.acker.ack(BasicAckOptions::default()),
        )
        .await
        .map(drop)
    }

    /// Hands the delivery back to the queue at once.
    ///
    /// # Errors
    /// [`QueueError`] when the channel is gone (which requeues it too).
    pub async fn requeue(self) -> Result<(), QueueError> {
        let options = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        bounded(self.broker.inner.timeout, self.inner.acker.nack(options))
            .await
            .map(drop)
    }

    /// Moves the message to the parked queue with `reason` in [`PARK_REASON_HEADER`], then
    /// acknowledges it. The copy is confirmed before the original is acknowledged, so a crash
    /// in between leaves the task queued, never lost.
    ///
    /// # Errors
    /// [`QueueError`] when parking or acknowledging fails; the task then stays queued.
    pub async fn park(self, reason: &str) -> Result<(), QueueError> {
        let attempts = self.delivery_count() + 1;
        self.broker
            .park_bytes(
                &self.inner.data,
                self.inner.properties.clone(),
                reason,
                attempts,
            )
            .await?;
        self.ack().await
    }
}

/// Events from the events exchange, each decoded or with its decode error.
pub struct AmqpEventStream {
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl std::fmt::Debug for AmqpEventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpEventStream").finish_non_exhaustive()
    }
}

impl AmqpEventStream {
    /// The next event with its headers. `None` when the subscription ended.
    ///
    /// Events are acknowledged on receipt: status is a relay with in-memory state, and an
    /// event it cannot decode is logged and skipped rather than redelivered forever.
    pub async fn next(
        &mut self,
    ) -> Option<Result<(Result<Event, DecodeError>, Headers), QueueError>> {
        let delivery = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e.into())),
        };
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        Some(Ok((
            from_msgpack(&delivery.data),
            headers_of(&delivery.properties),
        )))
    }
}
