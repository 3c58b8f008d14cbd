//! The channels a command's chan-run ancestors hold, passed down in `CHAN_RUN_HELD`: a
//! chan-run started inside a command for the very lock its own ancestor holds would
//! wait for that ancestor forever, so it refuses (exit 125). A lock is a channel in a
//! store: the same name in another state directory or database is another lock.

use crate::channel::Channel;
use anyhow::bail;
use std::ffi::OsString;

/// Lines of `<pid> <store> <channel>`, one per holding ancestor.
pub const HELD_ENV: &str = "CHAN_RUN_HELD";

/// Lines of `<pid> <store> <pool>`, one per seat an ancestor holds (or is covered by).
pub const SEATS_ENV: &str = "CHAN_RUN_SEATS";

/// The pid of an ancestor that `var`'s lines say holds `name` in `store`.
fn ancestors_holding(var: &str, store: &str, name: &str) -> Option<u32> {
    let held = std::env::var_os(var)?;
    held.to_string_lossy().lines().find_map(|line| {
        let mut words = line.splitn(3, ' ');
        let (pid, on, named) = (words.next()?, words.next()?, words.next()?);
        let pid = pid.parse::<u32>().ok()?;
        (on == store && named == name && (!cfg!(target_os = "linux") || crate::procfs::is_ancestor(pid)))
            .then_some(pid)
    })
}

/// The ancestor run whose seat in `pool` covers this run, if any.
pub fn ancestor_seat(store: &str, pool: &crate::pool::Pool) -> Option<u32> {
    ancestors_holding(SEATS_ENV, store, pool.name())
}

/// `CHAN_RUN_SEATS` for the command: the ancestors' lines and this run's pools.
pub fn seats_env(store: &str, pools: &[&str]) -> Option<OsString> {
    let mut held = std::env::var_os(SEATS_ENV).map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    for pool in pools {
        if !held.is_empty() && !held.ends_with('\n') {
            held.push('\n');
        }
        held.push_str(&format!("{} {store} {pool}", std::process::id()));
    }
    (!held.is_empty()).then(|| held.into())
}

/// Refuses a run for a lock that one of this process's ancestors holds.
pub fn refuse_self_deadlock(store: &str, channel: &Channel) -> anyhow::Result<()> {
    if let Some(pid) = ancestors_holding(HELD_ENV, store, channel.name()) {
        bail!(
            "channel {channel} is held by this command's own chan-run (pid {pid}); waiting for it would never end: use another channel for the nested call"
        );
    }
    Ok(())
}

/// `CHAN_RUN_HELD` for the command: the ancestors' lines and this run's.
pub fn held_env(store: &str, channel: &Channel) -> OsString {
    let mut held = std::env::var_os(HELD_ENV).map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    if !held.is_empty() && !held.ends_with('\n') {
        held.push('\n');
    }
    held.push_str(&format!("{} {store} {}", std::process::id(), channel.name()));
    held.into()
}
