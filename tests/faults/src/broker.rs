//! The broker as the suite sees it: the shared RabbitMQ at `LUNA_AMQP_URL`, reached directly
//! (never through a scenario's proxy) for auditing and cleanup.
//!
//! Other people share this broker: the suite only ever touches names under its own prefix and
//! connections it can prove are its own (by the local port its proxy connected from). It never
//! closes every connection.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker the suite uses: `LUNA_AMQP_URL`, or RabbitMQ on localhost.
pub fn amqp_url() -> String {
    std::env::var("LUNA_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// `host:port` of an `amqp://user:pass@host:port/vhost` URL, resolved.
///
/// # Errors
/// When the URL has no host part or the host does not resolve.
pub fn broker_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    use std::net::ToSocketAddrs as _;
    host_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolves to nothing"))
}

/// `url` with its host and port replaced by `addr` (to send a process through a proxy).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let (creds, rest) = match rest.rsplit_once('@') {
        Some((c, r)) => (format!("{c}@"), r),
        None => (String::new(), rest),
    };
    let vhost = rest.split_once('/').map_or("", |(_, v)| v);
    format!("{scheme}://{creds}{addr}/{vhost}")
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .context("connecting to the broker timed out")?
    .with_context(|| format!("no RabbitMQ answers at {url}: the suite needs one (`rabbitmq-server -detached`, or set LUNA_AMQP_URL)"))
}

/// Messages waiting in `<prefix>.parked`, by passive declaration; 0 when it does not exist.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn parked_count(url: &str, prefix: &str) -> anyhow::Result<u32> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let count = match ch
        .queue_declare(
            format!("{prefix}.parked").as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => q.message_count(),
        Err(_) => 0,
    };
    let _ = conn.close(200, "audited".into()).await;
    Ok(count)
}

/// Names under `prefix.` that the broker lists, from `rabbitmqctl list_<what> name`.
fn listed(what: &str, prefix: &str) -> Vec<String> {
    let Ok(out) = Command::new("rabbitmqctl")
        .args(["-q", what, "name", "--no-table-headers"])
        .output()
    else {
        return Vec::new();
    };
    let dotted = format!("{prefix}.");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&dotted))
        .map(str::to_owned)
        .collect()
}

/// Deletes every queue and exchange named `<prefix>.*`: the ones the protocol names, and any
/// other that `rabbitmqctl` lists (status instances' queues, streams, what a later version
/// adds).
///
/// # Errors
/// When the broker cannot be reached.
pub async fn delete_prefix(url: &str, prefix: &str) -> anyhow::Result<()> {
    let conn = connect(url).await?;
    let mut queues: HashSet<String> = ["save", "parked"]
        .iter()
        .map(|q| format!("{prefix}.{q}"))
        .collect();
    queues.extend(listed("list_queues", prefix));
    let mut exchanges: HashSet<String> = ["tasks", "events", "parked"]
        .iter()
        .map(|q| format!("{prefix}.{q}"))
        .collect();
    exchanges.extend(listed("list_exchanges", prefix));
    for q in &queues {
        // A fresh channel each time: deleting what is not there closes the channel.
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for e in &exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "cleaned up".into()).await;
    Ok(())
}

/// Closes, on the broker's side, the connections that come from these local ports (the
/// upstream sockets of a scenario's proxy). Returns how many it closed.
///
/// # Errors
/// When `rabbitmqctl` cannot list connections.
pub fn close_connections(ports: &[u16]) -> anyhow::Result<usize> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "pid",
            "name",
            "--no-table-headers",
        ])
        .output()
        .context("running rabbitmqctl list_connections")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl list_connections failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut closed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "<rabbit@host.1.2345.0>\t127.0.0.1:54321 -> 127.0.0.1:5672"
        let Some((pid, name)) = line.trim().split_once('\t') else {
            continue;
        };
        let Some(port) = name
            .split(" -> ")
            .next()
            .and_then(|from| from.rsplit(':').next())
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            continue;
        };
        if !ports.contains(&port) {
            continue;
        }
        // close_connection takes the connection's Erlang pid, not its name.
        let status = Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                pid.trim(),
                "fault suite: forced close",
            ])
            .status()
            .context("running rabbitmqctl close_connection")?;
        if status.success() {
            closed += 1;
        }
    }
    Ok(closed)
}

/// One event as published on `<prefix>.events`.
#[derive(Debug, Clone)]
pub struct SeenEvent {
    pub name: String,
    pub job_id: String,
    pub index: Option<u64>,
}

/// Every event of a namespace, recorded from a queue of the suite's own (exclusive, so it
/// vanishes with the recorder's connection).
#[derive(Debug, Clone)]
pub struct EventRecorder {
    events: Arc<Mutex<Vec<SeenEvent>>>,
    _conn: Arc<Connection>,
}

impl EventRecorder {
    /// Binds `<prefix>.audit.<uuid>` to `<prefix>.events` with `#` and starts recording.
    ///
    /// # Errors
    /// When the broker cannot be reached or the exchange does not exist yet.
    pub async fn start(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let conn = connect(url).await?;
        let ch = conn.create_channel().await?;
        let queue = format!("{prefix}.audit.{}", uuid::Uuid::new_v4().simple());
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            queue.as_str().into(),
            format!("{prefix}.events").as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding the audit queue (is the events exchange declared yet?)")?;
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "fault-audit".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if let Some(e) = decode_event(&delivery.data) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(Self {
            events,
            _conn: Arc::new(conn),
        })
    }

    pub fn snapshot(&self) -> Vec<SeenEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn decode_event(body: &[u8]) -> Option<SeenEvent> {
    let value = rmpv::decode::read_value(&mut &body[..]).ok()?;
    let map = value.as_map()?;
    let field = |k: &str| {
        map.iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v)
    };
    Some(SeenEvent {
        name: field("event")?.as_str()?.to_owned(),
        job_id: field("job_id")?.as_str()?.to_owned(),
        index: field("index").and_then(rmpv::Value::as_u64),
    })
}
