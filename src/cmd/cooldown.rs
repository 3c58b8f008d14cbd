//! A pool's cool-down: when a run in a pool ends overloaded, rate limited or with a 5xx
//! (as its profile reads it), the pool's next commands wait for one back-off, shared
//! by all its channels, instead of each channel retrying on its own. Kept in the pool's
//! ledger as `cool_down: {"until", "step", "kind", "channel"}`.
//!
//! - A transient ending with no cool-down starts one (step 0: `retry::BASE` with
//!   jitter, or until the reset time the CLI named, at most `retry::MAX_RESET_WAIT`).
//!   One while a cool-down runs changes nothing: it started before it.
//! - A run that took its seats waits until `until` (a signal ends the wait; `-n` and
//!   `-w` make it busy). The first to find the cool-down over goes alone, as the
//!   probe (it holds the pool's probe lock until its outcome is in the ledger); the
//!   others wait for that lock, then look again. The probe's `ok` ends the cool-down;
//!   a transient ending starts the next step (doubled).
//!
//! So a pool hammered by 529s sees one back-off schedule: one probe per step.

use super::retry;
use crate::control::Control;
use crate::pool::Pool;
use crate::state::{Kind, LastRun};
use crate::store::{AcquireError, Lease, Wait};
use serde_json::{Map, Value, json};
use std::time::{Duration, Instant, SystemTime};

const KEY: &str = "cool_down";

fn until(cool: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(cool.get("until")?.as_str()?).ok()
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The step-`step` back-off (0 is the first), or until a near reset time.
fn step_len(step: u64, resets_at: Option<&str>, now: SystemTime) -> Duration {
    match retry::back_off(step.min(30) as u32 + 2, resets_at, now) {
        retry::BackOff::Wait(d) => d,
        retry::BackOff::TooFar(_) => retry::MAX_RESET_WAIT,
    }
}

/// The cool-down in force at `now`, for `status --json` (`null` when none).
pub fn active(ledger: &Map<String, Value>, now: SystemTime) -> Value {
    match ledger.get(KEY) {
        Some(cool) if until(cool).is_some_and(|u| u > now) => cool.clone(),
        _ => Value::Null,
    }
}

/// The line `status` says about a pool cooling down.
pub fn describe(pool: &str, ledger: &Map<String, Value>, now: SystemTime) -> Option<String> {
    let cool = ledger.get(KEY)?;
    let end = until(cool).filter(|u| *u > now)?;
    let kind = cool.get("kind").and_then(Value::as_str).unwrap_or("overloaded");
    let channel = cool.get("channel").and_then(Value::as_str).unwrap_or("?");
    let left = end.duration_since(now).unwrap_or_default();
    Some(format!(
        "pool {pool} cools down until {} ({kind} on channel {channel}; {} left): its next commands wait",
        humantime::format_rfc3339_seconds(end),
        crate::duration::short(Duration::from_millis(left.as_millis().max(1) as u64)),
    ))
}

/// After an attempt in `pools` ended as `last_run` says (its seats still held):
/// starts a cool-down for a transient ending, or its next step if the one in force is
/// over (this run was its probe, or started before it); ends it for `ok`.
pub fn on_ending(lease: &mut dyn Lease, pools: &[Pool], channel: &str, last_run: &LastRun) {
    let transient = retry::transient(last_run);
    if !transient && last_run.kind != Some(Kind::Ok) {
        return;
    }
    let resets_at = last_run.extra.get("resets_at").and_then(Value::as_str);
    let kind = last_run.kind.map_or("failed", Kind::as_str);
    for pool in pools {
        let changed = lease.update_pool_ledger(pool, &mut |ledger| {
            let now = SystemTime::now();
            let cool = ledger.get(KEY);
            let step = match cool.map(|c| (until(c).is_some_and(|u| u > now), c)) {
                _ if !transient => {
                    ledger.remove(KEY);
                    return;
                }
                Some((true, _)) => return,
                Some((false, c)) => c.get("step").and_then(Value::as_u64).unwrap_or(0) + 1,
                None => 0,
            };
            let end = now + step_len(step, resets_at, now);
            let cool = json!({"until": stamp(end), "step": step, "kind": kind, "channel": channel});
            ledger.insert(KEY.into(), cool);
        });
        if let Err(e) = changed {
            crate::ui::warn(format!("pool {}'s cool-down was not updated ({e:#})", pool.name()));
        }
    }
}

/// Before the command starts, holding its seats: waits out each pool's cool-down, then
/// for its probe, or becomes the probe. `Err(None)`: the wait was given up (busy);
/// `Err(Some(sig))`: a signal ended it.
pub fn wait_out(
    lease: &mut dyn Lease,
    pools: &[Pool],
    channel: &str,
    wait: Wait,
    control: &'static Control,
    quiet: bool,
) -> anyhow::Result<Result<(), Option<i32>>> {
    let deadline = match wait {
        Wait::Until(d) => Some(d),
        _ => None,
    };
    for pool in pools {
        let mut said = false;
        loop {
            let ledger = lease.update_pool_ledger(pool, &mut |_| {})?;
            let Some(cool) = ledger.get(KEY) else { break };
            let now = SystemTime::now();
            if wait == Wait::No {
                return Ok(Err(None));
            }
            if let Some(end) = until(cool).filter(|u| *u > now) {
                let left = end.duration_since(now).unwrap_or_default();
                if !quiet && !said {
                    said = true;
                    crate::ui::say(format_args!(
                        "channel {channel}: pool {} cools down for {}; waiting",
                        pool.name(),
                        crate::duration::short(left)
                    ));
                }
                let wake = Instant::now() + left;
                let stop = deadline.filter(|d| *d < wake);
                if let Err(sig) =
                    retry::sleep(control, stop.unwrap_or(wake).saturating_duration_since(Instant::now()))?
                {
                    return Ok(Err(Some(sig)));
                }
                if stop.is_some() {
                    return Ok(Err(None));
                }
                continue;
            }
            if lease.take_pool_probe(pool)? {
                lease.update_pool_ledger(pool, &mut |l| {
                    if let Some(cool) = l.get_mut(KEY).and_then(Value::as_object_mut) {
                        cool.insert("probe".into(), channel.into());
                    }
                })?;
                break;
            }
            match lease.wait_pool_probe(pool, deadline, control) {
                Ok(()) => {}
                Err(AcquireError::Busy) => return Ok(Err(None)),
                Err(AcquireError::Interrupted(sig)) => return Ok(Err(Some(sig))),
                Err(AcquireError::Failed(e)) => return Err(e),
            }
        }
    }
    Ok(Ok(()))
}
