//! Reading `active.json` line by line, and the changes of its structure, each made
//! holding the append lock and the shared state lock, and each a write inside one
//! aligned slot (so inside one page: a killed process leaves it whole) or a write at
//! the end. Each step, and what a process killed there leaves [in brackets]:
//!
//! - add a line: its index entry first (synced), then one write of fillers, the slot and
//!   the closing `}}` over the old `}}`, `fdatasync`, then the new end in the index [an
//!   entry naming nothing; or a torn end, which the next holder of the append lock finds
//!   (the index's end no longer leads to `}}`) and cuts back to the last whole line];
//! - move a record that outgrew its slot: its holder's hint is cleared first (synced),
//!   then the record is added as a new line, then the old line blanked [two copies: the
//!   one further on, the newer, is the record];
//! - blank a line (its record moved or removed): one write of spaces over its slot; the
//!   first member line instead becomes the placeholder `"K":{}` of a key K that appears
//!   further on, so the first member keeps its separator [either the line or the
//!   placeholder];
//! - move the end back (compaction): the new end in the index (synced), `}}` written
//!   there, the file cut after it [`}}` followed by old lines, which the next holder of
//!   the append lock cuts off; readers of the whole file fail until then].

use super::index::Index;
use super::layout::{self, Header, MAX_OLD_SLOT, MAX_SLOT, Slot, TRAILER, UNIT};
use super::locks::StateLock;
use super::whole::{first_slot, within_size_limit};
use crate::state::ChannelRecord;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

/// `active.json` opened for a change of its structure: the append lock (the index's
/// `flock`) and the shared state lock held, the index checked against the file.
pub struct Structure<'a> {
    pub file: File,
    pub header: Header,
    pub index: Index,
    pub _state: StateLock<'a>,
}

/// One line of a record, as found.
#[derive(Clone, Debug)]
pub struct Line {
    pub offset: u64,
    pub size: u64,
    pub first: bool,
    /// How many bytes of the slot are not padding.
    pub used: u64,
    pub record: ChannelRecord,
}

/// What `Structure::check` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    Ready,
    /// Not as this layout writes it (a line out of place, or an end no write of
    /// chan-run's leaves): read the file whole, as valid JSON to convert, or damage.
    Whole,
}

/// Whether the file ends as this layout writes it (`}}` after whole lines), without
/// the append lock: an add under way may show a torn end, so a `false` is only a
/// reason to look again holding it.
pub fn looks_whole(file: &File, header: &Header) -> io::Result<bool> {
    let len = file.metadata()?.len();
    let mut tail = [0u8; 3];
    Ok(len >= header.len + 3
        && (len - 3 - header.len).is_multiple_of(UNIT)
        && file.read_exact_at(&mut tail, len - 3).is_ok()
        && tail == TRAILER)
}

/// What a scan of the file found: every member line, and where it ends.
pub struct Scan {
    pub lines: Vec<(String, u64)>,
    pub end: u64,
    /// Whole lines past the last `}}` or a torn last line: a write killed midway.
    pub torn: bool,
}

/// The line starting at `offset`, if one ends (at a size it could have) there. One
/// read covers every slot of this layout (the biggest aligned span up to a page); only
/// an older file's bigger slot needs more.
pub fn read_line(file: &File, offset: u64) -> Option<Vec<u8>> {
    if !offset.is_multiple_of(UNIT) {
        return None;
    }
    let mut span = UNIT;
    while span < MAX_SLOT && offset.is_multiple_of(span * 2) {
        span *= 2;
    }
    loop {
        // Read into spare capacity: nothing is zeroed first.
        let mut buf = Vec::with_capacity(span as usize);
        let n = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), offset).ok()?;
        if let Some(end) = layout::find(b'\n', &buf) {
            let size = end as u64 + 1;
            let aligned = size.is_power_of_two() && size >= UNIT && offset.is_multiple_of(size);
            buf.truncate(end + 1);
            return aligned.then_some(buf);
        }
        if n < span as usize || span >= MAX_OLD_SLOT || !offset.is_multiple_of(span * 2) {
            return None;
        }
        span *= 2;
    }
}

/// `name`'s line at `offset`, if that is what is there.
pub fn line_at(file: &File, offset: u64, name: &str) -> Option<Line> {
    let bytes = read_line(file, offset)?;
    parse_line(&bytes, offset, name)
}

