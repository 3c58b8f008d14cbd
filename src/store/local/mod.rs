//! The default store: files under the state directory, locked with `flock`.
//!
//!     <state-dir>/locks/<stem>.lock   the channel lock and holder record (lock.rs)
//!     <state-dir>/queue/<stem>/       the channel's FIFO queue of tickets (queue.rs)
//!
//! The state directory is created mode 0700 and must belong to the user; its files are
//! 0600, opened relative to directory descriptors with `O_NOFOLLOW`, so a planted
//! symlink is refused rather than followed. Every descriptor is close-on-exec: the
//! command never inherits a lock, so a descendant that outlives a run cannot wedge
//! its channel.

mod history;
pub(crate) mod lock;
mod queue;
mod slots;
mod state_file;

use crate::channel::Channel;
use crate::control::Control;
use crate::state::ChannelRecord;
use crate::store::{AcquireError, Holder, Lease, Store, Wait, WaitNote, WriteError};
use crate::store::{ChannelStatus, GcItem, HolderView};
use anyhow::{Context, anyhow, bail};
use queue::{QueueDir, Ticket};
use rustix::fd::{OwnedFd, RawFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use state_file::{Loaded, StateFiles};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

pub struct LocalStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    dir: OwnedFd,
    locks: OwnedFd,
    queues: OwnedFd,
    history: OwnedFd,
    /// The kind of network filesystem the state directory is on, if it is on one.
    network: Option<&'static str>,
}

impl LocalStore {
    /// Opens (creating as needed) the state directory at `root`.
    pub fn open(root: &Path) -> anyhow::Result<LocalStore> {
        let hint = "pass --state-dir DIR (or set CHAN_RUN_STATE_DIR) to a directory of your own";
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("cannot create the state directory {}; {hint}", root.display()))?;
        let meta = std::fs::metadata(root)
            .with_context(|| format!("cannot use the state directory {}", root.display()))?;
        if !meta.is_dir() {
            bail!("the state directory {} is not a directory; {hint}", root.display());
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            bail!(
                "the state directory {} belongs to uid {}, not to you (uid {me}); {hint}",
                root.display(),
                meta.uid()
            );
        }
        let dir = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open the state directory {}", root.display()))?;
        let named = |name: &str| root.join(name).display().to_string();
        let locks =
            subdir(&dir, "locks").with_context(|| format!("cannot use {}; remove it", named("locks")))?;
        let queues =
            subdir(&dir, "queue").with_context(|| format!("cannot use {}; remove it", named("queue")))?;
        let history =
            subdir(&dir, "history").with_context(|| format!("cannot use {}; remove it", named("history")))?;
        let network = network_filesystem(&dir);
        if let Some(kind) = network {
            crate::ui::warn(network_warning(root, kind));
        }
        Ok(LocalStore {
            inner: Arc::new(Inner { root: root.to_owned(), dir, locks, queues, history, network }),
        })
    }
}

