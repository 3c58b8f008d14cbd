//! `history/<stem>.log`: a channel's runs as JSON Lines, appended by the channel's lock
//! holder only (so lines never interleave), with one `write` of a whole line under
//! `O_APPEND`. Bounded: past `ROTATE_AT` bytes the log becomes `<stem>.log.1` (the
//! previous `.1` is dropped) and a new log starts, so a channel keeps at most twice that.
//! Not fsynced: it is a record for people, and a run's durable write is its state.

use crate::history::{self, Entry};
use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, OFlags};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

const ROTATE_AT: u64 = 256 * 1024;

pub fn append(dir: &OwnedFd, stem: &str, entry: &Entry) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    let name = format!("{stem}.log");
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::APPEND;
    let mut file = super::dir::file(dir, &name, flags)
        .map_err(|e| anyhow::anyhow!("{}", e.message(&std::path::Path::new("history").join(&name))))?;
    let len = file.metadata()?.len();
    // After a crash mid-append the log ends in a torn line: start on a line of our own.
    let mut last = [b'\n'];
    if len > 0 && file.read_at(&mut last, len - 1)? == 1 && last[0] != b'\n' {
        line.insert(0, b'\n');
    }
    file.write_all(&line)?;
    if len + line.len() as u64 > ROTATE_AT {
        rustix::fs::renameat(dir, &name, dir, format!("{name}.1"))?;
    }
    Ok(())
}

/// The newest `n` entries, from the log and, if it has fewer, the rotated one.
pub fn read(dir: &OwnedFd, stem: &str, n: usize) -> Vec<Entry> {
    let mut entries = history::parse_newest_first(&slurp(dir, &format!("{stem}.log")), n);
    if entries.len() < n {
        let older = history::parse_newest_first(&slurp(dir, &format!("{stem}.log.1")), n - entries.len());
        entries.extend(older);
    }
    entries
}

/// Removes a channel's logs (`gc`).
pub fn remove(dir: &OwnedFd, stem: &str) {
    for name in [format!("{stem}.log"), format!("{stem}.log.1")] {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
}

fn slurp(dir: &OwnedFd, name: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(file) = super::dir::file(dir, name, OFlags::RDONLY) {
        let _ = file.take(4 * ROTATE_AT).read_to_end(&mut buf);
    }
    buf
}
