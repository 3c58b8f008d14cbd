//! One line per finished run, kept per channel for `chan-run history`: when it ran, how
//! it ended, and the session id before and after. Where the lines live is the store's
//! business; a line that does not parse (a crash mid-append) is skipped, never fatal.

use crate::state::{Kind, Outcome};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub session_before: Option<String>,
    pub session_after: Option<String>,
    /// chan-run's pid for this run.
    pub pid: u32,
    /// Why the session id the command printed was not taken, if it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_refused: Option<String>,
    /// The ending named more finely than `outcome` (see `state::Kind`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// The model API's HTTP status, for an error result that gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_status: Option<u64>,
    /// When a rate limit resets, if the model's CLI said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    /// What chan-run did to the channel's session on its own, if anything (a stale
    /// session replaced, `--fresh-after` dropping it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_note: Option<String>,
    /// `--collect`: how many callers' messages the run answered (its own included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// The command, for a run whose chan-run died (its holder record named it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Which attempt of a `--retry` run this was (1 is the first); absent without retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// What the run reported spending: `cost_usd`, `usage`, `num_turns`, `model_usage`.
    #[serde(flatten)]
    pub spent: crate::spend::RunUsage,
}

/// The entries in `text` (one JSON object per line), newest first, at most `n`.
pub fn parse_newest_first(text: &[u8], n: usize) -> Vec<Entry> {
    text.split(|&b| b == b'\n').rev().filter_map(|line| serde_json::from_slice(line).ok()).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_skipped() {
        let line = |i: u64| {
            format!(
                r#"{{"started_at":"2026-11-26T09:00:0{i}.000Z","finished_at":"2026-11-26T09:00:0{i}.500Z","duration_ms":500,"outcome":"ok","exit_code":0,"signal":null,"session_before":null,"session_after":"s{i}","pid":{i}}}"#
            )
        };
        let mut text = format!("{}\n{}\n", line(1), line(2));
        text.push_str(&line(3)[..40]);
        let got = parse_newest_first(text.as_bytes(), 10);
        assert_eq!(got.iter().map(|e| e.pid).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(parse_newest_first(text.as_bytes(), 1).len(), 1);
    }
}
