//! `--collect` on the local store: a burst of queued messages answered by one run. It
//! rides on the channel's queue (queue.rs) and lock; what it adds lives beside the
//! tickets in `queue/<stem>/`, every file 0600 and checked as dir.rs checks them:
//!
//!     queue/<stem>/<ticket>          note `collect <fingerprint> <token>` on its first line
//!     queue/<stem>/msg-<token>       a waiting caller's message, not yet taken
//!     queue/<stem>/taken-<token>     the same message, taken into a batch
//!     queue/<stem>/verdict           the last batch's outcome: `<code> <pid> <n> <token>...`
//!
//! A token is the caller's pid and the time in ns: never reused, so a file of a caller
//! long gone can never be mistaken for a new caller's.
//!
//! Protocol (each step's crash outcome in brackets):
//! 1. Join: under the registration lock, write `msg-<token>` whole, then the ticket with
//!    its note (queue.rs step 3) [dies before the ticket: a stray message no one takes,
//!    removed with the folder; after: a dead ticket, skipped].
//! 2. Wait in line as any caller (queue.rs steps 4-5).
//! 3. Holding the channel lock: if `verdict` names this token, the run that took this
//!    message has ended and written its outcome: exit with it (the collected code when
//!    it was 0), nothing run. Else this caller runs, whether its message was never taken
//!    or taken by a runner that died before writing a verdict: it re-runs the message,
//!    in its own place in line, with those behind it [dies: as any holder].
//! 4. Window (`--collect-window`, before any pool seat): holding the channel, sleep on an inotify watch of the
//!    folder until no ticket has been created for DUR [dies: as any holder].
//! 5. Take (after the run's pool seats, right before the command): under the
//!    registration lock (so every message read is whole, and every message has its
//!    ticket: one that no live ticket names is a dead caller's, and is removed), walk
//!    the live tickets in order; each with this fingerprint is taken by renaming `msg-<token>` to
//!    `taken-<token>` (a `taken-` file with no verdict is a dead runner's, and is taken
//!    again), until one differs or the batch is full [dies: the taken callers find no
//!    verdict at step 3 and run their messages again, in order].
//! 6. Run the command once, all messages on its stdin; record the run.
//! 7. Settle: write `verdict` (a temporary file renamed over it: all or nothing),
//!    remove the taken messages, release the channel [dies before the rename: as 5;
//!    after: the batch counts as answered, and its runner's caller saw its whole output].
//!
//! The taken callers then take the channel in turn, each for an instant (step 3): they
//! were queued right behind the runner, and newcomers queue behind them, so no other
//! batch can replace `verdict` before they read it. They wait in the kernel, never
//! polling. A caller interrupted while waiting withdraws its message (unlinks
//! `msg-<token>` under the registration lock); if it was already renamed, the batch
//! answers it and the caller is told so.

use super::acquire::{self, Join};
use super::files::ChannelFiles;
use super::lease::LocalLease;
use super::queue::{QueueDir, Registration};
use crate::control::Control;
use crate::store::{AcquireError, CollectEntry, Turn, Verdict, Wait, WaitNote};
use anyhow::{Context, anyhow};
use rustix::fs::{AtFlags, OFlags};
use rustix::io::Errno;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const VERDICT: &str = "verdict";
const VERDICT_TMP: &str = "verdict.tmp";
/// The largest file read back from the queue folder (a message is capped below this).
const READ_CAP: u64 = 4 << 20;

/// What a `--collect` run's lease keeps: its own entry and the tokens it took.
pub struct Batch {
    token: String,
    fingerprint: String,
    taken: Vec<String>,
}

/// Whether `name` in a queue folder is one of the files this module keeps there.
pub fn is_companion(name: &str) -> bool {
    name.starts_with("msg-") || name.starts_with("taken-") || name == VERDICT || name == VERDICT_TMP
}

fn new_token() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// Steps 1-3 for one caller.
pub fn acquire(
    files: &ChannelFiles,
    wait: Wait,
    control: &'static Control,
    on_wait: &mut dyn FnMut(&WaitNote),
    entry: &CollectEntry,
) -> Result<Turn, AcquireError> {
    let token = new_token();
    // A caller that will not wait never queues: nothing to leave behind.
    let join = match wait {
        Wait::No => Join::default(),
        _ => Join {
            note: format!("collect {} {token}", entry.fingerprint),
            beside: Some((format!("msg-{token}"), Arc::clone(&entry.message))),
        },
    };
    let file = match acquire::acquire_joining(files, wait, control, on_wait, join) {
        Ok(file) => file,
        Err(AcquireError::Interrupted(sig)) => {
            return match withdraw(files, &token) {
                Ok(true) => Ok(Turn::TakenThenInterrupted(sig)),
                _ => Err(AcquireError::Interrupted(sig)),
            };
        }
        Err(e) => {
            let _ = withdraw(files, &token);
            return Err(e);
        }
    };
    let queue = files.queue()?;
    let verdict = read_verdict(&queue, &token);
    for name in [format!("msg-{token}"), format!("taken-{token}")] {
        let _ = rustix::fs::unlinkat(queue.fd(), name, AtFlags::empty());
    }
    if let Some(verdict) = verdict {
        // The lock is dropped with the file, the holder record left as it was.
        return Ok(Turn::Answered(verdict));
    }
    let mut lease = LocalLease::take(files.clone(), file, control)?;
    lease.collect = Some(Batch { token, fingerprint: entry.fingerprint.clone(), taken: Vec::new() });
    Ok(Turn::Run(Box::new(lease)))
}

