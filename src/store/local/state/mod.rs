//! `active.json`: every channel's record in one JSON document, laid out in slots
//! (`slots.rs`) so that a run reads and writes only its own record: O(1) in the number
//! of channels, in time and in memory.
//!
//! Who may write what: a channel's slot only by the holder of that channel's lock, so
//! no two writers ever touch the same bytes. The state lock (`flock` on the state
//! directory) is taken shared for an in-place update and exclusive for a change of
//! structure (a new record appended, a record moved to a bigger slot, a new file), so
//! a structural change never copies a slot while it is being rewritten. Each is held for
//! the update's own milliseconds, never for a command's run. A record's position is
//! remembered in the channel's lock file (a hint, checked against the name in the slot;
//! a stale hint costs one scan, never a wrong record).
//!
//! Each step and what a crash there leaves (in brackets):
//! - in place: `pwrite` of the slot (at most 4 KiB, inside one page), `fdatasync`
//!   [the old record or the new one: a page-internal write is not torn by a dying process];
//! - append: `pwrite` of filler, slot and the closing `}}` over the old closing bytes,
//!   `fdatasync` [if torn, the file no longer ends in `}}`: the next append sees it and
//!   handles the file as damaged; the records before are intact];
//! - move to a bigger slot, or a new file: a copy with the one change, written to a temp
//!   file in the same directory (0600, `O_EXCL`), fsync, rename over `active.json`, fsync
//!   of the directory [a stray temp file; `active.json` untouched]. Moves keep every
//!   other record at its offset, so no other channel's hint goes stale.
//!
//! Checks, each run: the header, the file's end (`}}` after whole slots) and its own
//! slot; a scan (a new channel, a stale hint) checks the shape of every slot it passes.
//! Where the layout does not hold, the file is read as plain JSON: valid state in
//! another layout (hand-edited, `{}`, a newline added) is converted on the first write;
//! anything else is damage, moved to a fresh `active.json.corrupt-<UTC time>` name (a
//! no-replace rename) with a warning, the state starting empty. A damaged record of
//! another channel is neither met nor touched by a run that rewrites its own slot in
//! place; `status` names it, and that channel's next run moves the file aside. A newer
//! `version`, a file that cannot be read or is not a regular file, is an error and is
//! left untouched. A write that `RLIMIT_FSIZE` would cut short is refused before it
//! starts. Readers of the whole file (`status`, `jq`) may meet a record mid-update;
//! `status` re-reads such a slot.

mod layout;

use crate::control::Control;
use crate::state::{ChannelRecord, StateFile, VERSION};
use anyhow::{Context, bail};
use layout::{self as slots, Header, Slot};
use rustix::fd::OwnedFd;
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

const NAME: &str = "active.json";

pub enum Loaded {
    State(StateFile),
    Damaged(String),
}

pub struct ActiveFile<'a> {
    dir: &'a OwnedFd,
    path: &'a Path,
    /// How waits for the state's locks end early (signals); `None` for readers that
    /// never wait.
    #[allow(dead_code)]
    control: Option<&'static Control>,
}

/// What `active.json` is right now.
enum View {
    Missing,
    Slots(File, Header),
    /// Valid state JSON in another layout.
    Other(StateFile),
    Damaged(String),
}

/// What `copy_blanking` wrote.
struct Copied {
    written: u64,
    kept_member: bool,
    blanked: Vec<(String, ChannelRecord)>,
}

/// `active.json` as it bears on one channel.
enum Resolved {
    Missing,
    Other(StateFile),
    Damaged(String),
    Slot(File, Header, Option<Box<Found>>),
}

enum Lookup {
    Found(Box<Found>),
    Absent,
    /// A slot on the way does not parse: the layout does not hold.
    Broken,
}

/// A channel's slot, as found.
struct Found {
    offset: u64,
    size: u64,
    first: bool,
    record: ChannelRecord,
}

