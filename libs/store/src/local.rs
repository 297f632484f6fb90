//! The local-filesystem store (also right for NFS and other shared mounts).
//!
//! # Nothing below the root is reached through a symlink
//! The root is opened once per write (the operator may point it anywhere, through a symlink
//! too); from there every folder is created and opened one name at a time, relative to its
//! parent's descriptor, with `O_NOFOLLOW`. Names are single components (placement never
//! yields `/`, `.` or `..`, and [`Dir::child`] checks again), so a symlink planted anywhere
//! below the root, at a folder, at a final name or at a work-file name, is refused or treated
//! as a taken name; it is never followed and nothing is written through it.
//!
//! # How a file is published
//! 1. Open the target folder as above and take an exclusive `flock` on the task's lock file
//!    `.luna-<job>-<index>.lock` (opened `O_NOFOLLOW`, checked to still be the file at that name
//!    once locked). The lock makes two savers that got the same task (a redelivery racing a
//!    slow first attempt) take turns instead of writing two files.
//! 2. Look for this task's file among `<stem>.<ext>`, `<stem>_1.<ext>`, ...: a file is ours when
//!    it is a regular file whose `user.luna.task` extended attribute is `<job_id>/<index>`. If
//!    found, the task was stored before (a redelivery): answer with that path and write nothing.
//! 3. Otherwise write the bytes to an unnamed file (`O_TMPFILE`) in the folder, tag it with the
//!    attribute, `fsync` it, and link that open descriptor to the first free name. `link` never
//!    replaces an existing file, so a name taken meanwhile just moves us to the next suffix.
//!    The attribute travels with the inode, so every published file carries its identity from
//!    the instant it becomes visible, and no partial file is ever visible under a final name.
//!    File systems without `O_TMPFILE` get a named temp file instead, created `O_EXCL |
//!    O_NOFOLLOW` and checked to be ours right before it is linked.
//! 4. Publish the JPEG sidecar (`<file>.json`) the same way, remove the lock file, `fsync` the
//!    folder (and the parent of every folder created on the way).
//!
//! A crash at any step leaves either no published file (the task is redone) or a tagged one
//! (step 2 finds it and completes the sidecar); at most an empty lock file is left behind.
//! Where user extended attributes are not supported, identity falls back to comparing bytes:
//! encoding is deterministic, and the embedded `luna_job_id` makes files of different jobs
//! differ.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use luna_imaging::Encoded;
use luna_job::task::TaskKey;
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, XattrFlags};
use rustix::io::Errno;

use crate::placement::{MAX_COMPONENT_LEN, Placement};
use crate::{Store, StoreError, Stored};

/// Extended attribute holding `<job_id>/<image index>` on every published file.
pub const TASK_XATTR: &str = "user.luna.task";

/// How many collision suffixes are tried before giving up.
pub const MAX_CANDIDATES: u32 = 100_000;

