//! A TCP proxy between the services and the broker, under the suite's control.
//!
//! Every process of a scenario reaches RabbitMQ through one of these, so the proxy sees each of
//! their connections: it counts them (the "connections" columns), knows the local port of each
//! upstream socket (to close exactly these connections on the broker side), and can
//! - pass bytes both ways ([`Mode::Pass`]);
//! - black-hole ([`Mode::BlackHole`]): keep every connection open and accept new ones, but
//!   forward nothing in either direction until passing again, as a stalled network does;
//! - cut every connection at once ([`Proxy::cut_all`]), as a broker restart does.
//!
//! Other users of the shared broker are never touched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    BlackHole,
}

/// A running proxy; cheap to clone. It stops when the last clone drops.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by `cut_all`: every connection task watching it ends, dropping both sockets.
    cuts: watch::Sender<u64>,
    /// Live connections: id -> local address of the upstream socket (once connected).
    conns: Mutex<HashMap<u64, Option<SocketAddr>>>,
    accepted: AtomicU64,
    accept_task: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let (cuts, _) = watch::channel(0u64);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let accept_task = tokio::spawn(async move {
                let mut next_id = 0u64;
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let Some(inner) = weak.upgrade() else { return };
                    next_id += 1;
                    inner.accepted.fetch_add(1, Ordering::Relaxed);
                    lock(&inner.conns).insert(next_id, None);
                    let weak = weak.clone();
                    let mode = inner.mode.subscribe();
                    let cuts = inner.cuts.subscribe();
                    drop(inner);
                    tokio::spawn(connection(next_id, client, upstream, mode, cuts, weak));
                }
            })
            .abort_handle();
            Inner {
                addr,
                mode,
                cuts,
                conns: Mutex::new(HashMap::new()),
                accepted: AtomicU64::new(0),
                accept_task,
            }
        });
        Ok(Self { inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        self.inner.mode.send_replace(mode);
    }

    /// Closes every connection through the proxy, both sides.
    pub fn cut_all(&self) {
        self.inner.cuts.send_modify(|n| *n += 1);
    }

    /// Connections open right now (client side still attached).
    pub fn live(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Local ports of the live upstream sockets: how the broker names these connections
    /// (`127.0.0.1:<port> -> 127.0.0.1:5672`).
    pub fn upstream_ports(&self) -> Vec<u16> {
        lock(&self.inner.conns)
            .values()
            .flatten()
            .map(SocketAddr::port)
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn wait_pass(mode: &mut watch::Receiver<Mode>) {
    while *mode.borrow_and_update() != Mode::Pass {
        if mode.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(
    id: u64,
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    mut cuts: watch::Receiver<u64>,
    inner: std::sync::Weak<Inner>,
) {
    cuts.borrow_and_update();
    let work = async {
        // A black hole accepts the connection but does not even reach the broker.
        wait_pass(&mut mode).await;
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let _ = server.set_nodelay(true);
        let _ = client.set_nodelay(true);
        if let (Some(inner), Ok(local)) = (inner.upgrade(), server.local_addr()) {
            lock(&inner.conns).insert(id, Some(local));
        }
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        // Either direction ending ends the connection: AMQP closes are whole-connection.
        tokio::select! {
            () = pump(cr, sw, mode.clone()) => {}
            () = pump(sr, cw, mode.clone()) => {}
        }
    };
    tokio::select! {
        () = work => {}
        _ = cuts.changed() => {}
    }
    if let Some(inner) = inner.upgrade() {
        lock(&inner.conns).remove(&id);
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_pass(&mut mode).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just as the black hole began are held, not forwarded.
        wait_pass(&mut mode).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
