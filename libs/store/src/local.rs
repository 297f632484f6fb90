//! The local-filesystem store (also right for NFS and other shared mounts).
//!
//! # How a file is published
//! 1. Create the folders; open `.luna-<job>-<index>.tmp` in the target folder and take an
//!    exclusive `flock` on it. The lock makes two savers that got the same task (a redelivery
//!    racing a slow first attempt) take turns instead of writing two files.
//! 2. Look for this task's file among `<stem>.<ext>`, `<stem>_1.<ext>`, ...: a file is ours when
//!    its `user.luna.task` extended attribute is `<job_id>/<index>`. If found, the task was
//!    stored before (a redelivery): answer with that path and write nothing.
//! 3. Otherwise write the bytes to the temp file, tag it with the attribute, `fsync` it, and
//!    hard-link it to the first free name. `link` never replaces an existing file, so a name
//!    taken meanwhile just moves us to the next suffix. The attribute travels with the inode, so
//!    every published file carries its identity from the instant it becomes visible, and no
//!    partial file is ever visible under a final name.
//! 4. Publish the JPEG sidecar (`<file>.json`) the same way, remove the temp file, `fsync` the
//!    folder.
//!
//! A crash at any step leaves either no published file (the task is redone) or a tagged one
//! (step 2 finds it and completes the sidecar). Where user extended attributes are not
//! supported, identity falls back to comparing bytes: encoding is deterministic, and the
//! embedded `luna_job_id` makes files of different jobs differ.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use luna_imaging::Encoded;
use luna_job::task::TaskKey;
use rustix::fs::{FlockOperation, XattrFlags};

use crate::placement::Placement;
use crate::{Store, StoreError, Stored};

/// Extended attribute holding `<job_id>/<image index>` on every published file.
pub const TASK_XATTR: &str = "user.luna.task";

/// How many collision suffixes are tried before giving up.
pub const MAX_CANDIDATES: u32 = 100_000;

/// Stores files under one output root.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    use_xattrs: bool,
}

impl LocalStore {
    /// A store writing below `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            use_xattrs: true,
        }
    }

    /// Chooses whether files are recognised by extended attribute (default) or only by
    /// content, for file systems that refuse user attributes.
    #[must_use]
    pub fn use_xattrs(mut self, on: bool) -> Self {
        self.use_xattrs = on;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// An exclusively locked temp file, removed when dropped.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn lock(path: PathBuf) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("create temp file", &path))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { path, file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Busy),
            Err(e) => Err(io_err("lock temp file", &path)(e.into())),
        }
    }

    /// Tags the file with `tag`; `Ok(false)` when the file system has no user attributes.
    fn tag(&self, tag: &str) -> Result<bool, StoreError> {
        match rustix::fs::fsetxattr(&self.file, TASK_XATTR, tag.as_bytes(), XattrFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOTSUP) => Ok(false),
            Err(e) => Err(io_err("tag", &self.path)(e.into())),
        }
    }

    /// Replaces the content with `bytes` and makes it durable. The tag stays on the inode.
    fn fill(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = &self.path;
        self.file
            .set_len(0)
            .map_err(io_err("truncate temp file", path))?;
        (&self.file)
            .write_all(bytes)
            .map_err(io_err("write", path))?;
        self.file.sync_all().map_err(io_err("fsync", path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Unlink while still holding the lock, so a waiting writer never locks a file that is
        // about to vanish and then publishes from it.
        let _ = fs::remove_file(&self.path);
    }
}

enum Identity<'a> {
    Xattr(&'a str),
    Content(&'a [u8]),
}

impl Identity<'_> {
    fn matches(&self, path: &Path) -> bool {
        match self {
            Self::Xattr(tag) => {
                let mut buf = [0u8; 128];
                matches!(rustix::fs::getxattr(path, TASK_XATTR, &mut buf[..]), Ok(n) if &buf[..n] == tag.as_bytes())
            }
            Self::Content(bytes) => {
                fs::metadata(path).is_ok_and(|m| m.len() == bytes.len() as u64)
                    && fs::read(path).is_ok_and(|existing| existing == *bytes)
            }
        }
    }
}

impl Store for LocalStore {
    fn put(
        &self,
        key: &TaskKey,
        placement: &Placement,
        file: &Encoded,
    ) -> Result<Stored, StoreError> {
        let dir = placement
            .dirs
            .iter()
            .fold(self.root.clone(), |p, d| p.join(d));
        fs::create_dir_all(&dir).map_err(io_err("create folder", &dir))?;
        let tag = key.to_string();
        let temp_name = |suffix: &str| {
            dir.join(format!(
                ".luna-{}-{}{suffix}.tmp",
                key.job_id, key.image_index
            ))
        };
        let mut temp = TempFile::lock(temp_name(""))?;
        let tagged = self.use_xattrs && temp.tag(&tag)?;
        let identity = if tagged {
            Identity::Xattr(&tag)
        } else {
            Identity::Content(&file.bytes)
        };

        let mut n = 0;
        let mut filled = false;
        let (n, already_stored) = loop {
            if n >= MAX_CANDIDATES {
                return Err(StoreError::NamesExhausted {
                    stem: placement.stem.clone(),
                    candidates: n,
                });
            }
            let target = dir.join(placement.file_name(n));
            match fs::symlink_metadata(&target) {
                Ok(_) if identity.matches(&target) => break (n, true),
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !filled {
                        temp.fill(&file.bytes)?;
                        filled = true;
                    }
                    match fs::hard_link(&temp.path, &target) {
                        Ok(()) => break (n, false),
                        // Taken since we looked: check it like any other existing name.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io_err("publish", &target)(e)),
                    }
                }
                Err(e) => return Err(io_err("inspect", &target)(e)),
            }
        };

        let name = placement.file_name(n);
        if let Some(sidecar) = &file.sidecar {
            let target = dir.join(format!("{name}.json"));
            if !target.exists() {
                let mut side = TempFile::lock(temp_name(".json"))?;
                if tagged {
                    side.tag(&tag)?;
                }
                side.fill(sidecar)?;
                match fs::hard_link(&side.path, &target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err("publish", &target)(e)),
                }
            }
        }
        drop(temp);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync folder", &dir))?;
        Ok(Stored {
            path: placement.relative_path(n),
            bytes: file.bytes.len() as u64,
            already_stored,
        })
    }
}
