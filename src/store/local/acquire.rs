//! Taking a channel: queue.rs's protocol driven for one caller. The channel's lock file
//! is opened once and used for every step (the try, the holder's record shown while
//! waiting, the blocking lock); only a lock file that clean-up removed meanwhile is
//! opened again. Blocking steps block this (the main) thread in the kernel, cut short by
//! a forwarded signal or the deadline (`Control::flock`, `sys::kick`): a caller that
//! gives up returns from its wait holding nothing, and closing its ticket frees its place
//! (the next in line moves up). (Until issue 17 the waits ran on a helper thread; its
//! start and the hop back to the main thread at every hand-off cost a tenth of the
//! serialized throughput.)

use super::files::ChannelFiles;
use super::lock;
use super::queue::{QueueDir, Ticket};
use crate::control::{Control, Gave};
use crate::store::{AcquireError, Wait, WaitNote};
use anyhow::Context;
use rustix::fd::{AsFd, BorrowedFd};
use std::fs::File;

/// Where registration (steps 1-3) left a caller.
enum Registered {
    Held(File),
    Queued(QueueDir, Ticket, File, WaitNote),
    /// Somebody else holds the registration lock right now.
    Contended(File),
}

/// Returns the channel's lock file, locked, once this caller's turn has come.
pub fn acquire(
    files: &ChannelFiles,
    wait: Wait,
    control: &'static Control,
    on_wait: &mut dyn FnMut(&WaitNote),
) -> Result<File, AcquireError> {
    acquire_joining(files, wait, control, on_wait, Join::default())
}

/// What a caller leaves in the queue with its ticket: the ticket's note, and a file
/// written beside it (name, contents) before the ticket exists, under the registration
/// lock (`--collect`'s message).
#[derive(Clone, Default)]
pub struct Join {
    pub note: String,
    pub beside: Option<(String, std::sync::Arc<[u8]>)>,
}

/// As `acquire`, leaving `join` in the queue if this caller has to wait.
pub fn acquire_joining(
    files: &ChannelFiles,
    wait: Wait,
    control: &'static Control,
    on_wait: &mut dyn FnMut(&WaitNote),
    join: Join,
) -> Result<File, AcquireError> {
    let lock = files.open_lock()?;
    let queued = match register(files, lock, None, &join)? {
        Registered::Held(file) => return Ok(file),
        _ if wait == Wait::No => return Err(AcquireError::Busy),
        Registered::Queued(queue, ticket, file, note) => {
            on_wait(&note);
            Ok((queue, ticket, file))
        }
        Registered::Contended(file) => Err(file),
    };
    let deadline = match wait {
        Wait::Until(d) => Some(d),
        _ => None,
    };
    // The waits block in this thread, cut short by a signal or the deadline (see
    // `Control::flock`); a cut-short wait comes back as a `Gave` inside the error.
    let mut block = |fd: BorrowedFd<'_>, exclusive: bool| -> anyhow::Result<()> {
        Ok(control.flock(fd, exclusive, deadline)?)
    };
    let waited = wait_turn(files, queued, on_wait, &join, &mut block);
    match waited.map_err(|e| e.downcast::<Gave>()) {
        Ok(file) => Ok(file),
        Err(Ok(Gave::Deadline)) => Err(AcquireError::Busy),
        Err(Ok(Gave::Signal(sig))) => Err(AcquireError::Interrupted(sig)),
        Err(Ok(Gave::Failed(why))) => {
            Err(anyhow::anyhow!("cannot wait for channel {}: {why}", files.channel).into())
        }
        Err(Err(e)) => Err(e.into()),
    }
}

/// Blocks on a lock (exclusive or shared) until it is granted, or fails.
type Block<'a> = dyn FnMut(BorrowedFd<'_>, bool) -> anyhow::Result<()> + 'a;

/// Registers (blocking) if the quick try was contended, then waits in line (steps 4-6),
/// every wait through `block`.
fn wait_turn(
    files: &ChannelFiles,
    queued: Result<(QueueDir, Ticket, File), File>,
    on_wait: &mut dyn FnMut(&WaitNote),
    join: &Join,
    block: &mut Block<'_>,
) -> anyhow::Result<File> {
    let (queue, ticket, file) = match queued {
        Ok(queued) => queued,
        Err(file) => match register(files, file, Some(&mut *block), join)? {
            Registered::Held(file) => return Ok(file),
            Registered::Queued(queue, ticket, file, note) => {
                on_wait(&note);
                (queue, ticket, file)
            }
            Registered::Contended(_) => unreachable!("a blocking registration waits its turn"),
        },
    };
    while let Some(ahead) = queue.predecessor(ticket.seq).context("cannot read the queue")? {
        queue.wait_for_with(ahead, |fd| block(fd, false)).context("cannot wait in the queue")?;
    }
    let file = lock_blocking(files, file, block)?;
    queue.leave(ticket);
    Ok(file)
}

/// Steps 1-3 of the queue protocol: the lock at once, or a ticket (or, with no `block`
/// to wait for the registration lock with, contended), starting over in a new folder if
/// clean-up removed the one it opened.
fn register(
    files: &ChannelFiles,
    mut lock: File,
    mut block: Option<&mut Block<'_>>,
    join: &Join,
) -> anyhow::Result<Registered> {
    loop {
        let queue = files.queue()?;
        let reg = match block.as_deref_mut() {
            Some(block) => queue.register_with(|dir| block(dir, true)).context("cannot lock the queue")?,
            None => match queue.register(false).context("cannot lock the queue")? {
                Some(reg) => reg,
                None => return Ok(Registered::Contended(lock)),
            },
        };
        if !files.queue_still_linked(&queue) {
            continue;
        }
        let (tickets, live) = queue.live_top(&reg).context("cannot read the queue")?;
        if !live {
            match try_lock(files, lock)? {
                Ok(file) => return Ok(Registered::Held(file)),
                Err(file) => lock = file,
            }
        }
        if let Some((name, contents)) = &join.beside {
            queue.write_beside(&reg, name, contents)?;
        }
        let ticket = queue.take_ticket(&reg, tickets.last().copied(), &join.note)?;
        drop(reg);
        let note = wait_note(&lock, tickets.len());
        return Ok(Registered::Queued(queue, ticket, lock, note));
    }
}

/// Takes the channel lock without waiting: `Err(file)` (the same file) when it is held.
fn try_lock(files: &ChannelFiles, mut file: File) -> anyhow::Result<Result<File, File>> {
    loop {
        match file.try_lock() {
            Ok(()) if files.still_names(&file) => return Ok(Ok(file)),
            Ok(()) => file = files.open_lock()?,
            Err(std::fs::TryLockError::WouldBlock) => return Ok(Err(file)),
            Err(std::fs::TryLockError::Error(e)) => return Err(e).context("cannot lock the channel"),
        }
    }
}

/// Step 5: blocks in the kernel until the channel lock is ours.
fn lock_blocking(files: &ChannelFiles, mut file: File, block: &mut Block<'_>) -> anyhow::Result<File> {
    loop {
        block(file.as_fd(), true).context("cannot lock the channel")?;
        if files.still_names(&file) {
            return Ok(file);
        }
        file = files.open_lock()?;
    }
}

/// What the waiting line shows: the holder's record, read from the lock file.
fn wait_note(lock: &File, ahead: usize) -> WaitNote {
    let record = lock::read(lock).ok().and_then(|c| c.record);
    WaitNote {
        holder_pid: record.as_ref().map(|r| r.pid),
        held_for: record.as_ref().and_then(|r| r.held_for()),
        holder_host: None,
        ahead,
    }
}
