//! Pools on the local store: a seat is a lock file, and callers wait for seats in a
//! first-come-first-served queue of the same kind as a channel's (queue.rs).
//!
//!     pools/<stem>/                  the pool's folder; its own flock is the queue's
//!                                    registration lock
//!     pools/<stem>/<ticket>          a waiting caller's ticket (queue.rs), noting its
//!                                    channel and N
//!     pools/<stem>/seat-<k>          seat k (1 to N): held while flocked; it keeps its
//!                                    last holder's record (one JSON line)
//!
//! Protocol of taking a seat (each step's crash outcome in brackets; every lock is a
//! `flock`, freed by the kernel when its holder dies):
//! 1. Take the registration lock; a folder `gc` removed meanwhile is left for a new one
//!    (as queue.rs step 1) [dies: lock freed].
//! 2. No live ticket: try seats 1..=N without waiting (`LOCK_EX|LOCK_NB`, on a read-only
//!    descriptor); the first one locked is this run's [dies: seat freed]. Otherwise (or
//!    all seats held) take a ticket, drop the registration lock, and wait behind the
//!    ticket below as queue.rs step 4 [dies: the ticket is dead; the one behind moves up].
//! 3. First in line: watch the folder (inotify, `IN_CLOSE_WRITE`), then try seats
//!    1..=N again; if none is free, sleep until a seat file is closed by a writer. Only
//!    a seat's holder ever has a seat file open for writing (the record it writes), and
//!    it closes that descriptor last, after unlocking; the kernel closes it at the
//!    holder's death too (possibly an instant before it frees the lock: so the waiter
//!    then blocks on that seat's lock, which is being freed, rather than try it). A
//!    release after the watch began is never missed; one before it is seen by the try.
//! 4. Holding the seat: write the record, unlink the ticket [dies: the seat is freed,
//!    the ticket is dead].
//!
//! Only the first in line (or, with nobody in line, a caller holding the registration
//! lock) ever tries a seat, so seats go in arrival order, and a seat is never free while
//! the first in line sleeps: the cap is work-conserving. `status` never takes a seat's
//! lock, not even shared (a probe could make the first in line's try fail, and its
//! close would wake nobody): it reads the kernel's lock table.
//!
//! Callers naming different N for one pool: each takes only seats 1..=its N, and the
//! queue is strict (a caller never passes an earlier one), so the one first in line
//! decides which seats may end the wait.

use super::Folders;
use super::dir::{self, Refused};
use super::queue::{QueueDir, Registration, Ticket};
use crate::channel::Channel;
use crate::control::{Control, Gave, Progress};
use crate::pool::Pool;
use crate::procfs::{FileId, file_id};
use crate::store::{AcquireError, GcItem, PoolStatus, SeatNote, SeatView, Wait};
use anyhow::{Context, anyhow};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FlockOperation, OFlags};
use rustix::io::Errno;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A held seat. Dropping it frees the seat: the lock first, then the record's
/// descriptor, whose close wakes the pool's first waiter (fields drop in order).
pub struct SeatHold {
    _lock: File,
    _record: File,
}

/// One pool's folder, reached through the state directory's `pools` folder.
#[derive(Clone)]
struct PoolFiles {
    folders: Arc<Folders>,
    pool: Pool,
    channel: Channel,
}

/// Where registration left a caller.
enum Registered {
    Seated(SeatHold),
    Queued(QueueDir, Ticket, SeatNote),
    /// Somebody else holds the registration lock right now.
    Contended,
}

fn seat_name(k: u32) -> String {
    format!("seat-{k}")
}

