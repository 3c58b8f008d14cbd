//! `active.json`: load, quarantine, atomic save, and the serialized read-modify-write.
//!
//! Protocol of an update (crash outcome in brackets): take the state lock (`flock` on
//! the state directory itself, held only for the update's milliseconds) [lock freed];
//! read the file, quarantining a damaged one by a no-replace rename to a fresh
//! `active.json.corrupt-<UTC time>` name [the rename is atomic: the file is either
//! still there or moved whole]; change one record; write a temp file in the same
//! directory (0600, `O_EXCL`), fsync it [a stray temp file; `active.json` untouched];
//! rename it over `active.json` [old or new file, never a mix]; fsync the directory.
//! Readers never lock: a rename never shows them a partial file.

use crate::state::{StateFile, VERSION};
use anyhow::{Context, bail};
use rustix::fd::OwnedFd;
use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

const NAME: &str = "active.json";

pub enum Loaded {
    State(StateFile),
    Damaged(String),
}

pub struct StateFiles<'a> {
    pub dir: &'a OwnedFd,
    pub path: &'a Path,
}

impl StateFiles<'_> {
    /// Reads `active.json` without locking. Unreadable or newer files are errors (exit
    /// 125, untouched); damage is reported, not repaired, here.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let file = match rustix::fs::openat(
            self.dir,
            NAME,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => File::from(fd),
            Err(Errno::NOENT) => return Ok(Loaded::State(StateFile::default())),
            Err(Errno::LOOP) => {
                bail!("{} is a symbolic link; chan-run never follows one: remove it", self.shown())
            }
            Err(e) => bail!("cannot read {}: {e}; fix it or pass another --state-dir", self.shown()),
        };
        let value: serde_json::Value =
            match serde_json::from_reader(BufReader::with_capacity(64 * 1024, file)) {
                Ok(v) => v,
                Err(e) if e.is_io() => match e.io_error_kind() {
                    Some(std::io::ErrorKind::IsADirectory) => {
                        return Ok(Loaded::Damaged("it is a directory".into()));
                    }
                    _ => bail!("cannot read {}: {e}; fix it or pass another --state-dir", self.shown()),
                },
                Err(e) => return Ok(Loaded::Damaged(e.to_string())),
            };
        if let Some(v) = value.get("version").and_then(|v| v.as_u64()).filter(|&v| v > VERSION) {
            bail!(
                "{} is from a newer chan-run (state version {v}, this one knows {VERSION}); upgrade chan-run",
                self.shown()
            );
        }
        match serde_json::from_value::<StateFile>(value) {
            Ok(state) => Ok(Loaded::State(state)),
            Err(e) => Ok(Loaded::Damaged(e.to_string())),
        }
    }

    /// Loads, moving a damaged file aside (under the state lock) with a warning.
    pub fn load_or_quarantine(&self) -> anyhow::Result<StateFile> {
        match self.load()? {
            Loaded::State(s) => Ok(s),
            Loaded::Damaged(_) => {
                let _lock = self.lock()?;
                self.load_locked()
            }
        }
    }

    fn load_locked(&self) -> anyhow::Result<StateFile> {
        match self.load()? {
            Loaded::State(s) => Ok(s),
            Loaded::Damaged(why) => {
                let moved = self.quarantine()?;
                crate::warn(format!(
                    "{} was damaged ({why}); moved it to {} and started from an empty state",
                    self.shown(),
                    self.path.join(&moved).display()
                ));
                Ok(StateFile::default())
            }
        }
    }

    /// The serialized read-modify-write.
    pub fn update(&self, change: impl FnOnce(&mut StateFile)) -> anyhow::Result<()> {
        let _lock = self.lock()?;
        let mut state = self.load_locked()?;
        state.version = VERSION;
        change(&mut state);
        self.save(&state)
    }

    fn lock(&self) -> anyhow::Result<StateLock<'_>> {
        loop {
            match rustix::fs::flock(self.dir, FlockOperation::LockExclusive) {
                Err(Errno::INTR) => continue,
                other => other.context("cannot lock the state directory")?,
            }
            return Ok(StateLock(self.dir));
        }
    }

    fn save(&self, state: &StateFile) -> anyhow::Result<()> {
        let failed = || format!("cannot write {}", self.shown());
        let mut temp =
            tempfile::Builder::new().prefix(".active.json.").tempfile_in(self.path).with_context(failed)?;
        {
            let mut out = BufWriter::with_capacity(64 * 1024, temp.as_file_mut());
            serde_json::to_writer_pretty(&mut out, state).with_context(failed)?;
            out.write_all(b"\n").with_context(failed)?;
            out.flush().with_context(failed)?;
        }
        temp.as_file().sync_all().with_context(failed)?;
        temp.persist(self.path.join(NAME)).map_err(|e| e.error).with_context(failed)?;
        rustix::fs::fsync(self.dir).with_context(failed)?;
        Ok(())
    }

    /// Renames the damaged file to a name no other file has (no-replace rename).
    fn quarantine(&self) -> anyhow::Result<String> {
        let stamp =
            humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string().replace(':', "");
        for n in 0..1000 {
            let name = match n {
                0 => format!("{NAME}.corrupt-{stamp}"),
                n => format!("{NAME}.corrupt-{stamp}-{n}"),
            };
            match rename_noreplace(self.dir, NAME, &name) {
                Ok(()) => return Ok(name),
                Err(Errno::EXIST) => continue,
                Err(e) => bail!("cannot move the damaged {} aside: {e}", self.shown()),
            }
        }
        bail!("cannot find a free name to move the damaged {} to", self.shown())
    }

    fn shown(&self) -> String {
        self.path.join(NAME).display().to_string()
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
    // Under the state lock nobody else quarantines, so check-then-rename cannot race.
    match rustix::fs::statat(dir, to, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EXIST),
        Err(_) => rustix::fs::renameat(dir, from, dir, to),
    }
}
