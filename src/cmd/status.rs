//! `chan-run status`: every known channel (or those named), running or idle, from the
//! kernel's lock table and the holder records, plus each channel's stored record. It
//! takes and joins nothing, so it never waits behind a run or makes one fail.

use crate::channel::Channel;
use crate::cli::StatusArgs;
use crate::exit_code::ExitCode;
use crate::store::{ChannelStatus, Store};
use crate::ui::write_out;
use serde_json::json;
use std::time::{Duration, SystemTime};

/// A channel that failed this many times in a row is flagged.
const FLAG_FAILURES: u64 = 3;

pub fn status(store: Option<&dyn Store>, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let only = args.channels.iter().map(|n| Channel::new(n)).collect::<Result<Vec<_>, _>>()?;
    let (channels, warnings) = match store {
        Some(store) => store.status(&only)?,
        None => (Vec::new(), Vec::new()),
    };
    for w in &warnings {
        crate::ui::warn(w);
    }
    if args.json {
        let list: Vec<_> = channels.iter().map(to_json).collect();
        let text =
            serde_json::to_string_pretty(&json!({"version": 1, "channels": list, "warnings": warnings}))?;
        write_out(&format!("{text}\n"))?;
    } else {
        write_out(&table(&channels, SystemTime::now()))?;
    }
    Ok(ExitCode::OK)
}

fn to_json(c: &ChannelStatus) -> serde_json::Value {
    let record = c.record.clone().unwrap_or_default();
    json!({
        "channel": c.channel,
        "state": if c.running { "running" } else { "idle" },
        "holder": c.holder,
        "waiting": c.queue.len(),
        "queue": c.queue,
        "session_id": record.session_id,
        "session_cwd": record.session_cwd,
        "runs": record.runs,
        "failures_in_a_row": record.failures_in_a_row,
        "last_run": record.last_run,
    })
}

const HEADERS: [&str; 8] = ["CHANNEL", "STATE", "PID", "FOR", "WAIT", "RUNS", "LAST RUN", "SESSION"];
/// Column caps that keep a row within 100 columns.
const CAPS: [usize; 8] = [21, 7, 7, 5, 4, 6, 26, 10];

fn table(channels: &[ChannelStatus], now: SystemTime) -> String {
    if channels.is_empty() {
        return "no channels yet\n".to_owned();
    }
    let rows: Vec<[String; 8]> = channels.iter().map(|c| row(c, now)).collect();
    crate::ui::table(HEADERS, Some(CAPS), &rows)
}

fn row(c: &ChannelStatus, now: SystemTime) -> [String; 8] {
    let record = c.record.clone().unwrap_or_default();
    let holder = c.holder.as_ref();
    let held_for = holder
        .and_then(|h| h.started_at.as_deref())
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| now.duration_since(t).ok())
        .map(crate::duration::short);
    let last = record.last_run.as_ref().map(|r| {
        let code = match (r.exit_code, r.signal) {
            (_, Some(sig)) => format!(" sig{sig}"),
            (Some(code), None) if code != 0 => format!(" {code}"),
            _ => String::new(),
        };
        let streak = match record.failures_in_a_row {
            n if n >= FLAG_FAILURES => format!(" !{n}x"),
            _ => String::new(),
        };
        let ago = humantime::parse_rfc3339(&r.finished_at)
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| match d.as_secs() {
                0 => " just now".to_owned(),
                s => format!(" {} ago", crate::duration::short(Duration::from_secs(s))),
            })
            .unwrap_or_default();
        format!("{}{code}{streak}{ago}", r.named())
    });
    let dash = || "-".to_owned();
    [
        c.channel.clone(),
        if c.running { "running" } else { "idle" }.to_owned(),
        holder.and_then(|h| h.pid).map_or_else(dash, |p| p.to_string()),
        held_for.unwrap_or_else(dash),
        c.queue.len().to_string(),
        record.runs.to_string(),
        last.unwrap_or_else(dash),
        record.session_id.unwrap_or_else(dash),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ChannelRecord, LastRun, Outcome};
    use crate::store::HolderView;

    #[test]
    fn table_fits_100_columns_and_flags_failing_channels() {
        let now = humantime::parse_rfc3339("2026-11-26T10:00:00Z").unwrap();
        let failing = ChannelRecord {
            session_id: Some("8f2c0a1e-1111-2222-3333-444455556666".into()),
            runs: 123456,
            failures_in_a_row: 4,
            last_run: Some(LastRun {
                started_at: "2026-11-26T09:57:00.000Z".into(),
                finished_at: "2026-11-26T09:58:00.000Z".into(),
                duration_ms: 60000,
                exit_code: None,
                signal: Some(15),
                outcome: Outcome::TimedOut,
                kind: None,
                extra: Default::default(),
            }),
            ..Default::default()
        };
        let channels = vec![
            ChannelStatus {
                channel: "discord:1234567890123456789/thread:987654321".into(),
                running: true,
                holder: Some(HolderView {
                    pid: Some(4194304),
                    started_at: Some("2026-11-26T09:59:48.000Z".into()),
                    ..Default::default()
                }),
                queue: vec![],
                record: Some(failing),
            },
            ChannelStatus { channel: "idle-one".into(), ..Default::default() },
        ];
        let out = table(&channels, now);
        for line in out.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        assert!(out.contains("timed_out sig15 !4x 2m ago"), "{out}");
        assert!(out.contains("12s"), "{out}");
        assert!(out.lines().nth(2).unwrap().starts_with("idle-one"), "{out}");
    }
}
