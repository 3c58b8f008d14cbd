//! `chan-run status`: every known channel (or those named), running or idle, from the
//! kernel's lock table and the holder records, plus each channel's stored record. It
//! takes and joins nothing, so it never waits behind a run or makes one fail.

use crate::channel::Channel;
use crate::cli::StatusArgs;
use crate::exit_code::ExitCode;
use crate::spend;
use crate::store::{ChannelStatus, PoolLedger, PoolStatus, Store};
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
    let mut pools = match store {
        Some(store) => store.pools(&[])?,
        None => Vec::new(),
    };
    let ledgers = match store {
        Some(store) => store.pool_ledgers(&[])?,
        None => Vec::new(),
    };
    // Named channels: only the pools they hold or wait for a seat in.
    if !only.is_empty() {
        pools.retain(|p| {
            p.holders
                .iter()
                .chain(&p.queue)
                .any(|s| channels.iter().any(|c| s.channel.as_deref() == Some(&c.channel)))
        });
    }
    // Pools the status knows only by their ledger (nobody holds or waits for a seat).
    if only.is_empty() {
        for l in &ledgers {
            if !pools.iter().any(|p| p.pool == l.pool) {
                pools.push(PoolStatus { pool: l.pool.clone(), ..Default::default() });
            }
        }
    }
    for w in &warnings {
        crate::ui::warn(w);
    }
    let now = SystemTime::now();
    if args.prometheus {
        write_out(&super::metrics::exposition(&channels, &pools, &ledgers, now))?;
        return Ok(ExitCode::OK);
    }
    if args.json {
        let list: Vec<_> = channels.iter().map(|c| to_json(c, waiting_for(c, &pools), now)).collect();
        let pool_list: Vec<_> = pools.iter().map(|p| pool_json(p, ledger_of(p, &ledgers), now)).collect();
        let text = serde_json::to_string_pretty(
            &json!({"version": 1, "channels": list, "pools": pool_list, "warnings": warnings}),
        )?;
        write_out(&format!("{text}\n"))?;
    } else {
        let mut out = table(&channels, &pools, now);
        if !pools.is_empty() {
            out.push('\n');
            out.push_str(&pool_table(&pools, now));
        }
        out.push_str(&spend_lines(&channels, &pools, &ledgers, now));
        write_out(&out)?;
    }
    Ok(ExitCode::OK)
}

/// The pool whose seat the channel's run waits for: it holds the channel and has not
/// started its command yet.
fn waiting_for<'a>(c: &ChannelStatus, pools: &'a [PoolStatus]) -> Option<&'a str> {
    pools
        .iter()
        .find(|p| p.queue.iter().any(|w| w.channel.as_deref() == Some(&c.channel)))
        .map(|p| p.pool.as_str())
}

fn state(c: &ChannelStatus, waiting: Option<&str>) -> &'static str {
    match (waiting, c.running) {
        (Some(_), _) => "waiting",
        (None, true) => "running",
        (None, false) => "idle",
    }
}

fn ledger_of<'a>(p: &PoolStatus, ledgers: &'a [PoolLedger]) -> Option<&'a PoolLedger> {
    ledgers.iter().find(|l| l.pool == p.pool)
}

fn pool_json(p: &PoolStatus, ledger: Option<&PoolLedger>, now: SystemTime) -> serde_json::Value {
    let fields = ledger.map(|l| l.fields.clone()).unwrap_or_default();
    let spent = spend::totals(&fields, now);
    json!({
        "pool": p.pool,
        "seats": p.seats,
        "held": p.holders.len(),
        "holders": p.holders,
        "waiting": p.queue.len(),
        "queue": p.queue,
        "cost_usd_today": spent.today_usd,
        "cost_usd_total": spent.total_usd,
        "cool_down": super::cooldown::active(&fields, now),
    })
}

/// Below the tables: what each channel and pool spent today (UTC) and in all, when any
/// run reported a cost, and the pools cooling down.
fn spend_lines(
    channels: &[ChannelStatus],
    pools: &[PoolStatus],
    ledgers: &[PoolLedger],
    now: SystemTime,
) -> String {
    let mut rows: Vec<[String; 3]> = Vec::new();
    for c in channels {
        let record = c.record.clone().unwrap_or_default();
        let t = spend::totals(&record.extra, now);
        if t.total_usd > 0.0 {
            rows.push([c.channel.clone(), spend::shown(t.today_usd), spend::shown(t.total_usd)]);
        }
    }
    let mut cooling = String::new();
    for p in pools {
        let fields = ledger_of(p, ledgers).map(|l| l.fields.clone()).unwrap_or_default();
        let t = spend::totals(&fields, now);
        if t.total_usd > 0.0 {
            rows.push([format!("pool {}", p.pool), spend::shown(t.today_usd), spend::shown(t.total_usd)]);
        }
        if let Some(line) = super::cooldown::describe(&p.pool, &fields, now) {
            cooling.push_str(&line);
            cooling.push('\n');
        }
    }
    let mut out = String::new();
    if !rows.is_empty() {
        out.push('\n');
        let today = format!("TODAY ({} UTC)", spend::day(now));
        out.push_str(&crate::ui::table(["SPENT BY", &today, "IN ALL"], Some([40, 24, 14]), &rows));
    }
    if !cooling.is_empty() {
        out.push('\n');
        out.push_str(&cooling);
    }
    out
}