impl Inner {
    fn state(&self) -> StateFiles<'_> {
        StateFiles { dir: &self.dir, path: &self.root }
    }

    /// Opens the channel's queue folder and registers there (steps 1-3), starting over
    /// in a new folder if clean-up removed the one it opened.
    fn register_fresh(
        &self,
        channel: &Channel,
        blocking: bool,
    ) -> anyhow::Result<(Arc<QueueDir>, Registered)> {
        loop {
            let queue = Arc::new(QueueDir::open(&self.queues, channel.stem())?);
            match self.register(&queue, channel, blocking)? {
                Registered::Stale => continue,
                registered => return Ok((queue, registered)),
            }
        }
    }

    /// Steps 1-3 of the queue protocol: the lock at once, busy, or a ticket.
    fn register(&self, queue: &QueueDir, channel: &Channel, blocking: bool) -> anyhow::Result<Registered> {
        let Some(reg) = queue.register(blocking).context("cannot lock the queue")? else {
            return Ok(Registered::Contended);
        };
        if !queue.still_linked(&self.queues, channel.stem()) {
            return Ok(Registered::Stale);
        }
        let (tickets, live) = queue.live_top(&reg).context("cannot read the queue")?;
        if !live && let Some(file) = self.try_lock(channel)? {
            return Ok(Registered::Held(file));
        }
        let ticket = queue.take_ticket(&reg, tickets.last().copied())?;
        drop(reg);
        let note = self.wait_note(channel, tickets.len());
        Ok(Registered::Queued(ticket, note))
    }

    fn try_lock(&self, channel: &Channel) -> anyhow::Result<Option<File>> {
        loop {
            let file = lock::open(&self.locks, channel.stem()).map_err(|e| open_error(channel, e))?;
            match file.try_lock() {
                Ok(()) if lock::still_named(&self.locks, channel.stem(), &file) => return Ok(Some(file)),
                Ok(()) => continue,
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => return Err(e).context("cannot lock the channel"),
            }
        }
    }

    /// Step 5: blocks in the kernel until the channel lock is ours.
    fn lock(&self, channel: &Channel) -> anyhow::Result<File> {
        loop {
            let file = lock::open(&self.locks, channel.stem()).map_err(|e| open_error(channel, e))?;
            file.lock().context("cannot lock the channel")?;
            if lock::still_named(&self.locks, channel.stem(), &file) {
                return Ok(file);
            }
        }
    }

    fn wait_note(&self, channel: &Channel, ahead: usize) -> WaitNote {
        let record = lock::open(&self.locks, channel.stem())
            .ok()
            .and_then(|f| lock::read(&f).ok())
            .and_then(|c| c.record);
        WaitNote {
            holder_pid: record.as_ref().map(|r| r.pid),
            held_for: record.as_ref().and_then(|r| r.held_for()),
            holder_host: None,
            ahead,
        }
    }

    /// Steps 4-6, run on a helper thread so the main thread can watch the deadline and
    /// signals: if it gives up, the process exits and the kernel drops the waits.
    fn wait_in_line(&self, queue: &QueueDir, channel: &Channel, ticket: Ticket) -> anyhow::Result<File> {
        while let Some(ahead) = queue.predecessor(ticket.seq).context("cannot read the queue")? {
            queue.wait_for(ahead).context("cannot wait in the queue")?;
        }
        let file = self.lock(channel)?;
        queue.leave(ticket);
        Ok(file)
    }

    /// The held lock becomes a lease once the name is checked and leftovers are gone.
    fn lease(self: &Arc<Self>, channel: &Channel, file: File) -> anyhow::Result<Box<dyn Lease>> {
        let contents = lock::read(&file).context("cannot read the lock file")?;
        // Without its header (a full disk) the lock still excludes; the run goes on
        // without a holder record, as a bot should still answer.
        let header_len = lock::claim_name(&file, channel.name(), &contents)?;
        if let Some(left) = contents.record.as_ref().and_then(|r| r.leftover()) {
            crate::orphans::kill(&left);
        }
        if let (true, Some(len)) = (contents.has_tail, header_len) {
            file.set_len(len).context("cannot clear the previous holder record")?;
        }
        Ok(Box::new(LocalLease {
            file,
            header_len,
            channel: channel.name().to_owned(),
            stem: channel.stem().to_owned(),
            slots: None,
            hint: contents.hint,
            hint_written: contents.hint,
            store: Arc::clone(self),
        }))
    }
}

impl Inner {
    /// The channel's lock and queue as the kernel's lock table shows them. Where
    /// there is no lock table, a holder record whose pid is alive counts as held.
    fn observe(
        &self,
        channel: &Channel,
        held: Option<&std::collections::HashMap<crate::procfs::FileId, u32>>,
    ) -> ChannelStatus {
        let mut status = ChannelStatus { channel: channel.name().to_owned(), ..Default::default() };
        let Some((file, id)) = lock::open_existing(&self.locks, channel.stem()) else { return status };
        let record = lock::read(&file).ok().and_then(|c| c.record);
        let holder_pid = match held {
            Some(table) => table.get(&id).copied(),
            None => record.as_ref().map(|r| r.pid).filter(|&p| crate::procfs::is_alive(p)),
        };
        if holder_pid.is_some() {
            status.running = true;
            status.holder = Some(match record {
                Some(r) => HolderView {
                    host: None,
                    pid: Some(r.pid),
                    command_pid: r.command_pid,
                    started_at: Some(r.started_at),
                    command: r.command,
                },
                None => HolderView { pid: holder_pid.filter(|&p| p != 0), ..Default::default() },
            });
        }
        if let Ok(queue) = QueueDir::open_existing(&self.queues, channel.stem()) {
            status.queue =
                queue.waiters(held).into_iter().filter(|w| w.pid.is_none() || w.pid != holder_pid).collect();
        }
        status.running |= !status.queue.is_empty();
        status
    }
}

