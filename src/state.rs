//! The channel records kept in `active.json` (SPEC "State directory"): their types
//! and how one run changes one record. Where they are stored is the store's business.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const VERSION: u64 = 1;

/// The whole file. Unknown fields are kept, so a newer minor writer loses nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    #[serde(default = "version_one")]
    pub version: u64,
    #[serde(default)]
    pub channels: BTreeMap<String, ChannelRecord>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for StateFile {
    fn default() -> StateFile {
        StateFile { version: VERSION, channels: BTreeMap::new(), extra: Map::new() }
    }
}

fn version_one() -> u64 {
    VERSION
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelRecord {
    #[serde(default)]
    pub session_id: Option<String>,
    /// The working directory the session was made in (model CLIs resume only there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_cwd: Option<String>,
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub failures_in_a_row: u64,
    #[serde(default)]
    pub last_run: Option<LastRun>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub outcome: Outcome,
    /// The run's ending named more finely than `outcome` (a model CLI's failure, by
    /// its profile); absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed,
    TimedOut,
    Signaled,
    Interrupted,
    SpawnFailed,
}

impl LastRun {
    /// The ending as the human views show it: its kind (else its outcome), with the
    /// API's status when the model's CLI gave one (`overloaded 529`).
    pub fn named(&self) -> String {
        named(self.outcome, self.kind, self.extra.get("api_status").and_then(Value::as_u64))
    }
}

/// An ending as the human views show it (`status`, `history`).
pub fn named(outcome: Outcome, kind: Option<Kind>, api_status: Option<u64>) -> String {
    let kind = kind.unwrap_or(Kind::from(outcome));
    match api_status {
        Some(status) => format!("{}({status})", kind.as_str()),
        None => kind.as_str().to_owned(),
    }
}

/// How a run ended, as `status` and `history` name it: `outcome`'s values, a model
/// CLI's own failures as its profile reads them, and a run whose chan-run died.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Ok,
    Failed,
    TimedOut,
    Signaled,
    Interrupted,
    SpawnFailed,
    /// The model's API answered with an error (its status kept beside).
    ModelError,
    /// The API was overloaded (HTTP 529): retry later.
    Overloaded,
    /// A rate limit was hit (HTTP 429): retry after its reset.
    RateLimited,
    /// The model no longer knows the stored session.
    StaleSession,
    /// chan-run itself died (SIGKILL, OOM) while the command ran; found by the next holder.
    Died,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ok => "ok",
            Kind::Failed => "failed",
            Kind::TimedOut => "timed_out",
            Kind::Signaled => "signaled",
            Kind::Interrupted => "interrupted",
            Kind::SpawnFailed => "spawn_failed",
            Kind::ModelError => "model_error",
            Kind::Overloaded => "overloaded",
            Kind::RateLimited => "rate_limited",
            Kind::StaleSession => "stale_session",
            Kind::Died => "died",
        }
    }
}

impl From<Outcome> for Kind {
    fn from(o: Outcome) -> Kind {
        match o {
            Outcome::Ok => Kind::Ok,
            Outcome::Failed => Kind::Failed,
            Outcome::TimedOut => Kind::TimedOut,
            Outcome::Signaled => Kind::Signaled,
            Outcome::Interrupted => Kind::Interrupted,
            Outcome::SpawnFailed => Kind::SpawnFailed,
        }
    }
}

/// What one finished run changes in its channel's record.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub last_run: LastRun,
    /// The session id the command's output named, if any (and sessions are on).
    pub new_session: Option<String>,
    pub cwd: Option<String>,
    /// `--fresh-after N`.
    pub fresh_after: Option<u64>,
}

impl ChannelRecord {
    pub fn apply(&mut self, run: RunResult) {
        self.runs = self.runs.saturating_add(1);
        self.failures_in_a_row = match run.last_run.outcome {
            Outcome::Ok => 0,
            _ => self.failures_in_a_row.saturating_add(1),
        };
        if let Some(id) = run.new_session {
            self.session_id = Some(id);
            self.session_cwd = run.cwd;
        } else if run.fresh_after.is_some_and(|n| self.failures_in_a_row >= n) {
            // A session the model no longer accepts must not wedge the channel.
            self.session_id = None;
            self.session_cwd = None;
        }
        self.last_run = Some(run.last_run);
    }

    pub fn forget_session(&mut self) {
        self.session_id = None;
        self.session_cwd = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(outcome: Outcome, id: Option<&str>, fresh_after: Option<u64>) -> RunResult {
        RunResult {
            last_run: LastRun {
                started_at: "2026-11-26T09:00:00.000Z".into(),
                finished_at: "2026-11-26T09:00:01.000Z".into(),
                duration_ms: 1000,
                exit_code: Some(0),
                signal: None,
                outcome,
                kind: None,
                extra: Map::new(),
            },
            new_session: id.map(str::to_owned),
            cwd: Some("/srv/bot".into()),
            fresh_after,
        }
    }

    #[test]
    fn counts_runs_failures_and_keeps_or_drops_sessions() {
        let mut r = ChannelRecord::default();
        r.apply(run(Outcome::Ok, Some("s1"), Some(2)));
        assert_eq!((r.runs, r.failures_in_a_row, r.session_id.as_deref()), (1, 0, Some("s1")));
        r.apply(run(Outcome::Failed, None, Some(2)));
        assert_eq!((r.failures_in_a_row, r.session_id.as_deref()), (1, Some("s1")));
        r.apply(run(Outcome::TimedOut, None, Some(2)));
        assert_eq!((r.runs, r.failures_in_a_row, r.session_id.as_deref()), (3, 2, None));
        r.apply(run(Outcome::TimedOut, Some("s2"), Some(2)));
        assert_eq!((r.failures_in_a_row, r.session_id.as_deref()), (3, Some("s2")));
        r.apply(run(Outcome::Ok, None, None));
        assert_eq!((r.runs, r.failures_in_a_row, r.session_id.as_deref()), (5, 0, Some("s2")));
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let mut r = ChannelRecord { runs: u64::MAX, failures_in_a_row: u64::MAX, ..Default::default() };
        r.apply(run(Outcome::Failed, None, None));
        assert_eq!((r.runs, r.failures_in_a_row), (u64::MAX, u64::MAX));
    }

    #[test]
    fn the_repository_example_parses_with_this_code() {
        let s: StateFile = serde_json::from_str(include_str!("../sessions.example.json")).unwrap();
        assert_eq!(s.channels.len(), 3);
        let slack = &s.channels["slack:C04QX7LMN2R"];
        assert_eq!((slack.runs, slack.failures_in_a_row), (311, 3));
        assert_eq!(slack.last_run.as_ref().unwrap().outcome, Outcome::TimedOut);
        assert_eq!(s.channels["telegram:-1001987654321"].session_id, None);
    }

    #[test]
    fn empty_object_is_an_empty_state_and_unknown_fields_survive() {
        let s: StateFile = serde_json::from_str("{}").unwrap();
        assert_eq!((s.version, s.channels.len()), (1, 0));
        let text = r#"{"version":1,"by":"x","channels":{"a":{"session_id":null,"runs":2,"failures_in_a_row":0,"last_run":null,"note":7}}}"#;
        let s: StateFile = serde_json::from_str(text).unwrap();
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back["by"], "x");
        assert_eq!(back["channels"]["a"]["note"], 7);
    }
}