fn to_json(c: &ChannelStatus, waiting: Option<&str>, now: SystemTime) -> serde_json::Value {
    let record = c.record.clone().unwrap_or_default();
    let spent = spend::totals(&record.extra, now);
    json!({
        "channel": c.channel,
        "state": state(c, waiting),
        "waiting_for_pool": waiting,
        "holder": c.holder,
        "waiting": c.queue.len(),
        "queue": queue_json(c),
        "session_id": record.session_id,
        "session_cwd": record.session_cwd,
        "runs": record.runs,
        "failures_in_a_row": record.failures_in_a_row,
        "last_run": record.last_run,
        "cost_usd_today": spent.today_usd,
        "cost_usd_total": spent.total_usd,
        "runs_by_kind": spent.runs_by_kind,
    })
}

/// The queue, each `--collect` caller marked `"collect": "queued"` or `"taken"` (into
/// the batch being run).
fn queue_json(c: &ChannelStatus) -> serde_json::Value {
    let list = c.queue.iter().enumerate().map(|(i, w)| {
        let mut entry = json!(w);
        if let (Some(Some(mark)), Some(map)) = (c.collect.get(i), entry.as_object_mut()) {
            map.insert("collect".into(), (*mark).into());
        }
        entry
    });
    serde_json::Value::Array(list.collect())
}

const HEADERS: [&str; 8] = ["CHANNEL", "STATE", "PID", "FOR", "WAIT", "RUNS", "LAST RUN", "SESSION"];
/// Column caps that keep a row within 100 columns.
const CAPS: [usize; 8] = [21, 7, 7, 5, 4, 6, 26, 10];

fn table(channels: &[ChannelStatus], pools: &[PoolStatus], now: SystemTime) -> String {
    if channels.is_empty() {
        return "no channels yet\n".to_owned();
    }
    let rows: Vec<[String; 8]> = channels.iter().map(|c| row(c, waiting_for(c, pools), now)).collect();
    crate::ui::table(HEADERS, Some(CAPS), &rows)
}

const POOL_HEADERS: [&str; 4] = ["POOL", "SEATS", "HELD BY", "WAITING"];
const POOL_CAPS: [usize; 4] = [21, 11, 40, 24];

/// Each pool: seats held of N, the holders (channel, pid, for how long) and the
/// waiters' channels in queue order.
fn pool_table(pools: &[PoolStatus], now: SystemTime) -> String {
    let rows: Vec<[String; 4]> = pools
        .iter()
        .map(|p| {
            let seats = match p.seats {
                Some(n) => format!("{}/{n}", p.holders.len()),
                None => p.holders.len().to_string(),
            };
            let holders: Vec<String> = p
                .holders
                .iter()
                .map(|h| {
                    let who = h.channel.clone().unwrap_or_else(|| "?".into());
                    let pid = h.pid.map(|p| format!(" pid {p}")).unwrap_or_default();
                    let on = h.host.as_ref().map(|h| format!(" on {h}")).unwrap_or_default();
                    let held_for = h
                        .since
                        .as_deref()
                        .and_then(|t| humantime::parse_rfc3339(t).ok())
                        .and_then(|t| now.duration_since(t).ok())
                        .map(|d| format!(" {}", crate::duration::short(d)))
                        .unwrap_or_default();
                    format!("{who} ({}{pid}{on}{held_for})", h.seat.map_or("-".into(), |s| format!("#{s}")))
                })
                .collect();
            let waiting: Vec<String> =
                p.queue.iter().map(|w| w.channel.clone().unwrap_or_else(|| "?".into())).collect();
            let dash = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
            [p.pool.clone(), seats, dash(holders), dash(waiting)]
        })
        .collect();
    crate::ui::table(POOL_HEADERS, Some(POOL_CAPS), &rows)
}

fn row(c: &ChannelStatus, waiting: Option<&str>, now: SystemTime) -> [String; 8] {
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
        state(c, waiting).to_owned(),
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
                collect: vec![],
                record: Some(failing),
            },
            ChannelStatus { channel: "idle-one".into(), ..Default::default() },
        ];
        let out = table(&channels, &[], now);
        for line in out.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        assert!(out.contains("timed_out sig15 !4x 2m ago"), "{out}");
        assert!(out.contains("12s"), "{out}");
        assert!(out.lines().nth(2).unwrap().starts_with("idle-one"), "{out}");
    }
}
