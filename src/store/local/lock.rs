//! A channel's lock file, `locks/<stem>.lock`, and the holder record inside it.
//!
//! Line 1 is the channel's full name, written by its first holder and checked by every
//! later one (two names whose long stems collide can never share a lock). Line 2 is
//! `at N`: where the channel's record was last seen in `active.json` (a hint, fixed
//! width, rewritten in place; `at -` when unknown). Line 3, while the lock is held, is
//! the holder record: chan-run's pid, the command's pid (= its process group), the
//! clock-tick window of its fork, start time, channel and command.
//!
//! Who writes the command's pid: the command's own process, between `fork` and `exec`,
//! into a fixed-width field (then chan-run again after the spawn). The parent alone
//! could not close the window: std's spawn returns only after the `exec`, so a chan-run
//! killed right then would leave a command that may already have forked descendants,
//! and a record that does not name their group. Written by the child, the record names
//! the group before the command runs a single instruction (the lock file's descriptor
//! is close-on-exec, so the command itself never holds it).
//!
//! A clean end truncates the file back to lines 1-2 before unlocking; a record found by
//! the next holder therefore means the previous run did not end cleanly, and what is
//! left of its command must be killed first. Readers take a record only if it is one
//! whole line of valid JSON: a torn or stale one reads as "unknown", never as an error.

use crate::orphans::Leftover;
use anyhow::{Context, bail};
use rustix::fd::{AsFd, AsRawFd, RawFd};
use serde::Deserialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime};

const PID_WIDTH: usize = 11;
const TICKS_WIDTH: usize = 20;

/// The record as readers see it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct HolderRecord {
    pub pid: u32,
    pub started_at: String,
    pub spawn_ticks: Option<u64>,
    pub spawned_ticks: Option<u64>,
    pub command_pid: Option<u32>,
    pub channel: String,
    pub command: Vec<String>,
}

impl HolderRecord {
    pub fn leftover(&self) -> Option<Leftover> {
        Some(Leftover {
            pgid: self.command_pid?,
            spawn_ticks: self.spawn_ticks?,
            spawned_ticks: self.spawned_ticks,
        })
    }

    pub fn held_for(&self) -> Option<Duration> {
        let since = humantime::parse_rfc3339(&self.started_at).ok()?;
        SystemTime::now().duration_since(since).ok()
    }
}

/// The file's content split into its name line, record hint and holder record, if valid.
pub struct Contents {
    pub name: Option<String>,
    /// Where line 2 starts, if it is a whole `at` line.
    hint_line: Option<usize>,
    pub hint: Option<u64>,
    pub record: Option<HolderRecord>,
    /// Bytes after the header lines (a record, whole or torn).
    pub has_tail: bool,
}

const HINT_LINE: usize = "at ".len() + 20 + 1;

fn hint_line(hint: Option<u64>) -> String {
    match hint {
        Some(offset) => format!("at {offset:<20}\n"),
        None => format!("at {:<20}\n", "-"),
    }
}

pub fn read(file: &File) -> std::io::Result<Contents> {
    // 8 KiB at a time straight into the buffer's spare capacity: nothing is zeroed
    // first. Reading stops once more than 64 KiB is in, as before.
    const CHUNK: usize = 8192;
    let mut buf = Vec::with_capacity(CHUNK);
    while buf.len() <= 64 * 1024 {
        if buf.capacity() - buf.len() < CHUNK {
            buf.reserve_exact(CHUNK);
        }
        let at = buf.len() as u64;
        if rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)? == 0 {
            break;
        }
    }
    Ok(parse(&buf))
}

fn parse(buf: &[u8]) -> Contents {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return Contents { name: None, hint_line: None, hint: None, record: None, has_tail: false };
    };
    let name = std::str::from_utf8(&buf[..nl]).ok().map(str::to_owned);
    let mut tail = &buf[nl + 1..];
    let mut hint_line = None;
    let mut hint = None;
    if tail.len() >= HINT_LINE && tail.starts_with(b"at ") && tail[HINT_LINE - 1] == b'\n' {
        hint_line = Some(nl + 1);
        hint = std::str::from_utf8(&tail[3..HINT_LINE - 1]).ok().and_then(|t| t.trim().parse().ok());
        tail = &tail[HINT_LINE..];
    }
    let record = match tail.iter().position(|&b| b == b'\n') {
        Some(end) if end + 1 == tail.len() => serde_json::from_slice(&tail[..end]).ok(),
        _ => None,
    };
    Contents { name, hint_line, hint, record, has_tail: !tail.is_empty() }
}

