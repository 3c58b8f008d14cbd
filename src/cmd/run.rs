//! `chan-run run`: validate, queue for the channel, read its session, run the command
//! holding the lock, record the run, release, and exit with the command's status.

use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::control::Control;
use crate::exit_code;
use crate::state::{LastRun, Outcome, RunResult};
use crate::store::{Holder, Store};
use crate::supervise::{self, Ending, Finished, Plan, Stop};
use anyhow::bail;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::time::SystemTime;

/// Names the channels held by chan-run ancestors of a command: lines of `<pid> <channel>`.
pub const HELD_ENV: &str = "CHAN_RUN_HELD";

pub fn run(store: &dyn Store, args: RunArgs, control: &Control) -> anyhow::Result<u8> {
    let channel = Channel::new(&args.channel)?;
    refuse_self_deadlock(&channel)?;
    let mut lease = match super::acquire(store, &channel, &args.wait, args.quiet, control)? {
        Ok(lease) => lease,
        Err(code) => return Ok(code),
    };
    let record = lease.record()?;
    let cwd = std::env::current_dir().ok().map(|d| d.to_string_lossy().into_owned());
    let session_before = record.session_id.clone();
    let session = record.session_id.filter(|_| !args.no_session);
    if let (Some(_), Some(made_in), Some(here)) = (&session, &record.session_cwd, &cwd)
        && made_in != here
    {
        crate::warn(format!(
            "channel {channel}'s session was made in {made_in}, this run is in {here}; the model may not find it"
        ));
    }

    let mut command = args.command.clone();
    if let (Some(flag), Some(id)) = (&args.session_arg, &session) {
        command.extend([flag.clone(), OsString::from(id)]);
    }
    let started_at = SystemTime::now();
    let me = std::process::id();
    let holder = Holder { pid: me, started_at, command: &command, spawn_ticks: crate::procfs::now_ticks() };
    if let Err(e) = lease.announce(&holder) {
        crate::warn(format!("cannot record the holder ({e:#}); running anyway"));
    }
    let take_terminal = supervise::should_take_terminal();
    let plan = Plan {
        command: &command,
        env: command_env(&channel, me, session.as_deref(), lease.fence()),
        timeout: Some(args.timeout).filter(|t| !t.is_zero()),
        kill_after: args.kill_after,
        take_terminal,
        setup: crate::sys::ChildSetup {
            parent: rustix::process::getpid(),
            pid_slot: lease.pid_slot(),
            take_terminal,
            default_sigxfsz: control.sigxfsz_changed,
        },
        tail_cap: if args.no_session { 0 } else { supervise::TAIL_CAP },
    };
    let mut finished =
        supervise::run(plan, control, &mut |pid| lease.command_started(pid, crate::procfs::now_ticks()));

    let (code, last_run) = conclude(&finished, started_at);
    match &finished.ending {
        Ending::SpawnFailed(e) => {
            say!("chan-run: cannot run {}: {}", shown(&command[0]), spawn_hint(e));
        }
        Ending::Ran { stop: Some(Stop::Timeout), .. } if !args.quiet => say!(
            "chan-run: {} timed out after {}; stopped it",
            shown(&command[0]),
            crate::duration::short(args.timeout)
        ),
        Ending::Ran { stop: Some(Stop::LockLost), .. } => say!(
            "chan-run: lost channel {channel}'s lock while {} ran; stopped it before the channel could be handed on",
            shown(&command[0])
        ),
        _ => {}
    }
    let new_session = match args.no_session {
        true => None,
        false => {
            let (tail, whole) = finished.stdout.contents();
            crate::session::find(tail, whole, &args.session_key)
        }
    };
    let result = RunResult { last_run: last_run.clone(), new_session, cwd, fresh_after: args.fresh_after };
    // Recorded before the lock is released; a failure here must not change the exit
    // status: the command ran, and a bot must not send the message again.
    let mut entry = |r: &crate::state::ChannelRecord| crate::history::Entry {
        started_at: last_run.started_at.clone(),
        finished_at: last_run.finished_at.clone(),
        duration_ms: last_run.duration_ms,
        outcome: last_run.outcome,
        exit_code: last_run.exit_code,
        signal: last_run.signal,
        session_before: session_before.clone(),
        session_after: r.session_id.clone(),
        pid: me,
    };
    let (recorded, logged) = lease.record_run(&mut |r| r.apply(result.clone()), &mut entry);
    if let Err(e) = recorded {
        if let Some(lost) = e.downcast_ref::<crate::store::LockLost>() {
            // Another run may have overlapped this one: the caller must know, whatever
            // the command's own status was.
            let status = match &finished.ending {
                Ending::Ran { status: Some(s), stop: None } => {
                    format!("; the command itself ended with {}", exit_code::from_status(*s))
                }
                _ => String::new(),
            };
            say!("chan-run: channel {channel}: {lost}{status}");
            return Ok(exit_code::LOCK_LOST);
        }
        crate::warn(format!("the run was not recorded in active.json ({e:#}); exit status kept"));
    }
    if let Err(e) = logged {
        crate::warn(format!("the run was not added to the channel's history ({e:#})"));
    }
    if let Err(e) = lease.release() {
        crate::warn(format!("{e:#}"));
    }
    Ok(code)
}

