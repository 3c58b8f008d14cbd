//! `--retry N`: which endings are worth another attempt (those the profile names
//! transient: overloaded, rate limited, a 5xx from the API; never a stale session or
//! another error), how long to back off before it (exponential with jitter, or until
//! the reset time the CLI named), and the wait itself, through `Control`, so a signal
//! ends it. The channel stays held throughout; `run` frees the pools' seats meanwhile.

use crate::cli::RunArgs;
use crate::control::Control;
use crate::profile::Profile;
use crate::state::{Kind, LastRun};
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The first back-off; each later one doubles, up to `CAP`.
pub const BASE: Duration = Duration::from_secs(1);
pub const CAP: Duration = Duration::from_secs(60);
/// A reset time further away than this is not waited for: the run ends rate limited.
pub const MAX_RESET_WAIT: Duration = Duration::from_secs(15 * 60);

/// Whether a run that ended as `last_run` says is worth another attempt.
pub fn transient(last_run: &LastRun) -> bool {
    let status = last_run.extra.get("api_status").and_then(|v| v.as_u64());
    match last_run.kind {
        Some(Kind::Overloaded | Kind::RateLimited) => true,
        Some(Kind::ModelError) => status.is_some_and(|s| (500..600).contains(&s)),
        _ => false,
    }
}

/// What to do before attempt `next` (2 is the first retry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackOff {
    /// Wait this long, then run again.
    Wait(Duration),
    /// The CLI's reset time is further away than `MAX_RESET_WAIT`: give up.
    TooFar(SystemTime),
}

/// The back-off before attempt `next`: `BASE`·2^(next-2), at most `CAP`, less a random
/// part of up to half (so channels that failed together do not come back together);
/// or, when the CLI named a later reset time, until then.
pub fn back_off(next: u32, resets_at: Option<&str>, now: SystemTime) -> BackOff {
    let full = BASE.saturating_mul(1 << next.saturating_sub(2).min(16)).min(CAP);
    let jittered = full.mul_f64(1.0 - 0.5 * random_fraction());
    match resets_at.and_then(parse_reset).and_then(|at| at.duration_since(now).ok()) {
        Some(until_reset) if until_reset > MAX_RESET_WAIT => BackOff::TooFar(now + until_reset),
        Some(until_reset) => BackOff::Wait(until_reset.max(jittered)),
        None => BackOff::Wait(jittered),
    }
}

/// A reset time as CLIs give it: RFC 3339, or seconds (milliseconds) since the epoch.
pub fn parse_reset(text: &str) -> Option<SystemTime> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Some(at);
    }
    let n: f64 = text.parse().ok().filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    let secs = if n > 1e12 { n / 1000.0 } else { n };
    Some(UNIX_EPOCH + Duration::from_secs_f64(secs))
}

/// In [0, 1), from the standard library's per-process random hash keys.
fn random_fraction() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Sleeps `d` on the main thread's one waiting place; `Err(signal)` if a forwarded
/// signal ends it first.
pub fn sleep(control: &'static Control, d: Duration) -> anyhow::Result<Result<(), i32>> {
    let deadline = Instant::now() + d;
    loop {
        if let Some(sig) = control.take_signal() {
            return Ok(Err(sig));
        }
        if Instant::now() >= deadline {
            return Ok(Ok(()));
        }
        control.wait(Some(deadline))?;
    }
}

/// With `--retry` and the claude profile, claude's own retries are turned off
/// (`CLAUDE_CODE_MAX_RETRIES=0`, unless the caller set it), so one place decides.
pub fn bound_cli_retries(
    args: &RunArgs,
    mut env: Vec<(&'static str, Option<OsString>)>,
) -> Vec<(&'static str, Option<OsString>)> {
    if args.retry.is_some()
        && args.profile == Some(Profile::Claude)
        && std::env::var_os("CLAUDE_CODE_MAX_RETRIES").is_none()
    {
        env.push(("CLAUDE_CODE_MAX_RETRIES", Some("0".into())));
    }
    env
}

/// How a transient ending reads in the retry line: `overloaded (529)`.
pub fn what(last_run: &LastRun) -> String {
    let kind = last_run.kind.map_or("failed", Kind::as_str).replace('_', " ");
    match last_run.extra.get("api_status").and_then(|v| v.as_u64()) {
        Some(status) => format!("{kind} ({status})"),
        None => kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn back_off_doubles_with_jitter_and_honours_a_near_reset() {
        let now = at("2026-12-01T10:00:00Z");
        for (next, full) in [(2, 1), (3, 2), (4, 4), (10, 60), (40, 60)] {
            let BackOff::Wait(d) = back_off(next, None, now) else { panic!() };
            let full = Duration::from_secs(full);
            assert!(d <= full && d >= full / 2, "attempt {next}: {d:?}");
        }
        assert_eq!(back_off(2, Some("2026-12-01T10:00:30Z"), now), BackOff::Wait(Duration::from_secs(30)));
        let epoch = (now + Duration::from_secs(20)).duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(back_off(2, Some(&epoch.to_string()), now), BackOff::Wait(Duration::from_secs(20)));
        assert_eq!(
            back_off(2, Some("2026-12-01T11:00:00Z"), now),
            BackOff::TooFar(at("2026-12-01T11:00:00Z"))
        );
        // A reset already past: the usual back-off.
        assert!(matches!(back_off(2, Some("2026-12-01T09:00:00Z"), now), BackOff::Wait(d) if d <= BASE));
    }

    #[test]
    fn only_transient_kinds_are_retried() {
        let run = |kind, status: Option<u64>| {
            let mut extra = serde_json::Map::new();
            if let Some(s) = status {
                extra.insert("api_status".into(), s.into());
            }
            LastRun {
                started_at: String::new(),
                finished_at: String::new(),
                duration_ms: 0,
                exit_code: Some(1),
                signal: None,
                outcome: crate::state::Outcome::Failed,
                kind: Some(kind),
                extra,
            }
        };
        assert!(transient(&run(Kind::Overloaded, Some(529))));
        assert!(transient(&run(Kind::RateLimited, Some(429))));
        assert!(transient(&run(Kind::ModelError, Some(503))));
        assert!(!transient(&run(Kind::ModelError, Some(400))));
        assert!(!transient(&run(Kind::StaleSession, None)));
        assert!(!transient(&run(Kind::Failed, None)));
        assert!(!transient(&run(Kind::TimedOut, None)));
    }
}
