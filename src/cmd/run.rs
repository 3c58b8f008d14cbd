//! `chan-run run`: validate, queue for the channel, read its session, run the command
//! holding the lock, record the run, release, and exit with the command's status.

use super::outcome::{self, Outcome};
use super::retry;
use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::profile::{OnStale, Reading};
use crate::session;
use crate::state::{ChannelRecord, Kind, LastRun, RunResult};
use crate::store::{Holder, Lease, RecordError, Store, Wait};
use crate::supervise::{self, Ending, Finished, Plan};
use crate::ui;
use std::ffi::OsString;
use std::time::{Duration, Instant, SystemTime};

/// SPEC's return-time promise: timeout + kill-after + this.
const RETURN_SLACK: Duration = Duration::from_secs(1);

pub fn run(store: &dyn Store, args: RunArgs, control: &'static Control) -> anyhow::Result<ExitCode> {
    let channel = Channel::new(&args.channel)?;
    check_profile(&args)?;
    let store_id = store.id();
    super::held::refuse_self_deadlock(&store_id, &channel)?;
    let mut pools = crate::pool::in_taking_order(args.pools.clone()).map_err(anyhow::Error::msg)?;
    // A seat an ancestor run holds covers its command's nested runs: taking another
    // could wait for that ancestor forever.
    pools.retain(|p| super::held::ancestor_seat(&store_id, p).is_none());
    let wait = super::wait_of(&args.wait);
    let collect = super::collect::prepare(&args)?;
    let mut lease = match super::collect::acquire(store, &channel, &args, wait, control, collect.as_ref())? {
        Ok(lease) => lease,
        Err(code) => return Ok(code),
    };
    if let Err(code) = super::take_seats(lease.as_mut(), &pools, &args.wait, wait, args.quiet, control)? {
        release(lease);
        return Ok(code);
    }
    let batch = super::collect::gather(lease.as_mut(), collect.as_ref())?;
    let run = Run {
        store,
        store_id: &store_id,
        channel: &channel,
        pools: &pools,
        args: &args,
        control,
        batch: batch.as_ref(),
    };
    let mut attempt = 1;
    loop {
        // -n/-w bound the first wait; a retry's waits are bounded by the back-off.
        let wait = if attempt == 1 { wait } else { Wait::Forever };
        let back_off = match run.attempt(lease.as_mut(), attempt, wait) {
            Err(e) => {
                release(lease);
                return Err(e);
            }
            Ok(Attempted::Ended(code)) => {
                // The callers a --collect batch took learn its outcome.
                super::collect::settle(lease.as_mut(), batch.as_ref(), code);
                release(lease);
                return Ok(code);
            }
            Ok(Attempted::LeaseGone(code)) => return Ok(code),
            Ok(Attempted::Retry(back_off)) => back_off,
        };
        // The seats were freed when the command ended: others use them meanwhile.
        if let Err(sig) = retry::sleep(control, back_off)? {
            release(lease);
            return Ok(ExitCode::Signal(sig));
        }
        let seats =
            super::take_seats(lease.as_mut(), &pools, &args.wait, Wait::Forever, args.quiet, control)?;
        if let Err(code) = seats {
            release(lease);
            return Ok(code);
        }
        attempt += 1;
    }
}

/// What one run holds on to across its attempts.
struct Run<'a> {
    store: &'a dyn Store,
    store_id: &'a str,
    channel: &'a Channel,
    pools: &'a [crate::pool::Pool],
    args: &'a RunArgs,
    control: &'static Control,
    /// The messages of a `--collect` batch, on the command's stdin at every attempt.
    batch: Option<&'a super::collect::Batch>,
}

/// How an attempt ended.
enum Attempted {
    /// Done: release the lease and exit with this.
    Ended(ExitCode),
    /// Done, and the lease is not this run's to release any more.
    LeaseGone(ExitCode),
    /// A transient failure with `--retry` attempts left: back off this long (holding
    /// the channel), then attempt again.
    Retry(Duration),
}

