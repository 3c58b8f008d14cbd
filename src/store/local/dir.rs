//! The state directory, opened once and checked on its descriptor; everything below it
//! is reached relative to that descriptor, each folder and file checked the same way.
//!
//! Opening walks the path one component at a time, never following a symbolic link
//! that another user could have planted: a link is followed only if it belongs to you
//! or to root (a link in a folder another user can write, swapped between two of our
//! opens, cannot redirect us: we hold descriptors, not paths). The directory reached
//! must belong to you and be writable by nobody else (mode 0700 is what chan-run
//! creates); so must every folder and file in it, and none may be a symbolic link.
//! Anything else is refused with exit 125 and the command that fixes it.

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt::Display;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the user can do about a state directory chan-run cannot use.
const HINT: &str = "or pass --state-dir DIR (or set CHAN_RUN_STATE_DIR) to a directory of your own";
/// Symbolic links followed while walking one path, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// The open, checked state directory.
pub struct StateDir {
    /// For messages only: nothing is ever opened through it again.
    pub path: PathBuf,
    pub fd: OwnedFd,
    /// Its device and inode, from the check at open (the store's id: no second fstat).
    pub dev_ino: (u64, u64),
}

impl StateDir {
    /// Opens the state directory at `path`, creating it (and its parents, mode 0700)
    /// when `create`; `None` if it does not exist and `create` is false.
    pub fn open(path: &Path, create: bool) -> anyhow::Result<Option<StateDir>> {
        let Some(fd) = walk(path, create)? else { return Ok(None) };
        let st = rustix::fs::fstat(&fd).map_err(|e| anyhow::anyhow!("cannot use {}: {e}", path.display()))?;
        if let Some(Refused::Unsafe(why)) = refusal(&st, FileType::Directory) {
            anyhow::bail!("the state directory {} {why}; {}", path.display(), fix(path, &why));
        }
        Ok(Some(StateDir { path: path.to_owned(), fd, dev_ino: (st.st_dev, st.st_ino) }))
    }

    /// The folder `name` in the state directory (created, 0700, when `create`).
    pub fn folder(&self, name: &str, create: bool) -> anyhow::Result<Option<OwnedFd>> {
        folder(&self.fd, name, create).map_err(|e| anyhow::anyhow!("{}", e.message(&self.path.join(name))))
    }
}

/// Why an object of ours cannot be used.
#[derive(Debug)]
pub enum Refused {
    Os(Errno),
    /// A symbolic link where a file or folder of chan-run's should be.
    Link,
    /// Not a regular file, or not a folder, as expected.
    Kind,
    /// Belongs to someone else, or others may write it: the text says which.
    Unsafe(String),
}

impl From<Errno> for Refused {
    fn from(e: Errno) -> Refused {
        Refused::Os(e)
    }
}

impl Refused {
    /// A one-line message naming `shown` and the fix.
    pub fn message(&self, shown: &Path) -> String {
        let shown = shown.display();
        match self {
            Refused::Os(e) if *e == Errno::MFILE || *e == Errno::NFILE => {
                format!("cannot open {shown}: {e} (chan-run is out of file descriptors: raise `ulimit -n`)")
            }
            Refused::Os(e) => format!("cannot open {shown}: {e}"),
            Refused::Link => {
                format!("{shown} is a symbolic link; chan-run never follows one there: remove it")
            }
            Refused::Kind => format!(
                "{shown} is not what chan-run keeps there (a file where a folder belongs, or a special file): remove it"
            ),
            Refused::Unsafe(why) => format!("{shown} {why}: remove it, or fix it with chown/chmod"),
        }
    }
}

