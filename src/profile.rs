//! A model CLI's ways (`--profile`): how a stored session is passed to it, where the
//! id it hands out is found in its output (a streamed format included: the first event
//! that names it), which ids of an error result are kept, and how its failures read
//! (overloaded, rate limited, a session it no longer knows). Plain functions over what
//! chan-run kept of the output; no printing, no store.
//!
//! Verified against the real clients (see README "Profiles"): `@anthropic-ai/claude-code`
//! 2.1.197 and `@openai/codex` 0.171.0.

use crate::session::{self, Found};
use crate::state::Kind;
use serde_json::Value;
use std::ffi::OsString;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Claude Code (`claude -p ... --output-format json|stream-json`)
    Claude,
    /// OpenAI Codex (`codex exec --json ...`)
    Codex,
}

/// What a stale-session run does (`--on-stale-session`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStale {
    /// Run again at once, without the session, and keep the new one
    Fresh,
    /// Fail the run, as without a profile
    Fail,
}

/// What the profile reads in a finished run's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// A failure the CLI named; `None`: nothing beyond the exit status.
    pub kind: Option<Kind>,
    /// The API's HTTP status, for an error result that gives one.
    pub api_status: Option<u64>,
    /// When a rate limit resets, if the CLI says.
    pub resets_at: Option<String>,
}

impl Profile {
    /// The JSON pointer of the session id in the CLI's output.
    pub fn session_key(self) -> &'static str {
        match self {
            Profile::Claude => "/session_id",
            Profile::Codex => "/thread_id",
        }
    }

    /// The command with the stored session passed as the CLI takes it: claude appends
    /// `--resume ID`; codex's resume is a subcommand, `codex exec resume ID ...`, so
    /// `resume ID` goes right after the first `exec` argument (`None` if there is none).
    pub fn with_session(self, command: &[OsString], id: &str) -> Option<Vec<OsString>> {
        let mut command = command.to_vec();
        match self {
            Profile::Claude => command.extend([OsString::from("--resume"), OsString::from(id)]),
            Profile::Codex => {
                let exec = command.iter().skip(1).position(|a| a == "exec")? + 1;
                command.splice(exec + 1..exec + 1, [OsString::from("resume"), OsString::from(id)]);
            }
        }
        Some(command)
    }

    /// The session id in the output: `tail` (the whole output when `whole`) and `head`
    /// (its first bytes). claude: the result document (whole JSON, or the last line of
    /// stream-json), else the first event that carries one (a run stopped before its
    /// result still made the session). An error result's id is kept when it names the
    /// API's status: the client had written the prompt to the session before the API
    /// refused it (verified for 529 and 429), so resuming it keeps the message. codex:
    /// the first event carrying `thread_id` (`thread.started`), else the last line.
    pub fn find_session(self, head: &[u8], tail: &[u8], whole: bool) -> Found {
        let key = self.session_key();
        let result = session::last_document(tail, whole);
        let from_result = || match &result {
            Some(doc) if self == Profile::Claude && is_error(doc) && api_status(doc).is_none() => {
                Some(Found::Nothing)
            }
            Some(doc) => id_at(doc, key),
            None => None,
        };
        let from_head = || first_event_with(head, key);
        let found = match self {
            Profile::Claude => from_result().or_else(from_head),
            Profile::Codex => from_head().or_else(from_result),
        };
        found.unwrap_or(Found::Nothing)
    }

    /// The failure the CLI names, from its output and the end of its stderr. `failed`:
    /// it exited non-zero (a stale session is named only then).
    pub fn read(self, tail: &[u8], whole: bool, stderr: &[u8], failed: bool) -> Reading {
        let stderr = String::from_utf8_lossy(stderr);
        let stale_words = match self {
            Profile::Claude => "No conversation found with session ID",
            Profile::Codex => "no rollout found for thread id",
        };
        if failed && stderr.contains(stale_words) {
            return Reading { kind: Some(Kind::StaleSession), ..Reading::default() };
        }
        let Some(doc) = session::last_document(tail, whole) else { return Reading::default() };
        match self {
            Profile::Claude if is_error(&doc) => {
                let api_status = api_status(&doc);
                let kind = match api_status {
                    Some(529) => Kind::Overloaded,
                    Some(429) => Kind::RateLimited,
                    _ => Kind::ModelError,
                };
                let resets_at = (kind == Kind::RateLimited).then(|| resets_at(&doc)).flatten();
                Reading { kind: Some(kind), api_status, resets_at }
            }
            Profile::Codex if doc.get("type").and_then(Value::as_str) == Some("turn.failed") => {
                let message = doc.pointer("/error/message").and_then(Value::as_str).unwrap_or_default();
                let lower = message.to_lowercase();
                let kind = if lower.contains("rate limit") || lower.contains("429") {
                    Kind::RateLimited
                } else if lower.contains("overloaded") || lower.contains("529") {
                    Kind::Overloaded
                } else {
                    Kind::ModelError
                };
                Reading { kind: Some(kind), ..Reading::default() }
            }
            _ => Reading::default(),
        }
    }
}

