//! `active.json`: every channel's record in one JSON document, laid out in slots
//! (layout.rs) so that a run reads and writes only its own record, and indexed
//! (index.rs) so that finding any record, a new channel's absence included, costs a few
//! reads whatever the file's size.
//!
//! Who may write what: a channel's lines only the holder of that channel's lock (or
//! `gc` holding it), so no two writers ever touch the same bytes. A run finds its record
//! by the hint in its lock file (the offset it last wrote, checked against the line's
//! key), else by the index; a change that fits its slot is written in place under the
//! shared state lock, the common case: one `pwrite` and one `fdatasync`, no other lock.
//! A new record, a move to a bigger slot, a removal or a compaction takes the append
//! lock too, and changes only the lines concerned (lines.rs). Only two rare changes
//! replace the file by a rename, under the exclusive state lock (whole.rs): converting
//! valid state in another layout (hand-edited, `{}`, a file of an earlier layout), and
//! moving a damaged file aside. Nothing scans the whole file under a lock but the
//! rebuild of a lost or stale index (and `gc`'s search for holes), under the append lock,
//! which in-place updates never take. Every wait for a lock is bounded
//! ([`RECORD_WITHIN`]) and interruptible (locks.rs).
//!
//! Damage: a line of this layout that does not parse, met by its own channel's run or by
//! a scan, makes the file damaged: it is moved to a fresh `active.json.corrupt-<UTC
//! time>` (a no-replace rename) with a warning, and the state starts empty. A newer
//! `version`, or a file that cannot be read or is not a regular file, is an error and
//! is left untouched. A write that `RLIMIT_FSIZE` would cut short is refused before it
//! starts. Readers of the whole file (`status`, `jq`) may meet a line mid-update;
//! `status` reads such a line again, and takes no lock.

mod compact;
mod index;
mod layout;
mod lines;
pub mod locks;
mod whole;

use crate::control::Control;
use crate::state::{ChannelRecord, StateFile};
use crate::store::RecordError;
use index::Index;
use layout::Slot;
use lines::{Checked, Line, Structure};
use locks::{Waited, Waits};
use rustix::fd::OwnedFd;
use std::io;
use std::path::Path;
use whole::View;

pub use compact::Held;

const NAME: &str = "active.json";

/// `active.json` in one state directory.
pub struct ActiveFile<'a> {
    dir: &'a OwnedFd,
    path: &'a Path,
    /// How waits for the state's locks end early (signals); `None` for readers that
    /// never wait.
    control: Option<&'static Control>,
}

pub enum Loaded {
    State(StateFile),
    Damaged(String),
}

/// Where a channel's holder keeps the offset of its record (its lock file's `at` line).
pub trait Hint {
    fn get(&self) -> Option<u64>;
    /// `durable`: a copy of the record is about to be made further on, and a hint left
    /// naming the old one after a crash would send updates where no reader looks.
    fn set(&mut self, at: Option<u64>, durable: bool) -> io::Result<()>;
}

impl From<Waited> for RecordError {
    fn from(w: Waited) -> RecordError {
        match w {
            Waited::Signal(sig) => RecordError::Interrupted(sig),
            other => RecordError::Failed(anyhow::Error::new(other)),
        }
    }
}

