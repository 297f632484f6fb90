//! The RabbitMQ backend.
//!
//! # Connections
//! Each handle owns at most two AMQP connections, one it publishes on and one its consumers
//! use (RabbitMQ blocks a publishing connection under memory pressure, which must not stall
//! acknowledgements), or a single one with `pool_size = 1`. A connection is opened on first
//! use and replaced, never added to, when it fails: the next operation that needs it dials
//! again, trying the cluster's nodes in turn. Consumers end with their connection; callers
//! consume anew (the saver's slots and the status relay do), which re-creates their channel
//! and consumer on the new connection, on whichever node answered.
//!
//! lapin's own automatic recovery is not used. It reconnects inside the I/O loop, behind the
//! handle's back: a connection dropped while it recovers is not closed (lapin only closes a
//! connection on drop while it is connecting or connected), so its I/O thread brings it back
//! with no owner, and every broker-forced close leaked one connection, its thread and buffers.
//! It also reconnects to the one URL it was given, which cannot follow a cluster.
//!
//! # Stalls
//! Connections ask for a short AMQP heartbeat (`heartbeat`), so a broker that stops answering
//! (a stalled node, a black-holed network) fails the connection within two heartbeat periods
//! and its consumers end. Every broker round trip, and each publish as a whole, is bounded by
//! the configured timeout; readiness probes the connections with a shorter deadline. A
//! handshake that outlives its deadline keeps running in the background (at most one per
//! connection and node) and is closed if it ever completes, so a stall does not pile them up.
//!
//! # Publishing
//! Publishing goes through one shared channel in confirm mode; any error on it discards the
//! channel and the next publish opens a fresh one, which is how a channel-level close (a 404, a
//! precondition failure) is recovered from. A blocked connection accepts publishes but never
//! confirms them; the timeout turns that into an error too.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use luna_job::codec::{DecodeError, from_msgpack, to_msgpack};
use luna_job::{Event, SaveTask};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::args::redact_url;
use crate::topology::{TASK_ROUTING_KEY, Topology};
use crate::{Headers, PARK_REASON_HEADER, QueueError};

