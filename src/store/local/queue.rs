//! A channel's first-come-first-served queue: a folder `queue/<stem>/` whose own
//! `flock` is the registration lock, holding one ticket file per waiting caller.
//!
//! Protocol (each step's crash outcome in brackets; every lock is a `flock`, freed by
//! the kernel when its holder dies):
//! 1. Take the registration lock (held for microseconds) [dies: lock freed]. If the
//!    folder was removed meanwhile (`gc` removes an idle channel's folder holding this
//!    lock, with no live ticket), start over in a new folder.
//! 2. Find the live tickets: a ticket is live while its owner holds it `LOCK_EX`; a
//!    `LOCK_SH|LOCK_NB` probe that succeeds proves its owner gone, and the dead ticket
//!    is unlinked [dies: nothing changed but dead files removed].
//! 3. No live ticket and the channel lock free (`LOCK_NB`): take it, done, no ticket.
//!    Otherwise create ticket `max+1` (`O_EXCL`), lock it `LOCK_EX`, write pid and
//!    time into it, drop the registration lock [dies before the lock: the file is an
//!    unlocked, hence dead, ticket; after: freed like any waiter].
//! 4. Wait: block (`LOCK_SH`, in the kernel) on the ticket just below one's own; when
//!    granted, its owner is gone (served or given up or dead): unlink it, look again.
//!    Each ticket has one waiter, so a hand-off wakes one process, never a herd.
//! 5. No ticket below: this caller is first; block on the channel lock itself. Only the
//!    first in line ever contends for it, so the kernel hands it over in queue order.
//! 6. Holding the channel lock: unlink one's own ticket; the next in line moves to 5.
//!
//! New tickets number above every live one, so a ticket's name is never reused while
//! anybody may still wait on it. The channel lock stays the sole authority for mutual
//! exclusion: a fault here can cost order, never overlap.

use super::dir::{self, Refused};
use crate::procfs::{FileId, file_id};
use crate::store::Waiter;
use anyhow::Context;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FlockOperation, OFlags};
use rustix::io::Errno;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct QueueDir {
    dir: OwnedFd,
}

/// This caller's place in the queue; its `LOCK_EX` is held while the value lives.
pub struct Ticket {
    pub seq: u64,
    file: File,
}

/// Holds the registration lock until dropped.
pub struct Registration<'a>(&'a QueueDir);

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(&self.0.dir, FlockOperation::Unlock);
    }
}

/// A ticket's `<pid> <ms since the epoch>[ <what the queue's owner adds>]` line.
fn parse_ticket(file: &File) -> (Waiter, String) {
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    // The first line only: what follows, if anything, is not for `status`.
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let text = std::str::from_utf8(line).unwrap_or("");
    let mut words = text.splitn(3, ' ');
    let pid = words.next().and_then(|w| w.parse().ok());
    let since = words.next().and_then(|w| w.parse::<u64>().ok()).map(|ms| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
    });
    (Waiter { host: None, pid, since }, words.next().unwrap_or("").to_owned())
}

fn ticket_name(seq: u64) -> String {
    format!("{seq:020}")
}

impl QueueDir {
    pub fn new(dir: OwnedFd) -> QueueDir {
        QueueDir { dir }
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.dir
    }

