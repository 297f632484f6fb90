//! Where a Luna Saver file lands and how it is written.
//!
//! # Layout
//! - [`placement`]: the contract's path rules, from a task to a relative directory and name.
//! - [`local`]: the local-filesystem [`Store`]: temp file, fsync, no-replace publish,
//!   collision suffixes, and idempotency per `(job_id, image index)`.
//! - [`blob`]: the claim-check store for frames too large to travel through the broker.
//! - [`save`]: one task end to end (gate, encode, store), synchronous, for savers to run on a
//!   blocking thread.
//!
//! The [`Store`] trait is the seam for other backends (an object store, say): it takes the
//! task's key, its placement and the encoded bytes, and answers with the path it used.

pub mod blob;
pub mod ledger;
pub mod local;
pub mod placement;
pub mod save;

use luna_imaging::Encoded;
use luna_job::task::TaskKey;

pub use blob::{BlobError, BlobStore};
pub use ledger::LEDGER_RETENTION;
pub use local::LocalStore;
pub use placement::{Placement, PlacementError};
pub use save::{Outcome, SaveError, Timings, save_task, save_task_timed};

/// A file as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Relative to the output root, `/`-separated.
    pub path: String,
    /// Size of the image file (not counting a sidecar).
    pub bytes: u64,
    /// True when this task had already stored the file (a redelivery); nothing was written.
    pub already_stored: bool,
}

/// Why a file could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} {reason}")]
    Unsafe {
        path: std::path::PathBuf,
        reason: &'static str,
    },
    #[error("another saver is writing this image right now")]
    Busy,
    #[error("{candidates} names starting with {stem:?} are taken")]
    NamesExhausted { stem: String, candidates: u32 },
}

impl StoreError {
    /// True when trying again later may succeed: disks fill and empty, permissions get fixed,
    /// a read-only mount comes back, a file in the way is moved, and a busy image is finished by
    /// its other writer. A symlink or a name the file system cannot hold stays as it is.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Io { source, .. } => !matches!(
                source
                    .raw_os_error()
                    .map(rustix::io::Errno::from_raw_os_error),
                Some(rustix::io::Errno::NAMETOOLONG | rustix::io::Errno::LOOP)
            ),
            Self::Busy => true,
            Self::Unsafe { .. } | Self::NamesExhausted { .. } => false,
        }
    }
}

/// Where encoded images go.
pub trait Store: Send + Sync {
    /// The submission time of `job` as first recorded: `proposed` when this is the first time
    /// the store hears of the job (it is then recorded durably), the recorded time otherwise.
    /// Idempotent resubmissions render names from it, so a retry finds the files of the first
    /// attempt. Records older than [`LEDGER_RETENTION`] may be swept.
    ///
    /// # Errors
    /// [`StoreError`] when the record cannot be read or written.
    fn first_submission(
        &self,
        job: &luna_job::JobId,
        proposed: chrono::DateTime<chrono::FixedOffset>,
    ) -> Result<chrono::DateTime<chrono::FixedOffset>, StoreError>;

    /// Stores `file` under `placement` for the task `key`, never replacing another file.
    /// Storing the same key twice answers with the first file and writes nothing.
    ///
    /// # Errors
    /// [`StoreError`] when the backend fails.
    fn put(
        &self,
        key: &TaskKey,
        placement: &Placement,
        file: &Encoded,
    ) -> Result<Stored, StoreError>;
}
