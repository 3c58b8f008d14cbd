//! The exit codes of SPEC.md as one type: a command's own status passes through,
//! chan-run's own endings have fixed codes, and a signal N becomes 128+N.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Stopped at `--timeout` (as `timeout(1)`), even when SIGKILL was needed.
pub const TIMED_OUT: u8 = 124;
/// chan-run itself failed: usage, bad channel name, unusable state directory.
pub const CHAN_RUN_FAILED: u8 = 125;
/// The command exists but could not be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;
/// The store lost the channel's lock while the command ran (PostgreSQL store: the
/// connection or heartbeat failed, or another holder's fence superseded this one):
/// the command was stopped, or its result was not recorded.
pub const LOCK_LOST: u8 = 122;
/// The default busy code (`EX_TEMPFAIL`), changed with `-E`.
pub const BUSY_DEFAULT: u8 = 75;

/// The shell's encoding of a finished process: its code, or 128 + the signal.
pub fn from_status(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => from_signal(sig),
        (None, None) => CHAN_RUN_FAILED,
    }
}

pub fn from_signal(sig: i32) -> u8 {
    (128 + sig).clamp(0, 255) as u8
}

/// A spawn error as a shell reports it: 127 when not found, 126 otherwise.
pub fn from_spawn_error(err: &std::io::Error) -> u8 {
    if err.kind() == std::io::ErrorKind::NotFound { NOT_FOUND } else { CANNOT_EXECUTE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_and_code_encoding() {
        assert_eq!(from_status(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(from_status(ExitStatus::from_raw(9)), 137);
        assert_eq!(from_signal(15), 143);
        let not_found = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(from_spawn_error(&not_found), 127);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(from_spawn_error(&denied), 126);
    }
}
