//! One module per subcommand, gluing the store, the supervisor and the state together;
//! and what `run` and `reset` share: queueing for a channel as `-n`/`-w`/`-E` say, with
//! the waiting line on a terminal.

mod budget;
mod collect;
mod cooldown;
pub mod gc;
mod held;
pub mod history;
mod metrics;
mod outcome;
pub mod reset;
mod retry;
pub mod run;
pub mod status;

use crate::channel::Channel;
use crate::cli::WaitArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::pool::Pool;
use crate::state::ChannelRecord;
use crate::store::{AcquireError, Lease, SeatNote, Store, Wait, WaitNote};
use std::io::IsTerminal;
use std::time::Instant;

/// How long this caller waits, as `-n`/`-w` say: one deadline for the channel and
/// every seat.
pub fn wait_of(args: &WaitArgs) -> Wait {
    match (args.no_wait, args.wait) {
        (true, _) => Wait::No,
        (false, Some(d)) => Instant::now().checked_add(d).map_or(Wait::Forever, Wait::Until),
        (false, None) => Wait::Forever,
    }
}

/// Queues for `channel` as `args` says; `Err(code)` when the caller must exit with it
/// (busy, or interrupted while waiting: then nothing ran).
pub fn acquire(
    store: &dyn Store,
    channel: &Channel,
    args: &WaitArgs,
    wait: Wait,
    quiet: bool,
    control: &'static Control,
) -> anyhow::Result<Result<Box<dyn Lease>, ExitCode>> {
    let mut on_wait = |note: &WaitNote| {
        if !quiet && std::io::stderr().is_terminal() {
            crate::ui::say(waiting_line(channel, note));
        }
    };
    let acquired = store.acquire(channel, wait, control, &mut on_wait);
    busy_or_interrupted(acquired, args)
}

/// Takes a seat in each of `pools` (already in name order) for the held channel, with
/// the same deadline; `Err(code)` as in `acquire`. Seats already held are kept until the
/// lease goes.
pub fn take_seats(
    lease: &mut dyn Lease,
    pools: &[Pool],
    args: &WaitArgs,
    wait: Wait,
    quiet: bool,
    control: &'static Control,
) -> anyhow::Result<Result<(), ExitCode>> {
    for pool in pools {
        let mut on_wait = |note: &SeatNote| {
            if !quiet && std::io::stderr().is_terminal() {
                crate::ui::say(seat_line(pool, note));
            }
        };
        if let Err(code) = busy_or_interrupted(lease.take_seat(pool, wait, control, &mut on_wait), args)? {
            return Ok(Err(code));
        }
    }
    Ok(Ok(()))
}

fn busy_or_interrupted<T>(
    taken: Result<T, AcquireError>,
    args: &WaitArgs,
) -> anyhow::Result<Result<T, ExitCode>> {
    match taken {
        Ok(held) => Ok(Ok(held)),
        Err(AcquireError::Busy) => Ok(Err(ExitCode::Busy(args.conflict_exit_code))),
        Err(AcquireError::Interrupted(sig)) => Ok(Err(ExitCode::Signal(sig))),
        Err(AcquireError::Failed(e)) => Err(e),
    }
}

fn seat_line(pool: &Pool, note: &SeatNote) -> String {
    // Whoever waits finds every seat it may take held (the first in line sleeps only then).
    let n = pool.seats;
    format!("waiting for a seat in pool {} ({n} of {n} seats held; {} ahead)", pool.name(), note.ahead)
}

fn waiting_line(channel: &Channel, note: &WaitNote) -> String {
    let on = note.holder_host.as_ref().map(|h| format!(" on {h}")).unwrap_or_default();
    let holder = match (note.holder_pid, note.held_for) {
        (Some(pid), Some(d)) => format!("held by pid {pid}{on} for {}", crate::duration::short(d)),
        (Some(pid), None) => format!("held by pid {pid}{on}"),
        _ => "held".to_owned(),
    };
    format!("waiting for channel {channel} ({holder}; {} ahead)", note.ahead)
}

/// Writes the history entry of the previous run if its chan-run died holding the
/// channel (the lease found its holder record), unless that run was recorded already
/// (killed between its record and its release), and says so.
pub fn record_dead_run(lease: &mut dyn Lease, channel: &Channel, record: &ChannelRecord, quiet: bool) {
    let Some(dead) = lease.died() else { return };
    if record.last_run.as_ref().is_some_and(|r| r.started_at == dead.started_at) {
        return;
    }
    let entry = outcome::died_entry(&dead, record);
    if !quiet {
        crate::ui::say(format_args!(
            "channel {channel}: the run of pid {} started {} ({}) ended with its chan-run, which died; recorded in its history as died",
            dead.pid,
            dead.started_at,
            dead.command.first().map_or("?", String::as_str),
        ));
    }
    if let Err(e) = lease.append_history(&entry) {
        crate::ui::warn(format!("the dead run was not added to the channel's history ({e:#})"));
    }
}