impl<'a> ActiveFile<'a> {
    pub fn new(dir: &'a super::dir::StateDir, control: Option<&'static Control>) -> ActiveFile<'a> {
        ActiveFile { dir: &dir.fd, path: &dir.path, control }
    }

    /// The whole state, for `status`: streamed line by line, taking no lock, repairing
    /// nothing. A line met mid-update is read again; a torn end (a write under way) is
    /// left out.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let (file, header) = match self.view(false)? {
            View::Missing => return Ok(Loaded::State(StateFile::default())),
            View::Other(state) => return Ok(Loaded::State(state)),
            View::Damaged(why) => return Ok(Loaded::Damaged(format!("{why}; the next run moves it aside"))),
            View::Slots(file, header) => (file, header),
        };
        let len = file.metadata()?.len();
        let mut state =
            StateFile { version: header.version, extra: header.extras.clone(), ..Default::default() };
        let mut bad = None;
        lines::each_line(&file, header.len, |offset, line| {
            match reread(&file, offset, line) {
                Slot::Member { name, record, .. } => {
                    state.channels.insert(name, *record);
                }
                Slot::Filler => {}
                Slot::Bad if offset + line.len() as u64 >= len => {}
                Slot::Bad => {
                    bad.get_or_insert((offset, layout::key_of(line)));
                }
            }
            true
        })?;
        Ok(match bad {
            Some((at, Some(key))) => Loaded::Damaged(format!(
                "the record of channel {key:?} at byte {at} is not valid; the next run on that channel moves the file aside"
            )),
            Some((at, None)) => Loaded::Damaged(format!(
                "the line at byte {at} is not a valid record; the next run that adds a channel moves the file aside"
            )),
            None => Loaded::State(state),
        })
    }

    /// One channel's record and where it is, read by its holder. A damaged file is
    /// moved aside here, before the command runs.
    pub fn read_channel(
        &self,
        name: &str,
        hint: Option<u64>,
    ) -> Result<(ChannelRecord, Option<u64>), RecordError> {
        let (file, header) = match self.view(false)? {
            View::Missing => return Ok((ChannelRecord::default(), None)),
            View::Other(mut state) => return Ok((state.channels.remove(name).unwrap_or_default(), None)),
            View::Slots(file, header) => (file, header),
            View::Damaged(_) => {
                self.settle(Waits::new(self.control), true)?;
                return Ok((ChannelRecord::default(), None));
            }
        };
        if let Some(line) = hint.and_then(|at| lines::keep_line_at(&file, at, name)) {
            return Ok((line.record, Some(line.offset))); // `newest` of that one line
        }
        if let Some(at) = hint
            && let Ok(found) = lines::find(&file, name, &[at])
            && !found.is_empty()
        {
            return Ok(newest(&found));
        }
        // The index answers without the append lock, "absent" (a new channel) included.
        if let Some(Ok(found)) = self.peek(&file, &header, name) {
            return Ok(newest(&found));
        }
        // No index to ask (the first run after an upgrade, or one killed mid-rewrite):
        // settle it, under the append lock.
        let (_, found) = self.settled_lines(Waits::new(self.control), name)?;
        Ok(newest(&found))
    }

    /// `active.json` settled (see `settle`), with `name`'s lines; a line of `name`'s that
    /// does not parse has the file moved aside first.
    fn settled_lines(&self, waits: Waits, name: &str) -> Result<(Structure<'a>, Vec<Line>), RecordError> {
        let s = self.settle(waits, false)?;
        if let Ok(found) = s.lines_of(name) {
            return Ok((s, found));
        }
        drop(s);
        let s = self.settle(waits, true)?;
        let found = s.lines_of(name).map_err(|d| anyhow::anyhow!("{}: {}", self.shown(), d.0))?;
        Ok((s, found))
    }

    /// `name`'s lines as the index names them, without the append lock (`None` if the
    /// index cannot say: missing, stale, or rewritten meanwhile).
    fn peek(
        &self,
        file: &std::fs::File,
        header: &layout::Header,
        name: &str,
    ) -> Option<Result<Vec<Line>, lines::Damaged>> {
        let index = super::dir::file(self.dir, index::NAME, rustix::fs::OFlags::RDONLY).ok()?;
        Some(lines::find(file, name, &index::peek(&index, header.epoch, name)?))
    }

    /// The read-modify-write of one channel's record. `change` may be called more than
    /// once, each time on a freshly read record.
    pub fn update_channel(
        &self,
        name: &str,
        hint: &mut dyn Hint,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> Result<(), RecordError> {
        let waits = Waits::new(self.control);
        if self.in_place(name, hint.get(), change, waits)? {
            return Ok(());
        }
        let (mut s, found) = self.settled_lines(waits, name)?;
        let mut record = found.last().map(|l| l.record.clone()).unwrap_or_default();
        change(&mut record);
        let written = self.restructure(&mut s, name, &found, &record, hint);
        written.map_err(|e| RecordError::Failed(e.context(self.cannot_write())))
    }

    /// The common case: the record is where the hint says and still fits. `false`
    /// leaves the work to the append-locked path.
    fn in_place(
        &self,
        name: &str,
        hint: Option<u64>,
        change: &mut dyn FnMut(&mut ChannelRecord),
        waits: Waits,
    ) -> Result<bool, RecordError> {
        let _shared = locks::state_lock(self.dir, false, waits)?;
        let View::Slots(file, header) = self.view(true)? else { return Ok(false) };
        // A file cut short (or mid-add) is left to the append-locked path, which tells one
        // from the other: a damaged file is never written into.
        if !lines::looks_whole(&file, &header).map_err(anyhow::Error::new)? {
            return Ok(false);
        }
        let line = match hint.and_then(|at| lines::take_line_at(&file, at, name)) {
            Some(line) => line,
            None => match self.peek(&file, &header, name) {
                Some(Ok(found)) if !found.is_empty() => found.last().cloned().expect("not empty"),
                _ => return Ok(false),
            },
        };
        let mut record = line.record.clone();
        change(&mut record);
        if record == ChannelRecord::default() {
            return Ok(false); // an emptied record is removed: a change of structure
        }
        let done = lines::rewrite(&file, &line, name, &record)
            .map_err(|e| anyhow::Error::new(e).context(self.cannot_write()))?;
        Ok(done)
    }

    /// The append-locked change of `name`'s record to `record`: in place, as a new line,
    /// a move, or a removal (an empty record).
    fn restructure(
        &self,
        s: &mut Structure,
        name: &str,
        found: &[Line],
        record: &ChannelRecord,
        hint: &mut dyn Hint,
    ) -> anyhow::Result<()> {
        let empty = *record == ChannelRecord::default();
        match found.last() {
            None if empty => return Ok(()),
            Some(line) if !empty && s.rewrite(line, name, record)? => {
                hint.set(Some(line.offset), false)?;
                return Ok(());
            }
            _ => {}
        }
        let at = match empty {
            true => None,
            false => {
                hint.set(None, true)?;
                Some(s.add(name, record)?)
            }
        };
        // The older lines go (all of them for an emptied record); a line in the first slot
        // stays, as the placeholder it is (a record there never needs to move).
        let older: Vec<Line> = found.iter().filter(|l| empty || !l.first).cloned().collect();
        s.blank_all(name, &older)?;
        s.file.sync_data()?;
        hint.set(at, false)?;
        Ok(())
    }

    /// `active.json` ready for a change of structure: the append lock and the shared
    /// state lock held, in this layout, the index describing it. A file that is not (none
    /// yet, another layout, an earlier one, or damaged: `damaged` when a caller found it
    /// so) is first replaced whole under the exclusive state lock.
    fn settle(&self, waits: Waits, damaged: bool) -> Result<Structure<'a>, RecordError> {
        let mut index = Index::new(locks::append_lock(self.dir, waits)?);
        let mut replaced = false;
        loop {
            if !damaged || replaced {
                let shared = locks::state_lock(self.dir, false, waits)?;
                if let View::Slots(file, header) = self.view(true)?
                    && header.epoch != 0
                {
                    let mut s = Structure { file, header, index, _state: shared };
                    if s.check().map_err(|e| anyhow::Error::new(e).context(self.cannot_write()))?
                        == Checked::Ready
                    {
                        return Ok(s);
                    }
                    index = s.index;
                }
            }
            if replaced {
                return Err(anyhow::anyhow!("{} keeps changing under chan-run", self.shown()).into());
            }
            let _exclusive = locks::state_lock(self.dir, true, waits)?;
            let state = match self.view(false)? {
                View::Missing => StateFile::default(),
                View::Other(state) => state,
                View::Slots(file, _) => match self.whole(file)? {
                    View::Other(state) => state,
                    View::Damaged(why) => self.quarantined(&why)?,
                    View::Missing | View::Slots(..) => self.quarantined("a record in it is not valid")?,
                },
                View::Damaged(why) => self.quarantined(&why)?,
            };
            let written = self.fresh(state, "", &mut |_| {})?;
            index.rebuild(written.epoch, written.end, written.lines).map_err(|e| {
                anyhow::Error::new(e).context(format!(
                    "cannot write active.json's index {}",
                    self.path.join(index::NAME).display()
                ))
            })?;
            replaced = true;
        }
    }

    fn quarantined(&self, why: &str) -> anyhow::Result<StateFile> {
        self.quarantine(why)?;
        Ok(StateFile::default())
    }
}

/// The record among a channel's lines (the last one), and where it is.
fn newest(found: &[Line]) -> (ChannelRecord, Option<u64>) {
    found.last().map_or((ChannelRecord::default(), None), |l| (l.record.clone(), Some(l.offset)))
}

/// A line that read as invalid, read again a few times (a concurrent in-place write).
fn reread(file: &std::fs::File, offset: u64, line: &[u8]) -> Slot {
    let slot = layout::parse_slot(line);
    if slot != Slot::Bad {
        return slot;
    }
    for _ in 0..3 {
        std::thread::yield_now();
        let mut again = vec![0u8; line.len()];
        if std::os::unix::fs::FileExt::read_exact_at(file, &mut again, offset).is_err() {
            break;
        }
        let slot = layout::parse_slot(&again);
        if slot != Slot::Bad {
            return slot;
        }
    }
    Slot::Bad
}