impl<'a> ActiveFile<'a> {
    pub fn new(dir: &'a super::dir::StateDir, control: Option<&'static Control>) -> ActiveFile<'a> {
        ActiveFile { dir: &dir.fd, path: &dir.path, control }
    }

    /// The whole state, for `status`: streamed slot by slot; never repairs anything.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        match self.load_unlocked()? {
            // Maybe caught mid-append (the end is rewritten then): look again once no
            // structural change is under way. Runs hold this lock only for milliseconds.
            Loaded::Damaged(_) => {
                let _shared = self.lock(false)?;
                self.load_unlocked()
            }
            loaded => Ok(loaded),
        }
    }

    fn load_unlocked(&self) -> anyhow::Result<Loaded> {
        match self.view()? {
            View::Missing => Ok(Loaded::State(StateFile::default())),
            View::Other(state) => Ok(Loaded::State(state)),
            View::Damaged(why) => Ok(Loaded::Damaged(format!("{why}; the next run moves it aside"))),
            View::Slots(file, header) => {
                let mut state = extras_of(&header);
                let mut bad = None;
                each_slot(&file, &header, |offset, line| match slots::parse_slot(line) {
                    Slot::Member { name, record } => {
                        state.channels.insert(name, *record);
                    }
                    Slot::Filler => {}
                    // Maybe caught mid-update: read it again before calling it damage.
                    Slot::Bad => match reread(&file, offset, line.len()) {
                        Some((name, record)) => {
                            state.channels.insert(name, record);
                        }
                        None => {
                            if bad.is_none() {
                                bad = Some((offset, slots::key_of(line)));
                            }
                        }
                    },
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
        }
    }

    /// One channel's record, without locking (only this channel's lock holder writes
    /// it). A damaged file is moved aside here, before the command runs.
    pub fn read_channel(
        &self,
        name: &str,
        hint: Option<u64>,
    ) -> anyhow::Result<(ChannelRecord, Option<u64>)> {
        match self.resolve(false, name, hint)? {
            Resolved::Missing => Ok((ChannelRecord::default(), None)),
            Resolved::Other(mut state) => Ok((state.channels.remove(name).unwrap_or_default(), None)),
            Resolved::Slot(_, _, found) => {
                Ok(found.map_or((ChannelRecord::default(), None), |f| (f.record, Some(f.offset))))
            }
            Resolved::Damaged(_) => {
                let _lock = self.lock(true)?;
                if let Resolved::Damaged(why) = self.resolve(false, name, hint)? {
                    self.quarantine(&why)?;
                }
                Ok((ChannelRecord::default(), None))
            }
        }
    }

    /// The file as it bears on `name`: its slot (found or not), or, where the slot
    /// layout does not hold up (a record that does not parse), the whole file read as
    /// plain JSON: valid state in another layout, or damage.
    fn resolve(&self, writable: bool, name: &str, hint: Option<u64>) -> anyhow::Result<Resolved> {
        Ok(match self.view_for(writable)? {
            View::Missing => Resolved::Missing,
            View::Other(state) => Resolved::Other(state),
            View::Damaged(why) => Resolved::Damaged(why),
            View::Slots(file, header) => match find(&file, &header, name, hint)? {
                Lookup::Found(found) => Resolved::Slot(file, header, Some(found)),
                Lookup::Absent => Resolved::Slot(file, header, None),
                Lookup::Broken => match self.whole(file)? {
                    View::Other(state) => Resolved::Other(state),
                    View::Damaged(why) => Resolved::Damaged(why),
                    _ => Resolved::Damaged("a record in it is not valid".into()),
                },
            },
        })
    }

    /// The read-modify-write of one channel's record; returns where the record now is.
    /// `change` may be called more than once, each time on a freshly read record.
    pub fn update_channel(
        &self,
        name: &str,
        hint: Option<u64>,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> anyhow::Result<Option<u64>> {
        {
            let _shared = self.lock(false)?;
            if let Resolved::Slot(file, _, Some(found)) = self.resolve(true, name, hint)?
                && let Some(offset) = self.in_place(&file, name, *found, change)?
            {
                return Ok(Some(offset));
            }
        }
        let _exclusive = self.lock(true)?;
        match self.resolve(true, name, hint)? {
            Resolved::Missing => self.fresh(StateFile::default(), name, change),
            Resolved::Other(state) => self.fresh(state, name, change),
            Resolved::Damaged(why) => {
                self.quarantine(&why)?;
                self.fresh(StateFile::default(), name, change)
            }
            Resolved::Slot(file, header, Some(found)) => {
                let offset = found.offset;
                match self.in_place(&file, name, *found, change)? {
                    Some(offset) => Ok(Some(offset)),
                    None => self.grow(&file, &header, name, offset, change),
                }
            }
            Resolved::Slot(file, header, None) => self.append(&file, &header, name, change),
        }
    }

    /// Rewrites the slot where it is, if the changed record still fits.
    fn in_place(
        &self,
        file: &File,
        name: &str,
        mut found: Found,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> anyhow::Result<Option<u64>> {
        change(&mut found.record);
        if found.record == ChannelRecord::default() {
            return Ok(None); // an empty record is dropped: a structural change
        }
        let member = slots::member(found.first, name, &found.record);
        if !slots::fits(member.len(), found.size) {
            return Ok(None);
        }
        let line = slots::slot(found.first, name, &found.record, found.size);
        within_size_limit(found.offset + found.size).with_context(|| self.cannot_write())?;
        file.write_all_at(&line, found.offset).with_context(|| self.cannot_write())?;
        file.sync_data().with_context(|| self.cannot_write())?;
        Ok(Some(found.offset))
    }

    /// Adds a record at the end, over the closing bytes.
    fn append(
        &self,
        file: &File,
        header: &Header,
        name: &str,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> anyhow::Result<Option<u64>> {
        let mut record = ChannelRecord::default();
        change(&mut record);
        if record == ChannelRecord::default() {
            return Ok(None);
        }
        let Some(end) = closing(file, header)? else {
            self.quarantine("it does not end as written")?;
            return self.fresh(StateFile::default(), name, change);
        };
        let first = end == header.len;
        let member = slots::member(first, name, &record);
        let size = slots::size_for(member.len()).context("the channel's record is too big to store")?;
        let offset = slots::align(end, size);
        let mut bytes = slots::fillers(end, offset);
        bytes.extend(slots::slot(first, name, &record, size));
        bytes.extend(slots::TRAILER);
        within_size_limit(end + bytes.len() as u64).with_context(|| self.cannot_write())?;
        if let Err(e) = file.write_all_at(&bytes, end) {
            // Put the closing bytes back (they were inside the file, so this needs no new
            // space), then cut what was added: the file is as it was.
            let _ = file.write_all_at(slots::TRAILER, end);
            let _ = file.set_len(end + slots::TRAILER.len() as u64);
            return Err(e).with_context(|| self.cannot_write());
        }
        file.sync_data().with_context(|| self.cannot_write())?;
        Ok(Some(offset))
    }

    /// Moves a record that outgrew its slot to a bigger one at the end: a copy of the
    /// file with that slot blanked, every other slot at its offset.
    fn grow(
        &self,
        file: &File,
        header: &Header,
        name: &str,
        old: u64,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> anyhow::Result<Option<u64>> {
        let mut out = self.temp()?;
        let mut body = BufWriter::with_capacity(256 * 1024, out.as_file_mut());
        let Some(copied) = self.copy_blanking(file, header, &mut body, |offset, _| offset == old)? else {
            drop(body);
            self.quarantine("a record in it is not valid JSON")?;
            return self.fresh(StateFile::default(), name, change);
        };
        let mut record = copied.blanked.into_iter().next().map(|(_, r)| r).unwrap_or_default();
        change(&mut record);
        let first = !copied.kept_member;
        let member = slots::member(first, name, &record);
        let size = slots::size_for(member.len()).context("the channel's record is too big to store")?;
        let offset = slots::align(copied.written, size);
        let mut tail = slots::fillers(copied.written, offset);
        tail.extend(slots::slot(first, name, &record, size));
        tail.extend(slots::TRAILER);
        body.write_all(&tail).and_then(|()| body.flush()).with_context(|| self.cannot_write())?;
        drop(body);
        self.persist(out)?;
        Ok(Some(offset))
    }

    /// Removes the records of `names` (`gc`): a copy with their slots blanked, every
    /// other record at its offset. A damaged file is left alone (an error).
    pub fn remove(&self, names: &[String]) -> anyhow::Result<()> {
        let _exclusive = self.lock(true)?;
        match self.view_for(false)? {
            View::Missing => Ok(()),
            View::Damaged(why) => bail!("{} is damaged ({why}); any run moves it aside", self.shown()),
            View::Other(mut state) => {
                state.channels.retain(|name, _| !names.contains(name));
                self.fresh(state, "", &mut |_| {}).map(drop)
            }
            View::Slots(file, header) => {
                let mut out = self.temp()?;
                let mut body = BufWriter::with_capacity(256 * 1024, out.as_file_mut());
                let copied =
                    self.copy_blanking(&file, &header, &mut body, |_, name| names.iter().any(|n| n == name))?;
                if copied.is_none() {
                    bail!("a record in {} is not valid JSON; any run moves it aside", self.shown());
                }
                body.write_all(slots::TRAILER)
                    .and_then(|()| body.flush())
                    .with_context(|| self.cannot_write())?;
                drop(body);
                self.persist(out)
            }
        }
    }

    /// Copies the header and every slot to `body`, each at its own offset: the members
    /// `blank(offset, name)` picks become fillers (and are returned), the separators of
    /// the members kept are made right (a space for the first, commas after). `None` if
    /// a slot is not valid: the file is damaged.
    fn copy_blanking(
        &self,
        file: &File,
        header: &Header,
        body: &mut impl Write,
        mut blank: impl FnMut(u64, &str) -> bool,
    ) -> anyhow::Result<Option<Copied>> {
        let mut head = vec![0u8; header.len as usize];
        file.read_exact_at(&mut head, 0).with_context(|| self.cannot_write())?;
        body.write_all(&head).with_context(|| self.cannot_write())?;
        let mut copied = Copied { written: header.len, kept_member: false, blanked: Vec::new() };
        let mut damaged = false;
        let mut failed = None;
        each_slot(file, header, |offset, line| {
            let mut line = line.to_vec();
            match slots::parse_slot(&line) {
                Slot::Member { name, record } if blank(offset, &name) => {
                    copied.blanked.push((name, *record));
                    line = slots::filler(line.len() as u64);
                }
                Slot::Member { .. } => {
                    line[0] = if copied.kept_member { b',' } else { b' ' };
                    copied.kept_member = true;
                }
                Slot::Filler => {}
                Slot::Bad => damaged = true,
            }
            copied.written += line.len() as u64;
            if failed.is_none() {
                failed = body.write_all(&line).err();
            }
        })?;
        if let Some(e) = failed {
            return Err(e).with_context(|| self.cannot_write());
        }
        Ok((!damaged).then_some(copied))
    }

    /// Writes a new file in this layout from `state` plus the change to `name`.
    fn fresh(
        &self,
        mut state: StateFile,
        name: &str,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> anyhow::Result<Option<u64>> {
        let record = state.channels.entry(name.to_owned()).or_default();
        change(record);
        if *record == ChannelRecord::default() {
            state.channels.remove(name);
        }
        let mut out = self.temp()?;
        let mut body = BufWriter::with_capacity(256 * 1024, out.as_file_mut());
        let head = slots::header(&state.extra);
        let mut written = head.len() as u64;
        body.write_all(&head).with_context(|| self.cannot_write())?;
        let mut ours = None;
        for (i, (channel, record)) in state.channels.iter().enumerate() {
            let member = slots::member(i == 0, channel, record);
            let size = slots::size_for(member.len())
                .with_context(|| format!("the record of channel {channel:?} is too big to store"))?;
            let offset = slots::align(written, size);
            body.write_all(&slots::fillers(written, offset)).with_context(|| self.cannot_write())?;
            body.write_all(&slots::slot(i == 0, channel, record, size))
                .with_context(|| self.cannot_write())?;
            written = offset + size;
            if channel == name {
                ours = Some(offset);
            }
        }
        body.write_all(slots::TRAILER).with_context(|| self.cannot_write())?;
        body.flush().with_context(|| self.cannot_write())?;
        drop(body);
        self.persist(out)?;
        Ok(ours)
    }

    /// A temp file for a rewrite, under the exclusive state lock; temp files of earlier
    /// rewrites that were killed midway are removed first (only this lock's holder
    /// writes one, so any there now is stale).
    fn temp(&self) -> anyhow::Result<tempfile::NamedTempFile> {
        if let Ok(mut dir) = rustix::fs::Dir::read_from(self.dir) {
            while let Some(Ok(entry)) = dir.read() {
                let name = entry.file_name().to_bytes();
                if name.starts_with(b".active.json.") {
                    let _ = rustix::fs::unlinkat(self.dir, entry.file_name(), rustix::fs::AtFlags::empty());
                }
            }
        }
        tempfile::Builder::new()
            .prefix(".active.json.")
            .tempfile_in(self.path)
            .with_context(|| self.cannot_write())
    }

    /// fsync, rename over `active.json`, fsync the directory.
    fn persist(&self, out: tempfile::NamedTempFile) -> anyhow::Result<()> {
        out.as_file().sync_all().with_context(|| self.cannot_write())?;
        out.persist(self.path.join(NAME)).map_err(|e| e.error).with_context(|| self.cannot_write())?;
        rustix::fs::fsync(self.dir).with_context(|| self.cannot_write())?;
        Ok(())
    }

    fn view(&self) -> anyhow::Result<View> {
        self.view_for(false)
    }

    /// `writable`: opened for the in-place writes of an update.
    fn view_for(&self, writable: bool) -> anyhow::Result<View> {
        let access = if writable { OFlags::RDWR } else { OFlags::RDONLY };
        // Non-blocking, so a FIFO planted here cannot hang the open.
        let flags = access | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let file = match rustix::fs::openat(self.dir, NAME, flags, Mode::empty()) {
            Ok(fd) => {
                let kind = rustix::fs::fstat(&fd).map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode));
                match kind {
                    Ok(rustix::fs::FileType::RegularFile) => File::from(fd),
                    Ok(rustix::fs::FileType::Directory) => {
                        return Ok(View::Damaged("it is a directory".into()));
                    }
                    _ => bail!("{} is not a regular file; remove it", self.shown()),
                }
            }
            Err(Errno::ISDIR) => return Ok(View::Damaged("it is a directory".into())),
            Err(Errno::NOENT) => return Ok(View::Missing),
            Err(Errno::LOOP) => {
                bail!("{} is a symbolic link; chan-run never follows one: remove it", self.shown())
            }
            Err(e) => bail!("cannot read {}: {e}; fix it or pass another --state-dir", self.shown()),
        };
        let mut start = vec![0u8; 4096];
        let n = match file.read_at(&mut start, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
                return Ok(View::Damaged("it is a directory".into()));
            }
            Err(e) => bail!("cannot read {}: {e}; fix it or pass another --state-dir", self.shown()),
        };
        if let Some(header) = slots::parse_header(&start[..n]) {
            if header.version > VERSION {
                bail!(self.newer(header.version));
            }
            // The layout's own shape: it ends in `}}` after whole slots. A file that
            // does not is read as plain JSON: converted if valid, else damaged.
            if closing(&file, &header)?.is_some() {
                return Ok(View::Slots(file, header));
            }
        }
        self.whole(file)
    }

    /// The file read as one JSON document: state in another layout, or damage.
    fn whole(&self, mut file: File) -> anyhow::Result<View> {
        file.seek(SeekFrom::Start(0)).with_context(|| format!("cannot read {}", self.shown()))?;
        let value: serde_json::Value =
            match serde_json::from_reader(BufReader::with_capacity(64 * 1024, file)) {
                Ok(v) => v,
                Err(e) if e.is_io() => {
                    bail!("cannot read {}: {e}; fix it or pass another --state-dir", self.shown())
                }
                Err(e) => return Ok(View::Damaged(e.to_string())),
            };
        if let Some(v) = value.get("version").and_then(|v| v.as_u64()).filter(|&v| v > VERSION) {
            bail!(self.newer(v));
        }
        match serde_json::from_value::<StateFile>(value) {
            Ok(state) => Ok(View::Other(state)),
            Err(e) => Ok(View::Damaged(e.to_string())),
        }
    }

    fn lock(&self, exclusive: bool) -> anyhow::Result<StateLock<'_>> {
        let op = if exclusive { FlockOperation::LockExclusive } else { FlockOperation::LockShared };
        loop {
            match rustix::fs::flock(self.dir, op) {
                Err(Errno::INTR) => continue,
                other => other.context("cannot lock the state directory")?,
            }
            return Ok(StateLock(self.dir));
        }
    }

    /// Moves the damaged file aside under a name no other file has, and says so.
    fn quarantine(&self, why: &str) -> anyhow::Result<()> {
        let stamp =
            humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string().replace(':', "");
        for n in 0..1000 {
            let name = match n {
                0 => format!("{NAME}.corrupt-{stamp}"),
                n => format!("{NAME}.corrupt-{stamp}-{n}"),
            };
            match rename_noreplace(self.dir, NAME, &name) {
                Ok(()) => {
                    crate::ui::warn(format!(
                        "{} was damaged ({why}); moved it to {} and started from an empty state",
                        self.shown(),
                        self.path.join(&name).display()
                    ));
                    return Ok(());
                }
                Err(Errno::EXIST) => continue,
                Err(e) => bail!("cannot move the damaged {} aside: {e}", self.shown()),
            }
        }
        bail!("cannot find a free name to move the damaged {} to", self.shown())
    }

    fn newer(&self, version: u64) -> String {
        format!(
            "{} is from a newer chan-run (state version {version}, this one knows {VERSION}); upgrade chan-run",
            self.shown()
        )
    }

    fn cannot_write(&self) -> String {
        format!("cannot write {}", self.shown())
    }

    fn shown(&self) -> String {
        self.path.join(NAME).display().to_string()
    }
}

fn extras_of(header: &Header) -> StateFile {
    StateFile { version: header.version, channels: Default::default(), extra: header.extras.clone() }
}

/// Finds `name`'s slot: at the hint if it is there, else by a scan of the slots.
/// Finds `name`'s slot: at the hint if it is there, else by a scan of the slots, which
/// checks the shape of every slot on its way and parses the one with `name`'s key.
fn find(file: &File, header: &Header, name: &str, hint: Option<u64>) -> anyhow::Result<Lookup> {
    if let Some(offset) = hint.filter(|&o| o >= header.len && o.is_multiple_of(slots::UNIT))
        && let Some(line) = read_slot(file, offset)
        && let Slot::Member { name: found, record } = slots::parse_slot(&line)
        && found == name
    {
        return Ok(Lookup::Found(Box::new(Found {
            offset,
            size: line.len() as u64,
            first: line[0] == b' ',
            record: *record,
        })));
    }
    // A member line starts with its separator and then exactly this.
    let mut key = serde_json::to_vec(name)?;
    key.push(b':');
    let mut result = Lookup::Absent;
    each_slot(file, header, |offset, line| {
        if !slots::looks_whole(line) {
            result = Lookup::Broken;
        } else if matches!(result, Lookup::Absent) && line.get(1..).is_some_and(|l| l.starts_with(&key)) {
            result = match slots::parse_slot(line) {
                Slot::Member { record, .. } => Lookup::Found(Box::new(Found {
                    offset,
                    size: line.len() as u64,
                    first: line[0] == b' ',
                    record: *record,
                })),
                _ => Lookup::Broken,
            };
        }
    })?;
    Ok(result)
}

/// The slot line starting at `offset`, if one ends (at a size it could have) there.
fn read_slot(file: &File, offset: u64) -> Option<Vec<u8>> {
    let mut size = slots::UNIT;
    while size <= slots::MAX_SLOT {
        if !offset.is_multiple_of(size) {
            return None;
        }
        let mut line = vec![0u8; size as usize];
        file.read_exact_at(&mut line, offset).ok()?;
        match line.iter().position(|&b| b == b'\n') {
            Some(end) if end as u64 + 1 == size => return Some(line),
            Some(_) => return None,
            None => size *= 2,
        }
    }
    None
}

/// A slot that read as invalid, read again a few times (a concurrent in-place write).
fn reread(file: &File, offset: u64, len: usize) -> Option<(String, ChannelRecord)> {
    for _ in 0..3 {
        let mut line = vec![0u8; len];
        file.read_exact_at(&mut line, offset).ok()?;
        if let Slot::Member { name, record } = slots::parse_slot(&line) {
            return Some((name, *record));
        }
        std::thread::yield_now();
    }
    None
}

/// Calls `each(offset, line)` for every slot line between the header and the end.
fn each_slot(file: &File, header: &Header, mut each: impl FnMut(u64, &[u8])) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    reader.seek(SeekFrom::Start(header.len)).context("cannot read active.json")?;
    let mut offset = header.len;
    let mut line = Vec::with_capacity(slots::UNIT as usize);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).context("cannot read active.json")?;
        if n == 0 || line.last() != Some(&b'\n') || line.as_slice() == slots::TRAILER {
            return Ok(());
        }
        each(offset, &line);
        offset += n as u64;
    }
}

