//! `chan-run reset CHANNEL`: queue for the channel like a run, forget its session id.
//! It does not count as a run.

use crate::channel::Channel;
use crate::cli::ResetArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::store::{Holder, Store};
use std::ffi::OsString;
use std::time::SystemTime;

pub fn reset(store: &dyn Store, args: ResetArgs, control: &'static Control) -> anyhow::Result<ExitCode> {
    let channel = Channel::new(&args.channel)?;
    super::held::refuse_self_deadlock(&store.id(), &channel)?;
    let mut lease =
        match super::acquire(store, &channel, &args.wait, super::wait_of(&args.wait), false, control)? {
            Ok(lease) => lease,
            Err(code) => return Ok(code),
        };
    // A run whose chan-run died holding the channel goes into its history first, as the
    // next run would have written it.
    match lease.record() {
        Ok(record) => super::record_dead_run(lease.as_mut(), &channel, &record, false),
        Err(crate::store::RecordError::Interrupted(sig)) => return Ok(ExitCode::Signal(sig)),
        Err(e) => return Err(e.into()),
    }
    let command = [OsString::from("chan-run"), OsString::from("reset")];
    let holder = Holder {
        pid: std::process::id(),
        started_at: SystemTime::now(),
        command: &command,
        spawn_ticks: crate::procfs::now_ticks(),
        ends_by: None,
    };
    lease.announce(&holder)?;
    let mut forgotten = None;
    let forgot = lease.update(&mut |record| {
        forgotten = record.session_id.clone();
        record.forget_session();
    });
    match forgot {
        Ok(()) => {}
        Err(crate::store::RecordError::Interrupted(sig)) => return Ok(ExitCode::Signal(sig)),
        Err(e) => return Err(e.into()),
    }
    lease.release()?;
    match forgotten {
        Some(id) => crate::ui::say(format_args!(
            "channel {channel}: forgot session {id}; its next run starts a new conversation"
        )),
        None => crate::ui::say(format_args!("channel {channel} had no stored session")),
    }
    Ok(ExitCode::OK)
}
