//! `status --prometheus`: what `status` knows, in Prometheus' text exposition format
//! (version 0.0.4), for a scrape or node_exporter's textfile collector. One family per
//! metric, labelled by `channel` or `pool` (and `kind`); label values escaped as the
//! format says.

use crate::spend;
use crate::store::{ChannelStatus, PoolLedger, PoolStatus};
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// One metric family: its name, type, help and samples (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family { name, kind, help, samples: Vec::new() }
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label(key: &str, value: &str) -> String {
    format!("{key}=\"{}\"", escape(value))
}

fn seconds(rfc3339: &str) -> Option<f64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
}

pub fn exposition(
    channels: &[ChannelStatus],
    pools: &[PoolStatus],
    ledgers: &[PoolLedger],
    now: SystemTime,
) -> String {
    let mut runs = Family::new("chan_run_runs_total", "counter", "Runs recorded on the channel.");
    let mut endings = Family::new(
        "chan_run_run_endings_total",
        "counter",
        "Runs by how they ended (kind: ok, failed, overloaded, rate_limited, ...), counted since chan-run kept them.",
    );
    let mut streak = Family::new(
        "chan_run_failures_in_a_row",
        "gauge",
        "Runs that did not end ok since the last one that did.",
    );
    let mut cost_total =
        Family::new("chan_run_cost_usd_total", "counter", "US dollars the channel's runs reported spending.");
    let mut cost_today = Family::new(
        "chan_run_cost_usd_today",
        "gauge",
        "US dollars spent by the channel's runs this UTC day.",
    );
    let mut running = Family::new("chan_run_running", "gauge", "1 while a run holds the channel.");
    let mut queue = Family::new("chan_run_queue_depth", "gauge", "Callers waiting for the channel.");
    let mut last_end =
        Family::new("chan_run_last_run_end_timestamp_seconds", "gauge", "When the channel's last run ended.");
    let mut last_took =
        Family::new("chan_run_last_run_duration_seconds", "gauge", "How long the last run took.");
    for c in channels {
        let l = label("channel", &c.channel);
        let record = c.record.clone().unwrap_or_default();
        let t = spend::totals(&record.extra, now);
        runs.samples.push((l.clone(), record.runs as f64));
        for (kind, n) in &t.runs_by_kind {
            endings.samples.push((format!("{l},{}", label("kind", kind)), n.as_f64().unwrap_or(0.0)));
        }
        streak.samples.push((l.clone(), record.failures_in_a_row as f64));
        cost_total.samples.push((l.clone(), t.total_usd));
        cost_today.samples.push((l.clone(), t.today_usd));
        running.samples.push((l.clone(), f64::from(u8::from(c.running))));
        queue.samples.push((l.clone(), c.queue.len() as f64));
        if let Some(last) = &record.last_run {
            if let Some(s) = seconds(&last.finished_at) {
                last_end.samples.push((l.clone(), s));
            }
            last_took.samples.push((l, last.duration_ms as f64 / 1000.0));
        }
    }
    let mut seats = Family::new("chan_run_pool_seats", "gauge", "The pool's seat count (N), as last named.");
    let mut held = Family::new("chan_run_pool_seats_held", "gauge", "Seats held by running commands.");
    let mut pool_queue = Family::new("chan_run_pool_queue_depth", "gauge", "Runs waiting for a seat.");
    let mut pool_total = Family::new(
        "chan_run_pool_cost_usd_total",
        "counter",
        "US dollars the pool's runs reported spending.",
    );
    let mut pool_today = Family::new(
        "chan_run_pool_cost_usd_today",
        "gauge",
        "US dollars spent by the pool's runs this UTC day.",
    );
    let mut cooling = Family::new(
        "chan_run_pool_cool_down_seconds",
        "gauge",
        "Seconds left of the pool's cool-down (0: none); its next commands wait.",
    );
    for p in pools {
        let l = label("pool", &p.pool);
        let fields = ledgers.iter().find(|g| g.pool == p.pool).map(|g| g.fields.clone()).unwrap_or_default();
        let t = spend::totals(&fields, now);
        if let Some(n) = p.seats {
            seats.samples.push((l.clone(), f64::from(n)));
        }
        held.samples.push((l.clone(), p.holders.len() as f64));
        pool_queue.samples.push((l.clone(), p.queue.len() as f64));
        pool_total.samples.push((l.clone(), t.total_usd));
        pool_today.samples.push((l.clone(), t.today_usd));
        let left = super::cooldown::active(&fields, now)
            .get("until")
            .and_then(|u| u.as_str())
            .and_then(|u| humantime::parse_rfc3339(u).ok())
            .and_then(|u| u.duration_since(now).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        cooling.samples.push((l, left));
    }
    let families = [
        runs, endings, streak, cost_total, cost_today, running, queue, last_end, last_took, seats, held,
        pool_queue, pool_total, pool_today, cooling,
    ];
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            let _ = writeln!(out, "{}{{{labels}}} {value}", f.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("channel", "a\"b\\c\nd"), r#"channel="a\"b\\c\nd""#);
    }
}