    /// The live waiters in queue order, with what each ticket's owner added to it
    /// (`take_ticket`'s `note`), for `status`: from the kernel's lock table when there is
    /// one (nothing taken), else by `LOCK_SH` probes (which never block or disturb an
    /// owner's `LOCK_EX`, nor a successor's `LOCK_SH`).
    pub fn waiters_with_notes(&self, held: Option<&HashMap<FileId, u32>>) -> Vec<(Waiter, String)> {
        let mut waiters = Vec::new();
        for seq in self.tickets().unwrap_or_default() {
            let Ok(fd) = dir::file(&self.dir, &ticket_name(seq), OFlags::RDONLY) else { continue };
            let live = match held {
                Some(table) => rustix::fs::fstat(&fd).is_ok_and(|st| table.contains_key(&file_id(&st))),
                None => {
                    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared) == Err(Errno::WOULDBLOCK)
                }
            };
            if live {
                waiters.push(parse_ticket(&fd));
            }
        }
        waiters
    }

    /// For clean-up, holding the registration lock: whether any ticket is live.
    pub fn has_live(&self) -> rustix::io::Result<bool> {
        for seq in self.tickets()?.into_iter().rev() {
            if self.is_live(seq)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Step 1; `None` if `blocking` is false and somebody else is registering.
    pub fn register(&self, blocking: bool) -> rustix::io::Result<Option<Registration<'_>>> {
        if blocking {
            return self.register_with(|dir| flock_restarting(dir, FlockOperation::LockExclusive)).map(Some);
        }
        match rustix::fs::flock(&self.dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Registration(self))),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Step 1, waiting as `lock` does (it takes the folder's exclusive lock, or fails).
    pub fn register_with<E>(
        &self,
        lock: impl FnOnce(BorrowedFd<'_>) -> Result<(), E>,
    ) -> Result<Registration<'_>, E> {
        lock(self.dir.as_fd())?;
        Ok(Registration(self))
    }

    /// For clean-up: takes the registration lock without waiting, and keeps it for as
    /// long as this value lives (closing the folder releases it).
    pub fn hold_registration(&self) -> rustix::io::Result<bool> {
        match rustix::fs::flock(&self.dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// For clean-up, holding the registration lock with no live ticket: removes the
    /// dead tickets and what `--collect` keeps beside them (the folder is removed by its
    /// owner, `ChannelFiles`).
    pub fn remove_tickets(&self) {
        for seq in self.tickets().unwrap_or_default() {
            let _ = rustix::fs::unlinkat(&self.dir, ticket_name(seq), AtFlags::empty());
        }
        let Ok(mut listing) = rustix::fs::Dir::read_from(&self.dir) else { return };
        while let Some(Ok(entry)) = listing.read() {
            if let Ok(name) = entry.file_name().to_str()
                && super::collect::is_companion(name)
            {
                let _ = rustix::fs::unlinkat(&self.dir, name, AtFlags::empty());
            }
        }
    }

    /// Ticket numbers present in the folder, ascending (live or not yet cleaned).
    pub fn tickets(&self) -> rustix::io::Result<Vec<u64>> {
        let mut dir = rustix::fs::Dir::read_from(&self.dir)?;
        let mut seqs = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            if let Some(seq) = entry.file_name().to_str().ok().and_then(|n| n.parse::<u64>().ok()) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Step 2, under the registration lock: drops dead tickets from the top down until
    /// a live one is found; returns the tickets left (a dead one below a live one is
    /// left for its successor to clean) and whether the highest of them is live.
    pub fn live_top(&self, _reg: &Registration) -> rustix::io::Result<(Vec<u64>, bool)> {
        let mut seqs = self.tickets()?;
        while let Some(&top) = seqs.last() {
            if self.is_live(top)? {
                return Ok((seqs, true));
            }
            seqs.pop();
        }
        Ok((seqs, false))
    }

    /// Whether `seq`'s owner still holds it; a dead ticket is unlinked.
    fn is_live(&self, seq: u64) -> rustix::io::Result<bool> {
        let name = ticket_name(seq);
        let fd = match dir::file(&self.dir, &name, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(Refused::Os(Errno::NOENT)) => return Ok(false),
            Err(e) => return Err(ticket_error(e)),
        };
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                self.unlink_if_same(&name, &fd);
                Ok(false)
            }
            Err(Errno::WOULDBLOCK) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Step 3's ticket: numbered above every ticket present; `note` (one line) is kept
    /// in it for `status`.
    pub fn take_ticket(&self, _reg: &Registration, above: Option<u64>, note: &str) -> anyhow::Result<Ticket> {
        let mut seq = above.map_or(1, |s| s + 1);
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL;
        let mut file = loop {
            // A dead ticket that could not be removed may sit above the live ones.
            match dir::file(&self.dir, &ticket_name(seq), flags) {
                Err(Refused::Os(Errno::EXIST)) => seq += 1,
                other => break other.map_err(ticket_error).context("cannot create a queue ticket")?,
            }
        };
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            .context("cannot lock a new queue ticket")?;
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        // Only `status` reads this; a failed write just shows an unknown waiter.
        let _ = match note {
            "" => writeln!(file, "{} {since}", std::process::id()),
            _ => writeln!(file, "{} {since} {note}", std::process::id()),
        };
        Ok(Ticket { seq, file })
    }

    /// Writes the file `name` (new, 0600) beside the tickets, under the registration
    /// lock: whoever reads it under that lock finds it whole.
    pub fn write_beside(&self, _reg: &Registration, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
        let mut file = dir::file(&self.dir, name, flags)
            .map_err(|e| anyhow::anyhow!("{}", e.message(std::path::Path::new(name))))?;
        file.write_all(contents).with_context(|| format!("cannot write {name} in the queue"))
    }

    /// The highest ticket below `seq`, if any.
    pub fn predecessor(&self, seq: u64) -> rustix::io::Result<Option<u64>> {
        Ok(self.tickets()?.into_iter().rev().find(|&s| s < seq))
    }

    /// Step 4: blocks until `seq`'s owner is gone, then removes its ticket.
    pub fn wait_for(&self, seq: u64) -> rustix::io::Result<()> {
        self.wait_for_with(seq, |fd| flock_restarting(fd, FlockOperation::LockShared))
    }

    /// Step 4, waiting as `lock_shared` does (it takes the ticket's shared lock, or fails).
    pub fn wait_for_with<E: From<Errno>>(
        &self,
        seq: u64,
        lock_shared: impl FnOnce(BorrowedFd<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let name = ticket_name(seq);
        let fd = match dir::file(&self.dir, &name, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(Refused::Os(Errno::NOENT)) => return Ok(()),
            Err(e) => return Err(ticket_error(e).into()),
        };
        lock_shared(fd.as_fd())?;
        self.unlink_if_same(&name, &fd);
        Ok(())
    }

    /// Step 6.
    pub fn leave(&self, ticket: Ticket) {
        self.unlink_if_same(&ticket_name(ticket.seq), &ticket.file);
    }

    fn unlink_if_same(&self, name: &str, fd: impl AsFd) {
        if dir::same_file(&self.dir, name, fd) {
            let _ = rustix::fs::unlinkat(&self.dir, name, AtFlags::empty());
        }
    }
}

/// A ticket that is not a plain file of ours: the queue folder was tampered with.
fn ticket_error(e: Refused) -> Errno {
    match e {
        Refused::Os(e) => e,
        Refused::Link | Refused::Kind | Refused::Unsafe(_) => Errno::INVAL,
    }
}

/// A blocking `flock`, restarted when a signal interrupts it.
fn flock_restarting(fd: BorrowedFd<'_>, op: FlockOperation) -> rustix::io::Result<()> {
    loop {
        match rustix::fs::flock(fd, op) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}
