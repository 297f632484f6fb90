//! Command-line flags and their environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use luna_telemetry::LogFormat;

/// Default size cap of the events stream: 1 GiB, a few million events.
pub const DEFAULT_EVENTS_MAX_BYTES: u64 = 1 << 30;

/// How the status service is run. Every flag can also be set through its environment variable.
#[derive(Clone, clap::Parser)]
#[command(
    name = "luna-status",
    version,
    about = "Relays Luna Saver job events over WebSocket and answers job state over HTTP."
)]
pub struct Config {
    /// Address for HTTP and WebSocket clients. Keep it on loopback unless --token is set.
    #[arg(long, env = "LUNA_LISTEN", default_value = "127.0.0.1:19284")]
    pub listen: SocketAddr,

    /// Broker connection.
    #[command(flatten)]
    pub broker: luna_queue::BrokerArgs,

    /// Bearer token required on every request except the health probes; none means no auth.
    #[arg(long, env = "LUNA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Bearer token required on `/metrics`; none means `/metrics` is open (--token does not
    /// cover it, so a scraper needs no access to jobs).
    #[arg(long, env = "LUNA_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// How long a job is remembered (for GET and replay) after its last event.
    #[arg(long, env = "LUNA_JOB_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub job_ttl: Duration,

    /// Most jobs remembered at once; the least recently active are forgotten first.
    #[arg(long, env = "LUNA_MAX_JOBS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_jobs: u32,

    /// How long the broker keeps events in the events stream (`x-max-age`). A status instance
    /// rebuilds its job table from this window when it starts, so keep it above --job-ttl
    /// plus the longest job. Fixed when the stream is first declared; change it with a policy.
    #[arg(long, env = "LUNA_EVENTS_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub events_max_age: Duration,

    /// Most bytes the events stream keeps (`x-max-length-bytes`); the oldest go first.
    #[arg(long, env = "LUNA_EVENTS_MAX_BYTES", default_value_t = DEFAULT_EVENTS_MAX_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub events_max_bytes: u64,

    /// Log line format.
    #[arg(long, env = "LUNA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

impl Config {
    /// Retention of the events stream, from `--events-max-age` and `--events-max-bytes`.
    pub fn event_retention(&self) -> luna_queue::EventRetention {
        luna_queue::EventRetention {
            max_age: self.events_max_age,
            max_bytes: self.events_max_bytes,
        }
    }

    /// The defaults, as if started without flags or environment (for tests and embedding).
    pub fn new(amqp_url: impl Into<String>, amqp_prefix: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 19284)),
            broker: luna_queue::BrokerArgs::new(amqp_url, amqp_prefix),
            token: None,
            metrics_token: None,
            job_ttl: Duration::from_secs(3600),
            max_jobs: 10_000,
            events_max_age: Duration::from_secs(24 * 3600),
            events_max_bytes: DEFAULT_EVENTS_MAX_BYTES,
            log_format: LogFormat::Human,
        }
    }
}

// By hand, so that logging a `Config` never prints the token or the broker password.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("broker", &self.broker)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<redacted>"),
            )
            .field("job_ttl", &self.job_ttl)
            .field("max_jobs", &self.max_jobs)
            .field("events_max_age", &self.events_max_age)
            .field("events_max_bytes", &self.events_max_bytes)
            .field("log_format", &self.log_format)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let cfg = Config::try_parse_from(["luna-status"]).expect("defaults parse");
        // The environment may override these on a developer's machine; only check what the
        // environment cannot have set.
        if std::env::var_os("LUNA_LISTEN").is_none() {
            assert_eq!(cfg.listen, SocketAddr::from(([127, 0, 0, 1], 19284)));
        }
        if std::env::var_os("LUNA_JOB_TTL").is_none() {
            assert_eq!(cfg.job_ttl, Duration::from_secs(3600));
        }
        let cfg = Config::try_parse_from(["luna-status", "--job-ttl", "90s", "--max-jobs", "5"])
            .expect("flags parse");
        assert_eq!((cfg.job_ttl, cfg.max_jobs), (Duration::from_secs(90), 5));
        let cfg = Config::try_parse_from([
            "luna-status",
            "--events-max-age",
            "2h",
            "--events-max-bytes",
            "1000000",
        ])
        .expect("retention flags parse");
        assert_eq!(
            cfg.event_retention(),
            luna_queue::EventRetention {
                max_age: Duration::from_secs(7200),
                max_bytes: 1_000_000
            }
        );
        assert!(Config::try_parse_from(["luna-status", "--events-max-bytes", "0"]).is_err());
        assert!(Config::try_parse_from(["luna-status", "--max-jobs", "0"]).is_err());
    }

    #[test]
    fn debug_hides_secrets() {
        let mut cfg = Config::new("amqp://luna:hunter2@broker:5672/%2f", "luna");
        cfg.token = Some("s3cret".into());
        cfg.metrics_token = Some("scrape-me".into());
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret") && !shown.contains("scrape-me"),
            "{shown}"
        );
        assert!(shown.contains("amqp://luna:***@broker:5672/%2f"), "{shown}");
    }
}
