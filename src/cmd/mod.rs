//! One module per subcommand, gluing the store, the supervisor and the state together;
//! and what `run` and `reset` share: queueing for a channel as `-n`/`-w`/`-E` say, with
//! the waiting line on a terminal.

pub mod gc;
mod held;
pub mod history;
mod outcome;
pub mod reset;
pub mod run;
pub mod status;

use crate::channel::Channel;
use crate::cli::WaitArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::store::{AcquireError, Lease, Store, Wait, WaitNote};
use std::io::IsTerminal;
use std::time::Instant;

/// Queues for `channel` as `args` says; `Err(code)` when the caller must exit with it
/// (busy, or interrupted while waiting: then nothing ran).
pub fn acquire(
    store: &dyn Store,
    channel: &Channel,
    args: &WaitArgs,
    quiet: bool,
    control: &'static Control,
) -> anyhow::Result<Result<Box<dyn Lease>, ExitCode>> {
    let wait = match (args.no_wait, args.wait) {
        (true, _) => Wait::No,
        (false, Some(d)) => Instant::now().checked_add(d).map_or(Wait::Forever, Wait::Until),
        (false, None) => Wait::Forever,
    };
    let mut on_wait = |note: &WaitNote| {
        if !quiet && std::io::stderr().is_terminal() {
            crate::ui::say(waiting_line(channel, note));
        }
    };
    match store.acquire(channel, wait, control, &mut on_wait) {
        Ok(lease) => Ok(Ok(lease)),
        Err(AcquireError::Busy) => Ok(Err(ExitCode::Busy(args.conflict_exit_code))),
        Err(AcquireError::Interrupted(sig)) => Ok(Err(ExitCode::Signal(sig))),
        Err(AcquireError::Failed(e)) => Err(e),
    }
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
