//! The Luna Saver worker.
//!
//! Consumes tasks, runs gate, encode and write on threads of lowered priority
//! ([`priority`]), publishes the outcome event and waits for its confirm, and only then
//! acknowledges the task. Concurrency is a pool
//! of save slots, each one consumer with prefetch 1, between `--min-workers` and
//! `--max-workers`: a slot is added while tasks wait and every slot is busy, and an extra slot
//! stops after `--idle-timeout` without work.
//!
//! # Layout
//! - [`Config`]: flags and `LUNA_*` environment variables.
//! - [`worker`]: what happens to one delivery: decode, validate, save, retry, report, settle.
//! - [`pool`]: the elastic set of save slots.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.

pub mod config;
pub mod http;
pub mod isolate;
pub mod metrics;
pub mod pool;
pub mod priority;
pub mod settle;
pub mod worker;

use std::sync::Arc;

use anyhow::Context as _;
use luna_queue::Broker;
use luna_store::{BlobStore, LocalStore};
use luna_telemetry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, PriorityArgs};

/// Everything a save slot needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub broker: Broker,
    pub store: Arc<LocalStore>,
    pub blobs: Option<BlobStore>,
    /// Unique per process: host, pid and a random suffix.
    pub worker_id: Arc<str>,
    pub metrics: Arc<metrics::Metrics>,
    /// What `/metrics` shows: the process registry, or a private one in tests.
    pub registry: Registry,
}

impl Context {
    /// Builds the context; the broker connects lazily.
    ///
    /// # Errors
    /// When the broker configuration is malformed.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let mut amqp = config.broker.config();
        amqp.pool_size = 2;
        let broker = Broker::new(amqp).context("configuring the broker connection")?;
        Ok(Self::with_broker(config, broker))
    }

    /// The context on a given broker handle: how `luna up` shares its in-process queue.
    pub fn with_broker(config: Config, broker: Broker) -> Self {
        let store = Arc::new(LocalStore::new(&config.output_root));
        let blobs = config.blob_dir.clone().map(BlobStore::new);
        let registry = Registry::shared();
        Self {
            worker_id: worker_id().into(),
            metrics: Arc::new(metrics::Metrics::new(
                &registry,
                config.min_workers,
                config.max_workers,
            )),
            registry,
            config: Arc::new(config),
            broker,
            store,
            blobs,
        }
    }
}

fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "saver".to_owned());
    // The random tail of a v7 id: unique even when a pid is reused after a restart.
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &id[id.len() - 6..])
}

/// Runs the saver until `shutdown` resolves, then stops taking work, lets in-flight saves
/// finish within `--shutdown-grace`, and returns; unfinished tasks go back to the queue.
///
/// # Errors
/// When the HTTP listener fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve(Context::new(config)?, listener, shutdown).await
}

/// Runs the saver with `ctx` (see [`run`]).
///
/// # Errors
/// When the worker bounds are inconsistent or the HTTP listener fails.
pub async fn serve(
    ctx: Context,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = &ctx.config;
    anyhow::ensure!(
        config.min_workers >= 1 && config.min_workers <= config.max_workers,
        "--min-workers must be at least 1 and at most --max-workers"
    );
    tracing::info!(
        worker = %ctx.worker_id,
        output_root = %ctx.config.output_root.display(),
        min = ctx.config.min_workers,
        max = ctx.config.max_workers,
        "saver starting"
    );
    let stop = CancellationToken::new();
    let http = tokio::spawn({
        let stop = stop.clone();
        let router = http::router(ctx.clone());
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });
    let pool = tokio::spawn(pool::run(ctx.clone(), stop.clone()));

    shutdown.await;
    tracing::info!(grace = ?ctx.config.shutdown_grace, "saver draining: no new tasks, finishing in-flight saves");
    stop.cancel();
    if let Err(e) = pool.await {
        tracing::error!(error = %e, "save pool ended abnormally");
    }
    match http.await {
        Ok(result) => result.context("serving HTTP"),
        Err(e) => Err(anyhow::anyhow!("HTTP task failed: {e}")),
    }
}
