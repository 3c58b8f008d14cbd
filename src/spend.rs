//! What runs spend, and what a day's budget allows: the cost and token counts a model
//! CLI reports (claude's result: `total_cost_usd`, `usage`, `num_turns`, `modelUsage`;
//! codex: the `usage` of its `turn.completed` event), the running totals a channel's
//! record keeps (in all, and for the current UTC day, updated in the run's own record
//! write, so `status` never scans history), and UTC days. Plain functions, no I/O.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What one run reported spending, as `last_run` and the history entry carry it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunUsage {
    /// US dollars, as the CLI computed them (claude's `total_cost_usd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// The CLI's token counts (its `usage` object's top-level integers, names kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_turns: Option<u64>,
    /// claude's per-model breakdown (`modelUsage`), as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_usage: Option<Value>,
}

impl RunUsage {
    /// Adds these fields to a map (`last_run`'s extra fields).
    pub fn put(&self, extra: &mut Map<String, Value>) {
        if let Ok(Value::Object(fields)) = serde_json::to_value(self) {
            extra.extend(fields);
        }
    }

    /// These fields as a map holds them.
    pub fn from_extra(extra: &Map<String, Value>) -> RunUsage {
        serde_json::from_value(Value::Object(extra.clone())).unwrap_or_default()
    }
}

/// What the command's output says it spent: claude's result document (the whole
/// output, or its last line), else the last `turn.completed` line (codex). Read with or
/// without a profile, so a wrapper printing either shape is counted too.
pub fn read(tail: &[u8], whole: bool) -> RunUsage {
    let whole_doc = whole.then(|| crate::session::json(tail)).flatten();
    let lines = || {
        tail.split(|&b| b == b'\n')
            .rev()
            .filter(|l| !l.trim_ascii().is_empty())
            .filter_map(crate::session::json)
    };
    let claude = whole_doc.clone().or_else(|| lines().next()).filter(|d| d.get("total_cost_usd").is_some());
    if let Some(doc) = claude {
        return RunUsage {
            cost_usd: doc
                .get("total_cost_usd")
                .and_then(Value::as_f64)
                .filter(|c| c.is_finite() && *c >= 0.0),
            usage: doc.get("usage").and_then(counts),
            num_turns: doc.get("num_turns").and_then(Value::as_u64),
            model_usage: doc
                .get("modelUsage")
                .filter(|m| m.as_object().is_some_and(|m| !m.is_empty()))
                .cloned(),
        };
    }
    let completed = whole_doc
        .into_iter()
        .chain(lines())
        .find(|d| d.get("type").and_then(Value::as_str) == Some("turn.completed"));
    match completed {
        Some(doc) => RunUsage { usage: doc.get("usage").and_then(counts), ..RunUsage::default() },
        None => RunUsage::default(),
    }
}

/// The top-level integer fields of a `usage` object.
fn counts(usage: &Value) -> Option<Map<String, Value>> {
    let counts: Map<String, Value> =
        usage.as_object()?.iter().filter(|(_, v)| v.is_u64()).map(|(k, v)| (k.clone(), v.clone())).collect();
    (!counts.is_empty()).then_some(counts)
}

/// The UTC day of `t`, `YYYY-MM-DD`.
pub fn day(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

/// The next UTC midnight after `t`: when a day's budget resets.
pub fn next_midnight(t: SystemTime) -> SystemTime {
    const DAY: u64 = 86_400;
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs((secs / DAY + 1) * DAY)
}

/// A channel's spending, as its record keeps it (fields of the record's extra map, so
/// every store keeps them: `cost_usd_total`, `cost_today: {"day", "usd"}`,
/// `runs_by_kind: {KIND: N}`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub total_usd: f64,
    /// Spent on the UTC day `now` falls in.
    pub today_usd: f64,
    pub runs_by_kind: Map<String, Value>,
}