/// A channel `gc` holds: its registration lock and its lock, no live waiter.
struct GcHold {
    channel: Channel,
    queue: Option<QueueDir>,
    file: File,
}

impl Inner {
    /// Takes an idle channel for removal without waiting: `Err(why)` if anybody holds
    /// it, waits for it or is registering, or it ran since the candidates were read.
    fn hold_for_gc(
        &self,
        channel: &Channel,
        idle_for: Duration,
    ) -> anyhow::Result<Result<GcHold, &'static str>> {
        let queue = QueueDir::open_existing(&self.queues, channel.stem()).ok();
        if let Some(queue) = &queue {
            if !queue.hold_registration()? || !queue.still_linked(&self.queues, channel.stem()) {
                return Ok(Err("busy"));
            }
            if queue.has_live()? {
                return Ok(Err("busy"));
            }
        }
        let Some(file) = self.try_lock(channel)? else { return Ok(Err("busy")) };
        let contents = lock::read(&file)?;
        let (record, _) = self.state().read_channel(channel.name(), contents.hint)?;
        if idle_since(&record).is_some_and(|idle| idle <= idle_for) {
            return Ok(Err("ran since"));
        }
        Ok(Ok(GcHold { channel: channel.clone(), queue, file }))
    }
}

/// How long ago the record's last run ended.
fn idle_since(record: &ChannelRecord) -> Option<Duration> {
    let finished = humantime::parse_rfc3339(&record.last_run.as_ref()?.finished_at).ok()?;
    SystemTime::now().duration_since(finished).ok()
}

enum Registered {
    Held(File),
    Queued(Ticket, WaitNote),
    /// Somebody else holds the registration lock right now.
    Contended,
    /// The folder was removed by clean-up after it was opened.
    Stale,
}

enum Progress {
    Queued(WaitNote),
    Done(anyhow::Result<File>),
}

impl Store for LocalStore {
    fn id(&self) -> String {
        match rustix::fs::fstat(&self.inner.dir) {
            Ok(st) => format!("local:{}:{}", st.st_dev, st.st_ino),
            Err(_) => format!("local:{}", self.inner.root.display()).replace(' ', "%20"),
        }
    }

    fn gc(&self, idle_for: Duration, dry_run: bool) -> anyhow::Result<Vec<GcItem>> {
        let inner = &self.inner;
        let state = match inner.state().load()? {
            Loaded::State(s) => s,
            Loaded::Damaged(why) => bail!("active.json is damaged ({why}); gc removes nothing until then"),
        };
        let mut candidates = Vec::new();
        for (name, record) in &state.channels {
            if let Some(idle) = idle_since(record).filter(|&idle| idle > idle_for) {
                candidates.push((Channel::new(name)?, idle));
            }
        }
        for name in lock::names(&inner.locks) {
            let Ok(channel) = Channel::new(&name) else { continue };
            if !state.channels.contains_key(&name)
                && let Some(idle) = lock::modified_ago(&inner.locks, channel.stem()).filter(|&i| i > idle_for)
            {
                candidates.push((channel, idle));
            }
        }
        let held = crate::procfs::held_flocks();
        let mut items = Vec::new();
        // In batches, so the locks held at once stay few and each batch is one rewrite.
        for batch in candidates.chunks(256) {
            let mut holds = Vec::new();
            for (channel, idle) in batch {
                let kept = if dry_run {
                    inner.observe(channel, held.as_ref()).running.then_some("busy")
                } else {
                    match inner.hold_for_gc(channel, idle_for)? {
                        Ok(hold) => {
                            holds.push(hold);
                            None
                        }
                        Err(why) => Some(why),
                    }
                };
                items.push(GcItem { channel: channel.name().to_owned(), idle: *idle, kept });
            }
            if holds.is_empty() {
                continue;
            }
            let names: Vec<String> = holds.iter().map(|h| h.channel.name().to_owned()).collect();
            inner.state().remove(&names)?;
            for hold in holds {
                history::remove(&inner.history, hold.channel.stem());
                lock::remove(&inner.locks, hold.channel.stem(), &hold.file);
                if let Some(queue) = &hold.queue {
                    queue.remove(&inner.queues, hold.channel.stem());
                }
            }
        }
        Ok(items)
    }