/// Mode of new files and folders, before the umask (as `open` and `mkdir` do by default).
const FILE_MODE: u32 = 0o666;
const DIR_MODE: u32 = 0o777;

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

    /// Opens (creating where missing) the folder `dirs` below the root, never through a
    /// symlink. Shared with other writers under the root (the submission ledger).
    pub(crate) fn open_dir(&self, dirs: &[String]) -> Result<Dir, StoreError> {
        dirs.iter()
            .try_fold(Dir::root(&self.root)?, |dir, name| dir.child(name))
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

fn errno(action: &'static str, path: &Path) -> impl FnOnce(Errno) -> StoreError + use<> {
    let f = io_err(action, path);
    move |e| f(e.into())
}

/// A folder below the root, opened without following symlinks, and the path it stands for
/// (for messages only: nothing is ever opened by that path).
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    fn root(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io_err("create folder", root))?;
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno("open output root", root))?;
        Ok(Self {
            fd,
            path: root.to_owned(),
        })
    }

    /// The folder `name` inside this one, created if missing.
    fn child(self, name: &str) -> Result<Self, StoreError> {
        let path = self.path.join(name);
        check_name(name, &path)?;
        let created = match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(errno("create folder", &path)(e)),
        };
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::NOTDIR) => return Err(self.refusal(name, path)),
            Err(e) => return Err(errno("open folder", &path)(e)),
        };
        if created {
            // The new entry must survive a crash as much as the file that will be in it.
            rustix::fs::fsync(&self.fd).map_err(errno("fsync folder", &self.path))?;
        }
        Ok(Self { fd, path })
    }

    /// Why `name` could not be opened as a folder: a symlink (refused for good), or something
    /// else in the way (which an operator may move, so it is worth retrying).
    fn refusal(&self, name: &str, path: PathBuf) -> StoreError {
        let symlink = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
        if symlink {
            StoreError::Unsafe {
                path,
                reason: "is a symbolic link; nothing below the output root is reached through one",
            }
        } else {
            StoreError::Io {
                action: "create folder",
                path,
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "something that is not a folder is in the way",
                ),
            }
        }
    }

    /// Removes the entry `name` of this folder (never what a symlink points to).
    pub(crate) fn remove(&self, name: &std::ffi::OsStr) -> Result<(), Errno> {
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn fsync(&self) -> Result<(), StoreError> {
        rustix::fs::fsync(&self.fd).map_err(errno("fsync folder", &self.path))
    }

    /// Opens the regular file `name` for reading, never through a symlink. `None` when the
    /// name is free; `Some(Err)` when it is taken by something that is not a regular file.
    pub(crate) fn open_file(
        &self,
        name: &str,
    ) -> Result<Option<Result<File, FileType>>, StoreError> {
        match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(errno("inspect", &self.path.join(name)))?;
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::RegularFile => Ok(Some(Ok(File::from(fd)))),
                    other => Ok(Some(Err(other))),
                }
            }
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::LOOP) => Ok(Some(Err(FileType::Symlink))),
            Err(e) => Err(errno("inspect", &self.path.join(name))(e)),
        }
    }

    /// A new file with nothing at any name yet: unnamed (`O_TMPFILE`) where the file system
    /// allows, else created at `temp_name` with `O_EXCL | O_NOFOLLOW`.
    pub(crate) fn new_file(&self, temp_name: &str) -> Result<NewFile<'_>, StoreError> {
        match rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        ) {
            Ok(fd) => {
                return Ok(NewFile {
                    dir: self,
                    file: File::from(fd),
                    name: None,
                });
            }
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL | Errno::NOSYS) => {}
            Err(e) => return Err(errno("create file in", &self.path)(e)),
        }
        let path = self.path.join(temp_name);
        let create = || {
            rustix::fs::openat(
                &self.fd,
                temp_name,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(FILE_MODE),
            )
        };
        let fd = match create() {
            Ok(fd) => fd,
            // Left by a crashed writer of this task (we hold its lock) or planted: drop the
            // name, never what it points to, and create our own.
            Err(Errno::EXIST) => {
                rustix::fs::unlinkat(&self.fd, temp_name, AtFlags::empty())
                    .map_err(errno("remove stale temp file", &path))?;
                create().map_err(errno("create temp file", &path))?
            }
            Err(e) => return Err(errno("create temp file", &path)(e)),
        };
        Ok(NewFile {
            dir: self,
            file: File::from(fd),
            name: Some(temp_name.to_owned()),
        })
    }

    /// Takes the task lock `name`, or [`StoreError::Busy`] when another writer holds it.
    fn lock(&self, name: &str) -> Result<TaskLock<'_>, StoreError> {
        let path = self.path.join(name);
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => {
                return Err(StoreError::Unsafe {
                    path,
                    reason: "is a symbolic link where the task's lock file belongs",
                });
            }
            Err(e) => return Err(errno("create lock file", &path)(e)),
        };
        let ours = rustix::fs::fstat(&fd).map_err(errno("inspect lock file", &path))?;
        if FileType::from_raw_mode(ours.st_mode) != FileType::RegularFile {
            return Err(StoreError::Unsafe {
                path,
                reason: "is not a regular file where the task's lock file belongs",
            });
        }
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => return Err(StoreError::Busy),
            Err(e) => return Err(errno("lock", &path)(e)),
        }
        // The holder before us unlinks the file while it still holds the lock; if that
        // happened between our open and our lock, we locked a file nobody else will see.
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(now) if now.st_dev == ours.st_dev && now.st_ino == ours.st_ino => Ok(TaskLock {
                dir: self,
                name: name.to_owned(),
                _fd: fd,
            }),
            Ok(_) | Err(Errno::NOENT) => Err(StoreError::Busy),
            Err(e) => Err(errno("inspect lock file", &path)(e)),
        }
    }
}