fn parse_line(bytes: &[u8], offset: u64, name: &str) -> Option<Line> {
    match layout::parse_slot(bytes) {
        Slot::Member { name: found, record, first } if found == name => {
            let used = layout::rfind(b'}', bytes).map_or(0, |i| i as u64 + 1);
            Some(Line { offset, size: bytes.len() as u64, first, used, record: *record })
        }
        _ => None,
    }
}

/// The line a run read of its channel before the command (`keep_line_at`): its update
/// after the command (`take_line_at`) finds the slot most often byte for byte the same,
/// and parsing the record is most of a read's cost. Only a parse is saved: the slot is
/// read again under the lock and compared in full, and a line is a pure function of
/// the slot's bytes, its offset and the name, so the line taken is the one a parse
/// would give.
type Kept = (u64, String, Vec<u8>, Line);
static KEPT: std::sync::Mutex<Option<Kept>> = std::sync::Mutex::new(None);

fn kept() -> std::sync::MutexGuard<'static, Option<Kept>> {
    KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `line_at`, keeping what it found for `take_line_at`.
pub fn keep_line_at(file: &File, offset: u64, name: &str) -> Option<Line> {
    let bytes = read_line(file, offset)?;
    let line = parse_line(&bytes, offset, name)?;
    *kept() = Some((offset, name.to_owned(), bytes, line.clone()));
    Some(line)
}

/// `line_at`, without parsing the slot again when it holds what `keep_line_at` read.
pub fn take_line_at(file: &File, offset: u64, name: &str) -> Option<Line> {
    let bytes = read_line(file, offset)?;
    match kept().take() {
        Some((at, kept_name, kept_bytes, line))
            if at == offset && kept_name == name && layout::same(&kept_bytes, &bytes) =>
        {
            Some(line)
        }
        _ => parse_line(&bytes, offset, name),
    }
}

/// `name`'s lines among `offsets` (lines that may be gone or another's), in file order
/// (the last is the record); `Err` if one of them does not read as a line at all (read
/// again first, in case a write was under way): where `name`'s record was said to be,
/// that is damage.
pub fn find(file: &File, name: &str, offsets: &[u64]) -> Result<Vec<Line>, Damaged> {
    let mut lines = Vec::new();
    for &at in offsets {
        for tries in 0.. {
            if let Some(line) = line_at(file, at, name) {
                lines.push(line);
                break;
            }
            let bad = match read_line(file, at) {
                Some(bytes) => layout::parse_slot(&bytes) == Slot::Bad,
                None => false,
            };
            if !bad {
                break;
            }
            if tries == 3 {
                return Err(Damaged(format!(
                    "the line at byte {at}, where channel {name:?}'s record was, is not valid"
                )));
            }
            std::thread::yield_now();
        }
    }
    lines.sort_by_key(|l| l.offset);
    lines.dedup_by_key(|l| l.offset);
    Ok(lines)
}

/// A line of the channel's own that does not parse: the file is damaged.
#[derive(Debug)]
pub struct Damaged(pub String);

/// Calls `each(offset, line)` for every line from `from` to the end, stopping after
/// the closing `}}` line; a last line without its newline is passed as it is.
pub fn each_line(file: &File, from: u64, mut each: impl FnMut(u64, &[u8]) -> bool) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    reader.seek(SeekFrom::Start(from))?;
    let mut offset = from;
    let mut line = Vec::with_capacity(UNIT as usize);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || !each(offset, &line) || line.as_slice() == TRAILER {
            return Ok(());
        }
        offset += n as u64;
    }
}

/// Reads every line: `None` if a line in the middle is not one of this layout's (the
/// file is then read whole: another layout, or damage).
pub fn scan(file: &File, header: &Header) -> io::Result<Option<Scan>> {
    let len = file.metadata()?.len();
    let mut out = Scan { lines: Vec::new(), end: header.len, torn: false };
    let mut broken = false;
    let mut closed = false;
    each_line(file, header.len, |offset, line| {
        if line == TRAILER {
            closed = true;
            out.end = offset;
            return false;
        }
        let size = line.len() as u64;
        let in_place =
            size.is_power_of_two() && (UNIT..=MAX_OLD_SLOT).contains(&size) && offset.is_multiple_of(size);
        match layout::parse_slot(line) {
            // A torn write can only be the last thing in the file.
            _ if offset + size == len && !line.ends_with(b"\n") => {
                out.torn = true;
                return false;
            }
            Slot::Bad if offset + size == len => {
                out.torn = true;
                return false;
            }
            _ if !in_place => broken = true,
            Slot::Member { name, .. } => out.lines.push((name, offset)),
            Slot::Filler => {}
            Slot::Bad => broken = true,
        }
        out.end = offset + line.len() as u64;
        !broken
    })?;
    if broken {
        return Ok(None);
    }
    out.torn |= !closed || out.end + TRAILER.len() as u64 != len;
    Ok(Some(out))
}

