//! The Luna Saver status service: relays job events to WebSocket clients and answers
//! `GET /v1/jobs/{id}`.
//!
//! Gateways and savers publish events to the broker's events exchange, which appends them to
//! the events stream. Each status instance reads the stream (from its start when it starts,
//! rebuilding the jobs of the retention window; from where it stopped after a reconnect),
//! records the events per job (so a client that connects late gets a replay), derives each
//! job's `save_job_completed` once every image has a final outcome, and fans everything out to
//! its WebSocket subscribers. The table is in memory and bounded: jobs are forgotten after
//! `--job-ttl` or beyond `--max-jobs`; the stream is what survives a restart.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`table`]: the pure, bounded, expiring job table and completion derivation.
//! - [`hub`]: the table behind one lock plus per-subscriber bounded queues.
//! - `relay`: the events stream reader, resuming after the last offset it applied.
//! - [`http`]: `router(state)`, handlers (with `/metrics`), auth and [`ApiError`].
//! - `metrics`: events relayed, WebSocket subscribers, jobs tracked.
//! - `ws`: one WebSocket session (replay, live, pings, closing slow clients).
//! - [`run`]: wires it together on a given listener until a given shutdown future resolves.

pub mod config;
pub mod http;
pub mod hub;
mod metrics;
mod relay;
pub mod table;
mod ws;

use std::future::Future;
use std::time::Duration;

use luna_queue::{Broker, QueueError};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use http::{ApiError, AppState, router};
pub use hub::Hub;
pub use table::{JobState, JobTable, JobView};
pub use ws::{PING_INTERVAL, TOO_SLOW};

/// Events a WebSocket subscriber may have queued before it is cut off as too slow. Large
/// enough for a burst of many jobs finishing at once; small enough that a stuck client costs
/// little memory.
pub const SUBSCRIBER_QUEUE: usize = 1024;

enum BrokerKind {
    Amqp,
    InProcess,
}

/// How long shutdown waits for the event consumer to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid broker configuration")]
    Broker(#[source] QueueError),
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// Serves on `listener` until `shutdown` resolves.
///
/// The broker need not be up: the service starts at once, reports not-ready on `/readyz`,
/// and subscribes as soon as the broker answers.
///
/// # Errors
/// [`Error::Broker`] for a malformed broker URL, [`Error::Serve`] if the server fails.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let broker = Broker::new(cfg.broker.config()).map_err(Error::Broker)?;
    run_with_broker(cfg, broker, listener, shutdown).await
}

/// [`run`] on a given broker handle: how `luna up` shares its in-process queue. With a
/// RabbitMQ handle, `cfg.broker` must name the same broker: the events stream is read on a
/// connection of its own, opened from it.
///
/// # Errors
/// [`Error::Serve`] if the server fails.
pub async fn run_with_broker(
    cfg: Config,
    broker: Broker,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let broker_kind = match &broker {
        Broker::Amqp(_) => BrokerKind::Amqp,
        Broker::Memory(_) => BrokerKind::InProcess,
    };
    let max_jobs = usize::try_from(cfg.max_jobs).unwrap_or(usize::MAX);
    let hub = Hub::new(JobTable::new(cfg.job_ttl, max_jobs), SUBSCRIBER_QUEUE);
    // An empty LUNA_TOKEN (a blank line in a compose file) means no token, not the token "".
    let token = cfg.token.clone().filter(|t| !t.is_empty());
    let metrics_token = cfg.metrics_token.clone().filter(|t| !t.is_empty());
    let state = AppState::new(hub, broker, token.clone(), metrics_token);
    let cancel = state.shutdown_token();

    let source = match &broker_kind {
        BrokerKind::Amqp => relay::Source::Log {
            config: cfg.broker.config(),
            retention: cfg.event_retention(),
            connection_name: format!(
                "luna-status {} {}",
                cfg.broker.amqp_prefix,
                uuid::Uuid::now_v7().simple()
            ),
        },
        BrokerKind::InProcess => relay::Source::Bus,
    };
    let tracker = TaskTracker::new();
    tracker.spawn(relay::run(state.clone(), source, cancel.clone()));

    tracing::info!(
        listen = ?listener.local_addr().ok(),
        prefix = %cfg.broker.amqp_prefix,
        amqp = %luna_queue::args::redact_url(&cfg.broker.amqp_url),
        auth = token.is_some(),
        "status service listening"
    );
    let stop = cancel.clone();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Tell open WebSockets to close, or the server would wait on them.
            stop.cancel();
        })
        .await;

    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("event consumer did not stop within {SHUTDOWN_GRACE:?}");
    }
    tracing::info!("status service stopped");
    served.map_err(Error::Serve)
}
