//! `chan-run run`: validate, queue for the channel, read its session, run the command
//! holding the lock, record the run, release, and exit with the command's status.

use super::outcome::{self, Outcome};
use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::session;
use crate::state::{ChannelRecord, LastRun, RunResult};
use crate::store::{Holder, Lease, RecordError, Store};
use crate::supervise::{self, Finished, Plan};
use crate::ui;
use std::ffi::OsString;
use std::time::{Duration, Instant, SystemTime};

/// SPEC's return-time promise: timeout + kill-after + this.
const RETURN_SLACK: Duration = Duration::from_secs(1);

pub fn run(store: &dyn Store, args: RunArgs, control: &'static Control) -> anyhow::Result<ExitCode> {
    let channel = Channel::new(&args.channel)?;
    let store_id = store.id();
    super::held::refuse_self_deadlock(&store_id, &channel)?;
    let mut pools = crate::pool::in_taking_order(args.pools.clone()).map_err(anyhow::Error::msg)?;
    // A seat an ancestor run holds covers its command's nested runs: taking another
    // could wait for that ancestor forever.
    pools.retain(|p| super::held::ancestor_seat(&store_id, p).is_none());
    let wait = super::wait_of(&args.wait);
    let mut lease = match super::acquire(store, &channel, &args.wait, wait, args.quiet, control)? {
        Ok(lease) => lease,
        Err(code) => return Ok(code),
    };
    if let Err(code) = super::take_seats(lease.as_mut(), &pools, &args.wait, wait, args.quiet, control)? {
        release(lease);
        return Ok(code);
    }
    let held_pools: Vec<&str> = pools.iter().map(|p| p.name()).collect();
    let record = match lease.record() {
        Ok(record) => record,
        Err(RecordError::Interrupted(sig)) => return Ok(ExitCode::Signal(sig)),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("cannot read channel {channel}'s record")));
        }
    };
    let cwd = std::env::current_dir().ok().map(|d| d.to_string_lossy().into_owned());
    let session = session_to_pass(&channel, &record, &args, cwd.as_deref());
    let command = with_session(&args.command, args.session_arg.as_ref(), session.as_deref());
    let started_at = SystemTime::now();
    let env = command_env(store, &store_id, &channel, &held_pools, session.as_deref(), lease.fence());
    let mut finished = execute(lease.as_mut(), &args, &command, env, started_at, control);
    lease.free_seats();

    let outcome = Outcome::of(&finished, &channel, &command[0], args.timeout, started_at);
    if let Some((message, quiet_silences)) = &outcome.message
        && !(args.quiet && *quiet_silences)
    {
        ui::say(message);
    }
    let Some(mut last_run) = outcome.last_run else {
        release(lease);
        return Ok(outcome.code);
    };
    let new_session = session_from_output(&mut finished, &args, &channel, &command[0], &mut last_run);
    let result = RunResult { last_run: last_run.clone(), new_session, cwd, fresh_after: args.fresh_after };
    // Recorded before the lock is released.
    let mut entry = |after: &ChannelRecord| Outcome::entry(&last_run, record.session_id.clone(), after);
    let (recorded, logged) = lease.record_run(&mut |r| r.apply(result.clone()), &mut entry);
    if let Err(e) = logged {
        ui::warn(format!("the run was not added to the channel's history ({e:#})"));
    }
    let code = match recorded.map_err(|e| not_recorded(e, &channel, &finished)) {
        Ok(()) | Err(None) => outcome.code,
        // The lock is no longer this run's to release.
        Err(Some(ExitCode::LockLost)) => return Ok(ExitCode::LockLost),
        Err(Some(code)) => code,
    };
    release(lease);
    Ok(code)
}

/// Says why the run's record was not written; returns the exit code that replaces the
/// command's, if one does. A failure to record does not: the command ran, and a bot
/// must not send the message again.
fn not_recorded(e: RecordError, channel: &Channel, finished: &Finished) -> Option<ExitCode> {
    match e {
        RecordError::LockLost(lost) => {
            // Another run may have overlapped this one: the caller must know, whatever
            // the command's own status was.
            let status = outcome::command_status(finished)
                .map(|code| format!("; the command itself ended with {code}"))
                .unwrap_or_default();
            ui::say(format_args!("channel {channel}: {lost}{status}"));
            Some(ExitCode::LockLost)
        }
        RecordError::Interrupted(sig) => {
            ui::warn(format!("signal {sig} came while waiting to record the run: it was not recorded"));
            Some(ExitCode::Signal(sig))
        }
        RecordError::Failed(e) => {
            ui::warn(format!("the run was not recorded ({e:#}); exit status kept"));
            None
        }
    }
}

