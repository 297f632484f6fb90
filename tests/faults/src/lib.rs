//! The fault suite's harness: the real binaries as separate processes, a TCP proxy between
//! them and RabbitMQ, a load generator that retries as a careful client would, and an audit of
//! what actually landed on disk, on the broker and in the status service.
//!
//! Every scenario (one `#[test]` in `tests/faults.rs`) follows the same shape: a known load, a
//! fault, then an audit that yields one [`report::Row`]: accepted, saved, lost, duplicated,
//! partial, parked, recovery time, connections and RSS before and after. The rows are printed
//! as a markdown table and merged into `target/faults-report.json`. Scenarios run one at a time
//! ([`run`] holds a process-wide lock), since they measure memory and time.
//!
//! The suite depends on no Luna crate: it sees the services only as an operator or a client
//! does (HTTP, the broker, the file system), so a change in the product cannot bend the audit.
//!
//! # Layout
//! - [`bins`]: where the binaries are (next to the test executable), built when missing.
//! - [`procs`]: one service process: spawn with flags, SIGKILL, restart, RSS.
//! - [`proxy`]: a TCP proxy that passes, black-holes or cuts every connection through it.
//! - [`broker`]: broker-side helpers: parked count, event recorder, closing our connections,
//!   deleting our topology.
//! - [`load`]: clients posting jobs with an `Idempotency-Key`, retrying on no answer, 503, 429.
//! - [`audit`]: the output root: files per image, duplicates, undecodable files, temp files,
//!   symlinks.
//! - [`scenario`]: one scenario's namespace, folders, mounts and cleanup.
//! - [`cluster`]: extra RabbitMQ nodes on other ports, joined into a cluster.
//! - [`report`]: the table row, markdown and JSON.

pub mod audit;
pub mod bins;
pub mod broker;
pub mod cluster;
pub mod load;
pub mod procs;
pub mod proxy;
pub mod report;
pub mod scenario;

use std::future::Future;
use std::sync::Mutex;

pub use report::Row;
pub use scenario::Scenario;

/// Scenarios measure memory and time, so they never overlap, whatever `--test-threads` says.
static SUITE: Mutex<()> = Mutex::new(());

/// Runs one scenario: takes the suite lock, builds a runtime, runs `body`, records its row
/// (printed and merged into `target/faults-report.json`), then fails the test if any of the
/// row's acceptance checks failed. Cleanup (processes, mounts, broker names) happens when the
/// scenario's values drop, also when `body` fails.
pub fn run<F, Fut>(name: &str, body: F)
where
    F: FnOnce(Scenario) -> Fut,
    Fut: Future<Output = anyhow::Result<Row>>,
{
    let _serial = SUITE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let row = runtime.block_on(async {
        let scenario = Scenario::new(name).await.expect("scenario set-up");
        body(scenario).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    let row = match row {
        Ok(row) => row,
        Err(e) => panic!("scenario {name} could not run: {e:#}"),
    };
    report::record(&row);
    assert!(
        row.failed.is_empty(),
        "scenario {name} broke its promises: {}\n(notes: {})",
        row.failed.join("; "),
        row.notes
    );
}