/// A caller giving up its wait (which ran in this thread: nothing of it is still under
/// way): under the registration lock, which a batch's runner takes its messages under,
/// unlinks its message. `true` if the message had been taken already.
fn withdraw(files: &ChannelFiles, token: &str) -> anyhow::Result<bool> {
    let queue = files.queue()?;
    let _reg = queue.register(true).context("cannot lock the queue")?;
    let _ = rustix::fs::unlinkat(queue.fd(), format!("msg-{token}"), AtFlags::empty());
    Ok(rustix::fs::statat(queue.fd(), format!("taken-{token}"), AtFlags::SYMLINK_NOFOLLOW).is_ok())
}

/// The outcome `verdict` holds for `token`, if it names it (a torn file names nothing).
fn read_verdict(queue: &QueueDir, token: &str) -> Option<Verdict> {
    let text = read_small(queue, VERDICT).ok()?;
    let text = String::from_utf8(text).ok()?;
    let line = text.strip_suffix('\n')?;
    let mut words = line.split(' ');
    let code = words.next()?.parse().ok()?;
    let runner_pid = words.next()?.parse().ok()?;
    let messages = words.next()?.parse().ok()?;
    words.any(|w| w == token).then_some(Verdict { code, runner_pid, messages })
}

fn read_small(queue: &QueueDir, name: &str) -> anyhow::Result<Vec<u8>> {
    let file = super::dir::file(queue.fd(), name, OFlags::RDONLY)
        .map_err(|e| anyhow!("{}", e.message(std::path::Path::new(name))))?;
    let mut bytes = Vec::new();
    file.take(READ_CAP)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {name} in the queue"))?;
    Ok(bytes)
}

/// A live ticket's collect note: (fingerprint, token).
fn collect_note(note: &str) -> Option<(&str, &str)> {
    let mut words = note.strip_prefix("collect ")?.split(' ');
    Some((words.next()?, words.next()?))
}

/// For `status`: each waiter's collect mark ("queued", "taken") from its ticket's note.
pub fn marks(queue: &QueueDir, notes: &[String]) -> Vec<Option<&'static str>> {
    notes
        .iter()
        .map(|note| {
            let (_, token) = collect_note(note)?;
            let taken = rustix::fs::statat(queue.fd(), format!("taken-{token}"), AtFlags::SYMLINK_NOFOLLOW);
            Some(if taken.is_ok() { "taken" } else { "queued" })
        })
        .collect()
}

/// How the callers queued behind the runner stand: how many could join its batch
/// (before the first that differs), and whether one that differs is queued.
fn collectable(queue: &QueueDir, fingerprint: &str) -> (usize, bool) {
    let mut n = 0;
    for (_, note) in queue.waiters_with_notes(None) {
        match collect_note(&note) {
            Some((fp, _)) if fp == fingerprint => n += 1,
            _ => return (n, true),
        }
    }
    (n, false)
}

/// Step 4.
pub fn window(
    files: &ChannelFiles,
    batch: &Batch,
    quiet: Duration,
    max: u32,
    control: &'static Control,
) -> Result<(), AcquireError> {
    let queue = files.queue()?;
    let watch = watch(&queue).ok();
    let mut deadline = Instant::now() + quiet;
    loop {
        let (n, blocked) = {
            let _reg = queue.register(true).context("cannot lock the queue")?;
            collectable(&queue, &batch.fingerprint)
        };
        if blocked || n + 1 >= max as usize {
            return Ok(());
        }
        if let Some(sig) = control.take_signal() {
            return Err(AcquireError::Interrupted(sig));
        }
        if Instant::now() >= deadline {
            return Ok(());
        }
        let Some(watch) = &watch else {
            // No inotify: one quiet period from the turn, not extended.
            control.wait(Some(deadline)).context("cannot wait")?;
            continue;
        };
        let fds = [(rustix::fd::AsFd::as_fd(watch), rustix::event::PollFlags::IN)];
        control.wait_also(Some(deadline), &fds).context("cannot wait")?;
        if arrived(watch) {
            deadline = Instant::now() + quiet;
        }
    }
}