/// Where the closing `}}` starts, if the file ends as this layout writes it.
fn closing(file: &File, header: &Header) -> anyhow::Result<Option<u64>> {
    let len = file.metadata().context("cannot read active.json")?.len();
    let Some(end) = len.checked_sub(slots::TRAILER.len() as u64).filter(|&e| e >= header.len) else {
        return Ok(None);
    };
    let mut tail = [0u8; 3];
    file.read_exact_at(&mut tail, end).context("cannot read active.json")?;
    Ok((tail == slots::TRAILER && (end - header.len).is_multiple_of(slots::UNIT)).then_some(end))
}

/// Refuses a write that would reach past `RLIMIT_FSIZE`: the kernel would cut it short
/// (tearing a record), where refusing first leaves the file as it was.
fn within_size_limit(end: u64) -> std::io::Result<()> {
    match rustix::process::getrlimit(rustix::process::Resource::Fsize).current {
        Some(limit) if end > limit => Err(std::io::Error::from_raw_os_error(libc::EFBIG)),
        _ => Ok(()),
    }
}

struct StateLock<'a>(&'a OwnedFd);

impl Drop for StateLock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, FlockOperation::Unlock);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn rename_noreplace(dir: &OwnedFd, from: &str, to: &str) -> rustix::io::Result<()> {
    rustix::fs::renameat_with(dir, from, dir, to, rustix::fs::RenameFlags::NOREPLACE)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn rename_noreplace(dir: &OwnedFd, from: &str, to: &str) -> rustix::io::Result<()> {
    // Under the exclusive state lock nobody else quarantines, so check-then-rename
    // cannot race.
    match rustix::fs::statat(dir, to, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EXIST),
        Err(_) => rustix::fs::renameat(dir, from, dir, to),
    }
}