/// Makes sure line 1 names `channel` and line 2 is a hint line; an empty file gets
/// both, a different name is refused. Returns the header's length, or `None` (with a
/// warning) if it could not be written.
pub fn claim_name(file: &File, channel: &str, contents: &Contents) -> anyhow::Result<Option<u64>> {
    match (&contents.name, contents.hint_line) {
        (Some(name), Some(at)) if name == channel => Ok(Some((at + HINT_LINE) as u64)),
        (Some(other), _) if other != channel => bail!(
            "the lock file of channel {channel:?} belongs to channel {other:?} (their shortened names collide); use a shorter channel name"
        ),
        _ => {
            let header = format!("{channel}\n{}", hint_line(None));
            match file.set_len(0).and_then(|()| file.write_all_at(header.as_bytes(), 0)) {
                Ok(()) => Ok(Some(header.len() as u64)),
                Err(e) => {
                    let _ = file.set_len(0);
                    crate::ui::warn(format!(
                        "cannot write the lock file ({e}); running without a holder record"
                    ));
                    Ok(None)
                }
            }
        }
    }
}

/// Rewrites the record hint in place (fixed width: the record after it does not move).
pub fn write_hint(file: &File, header_len: u64, hint: Option<u64>) -> std::io::Result<()> {
    file.write_all_at(hint_line(hint).as_bytes(), header_len - HINT_LINE as u64)
}

/// Where the fixed-width fields of a written holder record are.
#[derive(Clone, Copy, Debug)]
pub struct Fields {
    pub pid: u64,
    pub spawned_ticks: u64,
}

/// Writes the holder record after the header lines; returns where its fields are.
pub fn announce(
    file: &File,
    header_len: u64,
    channel: &str,
    holder: &crate::store::Holder,
) -> anyhow::Result<Fields> {
    let started_at = humantime::format_rfc3339_millis(holder.started_at).to_string();
    let command = crate::store::capped(holder.command);
    let mut line = format!(
        r#"{{"pid":{},"started_at":{},"spawn_ticks":{},"spawned_ticks":"#,
        holder.pid,
        serde_json::to_string(&started_at)?,
        holder.spawn_ticks
    );
    let spawned_ticks = line.len() as u64;
    line.push_str(&format!("{:<TICKS_WIDTH$}", "null"));
    line.push_str(r#","command_pid":"#);
    let pid = line.len() as u64;
    line.push_str(&format!("{:<PID_WIDTH$}", "null"));
    line.push_str(&format!(
        r#","channel":{},"command":{}}}"#,
        serde_json::to_string(channel)?,
        serde_json::to_string(&command)?
    ));
    line.push('\n');
    file.write_all_at(line.as_bytes(), header_len).context("cannot write the holder record")?;
    file.set_len(header_len + line.len() as u64).context("cannot write the holder record")?;
    Ok(Fields { pid: header_len + pid, spawned_ticks: header_len + spawned_ticks })
}

/// Where the command's process writes its own pid: (fd, offset, width).
pub fn pid_field(file: &File, fields: Fields) -> (RawFd, u64, usize) {
    (file.as_fd().as_raw_fd(), fields.pid, PID_WIDTH)
}

pub fn write_spawned(file: &File, fields: Fields, pid: u32, ticks: u64) {
    // Best effort: the command's own pre-exec write already named the group.
    let _ = file.write_all_at(format!("{:<PID_WIDTH$}", pid).as_bytes(), fields.pid);
    let _ = file.write_all_at(format!("{:<TICKS_WIDTH$}", ticks).as_bytes(), fields.spawned_ticks);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_or_partial_records_read_as_unknown() {
        let full = br#"chan
at 1024                
{"pid":1,"started_at":"2026-01-01T00:00:00.000Z","spawn_ticks":5,"spawned_ticks":6                   ,"command_pid":7          ,"channel":"chan","command":["a"]}
"#;
        let c = parse(full);
        assert_eq!(c.name.as_deref(), Some("chan"));
        assert_eq!(c.hint, Some(1024));
        let rec = c.record.unwrap();
        assert_eq!(rec.command_pid, Some(7));
        assert_eq!(rec.leftover().unwrap().spawned_ticks, Some(6));
        for cut in [5, 30, full.len() - 1] {
            let c = parse(&full[..cut]);
            assert!(c.record.is_none(), "{cut}");
        }
        assert!(parse(b"chan\n").record.is_none());
        let no_hint = parse(format!("chan\nat {:<20}\n", "-").as_bytes());
        assert_eq!((no_hint.hint, no_hint.hint_line, no_hint.has_tail), (None, Some(5), false));
    }
}
