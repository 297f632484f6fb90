//! Saver configuration: every flag is also a `LUNA_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use luna_telemetry::LogFormat;

/// Saver settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "luna-saver",
    version,
    about = "Saves queued images: gate, encode, write, report."
)]
pub struct Config {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "LUNA_LISTEN", default_value = "127.0.0.1:19285")]
    pub listen: SocketAddr,

    /// Broker connection.
    #[command(flatten)]
    pub broker: luna_queue::BrokerArgs,

    /// Folder that save paths are relative to.
    #[arg(long, env = "LUNA_OUTPUT_ROOT", default_value = "./output")]
    pub output_root: PathBuf,

    /// Shared directory where the gateway leaves large frames (claim check).
    #[arg(long, env = "LUNA_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,

    /// Save slots always running (concurrent saves).
    #[arg(long, env = "LUNA_MIN_WORKERS", default_value_t = 2)]
    pub min_workers: usize,

    /// Most save slots; extra slots start while tasks wait and every slot is busy.
    #[arg(long, env = "LUNA_MAX_WORKERS", default_value_t = 4)]
    pub max_workers: usize,

    /// An extra slot stops after this long without work.
    #[arg(long, env = "LUNA_IDLE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// How often the pool checks the queue to grow or shrink.
    #[arg(long, env = "LUNA_SCALE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub scale_interval: Duration,

    /// On SIGTERM, how long in-flight saves may take to finish; the rest is redelivered.
    #[arg(long, env = "LUNA_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Attempts at a transient failure (local retries and earlier deliveries together) before
    /// the task is parked.
    #[arg(long, env = "LUNA_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// A task with this many unfinished attempts before (its saver stopped while holding it)
    /// is saved in a child process of its own, so a task that crashes savers is parked with the
    /// reason while one whose savers were merely killed (preemption) is not.
    #[arg(long, env = "LUNA_ISOLATE_AFTER", default_value_t = 1)]
    pub isolate_after: u32,

    /// Attempts that started and never finished (the saver holding the task stopped) after
    /// which a task is parked whatever the reason.
    #[arg(long, env = "LUNA_MAX_DELIVERIES", default_value_t = 25)]
    pub max_deliveries: u32,

    /// Wait before the first retry of a transient failure; doubles per attempt, up to 30 s.
    #[arg(long, env = "LUNA_RETRY_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Blobs older than this are removed (their tasks were parked or lost).
    #[arg(long, env = "LUNA_BLOB_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub blob_ttl: Duration,

    /// Priority of the saves against the rest of the process.
    #[command(flatten)]
    pub priority: PriorityArgs,

    /// Bearer token required on `/metrics`; none means `/metrics` is open.
    #[arg(long, env = "LUNA_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Log line format.
    #[arg(long, env = "LUNA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// `--save-nice`, shared with `luna up`.
#[derive(Debug, Clone, clap::Args)]
pub struct PriorityArgs {
    /// Saves (gate, encode, write) run this many nice levels below the rest of the process
    /// (at most 19), so that answers, event confirms and, beside `luna up`, the program that
    /// handed the pixels over get the cores first when every core is busy; 0 runs everything
    /// at one priority.
    #[arg(long, env = "LUNA_SAVE_NICE", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub save_nice: u8,
}

impl Config {
    /// The defaults, as if started without flags or environment.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["luna-saver"])
    }

    /// The limits the settle decision follows.
    pub fn policy(&self) -> crate::settle::Policy {
        crate::settle::Policy {
            max_attempts: self.max_attempts,
            isolate_after: self.isolate_after,
            max_deliveries: self.max_deliveries,
            retry_backoff: self.retry_backoff,
        }
    }
}