/// Opens (creating, 0700, when `create`) the folder `name` in `parent`, checked; `None`
/// if it does not exist and `create` is false.
pub fn folder(parent: &OwnedFd, name: &str, create: bool) -> Result<Option<OwnedFd>, Refused> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // `gc` may remove a queue folder between the mkdir that made it and the open: make
    // it again (each round needs gc to win a fresh race, so this ends).
    for _ in 0..100 {
        match rustix::fs::openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => return checked(fd, FileType::Directory).map(Some),
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(not_followed(parent, name, e)),
        }
    }
    Err(Errno::NOENT.into())
}

/// Opens the regular file `name` in `dir` with `flags` (never through a symbolic link,
/// never blocking on a FIFO, close-on-exec), checked; a new file is made 0600.
pub fn file(dir: &OwnedFd, name: &str, flags: OFlags) -> Result<File, Refused> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    match rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => checked(fd, FileType::RegularFile).map(File::from),
        Err(e) => Err(not_followed(dir, name, e)),
    }
}

/// Whether `dir/name` still names the file open as `fd`: after taking a lock, a file
/// that clean-up removed (or replaced) meanwhile protects nothing, and the caller
/// starts over. The one place this question is answered.
pub fn same_file(dir: &OwnedFd, name: impl rustix::path::Arg, fd: impl AsFd) -> bool {
    match (rustix::fs::fstat(fd), rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)) {
        (Ok(open), Ok(named)) => (open.st_dev, open.st_ino) == (named.st_dev, named.st_ino),
        _ => false,
    }
}

fn checked(fd: OwnedFd, kind: FileType) -> Result<OwnedFd, Refused> {
    match refusal(&rustix::fs::fstat(&fd)?, kind) {
        None => Ok(fd),
        Some(refused) => Err(refused),
    }
}

/// An open that refused a symbolic link, or met a file where a folder belongs.
fn not_followed(dir: &OwnedFd, name: &str, e: Errno) -> Refused {
    if e != Errno::LOOP && e != Errno::NOTDIR && e != Errno::MLINK {
        return e.into();
    }
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => Refused::Link,
        Ok(_) => Refused::Kind,
        Err(e) => e.into(),
    }
}

/// chan-run's effective uid, asked once: every folder and file is checked against it
/// (one `geteuid` per object before), and chan-run never changes its ids.
fn euid() -> u32 {
    static EUID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *EUID.get_or_init(|| rustix::process::geteuid().as_raw())
}

/// What is wrong with an object chan-run keeps, if anything: the wrong kind, another
/// owner, or write access for others.
fn refusal(st: &Stat, kind: FileType) -> Option<Refused> {
    let me = euid();
    if FileType::from_raw_mode(st.st_mode) != kind {
        return Some(Refused::Kind);
    }
    if st.st_uid != me {
        return Some(Refused::Unsafe(format!("belongs to uid {}, not to you (uid {me})", st.st_uid)));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 { "everyone" } else { "its group" };
        return Some(Refused::Unsafe(format!("is writable by {who} (mode {mode:04o})")));
    }
    None
}

/// The command that makes `path` usable, for the state directory itself.
fn fix(path: &Path, why: &str) -> String {
    if why.starts_with("is writable") {
        format!("fix it with: chmod go-w {}; {HINT}", path.display())
    } else {
        HINT.trim_start_matches("or ").to_owned()
    }
}