/// Refuses names that are not one plain component (a bug upstream if it ever happens).
fn check_name(name: &str, path: &Path) -> Result<(), StoreError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(StoreError::Unsafe {
            path: path.to_owned(),
            reason: "is not a single plain name",
        });
    }
    if name.len() > MAX_COMPONENT_LEN {
        return Err(StoreError::Io {
            action: "create",
            path: path.to_owned(),
            source: Errno::NAMETOOLONG.into(),
        });
    }
    Ok(())
}

/// An exclusively held task lock, removed when dropped.
struct TaskLock<'d> {
    dir: &'d Dir,
    name: String,
    _fd: OwnedFd,
}

impl Drop for TaskLock<'_> {
    fn drop(&mut self) {
        // Unlink while still holding the lock (the descriptor closes after this), so a waiting
        // writer that opened this file sees it gone once it gets the lock, and starts over.
        let _ = rustix::fs::unlinkat(&self.dir.fd, self.name.as_str(), AtFlags::empty());
    }
}

/// A file being written, not yet visible under a final name.
pub(crate) struct NewFile<'d> {
    dir: &'d Dir,
    file: File,
    /// The temp name on file systems without `O_TMPFILE`.
    name: Option<String>,
}

impl NewFile<'_> {
    fn where_(&self) -> PathBuf {
        self.dir
            .path
            .join(self.name.as_deref().unwrap_or("(unnamed)"))
    }

    /// Tags the file with `tag`; `Ok(false)` when the file system has no user attributes.
    fn tag(&self, tag: &str) -> Result<bool, StoreError> {
        match rustix::fs::fsetxattr(&self.file, TASK_XATTR, tag.as_bytes(), XattrFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOTSUP) => Ok(false),
            Err(e) => Err(errno("tag", &self.where_())(e)),
        }
    }

    /// Writes `bytes` and makes them durable.
    pub(crate) fn fill(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.where_();
        (&self.file)
            .write_all(bytes)
            .map_err(io_err("write", &path))?;
        self.file.sync_all().map_err(io_err("fsync", &path))
    }

    /// Links the file at `name`. `Ok(false)` when the name is taken (nothing is replaced).
    pub(crate) fn publish(&self, name: &str) -> Result<bool, StoreError> {
        let target = self.dir.path.join(name);
        let linked = match &self.name {
            None => link_descriptor(&self.file, &self.dir.fd, name),
            Some(temp) => {
                // Only link the temp name while it is still the file we wrote.
                let ours = rustix::fs::fstat(&self.file).map_err(errno("inspect", &target))?;
                let now =
                    rustix::fs::statat(&self.dir.fd, temp.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(errno("inspect temp file", &self.where_()))?;
                if now.st_dev != ours.st_dev || now.st_ino != ours.st_ino {
                    return Err(StoreError::Unsafe {
                        path: self.where_(),
                        reason: "was replaced while being written",
                    });
                }
                rustix::fs::linkat(
                    &self.dir.fd,
                    temp.as_str(),
                    &self.dir.fd,
                    name,
                    AtFlags::empty(),
                )
            }
        };
        match linked {
            Ok(()) => Ok(true),
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(errno("publish", &target)(e)),
        }
    }
}

impl Drop for NewFile<'_> {
    fn drop(&mut self) {
        if let Some(temp) = &self.name {
            let _ = rustix::fs::unlinkat(&self.dir.fd, temp.as_str(), AtFlags::empty());
        }
    }
}

