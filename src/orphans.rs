//! What is left of a run whose chan-run died: its command's process group. The holder
//! record names the group (the command's pid) and the clock-tick window in which the
//! command was forked; a group is taken as that run's only if its members started at
//! or after the window, and its leader, if still alive, started inside it. A pid number
//! cannot be reused while a group of that id has members, so this never hits a
//! stranger. The group is killed with SIGKILL and waited for (pidfd) until gone.

use crate::procfs::{self, ProcStat};
use rustix::process::{Pid, Signal};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leftover {
    pub pgid: u32,
    /// Ticks read just before the command was forked.
    pub spawn_ticks: u64,
    /// Ticks read just after the fork returned, when chan-run lived to write them.
    pub spawned_ticks: Option<u64>,
}

/// How long to wait for SIGKILLed processes to be gone before carrying on anyway
/// (a process stuck in uninterruptible I/O cannot be hurried).
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// Kills and waits for what is left of `left`; returns how many processes it killed.
pub fn kill(left: &Leftover) -> usize {
    let mut killed = 0;
    let until = Instant::now() + GONE_WITHIN;
    // A member may fork while it is being killed; a few rounds catch its children.
    for _ in 0..8 {
        let members = members(left);
        if members.is_empty() {
            break;
        }
        let Some(pgid) = Pid::from_raw(left.pgid as i32) else { break };
        if rustix::process::kill_process_group(pgid, Signal::KILL).is_err() {
            break;
        }
        killed += members.len();
        wait_gone(&members, until);
        if Instant::now() >= until {
            break;
        }
    }
    killed
}

/// The live members of the group, if the group is `left`'s; empty otherwise.
fn members(left: &Leftover) -> Vec<ProcStat> {
    let latest_leader_start =
        left.spawned_ticks.unwrap_or(left.spawn_ticks + ticks_in(Duration::from_secs(1)));
    let group: Vec<ProcStat> =
        procfs::all().into_iter().filter(|p| p.pgrp == left.pgid && !p.is_dead()).collect();
    let leader_ok = group
        .iter()
        .find(|p| p.pid == left.pgid)
        .is_none_or(|l| (left.spawn_ticks..=latest_leader_start).contains(&l.start_ticks));
    if !leader_ok || group.iter().any(|p| p.start_ticks < left.spawn_ticks) {
        return Vec::new();
    }
    group
}

fn ticks_in(d: Duration) -> u64 {
    (d.as_nanos() / procfs::tick().as_nanos().max(1)) as u64
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn wait_gone(members: &[ProcStat], until: Instant) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    use rustix::process::PidfdFlags;
    for p in members {
        let Some(pid) = Pid::from_raw(p.pid as i32) else { continue };
        let Ok(fd) = rustix::process::pidfd_open(pid, PidfdFlags::empty()) else { continue };
        // The pid may have been reused between the scan and pidfd_open: then it is a
        // stranger and waiting on it is harmless (bounded), never a kill.
        let left = until.saturating_duration_since(Instant::now());
        let timeout = Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&timeout));
    }
}

/// Without `/proc` there are no members to wait for: `members` finds none.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn wait_gone(_members: &[ProcStat], _until: Instant) {}
