//! The broker flags every service shares, declared once.

use std::time::Duration;

use crate::amqp::{AmqpConfig, DEFAULT_HEARTBEAT};

/// Default broker URL: RabbitMQ on this machine with its stock account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `--amqp-url`, `--amqp-prefix`, `--broker-timeout` and `--amqp-heartbeat`, for
/// `#[command(flatten)]`.
#[derive(Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (`amqp://user:pass@host:port/vhost`), or the comma-separated URLs of the
    /// nodes of one cluster: when the node in use fails, the next is tried.
    #[arg(long, env = "LUNA_AMQP_URL", hide_env_values = true, default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name, so several deployments can share one broker.
    #[arg(long, env = "LUNA_AMQP_PREFIX", default_value = "luna")]
    pub amqp_prefix: String,

    /// How long to wait for the broker (connect, confirm) before giving up on it.
    #[arg(long, env = "LUNA_BROKER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub broker_timeout: Duration,

    /// Most tasks waiting in the task queue; beyond, publishes are refused and the gateway
    /// answers 503 with Retry-After. A queue argument: every service must be given the same
    /// value, and an existing queue without it refuses it (use a policy there; see docs).
    #[arg(long, env = "LUNA_MAX_QUEUED_TASKS")]
    pub max_queued_tasks: Option<u64>,

    /// Most bytes of tasks waiting in the task queue; as --max-queued-tasks.
    #[arg(long, env = "LUNA_MAX_QUEUED_BYTES")]
    pub max_queued_bytes: Option<u64>,

    /// AMQP heartbeat: a broker silent for two periods is given up on and reconnected to.
    #[arg(long, env = "LUNA_AMQP_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub amqp_heartbeat: Duration,
}

impl BrokerArgs {
    /// The flags as given, for `url` and `prefix`, with the default timeout.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            amqp_url: url.into(),
            amqp_prefix: prefix.into(),
            broker_timeout: Duration::from_secs(5),
            max_queued_tasks: None,
            max_queued_bytes: None,
            amqp_heartbeat: DEFAULT_HEARTBEAT,
        }
    }

    /// The backend configuration these flags describe.
    pub fn config(&self) -> AmqpConfig {
        let mut config = AmqpConfig::new(&self.amqp_url, &self.amqp_prefix);
        config.timeout = self.broker_timeout;
        config.topology.max_length = self.max_queued_tasks;
        config.topology.max_length_bytes = self.max_queued_bytes;
        config.heartbeat = self.amqp_heartbeat;
        config
    }
}

impl Default for BrokerArgs {
    fn default() -> Self {
        Self::new(DEFAULT_AMQP_URL, "luna")
    }
}

// By hand, so that logging a configuration never prints the broker password.
impl std::fmt::Debug for BrokerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerArgs")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_prefix", &self.amqp_prefix)
            .field("broker_timeout", &self.broker_timeout)
            .field("max_queued_tasks", &self.max_queued_tasks)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("amqp_heartbeat", &self.amqp_heartbeat)
            .finish()
    }
}

/// `url` (or each of comma-separated URLs) with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact_url("amqp://u:secret@h:5672/%2f"),
            "amqp://u:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(
            redact_url("amqp://u:a@h1/%2f,amqp://u:b@h2/%2f"),
            "amqp://u:***@h1/%2f,amqp://u:***@h2/%2f"
        );
        assert!(!format!("{:?}", BrokerArgs::new("amqp://u:secret@h/x", "p")).contains("secret"));
    }
}