impl Structure<'_> {
    /// Makes the index describe the file: `Ready` in the usual case (two reads);
    /// else the index is rebuilt from a scan, and a torn end left by a chan-run killed
    /// mid-write is cut back to the last whole line; `Damaged` if the file does not end
    /// or read as this layout writes it (a cut or a change that no write of ours leaves).
    pub fn check(&mut self) -> io::Result<Checked> {
        let end = self.index.head.end;
        let indexed = self.index.is_for(self.header.epoch);
        if indexed && self.ends_at(end)? {
            return Ok(Checked::Ready);
        }
        let Some(scan) = scan(&self.file, &self.header)? else { return Ok(Checked::Whole) };
        // Only an index of this very file knows where the last whole write ended. Past it,
        // an add killed midway (the old `}}` overwritten) or a cut killed between its two
        // steps (`}}` there, old lines after) is ours to finish; anything else is damage.
        let len = self.file.metadata()?.len();
        let mut at_end = [0u8; 3];
        let n = self.file.read_at(&mut at_end, end).unwrap_or(0);
        let cut_midway = n == 3 && at_end == *TRAILER && len > end + 3;
        let added_midway = n > 0 && at_end[0] != b'}';
        if scan.torn && !(indexed && scan.end >= end && (cut_midway || added_midway)) {
            return Ok(Checked::Whole);
        }
        if scan.torn {
            self.file.write_all_at(TRAILER, scan.end)?;
            self.file.set_len(scan.end + TRAILER.len() as u64)?;
            self.file.sync_data()?;
        }
        self.index.rebuild(self.header.epoch, scan.end, scan.lines)?;
        Ok(Checked::Ready)
    }

    fn ends_at(&self, end: u64) -> io::Result<bool> {
        let mut tail = [0u8; 3];
        let len = self.file.metadata()?.len();
        Ok(len == end + 3 && self.file.read_exact_at(&mut tail, end).is_ok() && tail == TRAILER)
    }

    /// Every line of `name`, in file order (the last is the record).
    pub fn lines_of(&self, name: &str) -> Result<Vec<Line>, Damaged> {
        find(&self.file, name, &self.index.lookup(name))
    }

    /// Whether the file has a member line (then one is in the first slot).
    pub fn has_members(&self) -> bool {
        let first = first_slot(&self.header);
        first < self.index.head.end
            && read_line(&self.file, first)
                .is_some_and(|l| matches!(layout::parse_slot(&l), Slot::Member { .. }))
    }

    /// Adds `name`'s record as a new line: in the first slot when the file has no
    /// member, else at the end. Returns its offset.
    pub fn add(&mut self, name: &str, record: &ChannelRecord) -> anyhow::Result<u64> {
        let first = !self.has_members();
        let member = layout::member(first, name, record);
        let Some(size) = layout::size_for(member.len(), first) else {
            anyhow::bail!(
                "the channel's record is {} bytes; the most chan-run stores is {}",
                member.len(),
                layout::MAX_SLOT
            );
        };
        let end = self.index.head.end;
        let at = if first { first_slot(&self.header) } else { layout::align(end, size) };
        self.index.insert(name, at)?;
        self.index.sync()?;
        let slot = layout::slot(first, name, record, size);
        if at + size <= end {
            // Into the fillers of an emptied file: one write inside one page.
            self.file.write_all_at(&slot, at)?;
        } else {
            let mut bytes = layout::fillers(end, at);
            bytes.extend(slot);
            bytes.extend(TRAILER);
            within_size_limit(end + bytes.len() as u64)?;
            if let Err(e) = self.file.write_all_at(&bytes, end) {
                // Put the closing bytes back (they were inside the file, so this needs no
                // new space), then cut what was added: the file is as it was.
                let _ = self.file.write_all_at(TRAILER, end);
                let _ = self.file.set_len(end + TRAILER.len() as u64);
                return Err(e.into());
            }
            self.file.sync_data()?;
            self.index.set_end(at + size)?;
            return Ok(at);
        }
        self.file.sync_data()?;
        Ok(at)
    }

    /// Rewrites `line` with `record` where it is, if it still fits.
    pub fn rewrite(&self, line: &Line, name: &str, record: &ChannelRecord) -> io::Result<bool> {
        rewrite(&self.file, line, name, record)
    }

    /// Blanks `name`'s `line` (the first member line becomes a placeholder).
    fn blank(&mut self, name: &str, line: &Line) -> io::Result<()> {
        // Fillers are written as 512-byte lines, so any aligned place in a hole starts a
        // line (compaction writes records there).
        let blank = || layout::fillers(line.offset, line.offset + line.size);
        let bytes = match line.first {
            false => blank(),
            true => match self.other_key(name)? {
                Some(key) => {
                    self.index.insert(&key, line.offset)?;
                    self.index.sync()?;
                    layout::placeholder(&key, line.size)
                }
                None => blank(),
            },
        };
        self.file.write_all_at(&bytes, line.offset)?;
        self.index.remove(name, line.offset)
    }

    /// Removes every one of `lines` (all of `name`'s), in the order that keeps the file
    /// valid JSON after each write: the first slot's line first while another key can
    /// take the placeholder there (so a crash leaves the record whole), else last (so a
    /// crash leaves at worst the placeholder `{}` of the record being removed).
    pub fn blank_all(&mut self, name: &str, lines: &[Line]) -> io::Result<()> {
        let others = lines.iter().any(|l| l.first) && self.other_key(name)?.is_some();
        let mut lines = lines.to_vec();
        lines.sort_by_key(|l| l.first != others);
        for line in &lines {
            self.blank(name, line)?;
        }
        Ok(())
    }

    /// A key other than `name` with a line further on than the first slot.
    fn other_key(&self, name: &str) -> io::Result<Option<String>> {
        let mut key = None;
        each_line(&self.file, first_slot(&self.header) + layout::MAX_SLOT, |_, line| {
            if let Slot::Member { name: found, .. } = layout::parse_slot(line)
                && found != name
            {
                key = Some(found);
            }
            key.is_none()
        })?;
        Ok(key)
    }

    /// Moves the end back to `end` (nothing but fillers after it).
    pub fn cut_at(&mut self, end: u64) -> io::Result<()> {
        self.index.set_end(end)?;
        self.index.sync()?;
        self.file.write_all_at(TRAILER, end)?;
        self.file.set_len(end + TRAILER.len() as u64)?;
        self.file.sync_data()
    }
}

