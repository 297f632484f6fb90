//! Saving a suspect task in a child process, so a task that crashes savers is told apart
//! from savers that were merely killed while holding it (see [`crate::settle`]).
//!
//! The child is this same executable started with [`ISOLATED_ARG`]: every binary that runs a
//! saver calls [`isolated_entry`] first thing in `main`. It reads the task's MessagePack body
//! on stdin, saves it into the same output root exactly as the saver would (same store, same
//! idempotency), and prints one JSON [`Report`] line on stdout. A child that ends without a
//! report (a signal, an abort, a panic) crashed on the task.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use luna_job::codec::from_msgpack;
use luna_job::{QualityGate, SaveTask};
use luna_store::{BlobStore, LocalStore, Outcome, SaveError, Stored, save_task};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

use crate::Context;

/// First argument of an isolated save.
pub const ISOLATED_ARG: &str = "__luna-save-isolated";

/// What the child answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Report {
    Saved {
        stored: StoredReport,
        quality_score: Option<f64>,
    },
    Rejected {
        gate: QualityGate,
        score: f64,
        threshold: f64,
        stored: Option<StoredReport>,
    },
    Failed {
        transient: bool,
        kind: String,
        reason: String,
    },
}

/// [`Stored`] on the wire between parent and child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReport {
    pub path: String,
    pub bytes: u64,
    pub already_stored: bool,
}

impl From<&Stored> for StoredReport {
    fn from(s: &Stored) -> Self {
        Self {
            path: s.path.clone(),
            bytes: s.bytes,
            already_stored: s.already_stored,
        }
    }
}

impl From<StoredReport> for Stored {
    fn from(s: StoredReport) -> Self {
        Self {
            path: s.path,
            bytes: s.bytes,
            already_stored: s.already_stored,
        }
    }
}

impl Report {
    fn of(result: &Result<Outcome, SaveError>) -> Self {
        match result {
            Ok(Outcome::Saved {
                stored,
                quality_score,
            }) => Self::Saved {
                stored: stored.into(),
                quality_score: *quality_score,
            },
            Ok(Outcome::Rejected {
                gate,
                score,
                threshold,
                stored,
            }) => Self::Rejected {
                gate: *gate,
                score: *score,
                threshold: *threshold,
                stored: stored.as_ref().map(Into::into),
            },
            Err(e) => Self::Failed {
                transient: e.is_transient(),
                kind: e.kind().to_owned(),
                reason: crate::worker::error_chain(e),
            },
        }
    }

    /// The outcome, or the failure as the worker reports it.
    pub fn into_result(self) -> Result<Outcome, Failure> {
        match self {
            Self::Saved {
                stored,
                quality_score,
            } => Ok(Outcome::Saved {
                stored: stored.into(),
                quality_score,
            }),
            Self::Rejected {
                gate,
                score,
                threshold,
                stored,
            } => Ok(Outcome::Rejected {
                gate,
                score,
                threshold,
                stored: stored.map(Into::into),
            }),
            Self::Failed {
                transient,
                kind,
                reason,
            } => Err(Failure {
                transient,
                kind: known_kind(&kind),
                reason,
            }),
        }
    }
}

/// A failed save, wherever it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub transient: bool,
    pub kind: &'static str,
    pub reason: String,
}

impl From<&SaveError> for Failure {
    fn from(e: &SaveError) -> Self {
        Self {
            transient: e.is_transient(),
            kind: e.kind(),
            reason: crate::worker::error_chain(e),
        }
    }
}

/// The metric label for a kind the child named (labels stay a closed set).
fn known_kind(kind: &str) -> &'static str {
    [
        "invalid",
        "placement",
        "shape",
        "encode",
        "storage",
        "blob",
        "no_blob_store",
    ]
    .into_iter()
    .find(|k| *k == kind)
    .unwrap_or("other")
}

/// Runs an isolated save when this process was started as one; `None` otherwise. Call it first
/// thing in `main` of every binary that runs a saver.
pub fn isolated_entry() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != ISOLATED_ARG {
        return None;
    }
    Some(match run_child(args.collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luna isolated save: {e:#}");
            ExitCode::from(2)
        }
    })
}

fn run_child(args: Vec<OsString>) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut root = None;
    let mut blob_dir = None;
    let mut nice = 0;
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let value = args.next().map(PathBuf::from);
        match flag.to_str() {
            Some("--output-root") => root = value,
            Some("--blob-dir") => blob_dir = value,
            Some("--save-nice") => {
                let value = value.as_deref().and_then(|v| v.to_str());
                nice = value
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--save-nice takes 0..=19, not {value:?}"))?;
            }
            _ => anyhow::bail!("unknown argument {flag:?}"),
        }
    }
    crate::priority::lower_this_thread(nice);
    let root = root.ok_or_else(|| anyhow::anyhow!("--output-root is required"))?;
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    let task: SaveTask = from_msgpack(&body)?;
    drop(body);
    let store = LocalStore::new(root);
    let blobs = blob_dir.map(BlobStore::new);
    let report = Report::of(&save_task(&task, &store, blobs.as_ref()));
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &report)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Saves the task in `body` in a child process. `Err` with a description when the child
/// ended without a report: the task crashed it.
///
/// # Errors
/// The crash, or why the child could not be started (reported the same way: a saver that
/// cannot isolate a suspect task must not run it in process either).
pub async fn save_isolated(ctx: &Context, body: &[u8]) -> Result<Report, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(ISOLATED_ARG)
        .arg("--output-root")
        .arg(&ctx.config.output_root)
        .arg("--save-nice")
        .arg(ctx.config.priority.save_nice.to_string());
    if let Some(dir) = &ctx.config.blob_dir {
        command.arg("--blob-dir").arg(dir);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start an isolated save: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child that dies early closes the pipe; its exit status tells why.
        let _ = stdin.write_all(body).await;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("lost the isolated save: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match serde_json::from_str::<Report>(text.trim()) {
        Ok(report) if output.status.success() => Ok(report),
        _ => Err(describe(output.status)),
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.signal(), status.code()) {
        (Some(signal), _) => format!("killed by signal {signal}"),
        (None, Some(101)) => "it panicked".to_owned(),
        (None, Some(code)) => format!("it exited with status {code} and no answer"),
        (None, None) => "it ended without an answer".to_owned(),
    }
}
