//! Watching the running command until its leader can be reaped: the timeout's stages,
//! forwarded signals, the lock-lost alarm, and the leader's stops (job control).

use super::terminal::Terminal;
use super::{Plan, REAP_AFTER_KILL, Stop, signal_command};
use crate::control::Control;
use crate::pump::Output;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Where the staged stop stands.
struct Stages {
    /// The timeout's SIGTERM, while it has not come.
    term_at: Option<Instant>,
    kill_at: Option<Instant>,
    killed_at: Option<Instant>,
    stop: Option<Stop>,
}

impl Stages {
    /// Acts on what is due at `now`: a forwarded signal, the lock-lost alarm, the
    /// timeout, the SIGKILL.
    fn step(&mut self, now: Instant, pid: Pid, plan: &Plan, control: &Control) {
        if let Some(sig) = control.take_signal() {
            signal_group(pid, sig);
            if self.stop.is_none() {
                self.stop = Some(Stop::Signal(sig));
                self.kill_at = now.checked_add(plan.kill_after);
            }
        }
        if control.lock_lost() && self.stop != Some(Stop::LockLost) {
            signal_group(pid, libc::SIGTERM);
            self.stop = Some(Stop::LockLost);
            let grace = plan.lost_grace.map_or(plan.kill_after, |g| g.min(plan.kill_after));
            self.kill_at = [self.kill_at, now.checked_add(grace)].into_iter().flatten().min();
        }
        if self.term_at.is_some_and(|t| now >= t) {
            self.term_at = None;
            if self.stop.is_none() {
                signal_group(pid, libc::SIGTERM);
                self.stop = Some(Stop::Timeout);
                self.kill_at = now.checked_add(plan.kill_after);
            }
        }
        if self.kill_at.is_some_and(|t| now >= t) {
            self.kill_at = None;
            signal_command(pid, Signal::KILL);
            self.killed_at = Some(now);
        }
    }

    /// Whether the SIGKILLed leader had its time to become reapable.
    fn gave_up(&self, now: Instant) -> bool {
        self.killed_at.is_some_and(|t| now >= t + REAP_AFTER_KILL)
    }

    fn next(&self) -> Option<Instant> {
        let term_at = self.term_at.filter(|_| self.stop.is_none());
        [term_at, self.kill_at, self.killed_at.map(|t| t + REAP_AFTER_KILL)].into_iter().flatten().min()
    }

    /// Moves the timeout's clock on by a spell chan-run spent stopped.
    fn postpone(&mut self, by: Duration) {
        self.term_at = self.term_at.and_then(|t| t.checked_add(by));
    }
}

/// Watches the command's leader `pid` until it can be reaped (or, SIGKILLed and stuck in the kernel, until
/// chan-run gives up on it: status `None`); says whether chan-run stopped it.
pub(super) fn supervise(
    pid: Pid,
    plan: &Plan,
    control: &Control,
    started: Instant,
    output: &mut Output,
    terminal: &mut Terminal,
) -> (Option<ExitStatus>, Option<Stop>) {
    // A deadline too far to represent is no deadline.
    let term_at = plan.timeout.and_then(|t| started.checked_add(t));
    let mut stages = Stages { term_at, kill_at: None, killed_at: None, stop: None };
    loop {
        match leader(pid, terminal.job_control()) {
            Leader::Exited => {
                if stages.stop.is_some() {
                    // The grace ends when the leader does; its group goes with it.
                    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                }
                return (reap(pid), stages.stop);
            }
            Leader::Stopped(sig) if stages.stop.is_none() => stages.postpone(terminal.suspend(pid, sig)),
            // Being stopped by chan-run, it must be able to act on its signal in time.
            Leader::Stopped(_) => signal_command(pid, Signal::CONT),
            Leader::Running => {}
        }
        let now = Instant::now();
        stages.step(now, pid, plan, control);
        if stages.gave_up(now) {
            return (None, stages.stop); // stuck in the kernel; the process exits without it
        }
        let _ = control.wait_also(stages.next(), &output.pending());
        output.poke(|| control.wake_handle());
    }
}

/// Reaps the exited leader.
fn reap(pid: Pid) -> Option<ExitStatus> {
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
            Err(rustix::io::Errno::INTR) => {}
            Ok(Some((_, status))) => return Some(ExitStatus::from_raw(status.as_raw())),
            Ok(None) | Err(_) => return None,
        }
    }
}

enum Leader {
    Running,
    /// Stopped by this signal (reported once).
    Stopped(i32),
    Exited,
}

/// How the leader is, without reaping it (so its group id stays reserved); with
/// `stops`, a stop is reported too, once. One `waitid`; two at a stop.
fn leader(pid: Pid, stops: bool) -> Leader {
    let mut options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    if stops {
        options |= WaitIdOptions::STOPPED;
    }
    match rustix::process::waitid(WaitId::Pid(pid), options) {
        Ok(None) => Leader::Running,
        Ok(Some(status)) if status.stopped() => {
            // Taken, so the next look does not report the same stop (an exit never is).
            let _ = rustix::process::waitid(WaitId::Pid(pid), WaitIdOptions::STOPPED | WaitIdOptions::NOHANG);
            Leader::Stopped(status.stopping_signal().unwrap_or(libc::SIGSTOP))
        }
        Ok(Some(_)) | Err(_) => Leader::Exited,
    }
}

fn signal_group(pid: Pid, sig: i32) {
    if let Some(sig) = Signal::from_named_raw(sig) {
        signal_command(pid, sig);
        signal_command(pid, Signal::CONT);
    }
}