/// Rewrites `line` in place with `record`, if it still fits its slot (at most a page);
/// `false` if it does not (or the slot is an old one bigger than a page). One write
/// covers the new record and as much padding as the old one's bytes need: the rest of
/// the slot is spaces already.
pub fn rewrite(file: &File, line: &Line, name: &str, record: &ChannelRecord) -> io::Result<bool> {
    let mut member = layout::member(line.first, name, record);
    if !layout::fits(member.len(), line.size) || line.size > layout::MAX_SLOT {
        return Ok(false);
    }
    within_size_limit(line.offset + line.size)?;
    if (member.len() as u64) < line.used {
        member.resize(line.used as usize, b' ');
    }
    file.write_all_at(&member, line.offset)?;
    file.sync_data()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_line_is_taken_only_while_its_slot_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let record = |runs| ChannelRecord { runs, ..ChannelRecord::default() };
        std::fs::write(&path, layout::slot(true, "k", &record(1), UNIT)).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        assert_eq!(keep_line_at(&file, 0, "k").unwrap().record, record(1));
        assert_eq!(take_line_at(&file, 0, "k").unwrap().record, record(1));
        keep_line_at(&file, 0, "k").unwrap();
        file.write_all_at(&layout::slot(true, "k", &record(2), UNIT), 0).unwrap();
        assert_eq!(take_line_at(&file, 0, "k").unwrap().record, record(2), "changed: parsed again");
        keep_line_at(&file, 0, "k").unwrap();
        assert!(take_line_at(&file, 0, "other").is_none(), "another name is not taken");
    }
}
