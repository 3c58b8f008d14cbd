//! How a run ended, decided once: the exit code, the channel's `last_run`, the history
//! entry, and the line chan-run says about it. `run` only carries these out.

use crate::channel::Channel;
use crate::exit_code::ExitCode;
use crate::history::Entry;
use crate::state::{ChannelRecord, LastRun, Outcome as Kind};
use crate::store::DeadRun;
use crate::supervise::{Ending, Finished, Stop};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

pub struct Outcome {
    pub code: ExitCode,
    /// `None`: nothing ran because chan-run itself could not start it; the channel's
    /// record is left as it was.
    pub last_run: Option<LastRun>,
    /// What chan-run says about the ending on stderr, and whether `-q` silences it.
    pub message: Option<Message>,
}

impl Outcome {
    pub fn of(
        finished: &Finished,
        channel: &Channel,
        program: &OsString,
        timeout: Duration,
        started_at: SystemTime,
    ) -> Outcome {
        let shown = shown(program);
        let (code, kind, exit_code, signal, message) = match &finished.ending {
            Ending::Unstarted(e) => {
                let (what, fix) = own_failure(e);
                let message = format!(
                    "cannot start {shown}: {what} ({e}){fix}; nothing ran, the channel's record is unchanged"
                );
                return Outcome { code: ExitCode::Failed, last_run: None, message: Some((message, false)) };
            }
            Ending::SpawnFailed(e) => {
                let message = format!("cannot run {shown}: {}", spawn_hint(e));
                (ExitCode::from_spawn_error(e), Kind::SpawnFailed, None, None, Some((message, false)))
            }
            Ending::Ran { status, stop, pid } => ran(*status, *stop, *pid, channel, &shown, timeout),
        };
        let last_run = LastRun {
            started_at: rfc3339(started_at),
            finished_at: rfc3339(SystemTime::now()),
            duration_ms: finished.duration.as_millis() as u64,
            exit_code,
            signal,
            outcome: kind,
            kind: None,
            extra: Default::default(),
        };
        Outcome { code, last_run: Some(last_run), message }
    }

    /// The history entry of this run, from the record as the run left it.
    pub fn entry(
        last_run: &LastRun,
        session_before: Option<String>,
        after: &ChannelRecord,
        session_note: Option<String>,
    ) -> Entry {
        Entry {
            started_at: last_run.started_at.clone(),
            finished_at: last_run.finished_at.clone(),
            duration_ms: last_run.duration_ms,
            outcome: last_run.outcome,
            exit_code: last_run.exit_code,
            signal: last_run.signal,
            session_before,
            session_after: after.session_id.clone(),
            pid: std::process::id(),
            session_refused: last_run
                .extra
                .get("session_refused")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            kind: last_run.kind,
            api_status: last_run.extra.get("api_status").and_then(|v| v.as_u64()),
            resets_at: last_run.extra.get("resets_at").and_then(|v| v.as_str()).map(str::to_owned),
            session_note,
            messages: last_run.extra.get("messages").and_then(|v| v.as_u64()),
            command: None,
            attempt: last_run.extra.get("attempt").and_then(|v| v.as_u64()).map(|a| a as u32),
            spent: crate::spend::RunUsage::from_extra(&last_run.extra),
        }
    }
}

/// The history entry of a run whose chan-run died holding the channel: it ended some
/// time before it was found, unknown how.
pub fn died_entry(dead: &DeadRun, record: &ChannelRecord) -> Entry {
    let now = SystemTime::now();
    let duration_ms = humantime::parse_rfc3339(&dead.started_at)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .map_or(0, |d| d.as_millis() as u64);
    Entry {
        started_at: dead.started_at.clone(),
        finished_at: rfc3339(now),
        duration_ms,
        outcome: Kind::Interrupted,
        exit_code: None,
        signal: None,
        session_before: record.session_id.clone(),
        session_after: record.session_id.clone(),
        pid: dead.pid,
        session_refused: None,
        kind: Some(crate::state::Kind::Died),
        api_status: None,
        resets_at: None,
        session_note: None,
        messages: None,
        command: Some(dead.command.clone()),
        attempt: None,
        spent: Default::default(),
    }
}

