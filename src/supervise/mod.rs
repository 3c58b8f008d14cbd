//! Running the command: its own process group, stdout and stderr through the pumps,
//! the timeout and forwarded signals, and the reap.
//!
//! Stopping is staged (timeout, or SIGINT/SIGTERM/SIGHUP to chan-run): the signal goes
//! to the whole group (with SIGCONT, so a stopped command can act on it), then the grace
//! of `--kill-after`, then SIGKILL to the group. The leader is watched with `waitid(...,
//! WNOWAIT)`: as a zombie it still reserves the group's id, so when a stopped leader
//! exits, what is left of its group is killed at once and only then is the leader reaped.
//! chan-run so returns within timeout + kill-after + the 1 s output drain, whatever the
//! descendants do. A command that exits on its own leaves its group alone. A leader
//! that left its group gets each signal by pid too, and is reaped before chan-run says
//! it stopped it. On a terminal, the leader's stops are job control (`terminal.rs`).

mod terminal;
mod watch;

use crate::control::Control;
use crate::pump::{Output, Stream, Tail};
use rustix::process::{Pid, Signal};
use std::ffi::OsString;
use std::io;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use terminal::Terminal;

/// How long a SIGKILLed leader may take to become reapable before chan-run moves on
/// (within SPEC's 1 s beyond timeout + kill-after, with the output drain).
pub const REAP_AFTER_KILL: Duration = Duration::from_millis(400);
/// The tail of stdout kept for the session id.
pub const TAIL_CAP: usize = 4 * 1024 * 1024;

pub struct Plan<'a> {
    pub command: &'a [OsString],
    pub env: Vec<(&'static str, Option<OsString>)>,
    /// `None`: no limit (`--timeout 0`).
    pub timeout: Option<Duration>,
    pub kill_after: Duration,
    /// Where the command's process writes its own pid (= its process group) before
    /// `exec`: (fd, offset, width), from the store's lease.
    pub pid_field: Option<(std::os::fd::RawFd, u64, usize)>,
    /// When the store can lose the lock while the command runs: the longest the command
    /// may outlive that news (its grace is then the shorter of this and `kill_after`).
    pub lost_grace: Option<Duration>,
    pub tail_cap: usize,
    /// What the command reads on its stdin (`--collect`'s messages), through a pipe; `None`:
    /// chan-run's own stdin, inherited.
    pub stdin: Option<Arc<[u8]>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Timeout,
    Signal(i32),
    /// The store could no longer prove this run holds the channel.
    LockLost,
}

#[derive(Debug)]
pub enum Ending {
    /// It ran and ended; `stop` says whether chan-run stopped it. `status` is `None` only
    /// if the leader, `pid`, was not reapable within [`REAP_AFTER_KILL`] of its SIGKILL:
    /// stuck in the kernel (state D), it runs none of its code again, and ends (reaped
    /// by init) when the kernel lets it go.
    Ran { status: Option<ExitStatus>, stop: Option<Stop>, pid: u32 },
    /// The command could not be executed (126) or found (127).
    SpawnFailed(io::Error),
    /// chan-run itself could not start it (out of file descriptors, processes or
    /// memory): nothing ran, and it is not the command's failure.
    Unstarted(io::Error),
}

pub struct Finished {
    pub ending: Ending,
    pub duration: Duration,
    pub stdout: Tail,
}

