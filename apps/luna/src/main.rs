//! `luna`: see the library docs.

use anyhow::Context as _;
use clap::Parser;

mod alloc;

/// Luna Saver: fast, safe image saving for render farms and ComfyUI.
#[derive(Debug, Parser)]
#[command(name = "luna", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run gateway, saver and status in one process (no broker needed).
    Up(luna::UpArgs),
    /// Send image files to a running Luna Saver.
    Submit(luna::submit::SubmitArgs),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    // A suspect task saved in a child process of its own (see luna_saver::settle).
    if let Some(code) = luna_saver::isolate::isolated_entry() {
        return Ok(code);
    }
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(run())
        .map(|()| std::process::ExitCode::SUCCESS)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => {
            let telemetry =
                luna_telemetry::init("luna", args.log_format).context("setting up telemetry")?;
            let result = luna::up(args, luna_telemetry::shutdown_signal()).await;
            telemetry.shutdown();
            result
        }
        Command::Submit(args) => {
            let summary = luna::submit::submit(&args).await?;
            if summary.failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