impl Run<'_> {
    /// One attempt, holding the channel (and the seats): read the record, check the
    /// budgets, run the command (again at once, fresh, if its session is stale), record
    /// it, and say whether to retry.
    fn attempt(&self, lease: &mut dyn Lease, attempt: u32, wait: Wait) -> anyhow::Result<Attempted> {
        let Run { store, store_id, channel, pools, args, control, batch } = *self;
        let stdin = batch.map(|b| &b.stdin);
        let held_pools: Vec<&str> = pools.iter().map(|p| p.name()).collect();
        let record = match lease.record() {
            Ok(record) => record,
            Err(RecordError::Interrupted(sig)) => return Ok(Attempted::LeaseGone(ExitCode::Signal(sig))),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("cannot read channel {channel}'s record")));
            }
        };
        super::record_dead_run(lease, channel, &record, args.quiet);
        let cooling = !pools.is_empty();
        if cooling {
            match super::cooldown::wait_out(lease, pools, channel.name(), wait, control, args.quiet)? {
                Ok(()) => {}
                Err(None) => return Ok(Attempted::Ended(ExitCode::Busy(args.wait.conflict_exit_code))),
                Err(Some(sig)) => return Ok(Attempted::Ended(ExitCode::Signal(sig))),
            }
        }
        if let Some(line) = super::budget::spent(lease, &record, args, channel, pools, SystemTime::now())? {
            ui::say(line);
            return Ok(Attempted::Ended(ExitCode::OverBudget));
        }
        let cwd = std::env::current_dir().ok().map(|d| d.to_string_lossy().into_owned());
        let session = session_to_pass(channel, &record, args, cwd.as_deref());
        let command = with_session(args, session.as_deref());
        let started_at = SystemTime::now();
        let env = command_env(store, store_id, channel, &held_pools, session.as_deref(), lease.fence());
        let env = retry::bound_cli_retries(args, env);
        let mut finished = execute(lease, args, args.timeout, &command, env, started_at, control, stdin);
        let mut reading = read(args, &mut finished);

        // A session the model no longer knows: once more at once, without it, still holding
        // the channel.
        let mut session_note = None;
        if let (Some(stale), Some(Kind::StaleSession)) = (&session, reading.kind)
            && on_stale(args) == OnStale::Fresh
            && matches!(finished.ending, Ending::Ran { stop: None, .. })
        {
            if !args.quiet {
                ui::say(format_args!(
                    "channel {channel}: the model no longer knows session {stale}; running again with a fresh session"
                ));
            }
            session_note = Some(format!("stale session {stale} replaced"));
            let env = command_env(store, store_id, channel, &held_pools, None, lease.fence());
            let env = retry::bound_cli_retries(args, env);
            // What is left of the time limit: the run still ends within SPEC's bound.
            let timeout = match args.timeout.is_zero() {
                true => Duration::ZERO,
                false => args.timeout.saturating_sub(finished.duration).max(Duration::from_millis(1)),
            };
            finished = execute(lease, args, timeout, &args.command, env, started_at, control, stdin);
            reading = read(args, &mut finished);
        }
        let spent = {
            let (tail, whole) = finished.stdout.contents();
            crate::spend::read(tail, whole)
        };
        let command = if session_note.is_some() { args.command.clone() } else { command };

        let outcome = Outcome::of(&finished, channel, &command[0], args.timeout, started_at);
        if let Some((message, quiet_silences)) = &outcome.message
            && !(args.quiet && *quiet_silences)
        {
            ui::say(message);
        }
        let Some(mut last_run) = outcome.last_run else {
            return Ok(Attempted::Ended(outcome.code));
        };
        name_the_ending(&mut last_run, reading, args, channel, session.as_deref());
        if let Some(batch) = batch {
            last_run.extra.insert("messages".into(), batch.messages.into());
        }
        // The pools' ledgers learn of the run while it still holds its seats (and the
        // probe's lock, if it tried the API after a cool-down).
        super::budget::charge_pools(lease, pools, spent.cost_usd);
        if cooling {
            super::cooldown::on_ending(lease, pools, channel.name(), &last_run);
        }
        lease.free_seats();
        spent.put(&mut last_run.extra);
        if args.retry.is_some_and(|n| n > 0) {
            last_run.extra.insert("attempt".into(), attempt.into());
        }
        let new_session = session_from_output(&mut finished, args, channel, &command[0], &mut last_run);
        let result =
            RunResult { last_run: last_run.clone(), new_session, cwd, fresh_after: args.fresh_after };
        let stale_replaced = session_note.is_some();
        let kind = last_run.kind.map_or("failed", Kind::as_str);
        let mut change = |r: &mut ChannelRecord| {
            if stale_replaced {
                r.forget_session();
            }
            r.apply(result.clone());
            crate::spend::charge(&mut r.extra, spent.cost_usd, kind, SystemTime::now());
        };
        // Dropped by --fresh-after: the record as this run will leave it says.
        let mut after = record.clone();
        change(&mut after);
        if !stale_replaced && record.session_id.is_some() && after.session_id.is_none() {
            if !args.quiet {
                ui::say(format_args!(
                    "channel {channel}: dropped its session after {} failures in a row (--fresh-after); its next run starts a fresh conversation",
                    after.failures_in_a_row
                ));
            }
            session_note =
                Some(format!("session dropped by --fresh-after {}", args.fresh_after.unwrap_or(0)));
        }
        // Recorded before the lock is released.
        let mut entry = |after: &ChannelRecord| {
            Outcome::entry(&last_run, record.session_id.clone(), after, session_note.clone())
        };
        let next = self.next(&last_run, attempt, outcome.code);
        // A --collect batch's outcome goes with its last attempt's record (in one write
        // where the store can): the callers it took learn it.
        if batch.is_some() && !matches!(next, Attempted::Retry(_)) {
            lease.stage_batch(outcome.code.code());
        }
        let (recorded, logged) = lease.record_run(&mut change, &mut entry);
        if let Err(e) = logged {
            ui::warn(format!("the run was not added to the channel's history ({e:#})"));
        }
        match recorded.map_err(|e| not_recorded(e, channel, &finished)) {
            Ok(()) | Err(None) => Ok(next),
            // The lock is no longer this run's to release.
            Err(Some(ExitCode::LockLost)) => Ok(Attempted::LeaseGone(ExitCode::LockLost)),
            Err(Some(code)) => Ok(Attempted::Ended(code)),
        }
    }

    /// After a recorded attempt: another one, if `--retry` says so and the ending was
    /// transient.
    fn next(&self, last_run: &LastRun, attempt: u32, code: ExitCode) -> Attempted {
        let (args, channel) = (self.args, self.channel);
        let left = args.retry.unwrap_or(0).saturating_sub(attempt - 1);
        if left == 0 || code == ExitCode::OK || !retry::transient(last_run) {
            return Attempted::Ended(code);
        }
        let resets_at = last_run.extra.get("resets_at").and_then(|v| v.as_str());
        let what = retry::what(last_run);
        match retry::back_off(attempt + 1, resets_at, SystemTime::now()) {
            retry::BackOff::Wait(d) => {
                if !args.quiet {
                    let total = args.retry.unwrap_or(0) + 1;
                    ui::say(format_args!(
                        "channel {channel}: the model's API answered {what}; attempt {} of {total} in {}",
                        attempt + 1,
                        crate::duration::short(d)
                    ));
                }
                Attempted::Retry(d)
            }
            retry::BackOff::TooFar(at) => {
                if !args.quiet {
                    ui::say(format_args!(
                        "channel {channel}: the model's API answered {what}, resetting at {}: more than {} away, so no retry",
                        humantime::format_rfc3339_seconds(at),
                        crate::duration::short(retry::MAX_RESET_WAIT)
                    ));
                }
                Attempted::Ended(code)
            }
        }
    }
}