/// The exit code and the record of a finished run.
fn conclude(finished: &Finished, started_at: SystemTime) -> (u8, LastRun) {
    let (code, outcome, exit_code, signal) = match &finished.ending {
        Ending::SpawnFailed(e) => (exit_code::from_spawn_error(e), Outcome::SpawnFailed, None, None),
        Ending::Ran { status, stop } => {
            let exit = status.and_then(|s| s.code());
            let signal = status.map_or(Some(libc::SIGKILL), |s| s.signal());
            match stop {
                Some(Stop::Timeout) => (exit_code::TIMED_OUT, Outcome::TimedOut, exit, signal),
                Some(Stop::Signal(sig)) => (exit_code::from_signal(*sig), Outcome::Interrupted, exit, signal),
                Some(Stop::LockLost) => (exit_code::LOCK_LOST, Outcome::Interrupted, exit, signal),
                None => match status {
                    Some(s) if s.success() => (0, Outcome::Ok, exit, None),
                    Some(s) if s.signal().is_some() => {
                        (exit_code::from_status(*s), Outcome::Signaled, None, signal)
                    }
                    Some(s) => (exit_code::from_status(*s), Outcome::Failed, exit, None),
                    None => (exit_code::CHAN_RUN_FAILED, Outcome::Failed, None, signal),
                },
            }
        }
    };
    let last_run = LastRun {
        started_at: rfc3339(started_at),
        finished_at: rfc3339(SystemTime::now()),
        duration_ms: finished.duration.as_millis() as u64,
        exit_code,
        signal,
        outcome,
        extra: Default::default(),
    };
    (code, last_run)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A chan-run started inside a command for the channel that command's ancestor holds
/// would wait for its own ancestor forever.
pub fn refuse_self_deadlock(channel: &Channel) -> anyhow::Result<()> {
    let Some(held) = std::env::var_os(HELD_ENV) else { return Ok(()) };
    let held = held.to_string_lossy();
    for line in held.lines() {
        let Some((pid, name)) = line.split_once(' ') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if name == channel.name() && (!cfg!(target_os = "linux") || crate::procfs::is_ancestor(pid)) {
            bail!(
                "channel {channel} is held by this command's own chan-run (pid {pid}); waiting for it would never end: use another channel for the nested call"
            );
        }
    }
    Ok(())
}

fn command_env(
    channel: &Channel,
    me: u32,
    session: Option<&str>,
    fence: Option<i64>,
) -> Vec<(&'static str, Option<OsString>)> {
    let mut held = std::env::var_os(HELD_ENV).map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    if !held.is_empty() && !held.ends_with('\n') {
        held.push('\n');
    }
    held.push_str(&format!("{me} {}", channel.name()));
    vec![
        ("CHAN_RUN_CHANNEL", Some(channel.name().into())),
        ("CHAN_RUN_SESSION_ID", session.map(OsString::from)),
        (HELD_ENV, Some(held.into())),
        ("CHAN_RUN_FENCE", fence.map(|f| f.to_string().into())),
    ]
}

fn shown(program: &OsString) -> String {
    format!("'{}'", program.to_string_lossy())
}

fn spawn_hint(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("{e} (is it installed and on PATH?)"),
        std::io::ErrorKind::PermissionDenied => format!("{e} (is it executable?)"),
        _ => e.to_string(),
    }
}