/// Gives the unnamed file `file` the name `name` in `dir`: through its `/proc/self/fd` entry
/// (what `linkat(2)` documents for `O_TMPFILE`), or `AT_EMPTY_PATH` where `/proc` is missing.
fn link_descriptor(file: &File, dir: &OwnedFd, name: &str) -> Result<(), Errno> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    ) {
        Err(Errno::NOENT) if !Path::new("/proc/self/fd").exists() => {
            rustix::fs::linkat(file.as_fd(), "", dir, name, AtFlags::EMPTY_PATH)
        }
        other => other,
    }
}

enum Identity<'a> {
    Xattr(&'a str),
    Content(&'a [u8]),
}

impl Identity<'_> {
    fn matches(&self, file: &File) -> bool {
        match self {
            Self::Xattr(tag) => {
                let mut buf = [0u8; 128];
                matches!(rustix::fs::fgetxattr(file, TASK_XATTR, &mut buf[..]), Ok(n) if &buf[..n] == tag.as_bytes())
            }
            Self::Content(bytes) => {
                let mut existing = Vec::with_capacity(bytes.len());
                file.metadata().is_ok_and(|m| m.len() == bytes.len() as u64)
                    && { file }.read_to_end(&mut existing).is_ok()
                    && existing == *bytes
            }
        }
    }
}

impl Store for LocalStore {
    fn first_submission(
        &self,
        job: &luna_job::JobId,
        proposed: chrono::DateTime<chrono::FixedOffset>,
    ) -> Result<chrono::DateTime<chrono::FixedOffset>, StoreError> {
        self.ledger_first_submission(job, proposed)
    }

    fn put(
        &self,
        key: &TaskKey,
        placement: &Placement,
        file: &Encoded,
    ) -> Result<Stored, StoreError> {
        let dir = self.open_dir(&placement.dirs)?;
        let tag = key.to_string();
        let work_name = |suffix: &str| format!(".luna-{}-{}{suffix}", key.job_id, key.image_index);
        let lock = dir.lock(&work_name(".lock"))?;
        // Temp files a crashed writer of this task left (we hold its lock now): drop the names.
        for stale in [work_name(".tmp"), work_name(".json.tmp")] {
            let _ = rustix::fs::unlinkat(&dir.fd, stale.as_str(), AtFlags::empty());
        }
        let mut data = dir.new_file(&work_name(".tmp"))?;
        let tagged = self.use_xattrs && data.tag(&tag)?;
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
            let name = placement.file_name(n);
            match dir.open_file(&name)? {
                Some(Ok(existing)) if identity.matches(&existing) => break (n, true),
                // Another file, or a symlink or folder someone put there: a taken name.
                Some(_) => n += 1,
                None => {
                    if !filled {
                        data.fill(&file.bytes)?;
                        filled = true;
                    }
                    // A name taken since we looked is checked like any other existing name.
                    if data.publish(&name)? {
                        break (n, false);
                    }
                }
            }
        };
        drop(data);

        let name = placement.file_name(n);
        if let Some(sidecar) = &file.sidecar {
            let side_name = format!("{name}.json");
            match dir.open_file(&side_name)? {
                Some(Ok(_)) => {}
                Some(Err(kind)) => {
                    return Err(StoreError::Unsafe {
                        path: dir.path().join(&side_name),
                        reason: if kind == FileType::Symlink {
                            "is a symbolic link where the metadata sidecar belongs"
                        } else {
                            "is in the way of the metadata sidecar"
                        },
                    });
                }
                None => {
                    let mut side = dir.new_file(&work_name(".json.tmp"))?;
                    if tagged {
                        side.tag(&tag)?;
                    }
                    side.fill(sidecar)?;
                    // Taken meanwhile: by this task's other writer, which wrote the same bytes.
                    side.publish(&side_name)?;
                }
            }
        }
        drop(lock);
        dir.fsync()?;
        Ok(Stored {
            path: placement.relative_path(n),
            bytes: file.bytes.len() as u64,
            already_stored,
        })
    }
}
