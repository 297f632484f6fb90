//! `luna-gateway`: see the library docs.

use anyhow::Context as _;
use clap::Parser as _;
use luna_gateway::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry =
        luna_telemetry::init("luna-gateway", config.log_format).context("setting up telemetry")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", config.listen))?;
    let result = luna_gateway::run(config, listener, luna_telemetry::shutdown_signal()).await;
    telemetry.shutdown();
    result
}