/// How a command that ran ended: its code, the record's outcome, exit code and signal,
/// and what chan-run says about it.
fn ran(
    status: Option<ExitStatus>,
    stop: Option<Stop>,
    pid: u32,
    channel: &Channel,
    shown: &str,
    timeout: Duration,
) -> Ended {
    let exit = status.and_then(|s| s.code());
    let signal = status.map_or(Some(libc::SIGKILL), |s| s.signal());
    let (code, kind, exit, signal, message) = match stop {
        Some(Stop::Timeout) => {
            let message = format!("{shown} timed out after {}; stopped it", crate::duration::short(timeout));
            (ExitCode::TimedOut, Kind::TimedOut, exit, signal, Some((message, true)))
        }
        Some(Stop::Signal(sig)) => (ExitCode::Signal(sig), Kind::Interrupted, exit, signal, None),
        Some(Stop::LockLost) => {
            let message = format!(
                "lost channel {channel}'s lock while {shown} ran; stopped it before the channel could be handed on"
            );
            (ExitCode::LockLost, Kind::Interrupted, exit, signal, Some((message, false)))
        }
        None => match status {
            Some(s) if s.success() => (ExitCode::OK, Kind::Ok, exit, None, None),
            Some(s) if s.signal().is_some() => (ExitCode::from_status(s), Kind::Signaled, None, signal, None),
            Some(s) => (ExitCode::from_status(s), Kind::Failed, exit, None, None),
            None => (ExitCode::Failed, Kind::Failed, None, signal, None),
        },
    };
    let message = match status {
        Some(_) => message,
        None => Some((unreaped(message, pid), false)),
    };
    (code, kind, exit, signal, message)
}

/// The exit code, the record's outcome, exit code and signal, and what chan-run says.
type Ended = (ExitCode, Kind, Option<i32>, Option<i32>, Option<Message>);

/// A line chan-run says, and whether `-q` silences it.
type Message = (String, bool);

/// The command's own status, for a message about a run whose lock was lost.
pub fn command_status(finished: &Finished) -> Option<ExitCode> {
    match &finished.ending {
        Ending::Ran { status: Some(s), stop: None, .. } => Some(ExitCode::from_status(*s)),
        _ => None,
    }
}

/// A program as messages show it.
pub fn shown(program: &OsString) -> String {
    format!("'{}'", program.to_string_lossy())
}

/// The ending's message, and that the SIGKILLed leader could not be reaped in time.
fn unreaped(message: Option<Message>, pid: u32) -> String {
    let stuck = format!(
        "pid {pid} got SIGKILL but had not exited {} later (stuck in the kernel, state D?); it runs none of its code again and ends when the kernel lets it go",
        crate::duration::short(crate::supervise::REAP_AFTER_KILL)
    );
    match message {
        Some((message, _)) => format!("{message}; {stuck}"),
        None => stuck,
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// What chan-run itself ran out of, and what to do about it.
fn own_failure(e: &std::io::Error) -> (&'static str, &'static str) {
    match e.raw_os_error() {
        Some(libc::EMFILE) => ("chan-run is out of file descriptors", "; raise `ulimit -n`"),
        Some(libc::ENFILE) => ("the system's table of open files is full", ""),
        Some(libc::EAGAIN) => ("chan-run cannot make a process", "; see `ulimit -u` and the system's limits"),
        Some(libc::ENOMEM) => ("out of memory", ""),
        _ => ("chan-run's own failure", ""),
    }
}

fn spawn_hint(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("{e} (is it installed and on PATH?)"),
        std::io::ErrorKind::PermissionDenied => format!("{e} (is it executable?)"),
        _ => e.to_string(),
    }
}
