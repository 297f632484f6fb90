//! `luna`: Luna Saver on one machine.
//!
//! `luna up` runs the gateway, the saver and the status service in one process, sharing an
//! in-process queue instead of a broker, with the same HTTP and WebSocket contract as the
//! distributed services. `luna up --amqp-url ...` runs the same three roles against RabbitMQ.
//!
//! # Layout
//! - [`UpArgs`] and [`up`]: start, announce, and drain in order on Ctrl-C.
//! - [`submit`]: send local files to a running daemon, optionally following them to the end.

pub mod submit;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use luna_queue::{AmqpConfig, Broker, MemoryBounds, MemoryBroker};
use luna_telemetry::LogFormat;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `luna up` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Gateway address (POST /v1/jobs).
    #[arg(long, env = "LUNA_GATEWAY_LISTEN", default_value = "127.0.0.1:19283")]
    pub gateway_listen: SocketAddr,

    /// Status address (WebSocket /ws, GET /v1/jobs/<id>).
    #[arg(long, env = "LUNA_STATUS_LISTEN", default_value = "127.0.0.1:19284")]
    pub status_listen: SocketAddr,

    /// Saver address (/metrics, /healthz, /readyz); port 0 picks a free one.
    #[arg(long, env = "LUNA_SAVER_LISTEN", default_value = "127.0.0.1:0")]
    pub saver_listen: SocketAddr,

    /// Folder that save paths are relative to.
    #[arg(long, env = "LUNA_OUTPUT_ROOT", default_value = "./output")]
    pub output_root: PathBuf,

    /// Use RabbitMQ at this URL instead of the in-process queue.
    #[arg(long, env = "LUNA_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// Prefix of every exchange and queue name (with --amqp-url).
    #[arg(long, env = "LUNA_AMQP_PREFIX", default_value = "luna")]
    pub amqp_prefix: String,

    /// Require `Authorization: Bearer <token>` on gateway and status.
    #[arg(long, env = "LUNA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Require `Authorization: Bearer <token>` on `/metrics` of every role; none: open.
    #[arg(long, env = "LUNA_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Most tasks held (waiting or being saved) in the in-process queue, 256 by default;
    /// beyond, POST /v1/jobs answers 429 with Retry-After. With --amqp-url: the task queue's
    /// length limit (none by default; beyond, 503).
    #[arg(long, env = "LUNA_MAX_QUEUED_TASKS")]
    pub max_queued_tasks: Option<u64>,

    /// Most bytes of tasks held in the in-process queue, 1 GiB by default; as
    /// --max-queued-tasks.
    #[arg(long, env = "LUNA_MAX_QUEUED_BYTES")]
    pub max_queued_bytes: Option<u64>,

    /// Most bytes of request bodies the gateway holds at once; beyond, 503 with Retry-After.
    #[arg(long, env = "LUNA_MAX_INFLIGHT_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_inflight_bytes: u64,

    /// Local hand-off of pixels (shared memory), as the gateway's flag.
    #[command(flatten)]
    pub handoff: luna_gateway::HandoffArgs,

    /// Priority of the saves, as the saver's flag.
    #[command(flatten)]
    pub priority: luna_saver::PriorityArgs,

    /// Shared directory for frames over the inline limit (only matters with --amqp-url).
    #[arg(long, env = "LUNA_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,

    /// Save slots always running.
    #[arg(long, env = "LUNA_MIN_WORKERS", default_value_t = 2)]
    pub min_workers: usize,

    /// Most save slots.
    #[arg(long, env = "LUNA_MAX_WORKERS", default_value_t = 4)]
    pub max_workers: usize,

    /// An extra save slot stops after this long without work.
    #[arg(long, env = "LUNA_IDLE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// On Ctrl-C, how long queued and in-flight saves may take to finish.
    #[arg(long, env = "LUNA_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Most images in one job.
    #[arg(long, env = "LUNA_MAX_IMAGES", default_value_t = 16)]
    pub max_images: usize,

    /// Attempts per image before it fails for good.
    #[arg(long, env = "LUNA_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// Wait before the first retry; doubles per attempt, up to 30 s.
    #[arg(long, env = "LUNA_RETRY_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Log line format.
    #[arg(long, env = "LUNA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// In process, queued tasks live only in memory: let the saver work through them (within the
/// grace period) before stopping it, instead of dropping them at exit.
async fn drain_queue(queue: &Broker, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let waiting = queue.task_queue_depth().await.unwrap_or(0);
        if waiting == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                waiting,
                "shutdown grace over: {waiting} queued images were not saved"
            );
            return;
        }
        tracing::info!(waiting, "saving {waiting} queued images before stopping");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the three roles until `shutdown` resolves, then stops them in order: the gateway