/// Takes a seat in `pool` for a run on `channel` (whose lock the caller holds).
pub fn take(
    folders: &Arc<Folders>,
    pool: &Pool,
    channel: &Channel,
    wait: Wait,
    control: &'static Control,
    on_wait: &mut dyn FnMut(&SeatNote),
) -> Result<SeatHold, AcquireError> {
    let files = PoolFiles { folders: Arc::clone(folders), pool: pool.clone(), channel: channel.clone() };
    let queued = match files.register(false)? {
        Registered::Seated(seat) => return Ok(seat),
        _ if wait == Wait::No => return Err(AcquireError::Busy),
        Registered::Queued(queue, ticket, note) => {
            on_wait(&note);
            Some((queue, ticket))
        }
        Registered::Contended => None,
    };
    let deadline = match wait {
        Wait::Until(d) => Some(d),
        _ => None,
    };
    let helper = files.clone();
    let waited = control.wait_for_progress(deadline, &mut |note: SeatNote| on_wait(&note), move |progress| {
        helper.wait_turn(queued, progress)
    });
    match waited {
        Ok(seat) => Ok(seat?),
        Err(Gave::Deadline) => Err(AcquireError::Busy),
        Err(Gave::Signal(sig)) => Err(AcquireError::Interrupted(sig)),
        Err(Gave::Failed(why)) => {
            Err(anyhow!("cannot wait for a seat in pool {}: {why}", pool.name()).into())
        }
    }
}

impl PoolFiles {
    fn shown(&self) -> std::path::PathBuf {
        Path::new("pools").join(self.pool.name.stem())
    }

    /// The pool's folder, created if missing.
    fn open(&self) -> anyhow::Result<QueueDir> {
        let pools = self.folders.pools(true)?.ok_or_else(|| anyhow!("cannot make the pools folder"))?;
        match dir::folder(pools, self.pool.name.stem(), true) {
            Ok(Some(fd)) => Ok(QueueDir::new(fd)),
            Ok(None) => Err(anyhow!("cannot make the pool folder {}", self.shown().display())),
            Err(e) => Err(anyhow!("{}", e.message(&self.shown()))),
        }
    }

    fn still_linked(&self, queue: &QueueDir) -> bool {
        self.folders
            .pools(false)
            .ok()
            .flatten()
            .is_some_and(|p| dir::same_file(p, self.pool.name.stem(), queue.fd()))
    }

    /// Steps 1-2: a seat at once, or a ticket (or, not `blocking`, contended).
    fn register(&self, blocking: bool) -> anyhow::Result<Registered> {
        loop {
            let queue = self.open()?;
            let Some(reg) = queue.register(blocking).context("cannot lock the pool's queue")? else {
                return Ok(Registered::Contended);
            };
            if !self.still_linked(&queue) {
                continue;
            }
            let (tickets, live) = queue.live_top(&reg).context("cannot read the pool's queue")?;
            if !live && let Some(seat) = self.try_seats(queue.fd())? {
                return Ok(Registered::Seated(seat));
            }
            let ticket = self.take_ticket(&queue, &reg, tickets.last().copied())?;
            drop(reg);
            let note = SeatNote { ahead: tickets.len() };
            return Ok(Registered::Queued(queue, ticket, note));
        }
    }

    fn take_ticket(
        &self,
        queue: &QueueDir,
        reg: &Registration,
        above: Option<u64>,
    ) -> anyhow::Result<Ticket> {
        let note = serde_json::json!({"seats": self.pool.seats, "pool": self.pool.name(), "channel": self.channel.name()});
        queue.take_ticket(reg, above, &note.to_string())
    }

    /// On the helper thread: registers (blocking) if the quick try was contended, waits
    /// behind the tickets below, then for a seat (step 3).
    fn wait_turn(
        &self,
        queued: Option<(QueueDir, Ticket)>,
        progress: &Progress<SeatNote>,
    ) -> anyhow::Result<SeatHold> {
        let (queue, ticket) = match queued {
            Some(queued) => queued,
            None => match self.register(true)? {
                Registered::Seated(seat) => return Ok(seat),
                Registered::Queued(queue, ticket, note) => {
                    progress.send(note);
                    (queue, ticket)
                }
                Registered::Contended => unreachable!("a blocking registration waits its turn"),
            },
        };
        while let Some(ahead) = queue.predecessor(ticket.seq).context("cannot read the pool's queue")? {
            queue.wait_for(ahead).context("cannot wait in the pool's queue")?;
        }
        let seat = self.first_free(queue.fd())?;
        queue.leave(ticket);
        Ok(seat)
    }