/// Walks `path` to a directory descriptor, as described in the module doc.
fn walk(path: &Path, create: bool) -> anyhow::Result<Option<OwnedFd>> {
    if let Some(fd) = fast_open(path) {
        return Ok(Some(fd));
    }
    let mut todo: VecDeque<OsString> = path.components().map(|c| c.as_os_str().to_owned()).collect();
    let is_root = |part: &OsStr| part == OsStr::new("/");
    let start = if path.is_absolute() { "/" } else { "." };
    let mut fd = open_dir(rustix::fs::CWD, start, true).map_err(|e| cannot(path, e))?;
    let mut links = 0;
    let mut walked = PathBuf::from(start);
    while let Some(part) = todo.pop_front() {
        let last = todo.is_empty();
        if is_root(&part) {
            fd = open_dir(rustix::fs::CWD, "/", !last).map_err(|e| cannot(path, e))?;
            walked = PathBuf::from("/");
            continue;
        }
        if part == OsStr::new(".") && !last {
            continue;
        }
        let name = part.as_os_str();
        walked.push(name);
        match step(&fd, name, last, create).map_err(|e| cannot(&walked, e))? {
            Step::Dir(next) => fd = next,
            Step::Missing => return Ok(None),
            Step::Link(target, owner) => {
                let me = euid();
                if owner != me && owner != 0 {
                    anyhow::bail!(
                        "{} is a symbolic link belonging to uid {owner}, not to you (uid {me}) or root; chan-run does not follow it: {HINT}",
                        walked.display()
                    );
                }
                links += 1;
                if links > MAX_LINKS {
                    anyhow::bail!("{}: too many levels of symbolic links; {HINT}", path.display());
                }
                walked.pop();
                let target = Path::new(&target);
                for part in target.components().rev() {
                    todo.push_front(part.as_os_str().to_owned());
                }
            }
            Step::NotDir => {
                anyhow::bail!("{} is not a directory; {HINT}", walked.display());
            }
        }
    }
    Ok(Some(fd))
}

/// Linux: one `openat2` that refuses every symbolic link; the slow walk handles the rest.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn fast_open(path: &Path) -> Option<OwnedFd> {
    use rustix::fs::ResolveFlags;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::openat2(rustix::fs::CWD, path, flags, Mode::empty(), ResolveFlags::NO_SYMLINKS).ok()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn fast_open(_path: &Path) -> Option<OwnedFd> {
    None
}

enum Step {
    Dir(OwnedFd),
    Missing,
    /// A symbolic link: its target and its owner.
    Link(OsString, u32),
    NotDir,
}

/// One component of the walk: the folder, made if missing and wanted, or what is there.
fn step(dir: &OwnedFd, name: &OsStr, last: bool, create: bool) -> Result<Step, Errno> {
    loop {
        match open_dir(dir, name, !last) {
            Ok(fd) => return Ok(Step::Dir(fd)),
            Err(Errno::NOENT) if create => match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            },
            Err(Errno::NOENT) => return Ok(Step::Missing),
            Err(Errno::LOOP | Errno::NOTDIR | Errno::MLINK) => return what_is(dir, name),
            Err(e) => return Err(e),
        }
    }
}

/// A name that is not a folder: a symbolic link (read from its own inode, so the owner
/// checked and the target read are of the same link), or something else.
fn what_is(dir: &OwnedFd, name: &OsStr) -> Result<Step, Errno> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let (st, target) = {
        let link =
            rustix::fs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
        let st = rustix::fs::fstat(&link)?;
        let target = match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => Some(rustix::fs::readlinkat(&link, "", Vec::new())?),
            _ => None,
        };
        (st, target)
    };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let (st, target) = {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let target = match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => Some(rustix::fs::readlinkat(dir, name, Vec::new())?),
            _ => None,
        };
        (st, target)
    };
    Ok(match target {
        Some(target) => Step::Link(OsStr::from_bytes(target.as_bytes()).to_owned(), st.st_uid),
        None => Step::NotDir,
    })
}

/// A folder on the way (`pass`: only to walk through it, where Linux needs no read
/// permission), or the state directory itself.
fn open_dir(dir: impl AsFd, name: impl rustix::path::Arg, pass: bool) -> Result<OwnedFd, Errno> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let access = if pass { OFlags::PATH } else { OFlags::RDONLY };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let access = {
        let _ = pass;
        OFlags::RDONLY
    };
    rustix::fs::openat(
        dir,
        name,
        access | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn cannot(path: &Path, e: impl Display) -> anyhow::Error {
    anyhow::anyhow!("cannot open the state directory {}: {e}; {HINT}", path.display())
}
