//! The local hand-off: pixels a client on this machine left in a file of the hand-off
//! directory, read by the gateway instead of travelling through HTTP.
//!
//! A client asks `GET /v1/handoff` where the directory is (and this machine's boot id, so it
//! can tell a remote gateway from a local one), writes an image's samples into a file there and
//! sends `{"handoff": {"name", "offset"}}` in place of `pixels`. The gateway reads the samples
//! before it answers, whatever the answer, so the client may reuse its file at once.
//!
//! Nothing but a regular file directly in that directory is ever read: the directory is opened
//! for each request without following a symlink and must belong to this user with no access for
//! others (created `0700`), and the name is opened relative to it with `O_NOFOLLOW |
//! O_NONBLOCK`, so a symlink, a FIFO or a device is refused without being read (and without
//! blocking on a FIFO that has no writer).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use luna_job::SampleType;
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

/// Samples each reading thread converts per step: the chunk stays in cache between the read
/// and the conversion, and is below the size at which the conversion itself would spawn.
const CHUNK_SAMPLES: usize = 64 << 10;

/// Frames below this many samples are read on one thread: spawning costs more.
const PARALLEL_FROM: usize = 1 << 20;

/// Where the hand-off directory is, as configured (`--handoff-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffDir {
    /// A per-user folder in shared memory ([`default_dir`]).
    Default,
    /// `none`: no hand-off; clients send pixels inline.
    Off,
    /// This folder.
    At(PathBuf),
}

impl std::str::FromStr for HandoffDir {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "" | "default" => Self::Default,
            "none" | "off" => Self::Off,
            path => Self::At(PathBuf::from(path)),
        })
    }
}

/// `/dev/shm/luna-handoff-<uid>` where `/dev/shm` exists (files there live in memory), else
/// the same name in the OS temp folder.
pub fn default_dir() -> PathBuf {
    let name = format!("luna-handoff-{}", rustix::process::geteuid().as_raw());
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join(name)
    } else {
        std::env::temp_dir().join(name)
    }
}

