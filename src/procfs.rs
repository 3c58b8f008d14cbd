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