pub fn totals(extra: &Map<String, Value>, now: SystemTime) -> Totals {
    let today = day(now);
    let cost_today = extra.get("cost_today");
    Totals {
        total_usd: extra.get("cost_usd_total").and_then(Value::as_f64).unwrap_or(0.0),
        today_usd: match cost_today.and_then(|c| c.get("day")).and_then(Value::as_str) {
            Some(d) if d == today => {
                cost_today.and_then(|c| c.get("usd")).and_then(Value::as_f64).unwrap_or(0.0)
            }
            _ => 0.0,
        },
        runs_by_kind: extra.get("runs_by_kind").and_then(Value::as_object).cloned().unwrap_or_default(),
    }
}

/// Adds one finished run to a record's totals: its cost (if known) to the day `now`
/// falls in and to the total, and its kind to the counts.
pub fn charge(extra: &mut Map<String, Value>, cost: Option<f64>, kind: &str, now: SystemTime) {
    add_cost(extra, cost, now);
    let mut kinds = extra.get("runs_by_kind").and_then(Value::as_object).cloned().unwrap_or_default();
    let n = kinds.get(kind).and_then(Value::as_u64).unwrap_or(0);
    kinds.insert(kind.to_owned(), n.saturating_add(1).into());
    extra.insert("runs_by_kind".into(), Value::Object(kinds));
}

/// Adds a cost (if known and not zero) to the day `now` falls in and to the total.
pub fn add_cost(extra: &mut Map<String, Value>, cost: Option<f64>, now: SystemTime) {
    let Some(cost) = cost.filter(|c| c.is_finite() && *c > 0.0) else { return };
    let t = totals(extra, now);
    extra.insert("cost_usd_total".into(), round(t.total_usd + cost).into());
    extra.insert("cost_today".into(), serde_json::json!({"day": day(now), "usd": round(t.today_usd + cost)}));
}

/// Sums keep nine decimals: no float noise piles up in the stored totals.
pub fn round(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

/// Dollars as messages and tables show them: cents, or more digits for small sums.
pub fn shown(usd: f64) -> String {
    if usd == 0.0 || usd >= 0.01 {
        format!("${usd:.2}")
    } else {
        let text = format!("{usd:.6}");
        format!("${}", text.trim_end_matches('0'))
    }
}

/// `--budget USD` / `--pool-budget USD`: a non-negative amount of US dollars (a leading
/// `$` is allowed).
pub fn parse_usd(text: &str) -> Result<f64, String> {
    let digits = text.strip_prefix('$').unwrap_or(text);
    match digits.parse::<f64>() {
        Ok(usd)
            if usd.is_finite() && usd >= 0.0 && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.') =>
        {
            Ok(usd)
        }
        _ => Err(format!("'{text}' is not an amount of US dollars; write e.g. 5 or 0.50")),
    }
}

/// Why a run may not start: what was spent on today's UTC day against the budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Spent {
    pub usd: f64,
    pub budget: f64,
    pub resets_at: SystemTime,
}

/// `Some` when `spent_today` has reached `budget`: a run checked at `now` may not start.
pub fn over(spent_today: f64, budget: Option<f64>, now: SystemTime) -> Option<Spent> {
    let budget = budget?;
    (spent_today >= budget).then(|| Spent { usd: spent_today, budget, resets_at: next_midnight(now) })
}