/// Why a hand-off could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The gateway runs without a hand-off directory.
    #[error("this gateway takes no hand-off (--handoff-dir none); send the pixels inline")]
    Disabled,
    /// The directory or the file is not there: the client is on another machine or in another
    /// container, or the directory was removed. The client sends the pixels inline instead.
    #[error("{0} does not exist on the gateway's machine; send the pixels inline")]
    Missing(PathBuf),
    /// Something other than a regular file (or a folder, for the directory) is at the name.
    #[error("{path} is {kind}, not a regular file; only files written by the client are read")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// The directory is not private to the gateway's user.
    #[error(
        "{path} {why}; the hand-off directory must be a folder of the gateway's user, mode 0700"
    )]
    Unsafe { path: PathBuf, why: String },
    /// The file ends before the image does.
    #[error(
        "{path} has {len} bytes; the image needs {need} bytes from offset {offset} (to byte {end})"
    )]
    Short {
        path: PathBuf,
        len: u64,
        offset: u64,
        need: u64,
        end: u128,
    },
    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HandoffError {
    /// The client can fall back to sending pixels inline: the hand-off is not possible here,
    /// rather than wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Disabled | Self::Missing(_))
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(Errno) -> HandoffError + use<> {
    let path = path.to_owned();
    move |e| HandoffError::Io {
        action,
        path,
        source: e.into(),
    }
}

fn kind_of(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a folder",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

/// The hand-off directory of one gateway, and this machine's boot id.
#[derive(Debug)]
pub struct Handoff {
    dir: PathBuf,
    boot_id: Option<String>,
}

impl Handoff {
    /// The hand-off as configured; `None` for `--handoff-dir none`. Creates the directory
    /// (logging, not failing, when it cannot: `GET /v1/handoff` tries again and says why).
    pub fn new(setting: &HandoffDir) -> Option<Self> {
        let dir = match setting {
            HandoffDir::Off => return None,
            HandoffDir::Default => default_dir(),
            HandoffDir::At(path) => path.clone(),
        };
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let handoff = Self { dir, boot_id };
        match handoff.ensure() {
            Ok(()) => {
                tracing::info!(dir = %handoff.dir.display(), "local hand-off directory ready")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "local hand-off directory not usable; clients send pixels inline until it is"
            ),
        }
        Some(handoff)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `/proc/sys/kernel/random/boot_id`: the same for every process of this boot of this
    /// machine (containers included), so a client knows whether it shares the gateway's memory.
    pub fn boot_id(&self) -> Option<&str> {
        self.boot_id.as_deref()
    }

    /// Creates the directory (mode 0700) when missing and checks it is private to this user.
    ///
    /// # Errors
    /// When it cannot be created, or is not a folder of this user without access for others.
    pub fn ensure(&self) -> Result<(), HandoffError> {
        match rustix::fs::mkdir(&self.dir, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io_error("create", &self.dir)(e)),
        }
        self.open_dir().map(drop)
    }

    /// The directory, opened without following a symlink, once it is known to be private.
    fn open_dir(&self) -> Result<OwnedFd, HandoffError> {
        let fd = match rustix::fs::open(
            &self.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(HandoffError::Missing(self.dir.clone())),
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(HandoffError::Unsafe {
                    path: self.dir.clone(),
                    why: "is not a folder (or is a symbolic link)".into(),
                });
            }
            Err(e) => return Err(io_error("open", &self.dir)(e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(io_error("inspect", &self.dir))?;
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != me {
            return Err(HandoffError::Unsafe {
                path: self.dir.clone(),
                why: format!("belongs to user {}, not {me}", st.st_uid),
            });
        }
        let mode = st.st_mode & 0o777;
        if mode & 0o077 != 0 {
            // Ours, so ours to fix: a umask or an operator's mkdir left it open to others.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
                .map_err(io_error("restrict", &self.dir))?;
        }
        Ok(fd)
    }

    /// Reads `count` samples of type `from` at `offset` of the file `name`, converted to `to`.
    ///
    /// Blocking: run it off the async threads.
    ///
    /// # Errors
    /// [`HandoffError::Missing`] (the client falls back to inline pixels); any other variant
    /// when the file cannot be what the client says it is.
    pub fn read(
        &self,
        name: &str,
        offset: u64,
        count: u64,
        from: SampleType,
        to: SampleType,
    ) -> Result<Vec<u8>, HandoffError> {
        let dir = self.open_dir()?;
        let path = self.dir.join(name);
        let fd = match rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(HandoffError::Missing(path)),
            Err(Errno::LOOP) => {
                return Err(HandoffError::NotRegular {
                    path,
                    kind: kind_of(FileType::Symlink),
                });
            }
            // A socket cannot be opened; a FIFO opened for reading never blocks with NONBLOCK.
            Err(Errno::NXIO | Errno::OPNOTSUPP) => {
                return Err(HandoffError::NotRegular {
                    path,
                    kind: kind_of(FileType::Socket),
                });
            }
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(io_error("inspect", &path))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind != FileType::RegularFile {
            return Err(HandoffError::NotRegular {
                path,
                kind: kind_of(kind),
            });
        }
        let in_size = u64::from(from.bytes());
        let need = count.saturating_mul(in_size);
        let len = u64::try_from(st.st_size).unwrap_or(0);
        let end = u128::from(offset) + u128::from(need);
        let short = || HandoffError::Short {
            path: path.clone(),
            len,
            offset,
            need,
            end,
        };
        if end > u128::from(len) {
            return Err(short());
        }
        let file = File::from(fd);
        let total = usize::try_from(count).map_err(|_| short())?;
        let read = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    // Truncated since fstat: the client rewrote it under us.
                    short()
                } else {
                    HandoffError::Io {
                        action: "read",
                        path: path.clone(),
                        source: e,
                    }
                }
            })
        };
        read_converted(total, offset, from, to, &read)
    }
}