    /// Step 3, first in line: sleeps until one of seats 1..=N is this caller's.
    fn first_free(&self, folder: &OwnedFd) -> anyhow::Result<SeatHold> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Ok(watch) = watch(folder) {
            let seat = self.sleep_on(&watch, folder);
            // Closing an inotify instance waits for the kernel's RCU grace period (16 ms
            // measured): not on the way to the command.
            if let Err(e) = std::thread::Builder::new().spawn(move || drop(watch)) {
                drop(e);
            }
            return seat;
        }
        // No inotify (another system, or the user's inotify instances used up): look at
        // the seats again every 50 ms (documented in the README).
        loop {
            if let Some(seat) = self.try_seats(folder)? {
                return Ok(seat);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Step 3 with the folder watched: tries the seats, then sleeps until a seat file is
    /// closed by a writer.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn sleep_on(&self, watch: &OwnedFd, folder: &OwnedFd) -> anyhow::Result<SeatHold> {
        use rustix::fs::inotify;
        if let Some(seat) = self.try_seats(folder)? {
            return Ok(seat);
        }
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut events = inotify::Reader::new(watch, &mut buf);
        loop {
            let event = match events.next() {
                Err(Errno::INTR) => continue,
                other => other.context("cannot watch the pool (inotify)")?,
            };
            if event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW) {
                // Which seat was closed is lost: look at them all, then sleep again.
                if let Some(seat) = self.try_seats(folder)? {
                    return Ok(seat);
                }
                continue;
            }
            let closed = event
                .file_name()
                .and_then(|n| n.to_str().ok())
                .and_then(|n| n.strip_prefix("seat-"))
                .and_then(|k| k.parse::<u32>().ok())
                .filter(|k| (1..=self.pool.seats).contains(k));
            if let Some(k) = closed
                && let Some(seat) = self.take_freed(folder, k)?
            {
                return Ok(seat);
            }
        }
    }

    /// Seat `k`, whose holder's record was just closed: its lock is free or being freed,
    /// so this blocks (briefly) rather than tries. `None` if it is not ours after all.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn take_freed(&self, folder: &OwnedFd, k: u32) -> anyhow::Result<Option<SeatHold>> {
        let name = seat_name(k);
        let lock = self.open_seat(folder, &name)?;
        loop {
            match rustix::fs::flock(&lock, FlockOperation::LockExclusive) {
                Err(Errno::INTR) => continue,
                other => other.context("cannot lock a seat")?,
            }
            break;
        }
        self.seated(folder, &name, k, lock)
    }

    /// Tries seats 1..=N without waiting: the first one free is this caller's.
    fn try_seats(&self, folder: &OwnedFd) -> anyhow::Result<Option<SeatHold>> {
        for k in 1..=self.pool.seats {
            let name = seat_name(k);
            let lock = self.open_seat(folder, &name)?;
            match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    if let Some(seat) = self.seated(folder, &name, k, lock)? {
                        return Ok(Some(seat));
                    }
                }
                Err(Errno::WOULDBLOCK) => {}
                Err(e) => return Err(e).context("cannot lock a seat"),
            }
        }
        Ok(None)
    }

    /// Opens (creating, 0600) a seat's lock file read-only: trying a seat never looks
    /// like a release to the first waiter.
    fn open_seat(&self, folder: &OwnedFd, name: &str) -> anyhow::Result<File> {
        dir::file(folder, name, OFlags::RDONLY | OFlags::CREATE)
            .map_err(|e| anyhow!("{}", e.message(&self.shown().join(name))))
    }

    /// Step 4: the locked seat becomes this run's, with its record written.
    fn seated(&self, folder: &OwnedFd, name: &str, k: u32, lock: File) -> anyhow::Result<Option<SeatHold>> {
        let record = match dir::file(folder, name, OFlags::WRONLY) {
            Ok(record) if same(&record, &lock) => record,
            Ok(_) | Err(Refused::Os(Errno::NOENT)) => return Ok(None),
            Err(e) => return Err(anyhow!("{}", e.message(&self.shown().join(name)))),
        };
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let line = serde_json::json!({
            "pid": std::process::id(),
            "since": since,
            "seat": k,
            "seats": self.pool.seats,
            "pool": self.pool.name(),
            "channel": self.channel.name(),
        });
        // Only `status` and `gc` read it; a failed write shows an unknown holder.
        let text = format!("{line}\n");
        if record.write_at(text.as_bytes(), 0).is_ok() {
            let _ = record.set_len(text.len() as u64);
        }
        Ok(Some(SeatHold { _lock: lock, _record: record }))
    }
}