    fn history(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<crate::history::Entry>> {
        Ok(history::read(&self.inner.history, channel.stem(), n))
    }

    fn status(&self, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)> {
        let inner = &self.inner;
        let mut warnings: Vec<String> =
            inner.network.map(|kind| network_warning(&inner.root, kind)).into_iter().collect();
        let state = match inner.state().load()? {
            Loaded::State(s) => s,
            Loaded::Damaged(why) => {
                warnings.push(format!("{} is damaged ({why})", inner.root.join("active.json").display()));
                Default::default()
            }
        };
        let held = crate::procfs::held_flocks();
        let channels: Vec<Channel> = if only.is_empty() {
            let mut names: std::collections::BTreeSet<String> = state.channels.keys().cloned().collect();
            names.extend(lock::names(&inner.locks));
            names.iter().filter_map(|n| Channel::new(n).ok()).collect()
        } else {
            only.to_vec()
        };
        let statuses = channels
            .iter()
            .map(|channel| {
                let mut status = inner.observe(channel, held.as_ref());
                status.record = state.channels.get(channel.name()).cloned();
                status
            })
            .collect();
        Ok((statuses, warnings))
    }

    fn acquire(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &Control,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let (queue, registered) = self.inner.register_fresh(channel, false)?;
        let ticket = match registered {
            Registered::Held(file) => return Ok(self.inner.lease(channel, file)?),
            _ if wait == Wait::No => return Err(AcquireError::Busy),
            Registered::Queued(ticket, note) => {
                on_wait(&note);
                Some(ticket)
            }
            Registered::Contended | Registered::Stale => None,
        };
        // The helper blocks in `flock`; if this thread gives up, it returns and the
        // caller exits: the kernel then drops the helper's waits and frees the ticket,
        // and the next in line moves up (it removes the ticket file).
        let (tx, rx) = mpsc::channel();
        let waker = control.waker().context("cannot set up waiting")?;
        let (inner, helper_queue, helper_channel) =
            (Arc::clone(&self.inner), Arc::clone(&queue), channel.clone());
        std::thread::spawn(move || {
            let send = |p| {
                let _ = tx.send(p);
                waker.wake();
            };
            let (helper_queue, ticket) = match ticket {
                Some(t) => (helper_queue, t),
                None => match inner.register_fresh(&helper_channel, true) {
                    Ok((queue, Registered::Queued(t, note))) => {
                        send(Progress::Queued(note));
                        (queue, t)
                    }
                    Ok((_, Registered::Held(file))) => return send(Progress::Done(Ok(file))),
                    Ok((_, Registered::Contended | Registered::Stale)) => {
                        unreachable!("a blocking registration waits its turn in a linked folder")
                    }
                    Err(e) => return send(Progress::Done(Err(e))),
                },
            };
            send(Progress::Done(inner.wait_in_line(&helper_queue, &helper_channel, ticket)));
        });
        loop {
            while let Ok(progress) = rx.try_recv() {
                match progress {
                    Progress::Queued(note) => on_wait(&note),
                    Progress::Done(file) => return Ok(self.inner.lease(channel, file?)?),
                }
            }
            if let Some(sig) = control.take_signal() {
                return Err(AcquireError::Interrupted(sig));
            }
            let deadline = match wait {
                Wait::Until(d) if Instant::now() >= d => return Err(AcquireError::Busy),
                Wait::Until(d) => Some(d),
                _ => None,
            };
            control.wait(deadline).context("cannot wait")?;
        }
    }
}

fn open_error(channel: &Channel, e: Errno) -> anyhow::Error {
    if e == Errno::LOOP || e == Errno::MLINK {
        anyhow!("locks/{}.lock is a symbolic link; chan-run never follows one: remove it", channel.stem())
    } else if e == Errno::INVAL {
        anyhow!("locks/{}.lock is not a regular file; remove it", channel.stem())
    } else {
        anyhow!("cannot open locks/{}.lock: {e}", channel.stem())
    }
}

fn network_warning(root: &Path, kind: &str) -> String {
    format!(
        "the state directory {} is on {kind}, where flock may be emulated or silently ineffective: runs on one channel may overlap across hosts; use a local directory",
        root.display()
    )
}

/// The network filesystem `dir` is on, by the filesystem's magic number (Linux).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn network_filesystem(dir: &OwnedFd) -> Option<&'static str> {
    network_kind(rustix::fs::fstatfs(dir).ok()?.f_type as u64)
}

