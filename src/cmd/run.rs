//! `chan-run run`: validate, queue for the channel, run the command holding its lock,
//! (record the run,) release, and exit with the command's status.

use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::control::Control;
use crate::exit_code;
use crate::store::{AcquireError, Holder, Store, Wait, WaitNote};
use crate::supervise::{self, Ending, Plan, Stop};
use anyhow::bail;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::time::{Instant, SystemTime};

/// Names the channels held by chan-run ancestors of a command: lines of `<pid> <channel>`.
pub const HELD_ENV: &str = "CHAN_RUN_HELD";

pub fn run(store: &dyn Store, args: RunArgs, control: &Control) -> anyhow::Result<u8> {
    let channel = Channel::new(&args.channel)?;
    refuse_self_deadlock(&channel)?;
    let wait = wait_mode(&args.wait);
    let quiet = args.quiet;
    let mut on_wait = |note: &WaitNote| {
        if !quiet && std::io::stderr().is_terminal() {
            eprintln!("chan-run: {}", waiting_line(&channel, note));
        }
    };
    let mut lease = match store.acquire(&channel, wait, control, &mut on_wait) {
        Ok(lease) => lease,
        Err(AcquireError::Busy) => return Ok(args.wait.conflict_exit_code),
        Err(AcquireError::Interrupted(sig)) => return Ok(exit_code::from_signal(sig)),
        Err(AcquireError::Failed(e)) => return Err(e),
    };

    let me = std::process::id();
    let holder = Holder {
        pid: me,
        started_at: SystemTime::now(),
        command: &args.command,
        spawn_ticks: crate::procfs::now_ticks(),
    };
    if let Err(e) = lease.announce(&holder) {
        warn(&format!("cannot record the holder ({e:#}); running anyway"));
    }
    let take_terminal = supervise::should_take_terminal();
    let plan = Plan {
        command: &args.command,
        env: command_env(&channel, me),
        timeout: Some(args.timeout).filter(|t| !t.is_zero()),
        kill_after: args.kill_after,
        take_terminal,
        setup: crate::sys::ChildSetup {
            parent: rustix::process::getpid(),
            pid_slot: lease.pid_slot(),
            take_terminal,
        },
        tail_cap: 0,
    };
    let finished =
        supervise::run(plan, control, &mut |pid| lease.command_started(pid, crate::procfs::now_ticks()));

    // The run's record (active.json) is written here, before the lock is released.
    let code = match &finished.ending {
        Ending::SpawnFailed(e) => {
            eprintln!("chan-run: cannot run {}: {}", shown(&args.command[0]), spawn_hint(e));
            exit_code::from_spawn_error(e)
        }
        Ending::Ran { stop: Some(Stop::Signal(sig)), .. } => exit_code::from_signal(*sig),
        Ending::Ran { stop: Some(Stop::Timeout), .. } => {
            if !quiet {
                eprintln!(
                    "chan-run: {} timed out after {}; stopped it",
                    shown(&args.command[0]),
                    crate::duration::short(args.timeout)
                );
            }
            exit_code::TIMED_OUT
        }
        Ending::Ran { status: Some(status), stop: None } => exit_code::from_status(*status),
        Ending::Ran { status: None, stop: None } => exit_code::CHAN_RUN_FAILED,
    };
    if let Err(e) = lease.release() {
        warn(&format!("{e:#}"));
    }
    Ok(code)
}

fn wait_mode(args: &crate::cli::WaitArgs) -> Wait {
    match (args.no_wait, args.wait) {
        (true, _) => Wait::No,
        (false, Some(d)) => Wait::Until(Instant::now() + d),
        (false, None) => Wait::Forever,
    }
}

fn waiting_line(channel: &Channel, note: &WaitNote) -> String {
    let holder = match (note.holder_pid, note.held_for) {
        (Some(pid), Some(d)) => format!("held by pid {pid} for {}", crate::duration::short(d)),
        (Some(pid), None) => format!("held by pid {pid}"),
        _ => "held".to_owned(),
    };
    format!("waiting for channel {channel} ({holder}; {} ahead)", note.ahead)
}

/// A chan-run started inside a command for the channel that command's ancestor holds
/// would wait for its own ancestor forever.
fn refuse_self_deadlock(channel: &Channel) -> anyhow::Result<()> {
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

fn command_env(channel: &Channel, me: u32) -> Vec<(&'static str, OsString)> {
    let mut held = std::env::var_os(HELD_ENV).map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    if !held.is_empty() && !held.ends_with('\n') {
        held.push('\n');
    }
    held.push_str(&format!("{me} {}", channel.name()));
    vec![("CHAN_RUN_CHANNEL", channel.name().into()), (HELD_ENV, held.into())]
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

/// Warnings about chan-run's own bookkeeping print even with `--quiet`: they are news.
fn warn(message: &str) {
    eprintln!("chan-run: warning: {message}");
}