/// An inotify watch for seat files closed by a writer in the pool's folder.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn watch(folder: &OwnedFd) -> rustix::io::Result<OwnedFd> {
    use rustix::fs::inotify;
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC)?;
    let path = format!("/proc/self/fd/{}", rustix::fd::AsRawFd::as_raw_fd(folder));
    inotify::add_watch(&watch, path, inotify::WatchFlags::CLOSE_WRITE | inotify::WatchFlags::ONLYDIR)?;
    Ok(watch)
}

fn same(a: &File, b: &File) -> bool {
    match (rustix::fs::fstat(a), rustix::fs::fstat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

/// A seat file's last holder record.
#[derive(serde::Deserialize, Default)]
struct SeatRecord {
    pid: Option<u32>,
    since: Option<u64>,
    seats: Option<u32>,
    pool: Option<String>,
    channel: Option<String>,
}

fn read_record(file: &File) -> SeatRecord {
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    serde_json::from_slice(buf[..n].trim_ascii_end()).unwrap_or_default()
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What one pool folder holds, read without taking anything.
struct Observed {
    stem: String,
    status: PoolStatus,
    /// When a seat was last taken (or the folder changed), for `gc`.
    last_used: Option<SystemTime>,
    /// The N the newest holder or waiter named, with when.
    newest: Option<(u64, u32)>,
}

fn observe(pools: &OwnedFd, stem: &str, held: Option<&HashMap<FileId, u32>>) -> Option<Observed> {
    let folder = dir::folder(pools, stem, false).ok().flatten()?;
    let mut seen = Observed {
        stem: stem.to_owned(),
        status: PoolStatus::default(),
        last_used: modified(&folder),
        newest: None,
    };
    let mut name = None;
    for file_name in seat_files(&folder) {
        let Some(k) = file_name.strip_prefix("seat-").and_then(|k| k.parse::<u32>().ok()) else { continue };
        let Ok(file) = dir::file(&folder, &file_name, OFlags::RDONLY) else { continue };
        let record = read_record(&file);
        seen.last_used = seen.last_used.max(modified(&file));
        name = name.or(record.pool.clone());
        if let (Some(since), Some(n)) = (record.since, record.seats)
            && seen.newest.is_none_or(|(t, _)| since > t)
        {
            seen.newest = Some((since, n));
        }
        let live = match held {
            Some(table) => rustix::fs::fstat(&file).is_ok_and(|st| table.contains_key(&file_id(&st))),
            None => record.pid.is_some_and(crate::procfs::is_alive),
        };
        if live {
            seen.status.holders.push(SeatView {
                host: None,
                channel: record.channel,
                pid: record.pid,
                since: record.since.map(rfc3339),
                seat: Some(k),
                seats: record.seats,
            });
        }
    }
    seen.status.holders.sort_by_key(|h| h.seat);
    for (waiter, note) in QueueDir::new(folder).waiters_with_notes(held) {
        let note: SeatRecord = serde_json::from_str(&note).unwrap_or_default();
        name = name.or(note.pool);
        seen.status.queue.push(SeatView {
            host: None,
            channel: note.channel,
            pid: waiter.pid,
            since: waiter.since,
            seat: None,
            seats: note.seats,
        });
        if let Some(n) = note.seats {
            seen.newest = Some((u64::MAX, n));
        }
    }
    seen.status.pool = name.unwrap_or_else(|| stem.to_owned());
    seen.status.seats = seen.newest.map(|(_, n)| n);
    Some(seen)
}

fn modified(fd: impl AsFd) -> Option<SystemTime> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64))
}

/// The seat files in a pool's folder.
fn seat_files(folder: &OwnedFd) -> Vec<String> {
    let Ok(mut listing) = rustix::fs::Dir::read_from(folder) else { return Vec::new() };
    let mut seats = Vec::new();
    while let Some(Ok(entry)) = listing.read() {
        if let Some(name) = entry.file_name().to_str().ok().filter(|n| n.starts_with("seat-")) {
            seats.push(name.to_owned());
        }
    }
    seats
}

