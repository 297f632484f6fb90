//! The claim-check blob store: large frames wait here instead of travelling through the broker.
//!
//! A directory shared by gateways and savers (an NFS mount on a farm). The gateway writes a
//! frame with [`BlobStore::put`] (temp file, `fsync`, rename: a blob is complete or absent) and
//! sends a [`BlobRef`] in the task; the saver reads it with [`BlobStore::get`], which checks
//! length and SHA-256, and removes it once the image has its final outcome. Blobs whose task
//! never finished (a parked task, a lost job) are removed by [`BlobStore::sweep`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use luna_job::BlobRef;
use sha2::{Digest, Sha256};

/// Why a blob could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0} is not in the blob store (yet)")]
    NotFound(String),
    #[error("failed to {action} blob {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "blob {name} does not match its reference (length {len}, expected {expected_len}, or checksum)"
    )]
    Mismatch {
        name: String,
        len: u64,
        expected_len: u64,
    },
}

impl BlobError {
    /// Missing blobs and I/O errors may resolve (shared file systems show new files late);
    /// a mismatch will not.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Mismatch { .. })
    }
}

/// A directory of blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `bytes` under `name` durably and answers with a reference to put in the task.
    ///
    /// # Errors
    /// [`BlobError::Io`] when the directory cannot be written.
    pub fn put(&self, name: &str, bytes: &[u8]) -> Result<BlobRef, BlobError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&self.dir).map_err(io("create folder for", &self.dir))?;
        let final_path = self.dir.join(name);
        let temp = self.dir.join(format!(".{name}.tmp"));
        let mut f = fs::File::create(&temp).map_err(io("create", &temp))?;
        f.write_all(bytes).map_err(io("write", &temp))?;
        f.sync_all().map_err(io("fsync", &temp))?;
        fs::rename(&temp, &final_path).map_err(io("publish", &final_path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync folder of", &self.dir))?;
        Ok(BlobRef {
            name: name.to_owned(),
            sha256: sha256_hex(bytes),
            len: bytes.len() as u64,
        })
    }

    /// Reads and verifies a blob.
    ///
    /// # Errors
    /// [`BlobError::NotFound`] or [`BlobError::Io`] (transient), [`BlobError::Mismatch`].
    pub fn get(&self, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
        let path = self.dir.join(&blob.name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(blob.name.clone()));
            }
            Err(source) => {
                return Err(BlobError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        if bytes.len() as u64 != blob.len || sha256_hex(&bytes) != blob.sha256 {
            return Err(BlobError::Mismatch {
                name: blob.name.clone(),
                len: bytes.len() as u64,
                expected_len: blob.len,
            });
        }
        Ok(bytes)
    }

    /// Deletes a blob; an already missing one is fine.
    ///
    /// # Errors
    /// [`BlobError::Io`] when it exists but cannot be removed.
    pub fn remove(&self, blob: &BlobRef) -> Result<(), BlobError> {
        let path = self.dir.join(&blob.name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BlobError::Io {
                action: "remove",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Removes blobs (and abandoned temp files) not modified for `older_than`; returns how many.
    ///
    /// # Errors
    /// [`BlobError::Io`] when the directory cannot be listed.
    pub fn sweep(&self, older_than: Duration) -> Result<usize, BlobError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(BlobError::Io {
                    action: "list",
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= older_than));
            if stale && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_remove_and_verify() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(tmp.path().join("blobs"));
        let blob = store.put("job-1.pixels", b"abc").expect("put");
        assert_eq!(blob.len, 3);
        assert_eq!(store.get(&blob).expect("get"), b"abc");
        let forged = BlobRef {
            sha256: sha256_hex(b"abd"),
            ..blob.clone()
        };
        assert!(!store.get(&forged).expect_err("mismatch").is_transient());
        store.remove(&blob).expect("remove");
        store.remove(&blob).expect("already gone is fine");
        assert!(matches!(store.get(&blob), Err(BlobError::NotFound(_))));
    }

    #[test]
    fn sweep_removes_only_old_blobs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(tmp.path());
        store.put("a", b"1").expect("put");
        assert_eq!(store.sweep(Duration::from_secs(3600)).expect("sweep"), 0);
        assert_eq!(store.sweep(Duration::ZERO).expect("sweep"), 1);
    }
}
