//! What `gc` does to `active.json`: removes the lines of channels it holds, and
//! compacts the file when at least half of it is free space: the last records move, a
//! batch at a time, into the lowest free slots that fit them, and the end moves back
//! over what they left (lines.rs gives each step's crash outcome). Moving a record needs
//! its channel's lock (a holder's in-place write must not land in a copy being left), so
//! a busy last record stops the compaction until the next `gc`. Each batch holds the
//! append lock for a few writes and syncs; runs that rewrite their records in place
//! never wait for it.

use super::layout::{self, MAX_OLD_SLOT, MAX_SLOT, Slot, UNIT};
use super::lines::{self, Line, Structure};
use super::locks::Waits;
use super::whole::first_slot;
use super::{ActiveFile, Hint};
use crate::store::RecordError;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Records moved per batch (and channel locks held at once).
const BATCH: usize = 64;
/// Files smaller than this are not worth compacting.
const SMALL: u64 = 64 * 1024;

/// A channel `gc` holds while it moves its record: the hint in its lock file.
pub type Held = Box<dyn Hint>;

/// What a compaction did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    pub moved: usize,
    pub before: u64,
    pub after: u64,
}

impl ActiveFile<'_> {
    /// Removes every line of the channels `names` (`gc`, holding their locks).
    pub fn remove(&self, names: &[String]) -> Result<(), RecordError> {
        let mut s = self.settle(Waits::new(self.control), false)?;
        for name in names {
            let found = s.lines_of(name).map_err(|d| anyhow::anyhow!("{}: {}", self.shown(), d.0))?;
            s.blank_all(name, &found).map_err(|e| anyhow::Error::new(e).context(self.cannot_write()))?;
        }
        s.file.sync_data().map_err(|e| anyhow::Error::new(e).context(self.cannot_write()))?;
        Ok(())
    }

    /// Compacts the file if at least half of it is free: `hold(name)` takes a channel's
    /// lock without waiting (`None` if it is busy).
    pub fn compact(&self, hold: &mut dyn FnMut(&str) -> Option<Held>) -> Result<Compacted, RecordError> {
        let failed =
            |e: std::io::Error| RecordError::from(anyhow::Error::new(e).context(self.cannot_write()));
        let mut s = self.settle(Waits::new(self.control), false)?;
        let end = s.index.head.end;
        let mut done = Compacted { moved: 0, before: end, after: end };
        if !s.has_members() {
            if end > s.header.len {
                s.cut_at(s.header.len).map_err(failed)?;
            }
            done.after = s.header.len;
            return Ok(done);
        }
        // Found once: only compaction fills a hole (records added or moved go to the end).
        let floor = first_slot(&s.header) + MAX_SLOT;
        let mut holes = holes(&s.file, floor, end).map_err(failed)?;
        let free: u64 = holes.iter().map(|h| h.1).sum();
        if end < SMALL || free * 2 < end - floor {
            return Ok(done);
        }
        loop {
            let moved = batch(&mut s, &mut holes, hold).map_err(failed)?;
            done.moved += moved;
            done.after = s.index.head.end;
            if moved == 0 {
                return Ok(done);
            }
            // Between batches the append lock is let go, so new channels are not held up.
            drop(s);
            s = self.settle(Waits::new(self.control), false)?;
        }
    }
}

/// One batch: the last records move into the lowest holes, then the end moves back.
fn batch(
    s: &mut Structure,
    holes: &mut Vec<(u64, u64)>,
    hold: &mut dyn FnMut(&str) -> Option<Held>,
) -> std::io::Result<usize> {
    let mut moves: Vec<(String, Line, u64, Held)> = Vec::new();
    // `at` walks back from the end; `cut` is the lowest line moved so far.
    let (mut at, mut cut) = (s.index.head.end, s.index.head.end);
    let floor = first_slot(&s.header) + MAX_SLOT;
    // Every copy must land below every line of the batch, so the end can pass them all.
    let mut highest_spot_end = 0;
    while moves.len() < BATCH {
        let Some((offset, bytes)) = line_before(&s.file, at, floor.max(highest_spot_end))? else { break };
        at = offset;
        let name = match layout::parse_slot(&bytes) {
            Slot::Filler => continue,
            Slot::Member { name, .. } => name,
            Slot::Bad => break,
        };
        let size = bytes.len() as u64;
        let Some(spot) = take_hole(holes, size, offset) else { break };
        let Some(held) = hold(&name) else { break };
        // Read again under the channel's lock: its holder may have rewritten it.
        let Some(line) = lines::line_at(&s.file, offset, &name) else { break };
        if !all_spaces(&s.file, spot, size)? {
            break;
        }
        s.index.insert(&name, spot)?;
        highest_spot_end = highest_spot_end.max(spot + size);
        moves.push((name, line, spot, held));
        cut = offset;
    }
    if moves.is_empty() {
        return Ok(0);
    }
    s.index.sync()?;
    for (name, line, spot, _) in &moves {
        s.file.write_all_at(&layout::slot(false, name, &line.record, line.size), *spot)?;
    }
    s.file.sync_data()?;
    // Past `cut` there are only the moved lines and fillers: the end goes back over
    // them (and the fillers before), then each holder's hint names the new place.
    let end = trailing_fillers(&s.file, cut, floor)?;
    for (name, line, _, _) in &moves {
        s.index.remove(name, line.offset)?;
    }
    s.cut_at(end)?;
    let n = moves.len();
    for (_, _, spot, mut held) in moves {
        held.set(Some(spot), false)?;
    }
    Ok(n)
}

