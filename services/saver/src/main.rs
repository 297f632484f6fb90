//! `luna-saver`: see the library docs.

use anyhow::Context as _;
use clap::Parser as _;
use luna_saver::Config;

fn main() -> anyhow::Result<std::process::ExitCode> {
    // A suspect task saved in a child process of its own (see luna_saver::settle).
    if let Some(code) = luna_saver::isolate::isolated_entry() {
        return Ok(code);
    }
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(serve())
        .map(|()| std::process::ExitCode::SUCCESS)
}

async fn serve() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry =
        luna_telemetry::init("luna-saver", config.log_format).context("setting up telemetry")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", config.listen))?;
    let result = luna_saver::run(config, listener, luna_telemetry::shutdown_signal()).await;
    telemetry.shutdown();
    result
}