impl Spent {
    /// `$1.02 of $1.00 spent today (UTC); resets at 2026-12-02T00:00:00Z (in 1h13m)`.
    pub fn describe(&self, now: SystemTime) -> String {
        let left = self.resets_at.duration_since(now).unwrap_or_default();
        format!(
            "{} of {} spent today (UTC); resets at {} (in {})",
            shown(self.usd),
            shown(self.budget),
            humantime::format_rfc3339_seconds(self.resets_at),
            crate::duration::short(Duration::from_secs(left.as_secs().max(1)))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from claude 2.1.197 against the test mock (fields trimmed).
    const CLAUDE: &str = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":1,"result":"turn 1: hello","session_id":"c3daba29-c2bf-434b-8d58-66e3d5a51b03","total_cost_usd":0.000175,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":5,"server_tool_use":{"web_search_requests":0},"service_tier":"standard"},"modelUsage":{"claude-opus-4-8[1m]":{"inputTokens":10,"outputTokens":5,"costUSD":0.000175}}}"#;
    const CLAUDE_529: &str = r#"{"type":"result","is_error":true,"api_error_status":529,"num_turns":1,"total_cost_usd":0,"usage":{"input_tokens":0,"output_tokens":0},"modelUsage":{}}"#;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn claude_results_and_codex_turns_are_read() {
        let u = read(CLAUDE.as_bytes(), true);
        assert_eq!(u.cost_usd, Some(0.000175));
        assert_eq!(u.num_turns, Some(1));
        let usage = u.usage.unwrap();
        assert_eq!((usage["input_tokens"].as_u64(), usage["output_tokens"].as_u64()), (Some(10), Some(5)));
        assert!(!usage.contains_key("service_tier") && !usage.contains_key("server_tool_use"));
        assert!(u.model_usage.unwrap().get("claude-opus-4-8[1m]").is_some());
        // stream-json: the result is the last line.
        let stream = format!("{{\"type\":\"system\",\"subtype\":\"init\"}}\n{CLAUDE}\n");
        assert_eq!(read(stream.as_bytes(), true).cost_usd, Some(0.000175));
        let failed = read(CLAUDE_529.as_bytes(), true);
        assert_eq!((failed.cost_usd, failed.model_usage), (Some(0.0), None));
        let codex = concat!(
            r#"{"type":"thread.started","thread_id":"t"}"#,
            "\n",
            r#"{"type":"turn.completed","usage":{"input_tokens":24763,"cached_input_tokens":24448,"output_tokens":122}}"#,
            "\n"
        );
        let u = read(codex.as_bytes(), true);
        assert_eq!((u.cost_usd, u.usage.unwrap()["cached_input_tokens"].as_u64()), (None, Some(24448)));
        assert_eq!(read(b"plain text\n", true), RunUsage::default());
    }

    #[test]
    fn totals_keep_the_utc_day_and_the_sum() {
        let mut extra = Map::new();
        let evening = at("2026-12-01T23:59:00Z");
        charge(&mut extra, Some(0.5), "ok", evening);
        charge(&mut extra, Some(0.25), "ok", evening);
        charge(&mut extra, None, "overloaded", evening);
        let t = totals(&extra, evening);
        assert_eq!((t.total_usd, t.today_usd), (0.75, 0.75));
        assert_eq!(
            (t.runs_by_kind["ok"].as_u64(), t.runs_by_kind["overloaded"].as_u64()),
            (Some(2), Some(1))
        );
        let morning = at("2026-12-02T00:00:01Z");
        assert_eq!(totals(&extra, morning).today_usd, 0.0);
        charge(&mut extra, Some(0.1), "ok", morning);
        let t = totals(&extra, morning);
        assert_eq!((t.total_usd, t.today_usd), (0.85, 0.1));
    }

    #[test]
    fn budgets_reset_at_the_next_utc_midnight() {
        let now = at("2026-12-01T22:46:30Z");
        assert_eq!(next_midnight(now), at("2026-12-02T00:00:00Z"));
        assert_eq!(over(0.99, Some(1.0), now), None);
        assert_eq!(over(0.5, None, now), None);
        let spent = over(1.0, Some(1.0), now).unwrap();
        assert_eq!(
            spent.describe(now),
            "$1.00 of $1.00 spent today (UTC); resets at 2026-12-02T00:00:00Z (in 1h13m)"
        );
        assert_eq!(shown(0.000175), "$0.000175");
    }

    #[test]
    fn amounts_parse_or_say_how_to_write_them() {
        assert_eq!(parse_usd("5"), Ok(5.0));
        assert_eq!(parse_usd("$0.50"), Ok(0.5));
        for bad in ["-1", "abc", "NaN", "inf", "1e3", ""] {
            assert!(parse_usd(bad).unwrap_err().contains("e.g. 5"), "{bad}");
        }
    }
}
