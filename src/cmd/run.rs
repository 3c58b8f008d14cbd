//! `chan-run run`: validate, queue for the channel, read its session, run the command
//! holding the lock, record the run, release, and exit with the command's status.

use super::outcome::{self, Outcome};
use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::state::{ChannelRecord, RunResult};
use crate::store::{Holder, Lease, Store, WriteError};
use crate::supervise::{self, Plan};
use crate::ui;
use std::ffi::OsString;
use std::time::SystemTime;

/// SPEC's return-time promise: timeout + kill-after + this.
const RETURN_SLACK: std::time::Duration = std::time::Duration::from_secs(1);

pub fn run(store: &dyn Store, args: RunArgs, control: &Control) -> anyhow::Result<ExitCode> {
    let channel = Channel::new(&args.channel)?;
    super::held::refuse_self_deadlock(&store.id(), &channel)?;
    let mut lease = match super::acquire(store, &channel, &args.wait, args.quiet, control)? {
        Ok(lease) => lease,
        Err(code) => return Ok(code),
    };
    let record = lease.record()?;
    let cwd = std::env::current_dir().ok().map(|d| d.to_string_lossy().into_owned());
    let session = record.session_id.clone().filter(|_| !args.no_session);
    warn_if_elsewhere(&channel, &record, session.is_some(), cwd.as_deref());
    let mut command = args.command.clone();
    if let (Some(flag), Some(id)) = (&args.session_arg, &session) {
        command.extend([flag.clone(), OsString::from(id)]);
    }

    let started_at = SystemTime::now();
    let holder = Holder {
        pid: std::process::id(),
        started_at,
        command: &command,
        spawn_ticks: crate::procfs::now_ticks(),
        ends_by: Some(args.timeout)
            .filter(|t| !t.is_zero())
            .and_then(|t| std::time::Instant::now().checked_add(t + args.kill_after + RETURN_SLACK)),
    };
    if let Err(e) = lease.announce(&holder) {
        ui::warn(format!("cannot record the holder ({e:#}); running anyway"));
    }
    let plan = Plan {
        command: &command,
        env: command_env(store, &channel, session.as_deref(), lease.fence()),
        timeout: Some(args.timeout).filter(|t| !t.is_zero()),
        kill_after: args.kill_after,
        pid_note: lease.pid_slot(),
        lost_grace: lease.lost_grace(),
        tail_cap: if args.no_session { 0 } else { supervise::TAIL_CAP },
    };
    let mut finished =
        supervise::run(plan, control, &mut |pid| lease.command_started(pid, crate::procfs::now_ticks()));

    let outcome = Outcome::of(&finished, &channel, &command[0], args.timeout, started_at);
    if let Some((message, quiet_silences)) = &outcome.message
        && !(args.quiet && *quiet_silences)
    {
        ui::say(message);
    }
    let Some(last_run) = outcome.last_run else {
        release(lease);
        return Ok(outcome.code);
    };
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
    let mut entry = |after: &ChannelRecord| Outcome::entry(&last_run, record.session_id.clone(), after);
    let (recorded, logged) = lease.record_run(&mut |r| r.apply(result.clone()), &mut entry);
    match recorded {
        Ok(()) => {}
        Err(WriteError::LockLost(lost)) => {
            // Another run may have overlapped this one: the caller must know, whatever
            // the command's own status was.
            let status = outcome::command_status(&finished)
                .map(|code| format!("; the command itself ended with {code}"))
                .unwrap_or_default();
            ui::say(format_args!("channel {channel}: {lost}{status}"));
            return Ok(ExitCode::LockLost);
        }
        Err(WriteError::Failed(e)) => {
            ui::warn(format!("the run was not recorded ({e:#}); exit status kept"));
        }
    }
    if let Err(e) = logged {
        ui::warn(format!("the run was not added to the channel's history ({e:#})"));
    }
    release(lease);
    Ok(outcome.code)
}

fn release(lease: Box<dyn Lease>) {
    if let Err(e) = lease.release() {
        ui::warn(format!("{e:#}"));
    }
}

/// Model CLIs resume a session only from the directory it was made in.
fn warn_if_elsewhere(channel: &Channel, record: &ChannelRecord, resuming: bool, here: Option<&str>) {
    if let (true, Some(made_in), Some(here)) = (resuming, &record.session_cwd, here)
        && made_in != here
    {
        ui::warn(format!(
            "channel {channel}'s session was made in {made_in}, this run is in {here}; the model may not find it"
        ));
    }
}

/// The command's environment: the channel, its session, the held-channel marks, the
/// fence, and the store without its password.
fn command_env(
    store: &dyn Store,
    channel: &Channel,
    session: Option<&str>,
    fence: Option<i64>,
) -> Vec<(&'static str, Option<OsString>)> {
    vec![
        ("CHAN_RUN_CHANNEL", Some(channel.name().into())),
        ("CHAN_RUN_SESSION_ID", session.map(OsString::from)),
        (super::held::HELD_ENV, Some(super::held::held_env(&store.id(), channel))),
        ("CHAN_RUN_FENCE", fence.map(|f| f.to_string().into())),
        ("CHAN_RUN_STORE", store.url_without_password().map(OsString::from)),
    ]
}