/// The network filesystems among `statfs` magic numbers (linux/magic.h).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn network_kind(magic: u64) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "NFS",
        0x517b | 0xff53_4d42 | 0xfe53_4d42 => "SMB/CIFS",
        0x0102_1997 => "9P",
        0x00c3_6400 => "CephFS",
        0x5346_414f => "AFS",
        0x7375_7245 => "Coda",
        0x0bd0_0bd0 => "Lustre",
        0x0116_1970 => "GFS2",
        0x7461_636f => "OCFS2",
        _ => return None,
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn network_filesystem(_dir: &OwnedFd) -> Option<&'static str> {
    None
}

/// Creates (0700) and opens a subdirectory without following a symlink.
fn subdir(parent: &OwnedFd, name: &str) -> rustix::io::Result<OwnedFd> {
    // `gc` may remove the folder between the mkdir that found it and the open: make it
    // again (each round needs gc to win a fresh race, so this ends).
    let mut tries = 0;
    loop {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(parent, name, flags, Mode::empty()) {
            Err(Errno::NOENT) if tries < 100 => tries += 1,
            other => return other,
        }
    }
}

struct LocalLease {
    file: File,
    /// `None` if the header could not be written: then nothing more is written.
    header_len: Option<u64>,
    stem: String,
    channel: String,
    slots: Option<lock::Slots>,
    /// Where the channel's record is in `active.json`, and what the lock file says.
    hint: Option<u64>,
    hint_written: Option<u64>,
    store: Arc<Inner>,
}

impl Lease for LocalLease {
    fn announce(&mut self, holder: &Holder) -> anyhow::Result<()> {
        if let Some(header_len) = self.header_len {
            self.slots = Some(lock::announce(&self.file, header_len, &self.channel, holder)?);
        }
        Ok(())
    }

    fn pid_slot(&self) -> Option<(RawFd, u64, usize)> {
        self.slots.map(|s| lock::pid_slot(&self.file, s))
    }

    fn command_started(&mut self, pid: u32, ticks: u64) {
        if let Some(slots) = self.slots {
            lock::write_spawned(&self.file, slots, pid, ticks);
        }
    }

    fn record(&mut self) -> anyhow::Result<ChannelRecord> {
        let (record, hint) = self.store.state().read_channel(&self.channel, self.hint)?;
        self.hint = hint.or(self.hint);
        Ok(record)
    }

    fn update(&mut self, change: &mut dyn FnMut(&mut ChannelRecord)) -> Result<(), WriteError> {
        self.hint = self.store.state().update_channel(&self.channel, self.hint, change)?;
        Ok(())
    }

    fn record_run(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: &mut dyn FnMut(&ChannelRecord) -> crate::history::Entry,
    ) -> (Result<(), WriteError>, anyhow::Result<()>) {
        // The history gets the run even when active.json could not take it.
        let mut after = ChannelRecord::default();
        let recorded = self.update(&mut |r| {
            change(r);
            after = r.clone();
        });
        (recorded, history::append(&self.store.history, &self.stem, &entry(&after)))
    }

    fn release(self: Box<Self>) -> anyhow::Result<()> {
        let Some(header_len) = self.header_len else { return Ok(()) };
        if self.hint != self.hint_written {
            lock::write_hint(&self.file, header_len, self.hint);
        }
        self.file.set_len(header_len).context("cannot clear the holder record")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_named_and_local_ones_are_not() {
        assert_eq!(network_kind(0x6969), Some("NFS"));
        assert_eq!(network_kind(0xff53_4d42), Some("SMB/CIFS"));
        assert_eq!(network_kind(0x00c3_6400), Some("CephFS"));
        for local in [
            0xef53,      /* ext4 */
            0x0102_1994, /* tmpfs */
            0x5846_5342, /* xfs */
            0x9123_683e, /* btrfs */
        ] {
            assert_eq!(network_kind(local), None);
        }
    }
}