/// An inotify watch (non-blocking) for files created in the queue folder.
fn watch(queue: &QueueDir) -> rustix::io::Result<rustix::fd::OwnedFd> {
    use rustix::fs::inotify;
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    let path = format!("/proc/self/fd/{}", rustix::fd::AsRawFd::as_raw_fd(queue.fd()));
    inotify::add_watch(&watch, path, inotify::WatchFlags::CREATE | inotify::WatchFlags::ONLYDIR)?;
    Ok(watch)
}

/// Drains the watch; whether a ticket (a numbered file) was created.
fn arrived(watch: &rustix::fd::OwnedFd) -> bool {
    use rustix::fs::inotify;
    let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
    let mut events = inotify::Reader::new(watch, &mut buf);
    let mut ticket = false;
    loop {
        match events.next() {
            Ok(event) => {
                let name = event.file_name().and_then(|n| n.to_str().ok());
                ticket |= event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW)
                    || name.is_some_and(|n| n.parse::<u64>().is_ok());
            }
            Err(Errno::INTR) => continue,
            Err(_) => return ticket,
        }
    }
}

/// Step 5.
pub fn take(files: &ChannelFiles, batch: &mut Batch, max: u32) -> anyhow::Result<Vec<Arc<[u8]>>> {
    let queue = files.queue()?;
    let reg = queue.register(true).context("cannot lock the queue")?;
    let reg = reg.ok_or_else(|| anyhow!("cannot lock the queue"))?;
    let waiters = queue.waiters_with_notes(None);
    sweep(&queue, &reg, &waiters);
    let mut messages = Vec::new();
    for (_, note) in waiters {
        if batch.taken.len() + 1 >= max as usize {
            break;
        }
        let Some((fp, token)) = collect_note(&note) else { break };
        if fp != batch.fingerprint || token == batch.token {
            break;
        }
        let taken = format!("taken-{token}");
        match rustix::fs::renameat(queue.fd(), format!("msg-{token}"), queue.fd(), &taken) {
            Ok(()) => {}
            // Withdrawn (its caller gave up), unless a runner that died took it.
            Err(Errno::NOENT) => {
                if rustix::fs::statat(queue.fd(), &taken, AtFlags::SYMLINK_NOFOLLOW).is_err() {
                    continue;
                }
            }
            Err(e) => return Err(e).context("cannot take a queued message"),
        }
        messages.push(Arc::from(read_small(&queue, &taken)?));
        batch.taken.push(token.to_owned());
    }
    Ok(messages)
}

/// Under the registration lock, where every message has a ticket: removes the messages
/// of callers that died waiting (no live ticket names them).
fn sweep(queue: &QueueDir, _reg: &Registration, waiters: &[(crate::store::Waiter, String)]) {
    let live: Vec<&str> = waiters.iter().filter_map(|(_, note)| collect_note(note)).map(|(_, t)| t).collect();
    let Ok(mut listing) = rustix::fs::Dir::read_from(queue.fd()) else { return };
    while let Some(Ok(entry)) = listing.read() {
        let Ok(name) = entry.file_name().to_str() else { continue };
        let token = name.strip_prefix("msg-").or_else(|| name.strip_prefix("taken-"));
        if token.is_some_and(|t| !live.contains(&t)) {
            let _ = rustix::fs::unlinkat(queue.fd(), name, AtFlags::empty());
        }
    }
}

/// Step 7.
pub fn settle(files: &ChannelFiles, batch: &Batch, code: u8) -> anyhow::Result<()> {
    if batch.taken.is_empty() {
        return Ok(());
    }
    let queue = files.queue()?;
    let line = format!("{code} {} {} {}\n", std::process::id(), batch.taken.len() + 1, batch.taken.join(" "));
    let _ = rustix::fs::unlinkat(queue.fd(), VERDICT_TMP, AtFlags::empty());
    let mut file = super::dir::file(queue.fd(), VERDICT_TMP, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL)
        .map_err(|e| anyhow!("{}", e.message(std::path::Path::new(VERDICT_TMP))))?;
    file.write_all(line.as_bytes()).context("cannot write the batch's verdict")?;
    rustix::fs::renameat(queue.fd(), VERDICT_TMP, queue.fd(), VERDICT)
        .context("cannot write the batch's verdict")?;
    // Answered: no one needs the messages any more.
    for token in &batch.taken {
        let _ = rustix::fs::unlinkat(queue.fd(), format!("taken-{token}"), AtFlags::empty());
    }
    Ok(())
}
