//! What the kernel says about processes, read from `/proc` (Linux). Identity is pid
//! plus start time in clock ticks since boot (`/proc/PID/stat` field 22), never a pid
//! alone. Elsewhere these return "unknown" and callers stay on the safe side.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub state: u8,
    pub ppid: u32,
    pub pgrp: u32,
    /// Clock ticks since boot when the process was forked.
    pub start_ticks: u64,
}

impl ProcStat {
    /// A zombie or dead entry: it runs nothing and holds nothing but its pid.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// The `stat` line of one process, or `None` if it is gone or unreadable.
pub fn stat(pid: u32) -> Option<ProcStat> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

fn parse_stat(pid: u32, text: &[u8]) -> Option<ProcStat> {
    // The command name (field 2) may hold spaces and ')': fields resume after the last ')'.
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.bytes().next()?; // field 3
    let ppid = fields.next()?.parse().ok()?; // 4
    let pgrp = fields.next()?.parse().ok()?; // 5
    let start_ticks = fields.nth(16)?.parse().ok()?; // 22
    Some(ProcStat { pid, state, ppid, pgrp, start_ticks })
}

/// Whether `pid` names a live (not zombie) process; without `/proc`, `kill(pid, 0)`.
pub fn is_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        return stat(pid).is_some_and(|s| !s.is_dead());
    }
    rustix::process::Pid::from_raw(pid as i32).is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Every process visible in `/proc` (empty where there is no `/proc`).
pub fn all() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).filter_map(stat).collect()
}

/// Now, in the clock `start_ticks` uses (boot time in `CLK_TCK` units).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn now_ticks() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let ticks = rustix::param::clock_ticks_per_second();
    let nanos = now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128;
    (nanos * ticks as u128 / 1_000_000_000) as u64
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn now_ticks() -> u64 {
    0
}

/// How long one tick is.
pub fn tick() -> Duration {
    Duration::from_nanos(1_000_000_000 / rustix::param::clock_ticks_per_second().max(1))
}

/// Whether `pid` is this process's parent, grandparent, ... (false where unknown).
pub fn is_ancestor(pid: u32) -> bool {
    let mut current = match rustix::process::getppid() {
        Some(p) => p.as_raw_nonzero().get() as u32,
        None => return false,
    };
    for _ in 0..4096 {
        if current == pid {
            return true;
        }
        match stat(current) {
            Some(s) if s.ppid != 0 && s.ppid != current => current = s.ppid,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line = b"4242 (a b) c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        let s = parse_stat(4242, line).unwrap();
        assert_eq!((s.state, s.ppid, s.pgrp, s.start_ticks), (b'S', 1, 4242, 987654));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_start_is_before_now() {
        let me = stat(std::process::id()).unwrap();
        assert!(me.start_ticks <= now_ticks());
        assert!(!me.is_dead());
        assert!(is_ancestor(me.ppid));
        assert!(!is_ancestor(std::process::id()));
    }
}

/// A file's identity as `/proc/locks` prints it: device major, minor, inode.
pub type FileId = (u32, u32, u64);

#[allow(clippy::unnecessary_cast)] // st_dev and st_ino differ in type across platforms
pub fn file_id(stat: &rustix::fs::Stat) -> FileId {
    let dev = stat.st_dev as u64;
    (rustix::fs::major(dev as _), rustix::fs::minor(dev as _), stat.st_ino as u64)
}

/// The files on which somebody holds a `flock` right now, from the kernel's lock table
/// (as `lslocks` reads it). Reading it takes nothing and disturbs nobody. `None` where
/// there is no `/proc/locks`.
/// Each maps to the pid that took the lock (as seen from this pid namespace; 0 if
/// the holder is outside it).
pub fn held_flocks() -> Option<std::collections::HashMap<FileId, u32>> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    Some(parse_locks(&text))
}

fn parse_locks(text: &str) -> std::collections::HashMap<FileId, u32> {
    let mut held = std::collections::HashMap::new();
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace().skip(1); // "N:"
        let Some(kind) = words.next() else { continue };
        if kind != "FLOCK" {
            continue; // "->" marks a blocked waiter; POSIX/OFDLCK locks are not ours
        }
        let (Some(pid), Some(id)) = (words.nth(2), words.next()) else { continue };
        let mut parts = id.split(':');
        let (Some(maj), Some(min), Some(ino)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if let (Ok(maj), Ok(min), Ok(ino)) =
            (u32::from_str_radix(maj, 16), u32::from_str_radix(min, 16), ino.parse::<u64>())
        {
            held.insert((maj, min, ino), pid.parse().unwrap_or(0));
        }
    }
    held
}

#[cfg(test)]
mod lock_table_tests {
    use super::*;

    #[test]
    fn granted_flocks_only() {
        let text = "1: FLOCK  ADVISORY  WRITE 8550 fe:00:10018916 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 8551 fe:00:10018916 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 77 00:2d:42 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 9 00:2d:7 0 EOF\n";
        let held = parse_locks(text);
        assert_eq!(held.len(), 2);
        assert_eq!(held.get(&(0xfe, 0, 10018916)), Some(&8550));
        assert_eq!(held.get(&(0, 0x2d, 7)), Some(&9));
        assert!(!held.contains_key(&(0, 0x2d, 42)));
    }
}
