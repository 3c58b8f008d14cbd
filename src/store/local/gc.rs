//! `gc` for the local store: removes the records, logs, queue folders and lock files of
//! channels idle for longer than asked. A channel is removed only while `gc` holds both
//! its queue's registration lock and its channel lock, with nobody queued; every caller,
//! once it holds a lock, checks that the path still names the file it locked and
//! otherwise starts over, so a removal can never let two runs overlap or a newcomer jump
//! the queue.

use super::Folders;
use super::files::{self, ChannelFiles};
use super::lock;
use super::queue::QueueDir;
use super::state::{Held, Hint, Loaded};
use crate::channel::Channel;
use crate::control::Control;
use crate::state::ChannelRecord;
use crate::store::{GcItem, GcReport};
use anyhow::bail;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Channels removed per batch: the locks held at once stay few.
const BATCH: usize = 256;

/// A channel `gc` holds: its registration lock and its lock, no live waiter.
struct Hold {
    files: ChannelFiles,
    queue: Option<QueueDir>,
    file: File,
}

pub fn gc(
    folders: &Arc<Folders>,
    idle_for: Duration,
    dry_run: bool,
    control: &'static Control,
) -> anyhow::Result<GcReport> {
    let candidates = candidates(folders, idle_for)?;
    let held = crate::procfs::held_flocks();
    let mut items = Vec::new();
    for batch in candidates.chunks(BATCH) {
        let mut holds = Vec::new();
        for (channel, idle) in batch {
            let files = ChannelFiles::new(folders, channel);
            let kept = if dry_run {
                super::status::observe(&files, held.as_ref()).running.then_some("busy")
            } else {
                match hold(folders, files, idle_for, control)? {
                    Ok(hold) => {
                        holds.push(hold);
                        None
                    }
                    Err(why) => Some(why),
                }
            };
            items.push(GcItem { pool: false, channel: channel.name().to_owned(), idle: *idle, kept });
        }
        if holds.is_empty() {
            continue;
        }
        let names: Vec<String> = holds.iter().map(|h| h.files.channel.name().to_owned()).collect();
        folders.active(control).remove(&names).map_err(anyhow::Error::new)?;
        for hold in holds {
            hold.files.remove_history();
            hold.files.remove_lock(&hold.file);
            if let Some(queue) = &hold.queue {
                hold.files.remove_queue(queue);
            }
        }
    }
    let mut notes = Vec::new();
    if !dry_run {
        let compacted = folders.active(control).compact(&mut |name| hold_to_move(folders, name))?;
        if compacted.moved > 0 || compacted.after < compacted.before {
            notes.push(format!(
                "compacted active.json from {} to {} bytes ({} records moved)",
                compacted.before, compacted.after, compacted.moved
            ));
        }
    }
    items.extend(super::pool::gc(folders, idle_for, dry_run));
    Ok(GcReport { items, notes })
}

/// A channel's lock taken without waiting, so compaction may move its record: `None`
/// if it is busy (or gone).
fn hold_to_move(folders: &Arc<Folders>, name: &str) -> Option<Held> {
    let files = ChannelFiles::new(folders, &Channel::new(name).ok()?);
    let file = files.open_lock().ok()?;
    file.try_lock().ok()?;
    if !files.still_names(&file) {
        return None;
    }
    let contents = lock::read(&file).ok()?;
    let header_len = lock::claim_name(&file, name, &contents).ok()??;
    Some(Box::new(MovingHint { file, header_len }))
}

/// The lock file of a channel whose record compaction moves.
struct MovingHint {
    file: File,
    header_len: u64,
}

impl Hint for MovingHint {
    fn get(&self) -> Option<u64> {
        None
    }

    fn set(&mut self, at: Option<u64>, _durable: bool) -> std::io::Result<()> {
        lock::write_hint(&self.file, self.header_len, at)
    }
}

/// Channels idle for longer than `idle_for`: those with a record whose last run ended
/// that long ago, and those with only a lock file that old.
fn candidates(folders: &Arc<Folders>, idle_for: Duration) -> anyhow::Result<Vec<(Channel, Duration)>> {
    let state = match folders.active_reader().load()? {
        Loaded::State(s) => s,
        Loaded::Damaged(why) => bail!("active.json is damaged ({why}); gc removes nothing until then"),
    };
    let mut candidates = Vec::new();
    for (name, record) in &state.channels {
        if let Some(idle) = idle_since(record).filter(|&idle| idle > idle_for) {
            candidates.push((Channel::new(name)?, idle));
        }
    }
    for name in files::names(folders.locks()?) {
        let Ok(channel) = Channel::new(&name) else { continue };
        if !state.channels.contains_key(&name)
            && let Some(idle) =
                ChannelFiles::new(folders, &channel).lock_modified_ago().filter(|&i| i > idle_for)
        {
            candidates.push((channel, idle));
        }
    }
    Ok(candidates)
}

/// Takes an idle channel for removal without waiting: `Err(why)` if anybody holds it,
/// waits for it or is registering, or it ran since the candidates were read.
fn hold(
    folders: &Arc<Folders>,
    files: ChannelFiles,
    idle_for: Duration,
    control: &'static Control,
) -> anyhow::Result<Result<Hold, &'static str>> {
    let queue = files.existing_queue();
    if let Some(queue) = &queue
        && (!queue.hold_registration()? || !files.queue_still_linked(queue) || queue.has_live()?)
    {
        return Ok(Err("busy"));
    }
    let file = files.open_lock()?;
    match file.try_lock() {
        Ok(()) if files.still_names(&file) => {}
        Ok(()) | Err(std::fs::TryLockError::WouldBlock) => return Ok(Err("busy")),
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    let contents = lock::read(&file)?;
    let (record, _) = folders
        .active(control)
        .read_channel(files.channel.name(), contents.hint)
        .map_err(anyhow::Error::new)?;
    if idle_since(&record).is_some_and(|idle| idle <= idle_for) {
        return Ok(Err("ran since"));
    }
    Ok(Ok(Hold { files, queue, file }))
}

/// How long ago the record's last run ended.
fn idle_since(record: &ChannelRecord) -> Option<Duration> {
    let finished = humantime::parse_rfc3339(&record.last_run.as_ref()?.finished_at).ok()?;
    SystemTime::now().duration_since(finished).ok()
}