/// A profile that cannot pass a session to this command is refused before anything runs.
fn check_profile(args: &RunArgs) -> anyhow::Result<()> {
    if let (Some(profile), None, false) = (args.profile, &args.session_arg, args.no_session)
        && profile.with_session(&args.command, "id").is_none()
    {
        anyhow::bail!(
            "--profile codex passes a session as `codex exec resume ID`, but the command has no `exec` argument; run `codex exec ...`, or pass --session-arg"
        );
    }
    Ok(())
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
#[allow(clippy::too_many_arguments)]
fn execute(
    lease: &mut dyn Lease,
    args: &RunArgs,
    timeout: Duration,
    command: &[OsString],
    env: Vec<(&'static str, Option<OsString>)>,
    started_at: SystemTime,
    control: &'static Control,
    stdin: Option<&std::sync::Arc<[u8]>>,
) -> Finished {
    let holder = Holder {
        pid: std::process::id(),
        started_at,
        command,
        spawn_ticks: crate::procfs::now_ticks(),
        ends_by: Some(timeout)
            .filter(|t| !t.is_zero())
            .and_then(|t| Instant::now().checked_add(t + args.kill_after + RETURN_SLACK)),
    };
    if let Err(e) = lease.announce(&holder) {
        ui::warn(format!("cannot record the holder ({e:#}); running anyway"));
    }
    let plan = Plan {
        command,
        env,
        timeout: Some(timeout).filter(|t| !t.is_zero()),
        kill_after: args.kill_after,
        pid_field: lease.pid_field(),
        lost_grace: lease.lost_grace(),
        // The tail also holds what the run spent: kept for a budget.
        tail_cap: match args.no_session && args.budget.is_none() && args.pool_budget.is_none() {
            true => 0,
            false => supervise::TAIL_CAP,
        },
        stdin: stdin.cloned(),
    };
    supervise::run(plan, control, &mut |pid| lease.command_started(pid, crate::procfs::now_ticks()))
}

/// What the profile reads in the run's output, if the run has a profile.
fn read(args: &RunArgs, finished: &mut Finished) -> Reading {
    let (Some(profile), false) = (args.profile, args.no_session) else { return Reading::default() };
    let failed = !matches!(&finished.ending, Ending::Ran { status: Some(s), .. } if s.success());
    let stderr = finished.stdout.stderr().to_vec();
    let (tail, whole) = finished.stdout.contents();
    profile.read(tail, whole, &stderr, failed)
}

fn on_stale(args: &RunArgs) -> OnStale {
    match (args.on_stale_session, args.profile) {
        (Some(what), _) => what,
        (None, Some(_)) => OnStale::Fresh,
        (None, None) => OnStale::Fail,
    }
}

/// Names the run's ending in `last_run`: the profile's reading refines an ending that
/// chan-run did not bring about itself (a run that exited, ok or not).
fn name_the_ending(
    last_run: &mut LastRun,
    reading: Reading,
    args: &RunArgs,
    channel: &Channel,
    session: Option<&str>,
) {
    let kind = match (last_run.outcome, reading.kind) {
        (crate::state::Outcome::Ok | crate::state::Outcome::Failed, Some(kind)) => kind,
        (outcome, _) => Kind::from(outcome),
    };
    last_run.kind = Some(kind);
    if let Some(status) = reading.api_status {
        last_run.extra.insert("api_status".into(), status.into());
    }
    if let Some(at) = reading.resets_at {
        last_run.extra.insert("resets_at".into(), at.into());
    }
    if let (Kind::StaleSession, Some(id), false) = (kind, session, args.quiet) {
        ui::say(format_args!(
            "channel {channel}: the model no longer knows session {id} (--on-stale-session fail); `chan-run reset` starts a fresh one"
        ));
    }
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
    let head = finished.stdout.head().to_vec();
    let (tail, whole) = finished.stdout.contents();
    let found = match (args.profile, &args.session_key) {
        (Some(profile), None) => profile.find_session(&head, tail, whole),
        (_, key) => session::find(tail, whole, key.as_deref().unwrap_or(DEFAULT_SESSION_KEY)),
    };
    match found {
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

/// `--session-key` without a profile.
const DEFAULT_SESSION_KEY: &str = "/session_id";

/// The command with the session passed: with `--session-arg FLAG`, `FLAG ID` appended,
/// or `FLAGID` as one argument when the flag ends in `=` (`--session-arg=--resume=`),
/// for a CLI whose flag value is optional; else as the profile passes it.
fn with_session(args: &RunArgs, id: Option<&str>) -> Vec<OsString> {
    let mut command = args.command.clone();
    let Some(id) = id else { return command };
    match (&args.session_arg, args.profile) {
        (Some(flag), _) => match flag.to_string_lossy().ends_with('=') {
            true => {
                let mut joined = flag.clone();
                joined.push(id);
                command.push(joined);
            }
            false => command.extend([flag.clone(), OsString::from(id)]),
        },
        (None, Some(profile)) => {
            if let Some(with) = profile.with_session(&command, id) {
                command = with;
            }
        }
        (None, None) => {}
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