/// first (no new jobs), then the saver (in-flight saves finish), then status (so subscribers
/// see those last events).
///
/// # Errors
/// When a port cannot be bound or a service fails.
pub async fn up(
    args: UpArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (broker, mode) = match &args.amqp_url {
        Some(url) => {
            let mut config = AmqpConfig::new(url, &args.amqp_prefix);
            config.topology.max_length = args.max_queued_tasks;
            config.topology.max_length_bytes = args.max_queued_bytes;
            let broker = Broker::new(config).context("configuring the broker")?;
            (broker, format!("RabbitMQ, prefix {}", args.amqp_prefix))
        }
        None => {
            let defaults = MemoryBounds::default();
            let bounds = MemoryBounds {
                max_tasks: args.max_queued_tasks.map_or(defaults.max_tasks, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
                max_bytes: args.max_queued_bytes.unwrap_or(defaults.max_bytes),
            };
            (
                Broker::Memory(MemoryBroker::bounded(10, bounds)),
                format!(
                    "in-process queue of at most {} tasks and {} MiB, no broker",
                    bounds.max_tasks,
                    bounds.max_bytes / (1024 * 1024)
                ),
            )
        }
    };
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| {
            format!("binding the {what} listener on {addr} (is another Luna Saver running?)")
        })
    };
    let gateway_listener = bind(args.gateway_listen, "gateway").await?;
    let status_listener = bind(args.status_listen, "status").await?;
    let saver_listener = bind(args.saver_listen, "saver").await?;

    let mut gateway_cfg = luna_gateway::Config::defaults();
    gateway_cfg.listen = args.gateway_listen;
    gateway_cfg.token.clone_from(&args.token);
    gateway_cfg.blob_dir.clone_from(&args.blob_dir);
    gateway_cfg.handoff.clone_from(&args.handoff);
    gateway_cfg.max_images = args.max_images;
    gateway_cfg.max_inflight_bytes = args.max_inflight_bytes;
    gateway_cfg.metrics_token.clone_from(&args.metrics_token);
    if args.amqp_url.is_none() {
        // In process, a task is never serialised onto a wire: no inline limit applies.
        gateway_cfg.max_inline_bytes = u64::MAX;
    }
    let mut saver_cfg = luna_saver::Config::defaults();
    saver_cfg.output_root.clone_from(&args.output_root);
    saver_cfg.blob_dir.clone_from(&args.blob_dir);
    saver_cfg.priority.clone_from(&args.priority);
    saver_cfg.min_workers = args.min_workers;
    saver_cfg.max_workers = args.max_workers;
    saver_cfg.idle_timeout = args.idle_timeout;
    saver_cfg.shutdown_grace = args.shutdown_grace;
    saver_cfg.max_attempts = args.max_attempts;
    saver_cfg.retry_backoff = args.retry_backoff;
    saver_cfg.metrics_token.clone_from(&args.metrics_token);
    let mut status_cfg =
        luna_status::Config::new(args.amqp_url.clone().unwrap_or_default(), &args.amqp_prefix);
    status_cfg.token.clone_from(&args.token);
    status_cfg.metrics_token.clone_from(&args.metrics_token);

    let output = std::fs::create_dir_all(&args.output_root)
        .and_then(|()| args.output_root.canonicalize())
        .with_context(|| format!("creating the output folder {}", args.output_root.display()))?;
    let saver_addr = saver_listener.local_addr().context("saver address")?;

    let stop_gateway = CancellationToken::new();
    let stop_saver = CancellationToken::new();
    let stop_status = CancellationToken::new();
    let status = tokio::spawn(luna_status::run_with_broker(
        status_cfg,
        broker.clone(),
        status_listener,
        stop_status.clone().cancelled_owned(),
    ));
    let saver = tokio::spawn(luna_saver::serve(
        luna_saver::Context::with_broker(saver_cfg, broker.clone()),
        saver_listener,
        stop_saver.clone().cancelled_owned(),
    ));
    let queue = broker.clone();
    let gateway_state = luna_gateway::AppState::with_broker(gateway_cfg, broker);
    let handoff = gateway_state.handoff.as_ref().map_or_else(
        || "off (--handoff-dir none)".to_owned(),
        |h| h.dir().display().to_string(),
    );
    let gateway = tokio::spawn(luna_gateway::serve(
        gateway_state,
        gateway_listener,
        stop_gateway.clone().cancelled_owned(),
    ));

    println!("Luna Saver is up ({mode}).");
    println!(
        "  submit:  POST http://{}/v1/jobs   (luna submit FILES..., or the ComfyUI node)",
        args.gateway_listen
    );
    println!(
        "  events:  ws://{}/ws?job_id=<id>   job status: GET http://{}/v1/jobs/<id>",
        args.status_listen, args.status_listen
    );
    println!("  files:   {}", output.display());
    println!("  hand-off: {handoff}   (shared memory for clients on this machine)");
    println!("  metrics: http://{saver_addr}/metrics");
    println!(
        "  try:     curl -H 'content-type: application/json' --data @docs/examples/request.json http://{}/v1/jobs",
        args.gateway_listen
    );
    println!("Ctrl-C stops after in-flight saves finish.");

    shutdown.await;
    stop_gateway.cancel();
    let gateway_result = gateway.await;
    if args.amqp_url.is_none() {
        drain_queue(&queue, args.shutdown_grace).await;
    }
    stop_saver.cancel();
    let saver_result = saver.await;
    stop_status.cancel();
    let status_result = status.await;
    gateway_result.context("gateway task")?.context("gateway")?;
    saver_result.context("saver task")?.context("saver")?;
    status_result.context("status task")?.context("status")?;
    Ok(())
}
