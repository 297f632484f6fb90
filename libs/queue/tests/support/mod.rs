//! Shared by the reconnection tests: a TCP proxy the test controls, the broker's own view of
//! our connections (`rabbitmqctl`), and consumer loops that resubscribe the way the saver and
//! status services do.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luna_job::{Event, EventKind, ImageFormat, JobId};
use luna_queue::{Broker, Headers, TaskLabel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker under test: `LUNA_AMQP_URL` or RabbitMQ on this machine.
pub fn amqp_url() -> String {
    std::env::var("LUNA_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// `host:port` of an `amqp://` URL.
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    url.replacen(&authority(url), &addr.to_string(), 1)
}

pub fn unique_prefix(what: &str) -> String {
    format!("t{what}{}", uuid::Uuid::new_v4().simple())
}

// ---------------------------------------------------------------------------------------------
// The proxy.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    /// Accept every byte, forward none, in both directions: a stalled network or broker. When
    /// forwarding resumes, connections that lived through the stall are cut (their streams lost
    /// bytes), as a NAT or firewall that timed them out would.
    BlackHole,
}

#[derive(Debug)]
struct ProxyState {
    mode: watch::Sender<Mode>,
    /// Upstream connections open now.
    live: AtomicUsize,
    /// Upstream connections opened so far.
    opened: AtomicUsize,
    /// Local ports of the open upstream connections: the broker's `peer_port` for them.
    ports: Mutex<HashSet<u16>>,
}

/// A TCP proxy in front of the broker, under the test's control.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Forward);
        let state = Arc::new(ProxyState {
            mode,
            live: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            ports: Mutex::new(HashSet::new()),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(client, target.clone(), shared.clone()));
            }
        });
        Self { addr, state, task }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.mode.send_replace(mode);
    }

    /// Upstream (broker) connections open through the proxy now.
    pub fn live(&self) -> usize {
        self.state.live.load(Ordering::SeqCst)
    }

    pub fn opened(&self) -> usize {
        self.state.opened.load(Ordering::SeqCst)
    }

    /// The broker-side `peer_port`s of the connections through this proxy.
    pub fn ports(&self) -> HashSet<u16> {
        self.state.ports.lock().expect("ports lock").clone()
    }
}

