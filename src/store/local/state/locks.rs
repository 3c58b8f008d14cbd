//! The two locks of `active.json`, and how a run waits for them: never deaf to
//! SIGINT/SIGTERM/SIGHUP, never longer than [`RECORD_WITHIN`]. A lock that is free is
//! taken at once with no extra work; a busy one is waited for on a helper thread, on a
//! description of its own, so the main thread can give up (and a lock the helper gets
//! after that is released as its answer is dropped).
//!
//! - The *state lock*, a `flock` on the state directory: shared by every write into
//!   `active.json` (a record in place, a line added or moved or blanked); exclusive only
//!   to replace the file by a rename (a conversion, or moving a damaged file aside).
//! - The *append lock*, the `flock` of `active.idx` (index.rs): held for every change of
//!   the file's structure and of the index. Taken before the state lock.

use super::super::dir;
use crate::control::{Control, Gave};
use rustix::fd::OwnedFd;
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::time::{Duration, Instant};

/// The longest a run waits for the state's locks, to read its record or to record a
/// run; past it the run warns and keeps the command's exit status.
pub const RECORD_WITHIN: Duration = Duration::from_secs(10);

/// How a wait for a lock may end early.
#[derive(Clone, Copy)]
pub struct Waits {
    pub control: Option<&'static Control>,
    pub deadline: Instant,
}

impl Waits {
    pub fn new(control: Option<&'static Control>) -> Waits {
        Waits { control, deadline: Instant::now() + RECORD_WITHIN }
    }
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Waited {
    #[error("{what} stayed locked for {}s (a stopped or slow chan-run holds it: `lslocks` names it)", RECORD_WITHIN.as_secs())]
    TimedOut { what: &'static str },
    #[error("interrupted by signal {0}")]
    Signal(i32),
    #[error("cannot lock {what}: {why}")]
    Failed { what: &'static str, why: String },
}

/// The state lock, held until dropped.
pub enum StateLock<'a> {
    /// On the state directory's own description (taken at once).
    Main(&'a OwnedFd),
    /// On a description of its own (waited for): closing it releases the lock.
    Own { _held: OwnedFd },
}

impl Drop for StateLock<'_> {
    fn drop(&mut self) {
        if let StateLock::Main(fd) = self {
            let _ = rustix::fs::flock(fd, FlockOperation::Unlock);
        }
    }
}

const STATE: &str = "the state directory";
const APPEND: &str = "active.idx";

pub fn state_lock(dir: &OwnedFd, exclusive: bool, waits: Waits) -> Result<StateLock<'_>, Waited> {
    let (now, block) = match exclusive {
        true => (FlockOperation::NonBlockingLockExclusive, FlockOperation::LockExclusive),
        false => (FlockOperation::NonBlockingLockShared, FlockOperation::LockShared),
    };
    match rustix::fs::flock(dir, now) {
        Ok(()) => return Ok(StateLock::Main(dir)),
        Err(Errno::WOULDBLOCK | Errno::INTR) => {}
        Err(e) => return Err(Waited::Failed { what: STATE, why: e.to_string() }),
    }
    let own =
        rustix::fs::openat(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| Waited::Failed { what: STATE, why: e.to_string() })?;
    let got = wait(waits, STATE, move || {
        loop {
            match rustix::fs::flock(&own, block) {
                Err(Errno::INTR) => continue,
                Ok(()) => return Ok(own),
                Err(e) => return Err(e),
            }
        }
    })?;
    got.map(|fd| StateLock::Own { _held: fd }).map_err(|e| Waited::Failed { what: STATE, why: e.to_string() })
}

/// Opens (creating, 0600) `active.idx` and takes the append lock on it.
pub fn append_lock(dir: &OwnedFd, waits: Waits) -> anyhow::Result<File, Waited> {
    let file = dir::file(dir, super::index::NAME, OFlags::RDWR | OFlags::CREATE)
        .map_err(|e| Waited::Failed { what: APPEND, why: e.message(std::path::Path::new(APPEND)) })?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Waited::Failed { what: APPEND, why: e.to_string() });
        }
    }
    wait(waits, APPEND, move || file.lock().map(|()| file))?
        .map_err(|e| Waited::Failed { what: APPEND, why: e.to_string() })
}

fn wait<T: Send + 'static>(
    waits: Waits,
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Waited> {
    let Some(control) = waits.control else {
        return Err(Waited::Failed { what, why: "it is busy and this command does not wait".into() });
    };
    control.wait_for(Some(waits.deadline), work).map_err(|gave| match gave {
        Gave::Deadline => Waited::TimedOut { what },
        Gave::Signal(sig) => Waited::Signal(sig),
        Gave::Failed(why) => Waited::Failed { what, why },
    })
}
