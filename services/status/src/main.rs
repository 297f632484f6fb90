//! `luna-status`: see the `luna_status` library for what it does.

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = luna_status::Config::parse();
    let telemetry =
        luna_telemetry::init("luna-status", cfg.log_format).context("setting up telemetry")?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding HTTP listener on {}", cfg.listen))?;
    let result = luna_status::run(cfg, listener, luna_telemetry::shutdown_signal())
        .await
        .context("status service failed");
    telemetry.shutdown();
    result
}