/// Reads exactly `buf.len()` bytes at a file offset.
type ReadAt<'a> = dyn Fn(&mut [u8], u64) -> Result<(), HandoffError> + Sync + 'a;

/// `total` samples of type `from` at byte `offset`, read with `read` and converted to `to`.
///
/// Large frames are split across the cores: each worker reads its own part of the file a chunk
/// at a time into a small buffer that stays in cache, converts it and writes its own disjoint
/// part of the output, so the samples cross memory once and the source never sits in the
/// gateway whole.
fn read_converted(
    total: usize,
    offset: u64,
    from: SampleType,
    to: SampleType,
    read: &ReadAt<'_>,
) -> Result<Vec<u8>, HandoffError> {
    let in_size = usize::from(from.bytes());
    let out_size = usize::from(to.bytes());
    let mut out = vec![0u8; total * out_size];
    let threads = if total >= PARALLEL_FROM {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        1
    };
    let per = total.div_ceil(threads.max(1)).max(1);
    let work = |first: usize, part: &mut [u8]| -> Result<(), HandoffError> {
        let at = |sample: usize| offset + (sample * in_size) as u64;
        if from == to {
            return read(part, at(first));
        }
        let count = part.len() / out_size;
        let mut chunk = vec![0u8; CHUNK_SAMPLES.min(count) * in_size];
        let mut done = 0usize;
        while done < count {
            let n = CHUNK_SAMPLES.min(count - done);
            let buf = &mut chunk[..n * in_size];
            read(buf, at(first + done))?;
            luna_imaging::samples::convert_into(
                buf,
                from,
                to,
                &mut part[done * out_size..(done + n) * out_size],
            )
            .map_err(|e| HandoffError::Io {
                action: "convert samples of",
                path: PathBuf::new(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            done += n;
        }
        Ok(())
    };
    if threads <= 1 {
        work(0, &mut out)?;
        return Ok(out);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = out
            .chunks_mut(per * out_size)
            .enumerate()
            .map(|(i, part)| scope.spawn(move || work(i * per, part)))
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err(worker_panicked())))
    })?;
    Ok(out)
}

fn worker_panicked() -> HandoffError {
    HandoffError::Io {
        action: "read",
        path: PathBuf::new(),
        source: io::Error::other("a reading thread panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        assert_eq!("none".parse::<HandoffDir>(), Ok(HandoffDir::Off));
        assert_eq!("".parse::<HandoffDir>(), Ok(HandoffDir::Default));
        assert_eq!(
            "/tmp/x".parse::<HandoffDir>(),
            Ok(HandoffDir::At(PathBuf::from("/tmp/x")))
        );
    }

    #[test]
    fn split_reads_convert_like_one_conversion() {
        let n = PARALLEL_FROM + 3 * CHUNK_SAMPLES + 17;
        let floats: Vec<u8> = (0..n)
            .flat_map(|i| ((i % 1013) as f32 / 1000.0).to_le_bytes())
            .collect();
        let mut file = vec![9u8; 12];
        file.extend_from_slice(&floats);
        let read = |buf: &mut [u8], at: u64| {
            let at = usize::try_from(at).expect("small");
            buf.copy_from_slice(&file[at..at + buf.len()]);
            Ok(())
        };
        for to in [SampleType::U8, SampleType::U16, SampleType::F32] {
            let got = read_converted(n, 12, SampleType::F32, to, &read).expect("read");
            let want = luna_imaging::samples::convert(&floats, SampleType::F32, to).expect("ok");
            assert!(got == want, "{to:?}");
        }
    }

    #[test]
    fn default_is_per_user() {
        let dir = default_dir();
        let uid = rustix::process::geteuid().as_raw();
        assert!(
            dir.ends_with(format!("luna-handoff-{uid}")),
            "{}",
            dir.display()
        );
    }
}