fn stems(pools: &OwnedFd) -> Vec<String> {
    let Ok(mut listing) = rustix::fs::Dir::read_from(pools) else { return Vec::new() };
    let mut stems = Vec::new();
    while let Some(Ok(entry)) = listing.read() {
        if let Some(name) = entry.file_name().to_str().ok().filter(|n| !n.starts_with('.')) {
            stems.push(name.to_owned());
        }
    }
    stems.sort();
    stems
}

/// `Store::pools`: every pool (or those named), from the kernel's lock table.
pub fn status(folders: &Folders, only: &[Channel]) -> anyhow::Result<Vec<PoolStatus>> {
    let Some(pools) = folders.pools(false)? else { return Ok(Vec::new()) };
    let held = crate::procfs::held_flocks();
    let stems: Vec<String> = match only {
        [] => stems(pools),
        named => named.iter().map(|c| c.stem().to_owned()).collect(),
    };
    Ok(stems.iter().filter_map(|stem| observe(pools, stem, held.as_ref())).map(|o| o.status).collect())
}

/// `Store::pool_ledgers`: the ledger of every pool (or those named) that has one.
pub fn ledgers(folders: &Folders, only: &[Channel]) -> anyhow::Result<Vec<crate::store::PoolLedger>> {
    let Some(pools) = folders.pools(false)? else { return Ok(Vec::new()) };
    let stems: Vec<String> = match only {
        [] => stems(pools),
        named => named.iter().map(|c| c.stem().to_owned()).collect(),
    };
    Ok(stems
        .iter()
        .filter_map(|stem| dir::folder(pools, stem, false).ok().flatten())
        .map(|folder| super::ledger::observe(&folder))
        .filter(|fields| !fields.is_empty())
        .filter_map(|fields| {
            let pool = fields.get("pool")?.as_str()?.to_owned();
            Some(crate::store::PoolLedger { pool, fields })
        })
        .collect())
}

/// `gc` for pools: removes the folder of each pool nobody holds a seat in or waits for,
/// whose seats were last taken more than `idle_for` ago. Holding the registration lock
/// (so no seat is tried meanwhile: see the module doc) and every seat's lock, it
/// unlinks the seats, the dead tickets and the folder; a caller that then gets the
/// registration lock of the removed folder starts over in a new one.
pub fn gc(folders: &Folders, idle_for: Duration, dry_run: bool) -> Vec<GcItem> {
    let Ok(Some(pools)) = folders.pools(false) else { return Vec::new() };
    let now = SystemTime::now();
    let mut items = Vec::new();
    for stem in stems(pools) {
        let Some(seen) = observe(pools, &stem, None) else { continue };
        let idle = seen.last_used.and_then(|t| now.duration_since(t).ok()).unwrap_or_default();
        if idle < idle_for {
            continue;
        }
        let kept = remove(pools, &seen, dry_run).err();
        items.push(GcItem { pool: true, channel: seen.status.pool, idle, kept });
    }
    items
}

fn remove(pools: &OwnedFd, seen: &Observed, dry_run: bool) -> Result<(), &'static str> {
    let folder = dir::folder(pools, &seen.stem, false).ok().flatten().ok_or("gone meanwhile")?;
    let queue = QueueDir::new(folder);
    if !queue.hold_registration().unwrap_or(false) {
        return Err("a caller is joining its queue");
    }
    if queue.has_live().unwrap_or(true) {
        return Err("callers wait for a seat");
    }
    // Seats made since `seen` was read, too (each under the registration lock now held).
    let seats = seat_files(queue.fd());
    let mut locks = Vec::new();
    for name in &seats {
        let Ok(lock) = dir::file(queue.fd(), name, OFlags::RDONLY) else { continue };
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err("a seat is held");
        }
        locks.push(lock);
    }
    if dry_run {
        return Ok(());
    }
    for name in &seats {
        let _ = rustix::fs::unlinkat(queue.fd(), name, AtFlags::empty());
    }
    queue.remove_tickets();
    let _ = rustix::fs::unlinkat(queue.fd(), super::ledger::LEDGER, AtFlags::empty());
    let _ = rustix::fs::unlinkat(queue.fd(), super::ledger::PROBE, AtFlags::empty());
    let _ = rustix::fs::unlinkat(pools, &seen.stem, AtFlags::REMOVEDIR);
    Ok(())
}