/// The stored session id to pass on, if any: not with `--no-session`, not one that
/// cannot be an argument (with a warning), and with a warning when the run is in
/// another directory than the session's.
fn session_to_pass(
    channel: &Channel,
    record: &ChannelRecord,
    args: &RunArgs,
    cwd: Option<&str>,
) -> Option<String> {
    let session =
        record.session_id.clone().filter(|_| !args.no_session).filter(|id| match session::refusal(id) {
            None => true,
            Some(why) => {
                ui::warn(format!("channel {channel}'s stored session id is not passed on: {why}"));
                false
            }
        });
    // Model CLIs resume a session only from the directory it was made in.
    if let (Some(_), Some(made_in), Some(here)) = (&session, &record.session_cwd, cwd)
        && made_in != here
    {
        ui::warn(format!(
            "channel {channel}'s session was made in {made_in}, this run is in {here}; the model may not find it"
        ));
    }
    session
}

/// Records the holder and runs the command under the lease.
fn execute(
    lease: &mut dyn Lease,
    args: &RunArgs,
    command: &[OsString],
    env: Vec<(&'static str, Option<OsString>)>,
    started_at: SystemTime,
    control: &'static Control,
) -> Finished {
    let holder = Holder {
        pid: std::process::id(),
        started_at,
        command,
        spawn_ticks: crate::procfs::now_ticks(),
        ends_by: Some(args.timeout)
            .filter(|t| !t.is_zero())
            .and_then(|t| Instant::now().checked_add(t + args.kill_after + RETURN_SLACK)),
    };
    if let Err(e) = lease.announce(&holder) {
        ui::warn(format!("cannot record the holder ({e:#}); running anyway"));
    }
    let plan = Plan {
        command,
        env,
        timeout: Some(args.timeout).filter(|t| !t.is_zero()),
        kill_after: args.kill_after,
        pid_field: lease.pid_field(),
        lost_grace: lease.lost_grace(),
        tail_cap: if args.no_session { 0 } else { supervise::TAIL_CAP },
    };
    supervise::run(plan, control, &mut |pid| lease.command_started(pid, crate::procfs::now_ticks()))
}

/// The session id the command's output names, if it is one to keep; a refused one is
/// named in `last_run`.
fn session_from_output(
    finished: &mut Finished,
    args: &RunArgs,
    channel: &Channel,
    program: &OsString,
    last_run: &mut LastRun,
) -> Option<String> {
    if args.no_session {
        return None;
    }
    let (tail, whole) = finished.stdout.contents();
    match session::find(tail, whole, &args.session_key) {
        session::Found::Id(id) => Some(id),
        session::Found::Nothing => None,
        session::Found::Refused(why) => {
            ui::warn(format!(
                "the session id in {}'s output is refused ({why}); channel {channel} keeps its previous one",
                outcome::shown(program)
            ));
            last_run.extra.insert("session_refused".into(), why.into());
            None
        }
    }
}

/// The command with the session appended: `FLAG ID`, or `FLAGID` as one argument when
/// the flag ends in `=` (`--session-arg=--resume=`), for a CLI whose flag value is
/// optional.
fn with_session(command: &[OsString], flag: Option<&OsString>, id: Option<&str>) -> Vec<OsString> {
    let mut command = command.to_vec();
    if let (Some(flag), Some(id)) = (flag, id) {
        match flag.to_string_lossy().ends_with('=') {
            true => {
                let mut joined = flag.clone();
                joined.push(id);
                command.push(joined);
            }
            false => command.extend([flag.clone(), OsString::from(id)]),
        }
    }
    command
}

fn release(lease: Box<dyn Lease>) {
    if let Err(e) = lease.release() {
        ui::warn(format!("{e:#}"));
    }
}

fn command_env(
    store: &dyn Store,
    store_id: &str,
    channel: &Channel,
    pools: &[&str],
    session: Option<&str>,
    fence: Option<i64>,
) -> Vec<(&'static str, Option<OsString>)> {
    vec![
        ("CHAN_RUN_CHANNEL", Some(channel.name().into())),
        ("CHAN_RUN_SESSION_ID", session.map(OsString::from)),
        (super::held::HELD_ENV, Some(super::held::held_env(store_id, channel))),
        (super::held::SEATS_ENV, super::held::seats_env(store_id, pools)),
        ("CHAN_RUN_FENCE", fence.map(|f| f.to_string().into())),
        // The store as the command may know it: never with a password.
        ("CHAN_RUN_STORE", store.url_without_password().map(OsString::from)),
    ]
}