async fn serve(mut client: TcpStream, target: String, state: Arc<ProxyState>) {
    let mut mode = state.mode.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    if *mode.borrow_and_update() == Mode::BlackHole {
        // Swallow everything until the stall ends, then hang up.
        loop {
            tokio::select! {
                r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
                changed = mode.changed() => if changed.is_err() || *mode.borrow() == Mode::Forward { return },
            }
        }
    }
    let Ok(upstream) = TcpStream::connect(&target).await else {
        return;
    };
    let port = upstream.local_addr().map(|a| a.port()).unwrap_or(0);
    state.ports.lock().expect("ports lock").insert(port);
    state.live.fetch_add(1, Ordering::SeqCst);
    state.opened.fetch_add(1, Ordering::SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut back = vec![0u8; 64 * 1024];
    let mut stalled = false;
    loop {
        let holing = *mode.borrow() == Mode::BlackHole;
        tokio::select! {
            r = cr.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => if !holing && uw.write_all(&buf[..n]).await.is_err() { break },
            },
            r = ur.read(&mut back) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => if !holing && cw.write_all(&back[..n]).await.is_err() { break },
            },
            changed = mode.changed() => {
                if changed.is_err() { break }
                match *mode.borrow() {
                    Mode::BlackHole => stalled = true,
                    Mode::Forward if stalled => break,
                    Mode::Forward => {}
                }
            }
        }
    }
    state.ports.lock().expect("ports lock").remove(&port);
    state.live.fetch_sub(1, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------------------------
// The broker's view, through rabbitmqctl.

/// One AMQP connection as the broker lists it.
#[derive(Debug, Clone)]
pub struct BrokerConnection {
    pub pid: String,
    pub peer_port: u16,
    pub channels: u64,
    pub connection_name: Option<String>,
}

fn rabbitmqctl(node: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = std::process::Command::new("rabbitmqctl");
    if let Some(node) = node {
        cmd.args(["-n", node]);
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every connection of `node` (the machine's broker when `None`).
pub fn list_connections(node: Option<&str>) -> Vec<BrokerConnection> {
    // Tab-separated rather than JSON: the JSON formatter prints pids in a form that
    // `close_connection` does not take.
    let text = rabbitmqctl(
        node,
        &[
            "-q",
            "--no-table-headers",
            "list_connections",
            "pid",
            "peer_port",
            "channels",
            "client_properties",
        ],
    )
    .expect("list connections");
    text.lines()
        .filter_map(|line| {
            let mut cols = line.splitn(4, '\t');
            let pid = cols.next()?.trim().to_owned();
            let peer_port = cols.next()?.trim().parse().ok()?;
            let channels = cols.next()?.trim().parse().ok()?;
            let connection_name = cols.next().and_then(connection_name);
            Some(BrokerConnection {
                pid,
                peer_port,
                channels,
                connection_name,
            })
        })
        .collect()
}

/// The `connection_name` in an Erlang-formatted `client_properties`:
/// `{"connection_name",longstr,<<"name">>}` or with a plain `"name"`.
fn connection_name(props: &str) -> Option<String> {
    let rest = &props[props.find("connection_name")? + "connection_name".len()..];
    let rest = &rest[rest.find("longstr,")? + "longstr,".len()..];
    let rest = rest.trim_start_matches("<<");
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// Makes the broker close `pid` (a `connection.close` with CONNECTION_FORCED).
pub fn close_connection(node: Option<&str>, pid: &str) {
    // The connection may already be gone; that is what we want anyway.
    let _ = rabbitmqctl(node, &["close_connection", pid, "forced by a test"]);
}

// ---------------------------------------------------------------------------------------------
// Work.

/// Publishes task number `n` (any bytes do: the consumers here do not decode them) and returns
/// its message id.
pub async fn publish_task(
    broker: &Broker,
    job: &JobId,
    n: u32,
) -> Result<String, luna_queue::QueueError> {
    let label = TaskLabel {
        job_id: job.clone(),
        image_index: n,
        format: ImageFormat::Png,
    };
    broker
        .publish_task_bytes(format!("task {n}").as_bytes(), &label, &Headers::new())
        .await?;
    Ok(label.message_id())
}

/// Publishes a `save_job_queued` event for `job`.
pub async fn publish_event(broker: &Broker, job: &JobId) -> Result<(), luna_queue::QueueError> {
    let event = Event::now(job.clone(), EventKind::SaveJobQueued { num_images: 1 });
    broker.publish_event(&event, &Headers::new()).await
}

/// Consumes tasks like a saver slot: ack each, and consume anew whenever the stream ends.
/// Sends the message id of every delivery.
pub fn task_consumer(
    broker: Broker,
    tag: String,
) -> (mpsc::UnboundedReceiver<String>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let _ = broker.declare_topology().await;
            let mut stream = match broker.consume_tasks(&tag).await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            while let Some(Ok(delivery)) = stream.next().await {
                let id = delivery.message_id().unwrap_or_default();
                if delivery.ack().await.is_ok() {
                    let _ = tx.send(id);
                }
            }
            stream.cancel().await;
        }
    });
    (rx, task)
}

/// Subscribes to events like the status relay: resubscribes whenever the stream ends.
pub fn event_consumer(broker: Broker) -> (mpsc::UnboundedReceiver<Event>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let _ = broker.declare_topology().await;
            let mut stream = match broker.subscribe_events(None).await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            while let Some(Ok((Ok(event), _))) = stream.next().await {
                let _ = tx.send(event);
            }
        }
    });
    (rx, task)
}

/// Retries `publish` until it succeeds or `limit` passes; the time it took.
pub async fn publish_until_ok<F, Fut>(limit: Duration, mut publish: F) -> Result<Duration, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), luna_queue::QueueError>>,
{
    let start = tokio::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match publish().await {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// Waits up to `limit` for `want` on `rx`, skipping anything else.
pub async fn receive<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    limit: Duration,
    want: impl Fn(&T) -> bool,
) -> bool {
    tokio::time::timeout(limit, async {
        while let Some(item) = rx.recv().await {
            if want(&item) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// Resident set size of this process, from /proc.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Threads of this process (lapin runs one I/O thread per connection).
pub fn threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub type Counts = BTreeMap<&'static str, u64>;
