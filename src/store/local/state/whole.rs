//! `active.json` as a whole: opening and telling what it is (this layout, valid state in
//! another layout, damage), and the two changes that replace it by a rename under the
//! exclusive state lock: writing it anew (a conversion, or the first file) and moving a
//! damaged one aside. A rename is a copy with the one change, written to a temp file in
//! the same directory (0600, `O_EXCL`), fsync, rename over `active.json`, fsync of the
//! directory [killed: a stray temp file, removed by the next rewrite; `active.json`
//! untouched].

use super::layout::{self, Header, MAX_SLOT};
use super::{ActiveFile, NAME};
use crate::state::{ChannelRecord, StateFile, VERSION};
use anyhow::{Context, bail};
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};

/// What `active.json` is right now.
pub enum View {
    Missing,
    Slots(File, Header),
    /// Valid state JSON in another layout.
    Other(StateFile),
    Damaged(String),
}

/// Where `fresh` put each record.
pub struct Written {
    pub epoch: u64,
    pub end: u64,
    pub lines: Vec<(String, u64)>,
}

impl ActiveFile<'_> {
    /// Opens `active.json` (read-write for writers) and tells what it is. A file of this
    /// layout is taken as such on its header alone: its lines are checked as they are read.
    pub(super) fn view(&self, writable: bool) -> anyhow::Result<View> {
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
        // Read into spare capacity: nothing is zeroed first.
        let mut start = Vec::with_capacity(4096);
        match rustix::io::pread(&file, rustix::buffer::spare_capacity(&mut start), 0)
            .map_err(std::io::Error::from)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
                return Ok(View::Damaged("it is a directory".into()));
            }
            Err(e) => bail!("cannot read {}: {e}; fix it or pass another --state-dir", self.shown()),
        };
        if let Some(header) = layout::parse_header(&start) {
            if header.version > VERSION {
                bail!(self.newer(header.version));
            }
            return Ok(View::Slots(file, header));
        }
        self.whole(file)
    }

    /// The file read as one JSON document: state in another layout, or damage.
    pub(super) fn whole(&self, mut file: File) -> anyhow::Result<View> {
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

    /// Writes a new file in this layout (a new epoch) from `state` plus the change to
    /// `name`; under the exclusive state lock.
    pub(super) fn fresh(
        &self,
        mut state: StateFile,
        name: &str,
        change: &mut dyn FnMut(&mut ChannelRecord),
    ) -> anyhow::Result<Written> {
        let record = state.channels.entry(name.to_owned()).or_default();
        change(record);
        if *record == ChannelRecord::default() {
            state.channels.remove(name);
        }
        let epoch = new_epoch();
        let mut out = self.temp()?;
        let mut body = BufWriter::with_capacity(256 * 1024, out.as_file_mut());
        let head = layout::header(epoch, &state.extra);
        let mut written = head.len() as u64;
        body.write_all(&head).with_context(|| self.cannot_write())?;
        let mut lines = Vec::new();
        for (i, (channel, record)) in state.channels.iter().enumerate() {
            let member = layout::member(i == 0, channel, record);
            let size = layout::size_for(member.len(), i == 0)
                .with_context(|| format!("the record of channel {channel:?} is too big to store"))?;
            let offset = layout::align(written, size);
            body.write_all(&layout::fillers(written, offset)).with_context(|| self.cannot_write())?;
            body.write_all(&layout::slot(i == 0, channel, record, size))
                .with_context(|| self.cannot_write())?;
            written = offset + size;
            lines.push((channel.clone(), offset));
        }
        body.write_all(layout::TRAILER).and_then(|()| body.flush()).with_context(|| self.cannot_write())?;
        drop(body);
        self.persist(out)?;
        Ok(Written { epoch, end: written, lines })
    }

    /// A temp file for a rewrite, under the exclusive state lock; temp files of earlier
    /// rewrites that were killed midway are removed first (only this lock's holder writes
    /// one, so any there now is stale).
    fn temp(&self) -> anyhow::Result<tempfile::NamedTempFile> {
        if let Ok(mut dir) = rustix::fs::Dir::read_from(self.dir) {
            while let Some(Ok(entry)) = dir.read() {
                if entry.file_name().to_bytes().starts_with(b".active.json.") {
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

    /// Moves the damaged file aside under a name no other file has, and says so; under
    /// the exclusive state lock.
    pub(super) fn quarantine(&self, why: &str) -> anyhow::Result<()> {
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

    pub(super) fn cannot_write(&self) -> String {
        format!("cannot write {}", self.shown())
    }

    pub(super) fn shown(&self) -> String {
        self.path.join(NAME).display().to_string()
    }
}

/// The first slot's offset: right after the header, aligned to a whole page.
pub fn first_slot(header: &Header) -> u64 {
    layout::align(header.len, MAX_SLOT)
}

/// A value no earlier `active.json` of this directory had, in all likelihood.
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Refuses a write that would reach past `RLIMIT_FSIZE`: the kernel would cut it short
/// (tearing a record), where refusing first leaves the file as it was.
pub fn within_size_limit(end: u64) -> std::io::Result<()> {
    match rustix::process::getrlimit(rustix::process::Resource::Fsize).current {
        Some(limit) if end > limit => Err(std::io::Error::from_raw_os_error(libc::EFBIG)),
        _ => Ok(()),
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
