//! The channels a command's chan-run ancestors hold, passed down in `CHAN_RUN_HELD`: a
//! chan-run started inside a command for the very lock its own ancestor holds would
//! wait for that ancestor forever, so it refuses (exit 125). A lock is a channel in a
//! store: the same name in another state directory or database is another lock.

use crate::channel::Channel;
use anyhow::bail;
use std::ffi::OsString;

/// Lines of `<pid> <store> <channel>`, one per holding ancestor.
pub const HELD_ENV: &str = "CHAN_RUN_HELD";

/// Refuses a run for a lock that one of this process's ancestors holds.
pub fn refuse_self_deadlock(store: &str, channel: &Channel) -> anyhow::Result<()> {
    let Some(held) = std::env::var_os(HELD_ENV) else { return Ok(()) };
    for line in held.to_string_lossy().lines() {
        let mut words = line.splitn(3, ' ');
        let (Some(pid), Some(on), Some(name)) = (words.next(), words.next(), words.next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if on == store
            && name == channel.name()
            && (!cfg!(target_os = "linux") || crate::procfs::is_ancestor(pid))
        {
            bail!(
                "channel {channel} is held by this command's own chan-run (pid {pid}); waiting for it would never end: use another channel for the nested call"
            );
        }
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