fn is_error(doc: &Value) -> bool {
    doc.get("is_error") == Some(&Value::Bool(true))
}

fn api_status(doc: &Value) -> Option<u64> {
    doc.get("api_error_status").and_then(Value::as_u64)
}

/// A reset time, where claude's result or its rate-limit fields give one.
fn resets_at(doc: &Value) -> Option<String> {
    ["/resets_at", "/rate_limit/resets_at", "/error/resets_at"].iter().find_map(|p| doc.pointer(p)).and_then(
        |v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
    )
}

fn id_at(doc: &Value, key: &str) -> Option<Found> {
    match doc.pointer(key).and_then(Value::as_str) {
        None | Some("") => None,
        Some(id) => Some(match session::refusal(id) {
            None => Found::Id(id.to_owned()),
            Some(why) => Found::Refused(why),
        }),
    }
}

/// The id of the first complete line of `head` that is a JSON document carrying one.
fn first_event_with(head: &[u8], key: &str) -> Option<Found> {
    let complete = &head[..head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)];
    complete
        .split(|&b| b == b'\n')
        .filter(|line| !line.trim_ascii().is_empty())
        .filter_map(session::json)
        .find_map(|doc| id_at(&doc, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes recorded from claude 2.1.197 against the test mock (fields trimmed).
    const CLAUDE_OK: &str = r#"{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"result":"turn 2: hello two","session_id":"d4634d17-0b2d-439e-9f05-61e2e0cf5325"}"#;
    const CLAUDE_529: &str = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529 overloaded_error.","session_id":"fc3dc722-4610-46b2-afbd-05febd5e5889"}"#;
    const CLAUDE_429: &str = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"API Error: Request rejected (429) · rate_limit_error","session_id":"b4ce63f7-984f-4ab2-84a7-e7fab62f3cf2"}"#;
    const CLAUDE_INIT: &str = r#"{"type":"system","subtype":"init","cwd":"/tmp","session_id":"c0cbfd55-8f2e-46f9-915e-b2fce75f18a8","tools":["Task","Bash"]}"#;
    const CLAUDE_STALE: &str =
        "No conversation found with session ID: 3f1c2b9e-1111-4222-8333-444455556666\n";
    /// Recorded from codex-cli 0.171.0 (`codex exec --json`, no server reachable).
    const CODEX: &str = concat!(
        r#"{"type":"thread.started","thread_id":"01a233b3-285a-7913-a90e-4a38c0f70abb"}"#,
        "\n",
        r#"{"type":"turn.started"}"#,
        "\n",
        r#"{"type":"error","message":"Reconnecting... 2/5 (stream disconnected before completion)"}"#,
        "\n"
    );
    const CODEX_STALE: &str = "Error: thread/resume: thread/resume failed: no rollout found for thread id 3f1c2b9e-1111-4222-8333-444455556666 (code -32600)\n";

    fn id(s: &str) -> Found {
        Found::Id(s.to_owned())
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn claude_resumes_with_a_flag_and_codex_with_a_subcommand() {
        let claude = Profile::Claude.with_session(&args(&["claude", "-p", "hi"]), "s1").unwrap();
        assert_eq!(claude, args(&["claude", "-p", "hi", "--resume", "s1"]));
        let codex = Profile::Codex.with_session(&args(&["codex", "exec", "--json", "hi"]), "t1").unwrap();
        assert_eq!(codex, args(&["codex", "exec", "resume", "t1", "--json", "hi"]));
        assert_eq!(Profile::Codex.with_session(&args(&["my-wrapper", "hi"]), "t1"), None);
    }

    #[test]
    fn claude_ids_from_results_and_streams() {
        let c = Profile::Claude;
        assert_eq!(
            c.find_session(CLAUDE_OK.as_bytes(), CLAUDE_OK.as_bytes(), true),
            id("d4634d17-0b2d-439e-9f05-61e2e0cf5325")
        );
        // An API error result: the prompt is in that session, so it is kept.
        assert_eq!(
            c.find_session(b"", CLAUDE_529.as_bytes(), true),
            id("fc3dc722-4610-46b2-afbd-05febd5e5889")
        );
        // An error result without an API status is not trusted (SPEC's rule).
        let no_status = r#"{"is_error":true,"session_id":"x"}"#;
        assert_eq!(c.find_session(no_status.as_bytes(), no_status.as_bytes(), true), Found::Nothing);
        // Stopped mid-stream: the init event names the session.
        let stream = format!("{CLAUDE_INIT}\n{{\"type\":\"assistant\",\"message\":{{\"content\":[");
        assert_eq!(
            c.find_session(stream.as_bytes(), stream.as_bytes(), true),
            id("c0cbfd55-8f2e-46f9-915e-b2fce75f18a8")
        );
        // A torn first line names nothing.
        assert_eq!(c.find_session(&CLAUDE_INIT.as_bytes()[..60], b"", false), Found::Nothing);
    }

    #[test]
    fn claude_failures_are_named() {
        let c = Profile::Claude;
        let r = c.read(CLAUDE_529.as_bytes(), true, b"", true);
        assert_eq!((r.kind, r.api_status), (Some(Kind::Overloaded), Some(529)));
        assert_eq!(c.read(CLAUDE_429.as_bytes(), true, b"", true).kind, Some(Kind::RateLimited));
        let other = r#"{"is_error":true,"api_error_status":500,"session_id":"x"}"#;
        assert_eq!(c.read(other.as_bytes(), true, b"", true).kind, Some(Kind::ModelError));
        assert_eq!(c.read(b"", true, CLAUDE_STALE.as_bytes(), true).kind, Some(Kind::StaleSession));
        assert_eq!(c.read(b"", true, CLAUDE_STALE.as_bytes(), false).kind, None);
        assert_eq!(c.read(CLAUDE_OK.as_bytes(), true, b"", false), Reading::default());
        let limited = r#"{"is_error":true,"api_error_status":429,"resets_at":"2026-12-02T00:00:00Z"}"#;
        assert_eq!(
            c.read(limited.as_bytes(), true, b"", true).resets_at.as_deref(),
            Some("2026-12-02T00:00:00Z")
        );
    }

    #[test]
    fn codex_thread_ids_and_failures() {
        let x = Profile::Codex;
        assert_eq!(
            x.find_session(CODEX.as_bytes(), CODEX.as_bytes(), true),
            id("01a233b3-285a-7913-a90e-4a38c0f70abb")
        );
        assert_eq!(x.read(b"", true, CODEX_STALE.as_bytes(), true).kind, Some(Kind::StaleSession));
        let failed = r#"{"type":"turn.failed","error":{"message":"exceeded retry limit, last status: 429 Too Many Requests"}}"#;
        assert_eq!(x.read(failed.as_bytes(), true, b"", true).kind, Some(Kind::RateLimited));
        let failed = r#"{"type":"turn.failed","error":{"message":"unexpected status 500"}}"#;
        assert_eq!(x.read(failed.as_bytes(), true, b"", true).kind, Some(Kind::ModelError));
    }
}