/// Default AMQP heartbeat: a silent broker is given up on after two periods.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Longest a readiness probe waits (less when the broker timeout is shorter), so `/readyz`
/// answers before a prober gives up on it.
pub const READY_PROBE_LIMIT: Duration = Duration::from_secs(2);

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`, or several such URLs separated by commas: the
    /// nodes of one RabbitMQ cluster, tried in turn. A comma inside a password must be
    /// percent-encoded (`%2C`).
    pub url: String,
    pub topology: Topology,
    /// Bound on connecting, opening a channel, one publish (channel, send and confirm), and
    /// any other broker round trip.
    pub timeout: Duration,
    /// Connections kept open: 1 for publishing and consuming on one connection, 2 or more for
    /// separate publishing and consuming connections (the default; more are not used).
    pub pool_size: usize,
    /// AMQP heartbeat asked of the broker (it may pick a shorter one). A broker silent for two
    /// periods is considered gone. Zero leaves it to the broker. A `heartbeat=` in the URL
    /// wins.
    pub heartbeat: Duration,
    /// The `connection_name` client property, shown by `rabbitmqctl list_connections` and the
    /// management UI; `/publish` or `/consume` is appended. Defaults to the program's name
    /// and process id.
    pub connection_name: String,
}

impl AmqpConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            topology: Topology::new(prefix),
            timeout: Duration::from_secs(5),
            pool_size: 2,
            heartbeat: DEFAULT_HEARTBEAT,
            connection_name: default_connection_name(),
        }
    }
}

fn default_connection_name() -> String {
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "luna".to_owned());
    format!("{program}[{}]", std::process::id())
}

/// Parses the comma-separated node URLs, with the heartbeat and connect timeout filled in
/// where the URL does not set them.
pub(crate) fn parse_nodes(config: &AmqpConfig) -> Result<Vec<AMQPUri>, QueueError> {
    let mut nodes = Vec::new();
    for url in config
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        let mut uri: AMQPUri = url
            .parse()
            .map_err(|reason| QueueError::InvalidUrl(format!("{}: {reason}", redact_url(url))))?;
        if uri.query.heartbeat.is_none() {
            let secs = config.heartbeat.as_secs().clamp(0, u64::from(u16::MAX));
            // A heartbeat under a second rounds up rather than turning heartbeats off.
            let secs = if secs == 0 && !config.heartbeat.is_zero() {
                1
            } else {
                secs
            };
            uri.query.heartbeat = u16::try_from(secs).ok();
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = u64::try_from(config.timeout.as_millis()).ok();
        }
        nodes.push(uri);
    }
    if nodes.is_empty() {
        return Err(QueueError::InvalidUrl("no broker URL given".to_owned()));
    }
    Ok(nodes)
}

/// What a connection is used for; each has its own connection unless `pool_size` is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Publishing, declaring, counting.
    Publish,
    /// Task consumers and event subscriptions.
    Consume,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Consume => "consume",
        }
    }
}

type Handshake = JoinHandle<Result<Connection, lapin::Error>>;

/// One connection slot: the connection in use, and handshakes still running per node.
struct Link {
    name: String,
    state: Mutex<LinkState>,
    /// Set once something used this link, so readiness probes only what is in use.
    used: AtomicBool,
}

struct LinkState {
    conn: Option<Arc<Connection>>,
    /// A handshake per node that outlived its caller's deadline. It is awaited again by the
    /// next dial instead of starting another one; if it is dropped, the task still runs and
    /// closes the connection it gets.
    pending: Vec<Option<Handshake>>,
}

/// A handle on the broker; cheap to clone.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<AMQPUri>,
    /// Redacted node URLs, for logs.
    node_names: Vec<String>,
    /// The node the next dial tries first: the last one that answered, or the one after the
    /// last that did not.
    next_node: AtomicUsize,
    links: Vec<Link>,
    topology: Topology,
    timeout: Duration,
    publisher: Mutex<Option<Channel>>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("nodes", &self.inner.node_names)
            .field("topology", &self.inner.topology)
            .finish_non_exhaustive()
    }
}

/// `fut`, or [`QueueError::Timeout`] once `limit` has passed.
pub(crate) async fn bounded<T, E: Into<QueueError>>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(QueueError::Timeout(limit)),
    }
}

impl AmqpBroker {
    /// Connects lazily: URLs are checked here, connections made on first use.
    ///
    /// # Errors
    /// [`QueueError::InvalidUrl`] for a malformed or empty URL list.
    pub fn new(config: AmqpConfig) -> Result<Self, QueueError> {
        let nodes = parse_nodes(&config)?;
        let node_names = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(redact_url)
            .collect();
        let roles: &[Role] = if config.pool_size <= 1 {
            &[Role::Publish]
        } else {
            &[Role::Publish, Role::Consume]
        };
        let links = roles
            .iter()
            .map(|role| Link {
                name: format!("{}/{}", config.connection_name, role.name()),
                state: Mutex::new(LinkState {
                    conn: None,
                    pending: nodes.iter().map(|_| None).collect(),
                }),
                used: AtomicBool::new(false),
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                nodes,
                node_names,
                next_node: AtomicUsize::new(0),
                links,
                topology: config.topology,
                timeout: config.timeout,
                publisher: Mutex::new(None),
            }),
        })
    }

    fn link(&self, role: Role) -> &Link {
        let links = &self.inner.links;
        match role {
            Role::Consume if links.len() > 1 => &links[1],
            _ => &links[0],
        }
    }

    /// The connection for `role`: the current one while it is up, else a new one.
    async fn connection(&self, role: Role) -> Result<Arc<Connection>, QueueError> {
        let link = self.link(role);
        link.used.store(true, Ordering::Relaxed);
        let mut state = link.state.lock().await;
        if let Some(conn) = state.conn.as_ref().filter(|c| c.status().connected()) {
            return Ok(conn.clone());
        }
        if let Some(old) = state.conn.take() {
            // Failed or closed: its I/O loop has ended. Channels still held elsewhere keep
            // only memory, freed when their holders drop them.
            tracing::info!(
                connection = %link.name,
                status = ?old.status(),
                "broker connection lost; reconnecting"
            );
        }
        let conn = Arc::new(self.dial(link, &mut state).await?);
        state.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Tries each node once, from the preferred one.
    async fn dial(&self, link: &Link, state: &mut LinkState) -> Result<Connection, QueueError> {
        let inner = &self.inner;
        let count = inner.nodes.len();
        let first = inner.next_node.load(Ordering::Relaxed) % count;
        let mut last = QueueError::Timeout(inner.timeout);
        for step in 0..count {
            let node = (first + step) % count;
            let handshake = match state.pending[node].take() {
                Some(h) => h,
                None => {
                    let uri = inner.nodes[node].clone();
                    let props = ConnectionProperties::default()
                        .with_connection_name(link.name.as_str().into());
                    tokio::spawn(Connection::connect_uri(uri, props))
                }
            };
            // Kept in the slot while awaited: a caller that gives up leaves it for the next.
            let slot = state.pending[node].insert(handshake);
            let outcome = tokio::time::timeout(inner.timeout, slot).await;
            let result = match outcome {
                Err(_) => {
                    last = QueueError::Timeout(inner.timeout);
                    inner.next_node.store((node + 1) % count, Ordering::Relaxed);
                    tracing::debug!(connection = %link.name, node = %inner.node_names[node], "broker handshake timed out");
                    continue;
                }
                Ok(joined) => {
                    state.pending[node] = None;
                    joined
                }
            };
            match result {
                Ok(Ok(conn)) if conn.status().connected() => {
                    inner.next_node.store(node, Ordering::Relaxed);
                    tracing::info!(connection = %link.name, node = %inner.node_names[node], "connected to the broker");
                    return Ok(conn);
                }
                Ok(Ok(_closed)) => {
                    last = QueueError::Broker(
                        lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed)
                            .into(),
                    );
                }
                Ok(Err(e)) => {
                    tracing::debug!(connection = %link.name, node = %inner.node_names[node], error = %e, "cannot connect to a broker node");
                    last = QueueError::Broker(e);
                }
                Err(join) => {
                    tracing::warn!(connection = %link.name, error = %join, "broker handshake task failed");
                }
            }
            inner.next_node.store((node + 1) % count, Ordering::Relaxed);
        }
        Err(last)
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

    /// A fresh channel on the connection for `role`.
    async fn channel(&self, role: Role) -> Result<Channel, QueueError> {
        let limit = self.inner.timeout;
        let conn = bounded(limit, self.connection(role)).await?;
        bounded(limit, conn.create_channel()).await
    }

    /// A fresh channel on the publishing connection.
    async fn open_channel(&self) -> Result<Channel, QueueError> {
        self.channel(Role::Publish).await
    }

    /// True when every connection in use (or, before any, the publishing one) is up and
    /// answers: a channel opened and closed within [`READY_PROBE_LIMIT`] (or the broker
    /// timeout, when shorter). A stalled broker makes this false at once; a lost one too.
    pub async fn is_ready(&self) -> bool {
        let limit = self.inner.timeout.min(READY_PROBE_LIMIT);
        bounded(limit, self.probe()).await.is_ok()
    }

    async fn probe(&self) -> Result<(), QueueError> {
        let mut roles = vec![Role::Publish];
        if self.inner.links.len() > 1 && self.link(Role::Consume).used.load(Ordering::Relaxed) {
            roles.push(Role::Consume);
        }
        for role in roles {
            let conn = self.connection(role).await?;
            let channel = conn.create_channel().await?;
            channel.close(200, "probe".into()).await?;
        }
        Ok(())
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
        let limit = self.inner.timeout;
        let result = bounded(limit, async {
            let ch = self.publisher().await?;
            let options = BasicPublishOptions {
                mandatory,
                ..Default::default()
            };
            let pending = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    body,
                    properties,
                )
                .await?;
            let confirm = pending.await?;
            if confirm.is_nack() {
                return Err(QueueError::Nacked);
            }
            if confirm.take_message().is_some() {
                return Err(QueueError::Unroutable(routing_key.to_owned()));
            }
            Ok(())
        })
        .await;
        if matches!(
            result,
            Err(QueueError::Broker(_) | QueueError::Timeout(_) | QueueError::Nacked)
        ) {
            // The channel may be closed or stuck; the next publish opens a new one. Whoever
            // holds the slot now is opening one already. A nack counts too: a channel that
            // published to a quorum queue whose leader died can go on refusing every publish
            // to it after a new leader is elected, while a fresh channel finds the new leader.
            if let Ok(mut slot) = self.inner.publisher.try_lock() {
                *slot = None;
            }
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
        let channel = self.channel(Role::Consume).await?;
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
        let channel = self.channel(Role::Consume).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_gets_the_heartbeat_and_connect_timeout() {
        let mut config = AmqpConfig::new(
            "amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5673/%2f?heartbeat=30",
            "t",
        );
        config.heartbeat = Duration::from_secs(3);
        config.timeout = Duration::from_millis(1500);
        let nodes = parse_nodes(&config).expect("two valid URLs");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].authority.host, "h1");
        assert_eq!(nodes[0].query.heartbeat, Some(3));
        assert_eq!(nodes[0].query.connection_timeout, Some(1500));
        assert_eq!(nodes[1].authority.port, 5673);
        assert_eq!(
            nodes[1].query.heartbeat,
            Some(30),
            "the URL's own value wins"
        );
    }

    #[test]
    fn a_sub_second_heartbeat_is_not_turned_off() {
        let mut config = AmqpConfig::new("amqp://h/%2f", "t");
        config.heartbeat = Duration::from_millis(300);
        assert_eq!(
            parse_nodes(&config).expect("valid")[0].query.heartbeat,
            Some(1)
        );
        config.heartbeat = Duration::ZERO;
        assert_eq!(
            parse_nodes(&config).expect("valid")[0].query.heartbeat,
            Some(0)
        );
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        let err = AmqpBroker::new(AmqpConfig::new("amqp://h/%2f,amqp://u:secret@[::1", "t"))
            .expect_err("the second URL does not parse");
        assert!(matches!(err, QueueError::InvalidUrl(_)));
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(matches!(
            AmqpBroker::new(AmqpConfig::new(" , ", "t")),
            Err(QueueError::InvalidUrl(_))
        ));
    }

    #[test]
    fn one_connection_when_the_pool_is_one() {
        let mut config = AmqpConfig::new("amqp://h/%2f", "t");
        config.pool_size = 1;
        let broker = AmqpBroker::new(config).expect("valid");
        assert!(std::ptr::eq(
            broker.link(Role::Publish),
            broker.link(Role::Consume)
        ));
        let broker = AmqpBroker::new(AmqpConfig::new("amqp://h/%2f", "t")).expect("valid");
        assert!(!std::ptr::eq(
            broker.link(Role::Publish),
            broker.link(Role::Consume)
        ));
    }
}