pub fn run(plan: Plan, control: &Control, on_spawn: &mut dyn FnMut(u32)) -> Finished {
    let started = Instant::now();
    let mut terminal = Terminal::new();
    // Everything chan-run needs for the run is had before the command starts: this pipe
    // (it tells the output thread of the exit) and, inside `spawn`, the command's pipes
    // and process. If one is missing, nothing ran and it is chan-run's own failure.
    let (notice_rx, notice_tx) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
        Ok(notice) => notice,
        Err(e) => return not_run(Ending::Unstarted(e.into()), started),
    };
    // The writer is started before the command, so a thread chan-run cannot start is its
    // own failure with nothing run; it writes as the command reads, so a command that
    // prints before it has read everything never deadlocks against chan-run.
    let feed = match plan.stdin.as_ref().map(|bytes| feed(Arc::clone(bytes))).transpose() {
        Ok(feed) => feed,
        Err(e) => return not_run(Ending::Unstarted(e), started),
    };
    let spawned = crate::sys::spawn(&crate::sys::Spawn {
        program: &plan.command[0],
        args: &plan.command[1..],
        env: &plan.env,
        stdin: feed.as_ref().map(|(read, _)| std::os::fd::AsFd::as_fd(read)),
        setup: crate::sys::ChildSetup {
            parent: rustix::process::getpid(),
            pid_field: plan.pid_field,
            take_terminal: terminal.handed(),
            default_sigxfsz: control.sigxfsz_changed,
        },
    });
    // The pipe's read end goes with the command: the writer then meets EPIPE (not a
    // signal: chan-run ignores SIGPIPE) if the command exits without reading it all.
    drop(feed);
    let spawned = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            // The child may have taken the terminal before its exec failed.
            terminal.take_back();
            return not_run(
                if is_own_failure(&e) { Ending::Unstarted(e) } else { Ending::SpawnFailed(e) },
                started,
            );
        }
    };
    let pid = spawned.pid.as_raw_nonzero().get() as u32;
    on_spawn(pid);
    let exited = Arc::new(AtomicBool::new(false));
    let streams =
        vec![Stream::new(spawned.stdout, 1, plan.tail_cap), Stream::new(spawned.stderr, 2, plan.tail_cap)];
    let mut output = Output::new(streams, Arc::clone(&exited), Arc::new(notice_rx));

    let (status, mut stop) =
        watch::supervise(spawned.pid, &plan, control, started, &mut output, &mut terminal);
    terminal.take_back();
    // Tells the pump the command is gone: it passes on what the pipes hold and stops
    // once they are empty, however long a descendant keeps them open. Only a reader
    // that stops reading can hold chan-run here, as it would hold the command.
    exited.store(true, Ordering::SeqCst);
    drop(notice_tx);
    if let Some(sig) = drain(&mut output, control) {
        stop.get_or_insert(Stop::Signal(sig)); // interrupted while passing output on
    }
    let stdout = output.finish();
    Finished { ending: Ending::Ran { status, stop, pid }, duration: started.elapsed(), stdout }
}

/// A pipe for the command's stdin, and a thread writing `bytes` into it, then closing it
/// (end of file). The thread ends when everything is written or the command has closed
/// its end. Returns the read end, for the command.
fn feed(bytes: Arc<[u8]>) -> io::Result<(std::os::fd::OwnedFd, std::thread::JoinHandle<()>)> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let mut write = std::fs::File::from(write);
    let writer = std::thread::Builder::new().spawn(move || {
        let _ = std::io::Write::write_all(&mut write, &bytes);
    })?;
    Ok((read, writer))
}

/// Passes on what is left of the output once the command has exited; a forwarded
/// signal cuts it short, and is returned.
fn drain(output: &mut Output, control: &Control) -> Option<i32> {
    output.poke(|| control.wake_handle());
    while output.busy() {
        if let Some(sig) = control.take_signal() {
            return Some(sig);
        }
        let _ = control.wait_also(None, &output.pending());
        output.poke(|| control.wake_handle());
    }
    None
}

fn not_run(ending: Ending, started: Instant) -> Finished {
    Finished { ending, duration: started.elapsed(), stdout: Tail::new(0) }
}

/// Whether a spawn error is chan-run's own lack of resources rather than the command's.
fn is_own_failure(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM))
}

/// Sends `sig` to the command's process group and, if its leader has left that group,
/// to the leader by pid as well (once: a second SIGINT can mean "force" to a CLI). The
/// leader is chan-run's unreaped child, so its pid cannot name anyone else.
pub(super) fn signal_command(pid: Pid, sig: Signal) {
    let _ = rustix::process::kill_process_group(pid, sig);
    if sig == Signal::KILL || rustix::process::getpgid(Some(pid)).is_ok_and(|group| group != pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}
