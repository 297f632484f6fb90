//! The submission ledger: the first submission time of each idempotent job, kept under the
//! output root so every saver sharing the root agrees on it.
//!
//! A job submitted with an `Idempotency-Key` has the same job id on every retry, but each
//! retry reaches the gateway at another time; `%time:...%` in its names must still render the
//! first attempt's time, or a retry would write its images a second time under new names. The
//! first saver to see such a job records the task's `submitted_at` in
//! `<root>/.luna/jobs/<job_id>`; every later task of the job (from any attempt, on any saver)
//! renders its names from the recorded time.
//!
//! A record is published like an image: written to an unnamed file, `fsync`ed and linked, so
//! it is complete or absent, and `link` never replaces it, so two savers racing on the first
//! task agree on whichever record landed first. Folders are opened without following symlinks.
//! Records older than [`LEDGER_RETENTION`] are swept: a key reused after that is a new
//! submission as far as names go (its job id, and so the files already stored under a name
//! rendered the same way, are still recognised).

use std::io::Read as _;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, FixedOffset};
use luna_job::JobId;

use crate::StoreError;
use crate::local::LocalStore;

/// Folders of the ledger below the output root.
pub const LEDGER_DIRS: [&str; 2] = [".luna", "jobs"];

/// How long a job's first submission time is kept: longer than any client retries for.
pub const LEDGER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

fn ledger_dirs() -> Vec<String> {
    LEDGER_DIRS.iter().map(|d| (*d).to_owned()).collect()
}

fn invalid_record(path: std::path::PathBuf, what: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        action: "read submission record",
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    }
}

impl LocalStore {
    /// See [`crate::Store::first_submission`].
    pub(crate) fn ledger_first_submission(
        &self,
        job: &JobId,
        proposed: DateTime<FixedOffset>,
    ) -> Result<DateTime<FixedOffset>, StoreError> {
        let dir = self.open_dir(&ledger_dirs())?;
        let name = job.as_str();
        let read = |file: std::fs::File| {
            let mut text = String::new();
            let path = dir.path().join(name);
            { file }
                .read_to_string(&mut text)
                .map_err(|e| invalid_record(path.clone(), e))?;
            DateTime::parse_from_rfc3339(text.trim()).map_err(|e| invalid_record(path, e))
        };
        match dir.open_file(name)? {
            Some(Ok(file)) => return read(file),
            Some(Err(_)) => {
                return Err(StoreError::Unsafe {
                    path: dir.path().join(name),
                    reason: "is not a regular file where the job's submission record belongs",
                });
            }
            None => {}
        }
        let mut record = dir.new_file(&format!(".{name}.tmp"))?;
        record.fill(proposed.to_rfc3339().as_bytes())?;
        if record.publish(name)? {
            dir.fsync()?;
            return Ok(proposed);
        }
        // Another saver recorded the job first: its time wins.
        match dir.open_file(name)? {
            Some(Ok(file)) => read(file),
            _ => Err(StoreError::Busy),
        }
    }

    /// Removes ledger records older than `max_age`; answers how many went.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the ledger folder cannot be listed.
    pub fn sweep_ledger(&self, max_age: Duration) -> Result<usize, StoreError> {
        let folder = LEDGER_DIRS
            .iter()
            .fold(self.root().to_owned(), |p, d| p.join(d));
        if std::fs::symlink_metadata(&folder).is_err() {
            return Ok(0); // no idempotent job has been stored here
        }
        let dir = self.open_dir(&ledger_dirs())?;
        let listing = std::fs::read_dir(dir.path()).map_err(|source| StoreError::Io {
            action: "list",
            path: dir.path().to_owned(),
            source,
        })?;
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in listing.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > max_age);
            if old && meta.is_file() && dir.remove(&entry.file_name()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}
