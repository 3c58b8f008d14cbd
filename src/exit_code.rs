//! SPEC's exit status as one type: a command's own status passes through, chan-run's own
//! endings have fixed codes, and a signal N becomes 128+N.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The default busy code (`EX_TEMPFAIL`), changed with `-E`.
pub const BUSY_DEFAULT: u8 = 75;

/// The default "answered by the run of an earlier message" code (`--collect`), changed
/// with `--collected-exit-code`: outside sysexits' 64-78, the shell's 126-165 and
/// chan-run's 69, 75, 122, 124-128, so a bot can never read it as one of those.
pub const COLLECTED_DEFAULT: u8 = 80;

/// How chan-run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// The command ran and exited with this code (0 included).
    Command(u8),
    /// Stopped at `--timeout` (as `timeout(1)`), even when SIGKILL was needed.
    TimedOut,
    /// The channel stayed busy (`--no-wait`, `--wait` elapsed): the `-E` code.
    Busy(u8),
    /// `--collect`: this caller's message was answered by the run of an earlier one (the
    /// `--collected-exit-code`).
    Collected(u8),
    /// chan-run itself failed: usage, bad channel name, unusable state directory, its
    /// own resources.
    Failed,
    /// The command exists but could not be executed.
    CannotExecute,
    /// The command was not found.
    NotFound,
    /// The command died of signal N, or chan-run was interrupted by it.
    Signal(i32),
    /// The store could not be reached or did not answer in time (`EX_UNAVAILABLE`):
    /// nothing ran; worth a retry.
    Unavailable,
    /// The store lost the channel's lock while the command ran (PostgreSQL store): the
    /// command was stopped, or its result was not recorded.
    LockLost,
    /// `--budget` / `--pool-budget`: today's spending reached the cap (`EX_NOPERM`):
    /// nothing ran.
    OverBudget,
}

impl ExitCode {
    pub const OK: ExitCode = ExitCode::Command(0);

    /// The shell's encoding of a finished process: its code, or 128 + the signal.
    pub fn from_status(status: ExitStatus) -> ExitCode {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::Command(code as u8),
            (None, Some(sig)) => ExitCode::Signal(sig),
            (None, None) => ExitCode::Failed,
        }
    }

    /// A spawn error as a shell reports it: 127 when not found, 126 otherwise.
    pub fn from_spawn_error(err: &std::io::Error) -> ExitCode {
        match err.kind() {
            std::io::ErrorKind::NotFound => ExitCode::NotFound,
            _ => ExitCode::CannotExecute,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            ExitCode::Command(code) | ExitCode::Busy(code) | ExitCode::Collected(code) => code,
            ExitCode::TimedOut => 124,
            ExitCode::Failed => 125,
            ExitCode::CannotExecute => 126,
            ExitCode::NotFound => 127,
            ExitCode::Signal(sig) => (128 + sig).clamp(0, 255) as u8,
            ExitCode::LockLost => 122,
            ExitCode::Unavailable => 69,
            ExitCode::OverBudget => 77,
        }
    }
}

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code())
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> std::process::ExitCode {
        std::process::ExitCode::from(code.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_and_code_encoding() {
        assert_eq!(ExitCode::from_status(ExitStatus::from_raw(3 << 8)).code(), 3);
        assert_eq!(ExitCode::from_status(ExitStatus::from_raw(9)).code(), 137);
        assert_eq!(ExitCode::Signal(15).code(), 143);
        let not_found = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(ExitCode::from_spawn_error(&not_found).code(), 127);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(ExitCode::from_spawn_error(&denied).code(), 126);
        assert_eq!(
            (ExitCode::TimedOut.code(), ExitCode::Failed.code(), ExitCode::LockLost.code()),
            (124, 125, 122)
        );
    }
}