/// Whether the `size` bytes at `at` are a free place: filler lines only, the first
/// starting right there.
fn all_spaces(file: &File, at: u64, size: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; size as usize + 1];
    file.read_exact_at(&mut buf, at - 1)?;
    Ok(buf[0] == b'\n' && buf[1..].iter().all(|&b| b == b' ' || b == b'\n'))
}

/// Where a run of fillers ending at `to` starts (not below `floor`).
fn trailing_fillers(file: &File, mut to: u64, floor: u64) -> std::io::Result<u64> {
    while let Some((offset, bytes)) = line_before(file, to, floor)? {
        if layout::parse_slot(&bytes) != Slot::Filler {
            break;
        }
        to = offset;
    }
    Ok(to)
}

/// The lowest free place for a slot of `size` below `limit` (aligned to its size),
/// taken out of `holes`.
fn take_hole(holes: &mut Vec<(u64, u64)>, size: u64, limit: u64) -> Option<u64> {
    for i in 0..holes.len() {
        let (start, len) = holes[i];
        let spot = layout::align(start, size);
        if spot + size <= start + len && spot + size <= limit {
            holes.remove(i);
            if spot > start {
                holes.insert(i, (start, spot - start));
            }
            if spot + size < start + len {
                holes.insert(i + usize::from(spot > start), (spot + size, start + len - spot - size));
            }
            return Some(spot);
        }
    }
    None
}

/// The runs of filler lines between `from` and `end`: (start, length).
fn holes(file: &File, from: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut holes: Vec<(u64, u64)> = Vec::new();
    if from >= end {
        return Ok(holes);
    }
    lines::each_line(file, from, |offset, line| {
        if offset >= end {
            return false;
        }
        if layout::parse_slot(line) == Slot::Filler {
            match holes.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += line.len() as u64,
                _ => holes.push((offset, line.len() as u64)),
            }
        }
        true
    })?;
    Ok(holes)
}

/// The line that ends just before `pos` (a line boundary), if it starts at or above
/// `floor`: its offset and bytes.
fn line_before(file: &File, pos: u64, floor: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let mut span = UNIT.min(pos.saturating_sub(floor));
    while span > 0 {
        let mut buf = vec![0u8; span as usize];
        file.read_exact_at(&mut buf, pos - span)?;
        if let Some(nl) = buf[..buf.len() - 1].iter().rposition(|&b| b == b'\n') {
            return Ok(Some((pos - span + nl as u64 + 1, buf[nl + 1..].to_vec())));
        }
        if pos - span == floor {
            return Ok(Some((floor, buf)));
        }
        if span >= MAX_OLD_SLOT {
            return Ok(None);
        }
        span = (span * 2).min(pos - floor);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_taken_lowest_first_at_aligned_places() {
        let mut holes = vec![(4608, 512), (8192, 4096)];
        assert_eq!(take_hole(&mut holes, 1024, 100_000), Some(8192));
        assert_eq!(holes, [(4608, 512), (9216, 3072)]);
        assert_eq!(take_hole(&mut holes, 512, 100_000), Some(4608));
        assert_eq!(take_hole(&mut holes, 2048, 100_000), Some(10240));
        assert_eq!(holes, [(9216, 1024), (12288, 0)].into_iter().filter(|h| h.1 > 0).collect::<Vec<_>>());
        assert_eq!(take_hole(&mut holes, 512, 9000), None, "never above the line that moves");
    }
}
