//! Gateway configuration: every flag is also a `LUNA_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use luna_telemetry::LogFormat;

pub use crate::handoff::HandoffDir;

/// Gateway settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "luna-gateway",
    version,
    about = "Accepts save requests and queues one task per image."
)]
pub struct Config {
    /// Address to listen on. No auth without --token, so keep it on loopback unless you set one.
    #[arg(long, env = "LUNA_LISTEN", default_value = "127.0.0.1:19283")]
    pub listen: SocketAddr,

    /// Broker connection.
    #[command(flatten)]
    pub broker: luna_queue::BrokerArgs,

    /// Shared directory for frames too large to travel inline (claim check). Savers need the
    /// same directory. Without it, such frames are refused with 413.
    #[arg(long, env = "LUNA_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,

    /// Local hand-off of pixels (shared memory).
    #[command(flatten)]
    pub handoff: HandoffArgs,

    /// Require `Authorization: Bearer <token>` on the API (the scheme in any letter case). It is
    /// checked before a byte of the body is read.
    #[arg(long, env = "LUNA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Require `Authorization: Bearer <token>` on `/metrics`; none means `/metrics` is open.
    #[arg(long, env = "LUNA_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Most images in one job.
    #[arg(long, env = "LUNA_MAX_IMAGES", default_value_t = 16)]
    pub max_images: usize,

    /// Largest request body, in bytes.
    #[arg(long, env = "LUNA_MAX_BODY_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_body_bytes: u64,

    /// Most bytes of request bodies held at once, over all requests being read or published.
    /// A request that would go beyond is answered 503 with Retry-After; its body is not kept
    /// (a client sending `Expect: 100-continue` is answered before it sends it). Peak memory is about 4 times this (decoding and
    /// task encoding copy the pixels), so the default of 1 GiB keeps the gateway near 4 GiB.
    #[arg(long, env = "LUNA_MAX_INFLIGHT_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_inflight_bytes: u64,

    /// Largest image, in pixels (width x height).
    #[arg(long, env = "LUNA_MAX_PIXELS", default_value_t = 64 * 1024 * 1024)]
    pub max_pixels: u64,

    /// Largest task sent inline through the broker; larger ones use --blob-dir. The default
    /// fits RabbitMQ 4's default max_message_size.
    #[arg(long, env = "LUNA_MAX_INLINE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_inline_bytes: u64,

    /// Log line format.
    #[arg(long, env = "LUNA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, as if started without flags or environment.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["luna-gateway"])
    }
}

/// The local hand-off flag, shared by `luna-gateway` and `luna up`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HandoffArgs {
    /// Folder where clients on this machine (the ComfyUI node) leave pixels for the gateway to
    /// read instead of sending them over HTTP (see GET /v1/handoff); `none` turns it off.
    /// Default: a folder of this user in shared memory, /dev/shm/luna-handoff-<uid> (the OS
    /// temp folder where there is no /dev/shm), created with mode 0700.
    #[arg(
        long = "handoff-dir",
        env = "LUNA_HANDOFF_DIR",
        value_name = "DIR|none"
    )]
    pub handoff_dir: Option<HandoffDir>,
}

impl HandoffArgs {
    /// What was configured, the default when nothing was.
    pub fn setting(&self) -> HandoffDir {
        self.handoff_dir.clone().unwrap_or(HandoffDir::Default)
    }
}
