//! Taking a channel: queue.rs's protocol driven for one caller. The channel's lock file
//! is opened once and used for every step (the try, the holder's record shown while
//! waiting, the blocking lock); only a lock file that clean-up removed meanwhile is
//! opened again. Blocking steps run on a helper thread so the main thread can watch the
//! deadline and signals: if it gives up, the process exits and the kernel drops the
//! helper's waits (and frees its ticket: the next in line moves up).

use super::files::ChannelFiles;
use super::lock;
use super::queue::{QueueDir, Ticket};
use crate::control::{Control, Gave, Progress};
use crate::store::{AcquireError, Wait, WaitNote};
use anyhow::Context;
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
    /// Set (under the registration lock) by a caller that gave up: a helper thread still
    /// registering for it must not join the queue after that.
    pub gave_up: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
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
    let queued = match register(files, lock, false, &join)? {
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
    let helper = files.clone();
    let waited = control.wait_for_progress(deadline, &mut |note: WaitNote| on_wait(&note), move |progress| {
        wait_turn(&helper, queued, progress, &join)
    });
    match waited {
        Ok(file) => Ok(file?),
        Err(Gave::Deadline) => Err(AcquireError::Busy),
        Err(Gave::Signal(sig)) => Err(AcquireError::Interrupted(sig)),
        Err(Gave::Failed(why)) => {
            Err(anyhow::anyhow!("cannot wait for channel {}: {why}", files.channel).into())
        }
    }
}

/// On the helper thread: registers (blocking) if the quick try was contended, then
/// waits in line (steps 4-6).
fn wait_turn(
    files: &ChannelFiles,
    queued: Result<(QueueDir, Ticket, File), File>,
    progress: &Progress<WaitNote>,
    join: &Join,
) -> anyhow::Result<File> {
    let (queue, ticket, file) = match queued {
        Ok(queued) => queued,
        Err(file) => match register(files, file, true, join)? {
            Registered::Held(file) => return Ok(file),
            Registered::Queued(queue, ticket, file, note) => {
                progress.send(note);
                (queue, ticket, file)
            }
            Registered::Contended(_) => unreachable!("a blocking registration waits its turn"),
        },
    };
    while let Some(ahead) = queue.predecessor(ticket.seq).context("cannot read the queue")? {
        queue.wait_for(ahead).context("cannot wait in the queue")?;
    }
    let file = lock_blocking(files, file)?;
    queue.leave(ticket);
    Ok(file)
}

/// Steps 1-3 of the queue protocol: the lock at once, or a ticket (or, not `blocking`,
/// contended), starting over in a new folder if clean-up removed the one it opened.
fn register(files: &ChannelFiles, mut lock: File, blocking: bool, join: &Join) -> anyhow::Result<Registered> {
    loop {
        let queue = files.queue()?;
        let Some(reg) = queue.register(blocking).context("cannot lock the queue")? else {
            return Ok(Registered::Contended(lock));
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
        if join.gave_up.as_ref().is_some_and(|g| g.load(std::sync::atomic::Ordering::SeqCst)) {
            anyhow::bail!("gave up waiting");
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
fn lock_blocking(files: &ChannelFiles, mut file: File) -> anyhow::Result<File> {
    loop {
        file.lock().context("cannot lock the channel")?;
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
