//! Profiles (`--profile claude|codex`, issue 14): a session passed and found as the
//! model CLI does it, failures named, a stale session replaced at once. The `real_claude`
//! tests drive the real Claude Code CLI (npm `@anthropic-ai/claude-code`, found through
//! `CHAN_RUN_TEST_CLAUDE`; `scripts/install-model-clis` installs it) against the project's
//! own mock of the Messages API (`tests/mock_anthropic.py`); without it they print a
//! notice and pass. The others use small scripts shaped like the CLIs' recorded output.

use crate::common::state::*;
use crate::common::{TestEnv, wait_until};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// A session id no claude has ever handed out.
const UNKNOWN: &str = "3f1c2b9e-1111-4222-8333-444455556666";

/// The real claude, if this machine has it: `CHAN_RUN_TEST_CLAUDE`, else where
/// `scripts/install-model-clis` puts it by default.
pub(crate) fn real_claude() -> Option<PathBuf> {
    let cached = std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".cache/chan-run/model-clis/node_modules/.bin/claude"));
    let found = std::env::var_os("CHAN_RUN_TEST_CLAUDE").map(PathBuf::from).or(cached).filter(|p| p.exists());
    if found.is_none() {
        eprintln!(
            "NOTICE: skipped: the real claude CLI is not installed (run scripts/install-model-clis and set CHAN_RUN_TEST_CLAUDE)"
        );
    }
    found
}

/// The project's mock of the Anthropic Messages API, on a loopback port.
pub(crate) struct Mock {
    dir: PathBuf,
    child: Child,
}

impl Mock {
    pub(crate) fn start(env: &TestEnv) -> Mock {
        let dir = env.root().join("mock");
        std::fs::create_dir(&dir).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mock_anthropic.py");
        let child = Command::new("python3").arg(script).arg(&dir).spawn().expect("python3 for the mock");
        wait_until("the mock to listen", || dir.join("port").exists());
        Mock { dir, child }
    }

    /// The answers' output token count, hence their cost (see the mock's doc).
    pub(crate) fn output_tokens(&self, n: u64) {
        std::fs::write(self.dir.join("output_tokens"), n.to_string()).unwrap();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", std::fs::read_to_string(self.dir.join("port")).unwrap())
    }

    /// How the next requests are answered: `ok`, `529`, `429` or `hang`.
    pub(crate) fn answer(&self, mode: &str) {
        std::fs::write(self.dir.join("mode"), mode).unwrap();
    }

    /// Every request seen so far: `{"path", "n_messages", "user_texts", "t", "answer"}`.
    pub(crate) fn requests(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("requests.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The user turns of the last request whose turns mention `marker`.
    fn turns_with(&self, marker: &str) -> Vec<String> {
        let requests = self.requests();
        let last = requests.iter().rev().find(|r| r.to_string().contains(marker));
        let turns = last.unwrap_or_else(|| panic!("no request mentions {marker}: {requests:?}"));
        turns["user_texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chan-run run --profile claude OPTS -- claude -p PROMPT --output-format json`, with the
/// client pointed at the mock and a throw-away HOME, run from the scratch folder.
fn claude_run(
    env: &TestEnv,
    mock: &Mock,
    claude: &Path,
    opts: &[&str],
    prompt: &str,
) -> std::process::Output {
    claude_cmd(env, mock, claude, opts, &["-p", prompt, "--output-format", "json"]).output().unwrap()
}

pub(crate) fn claude_cmd(env: &TestEnv, mock: &Mock, claude: &Path, opts: &[&str], args: &[&str]) -> Command {
    let mut command: Vec<&str> = vec![claude.to_str().unwrap()];
    command.extend(args);
    let mut opts = opts.to_vec();
    opts.push("--profile=claude");
    let mut cmd = env.std_run(&opts, &command);
    cmd.current_dir(env.t())
        .env("ANTHROPIC_BASE_URL", mock.url())
        .env("ANTHROPIC_API_KEY", "dummy")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .stdin(std::process::Stdio::null());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn history(env: &TestEnv, channel: &str) -> Vec<Value> {
    let out = env.command().args(["history", "--json", channel]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn last_run(env: &TestEnv, channel: &str) -> Value {
    record(env, channel)["last_run"].clone()
}

#[test]
fn real_claude_resumes_its_session_across_runs() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    let first = claude_run(&env, &mock, &claude, &["-c", "chat"], "first-marker-1");
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let id = session(&env, "chat").expect("the first run's session was not stored");
    let second = claude_run(&env, &mock, &claude, &["-c", "chat"], "second-marker-2");
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let turns = mock.turns_with("second-marker-2");
    assert!(turns.iter().any(|t| t.contains("first-marker-1")), "the model did not see turn 1: {turns:?}");
    assert_eq!(session(&env, "chat").as_deref(), Some(id.as_str()), "claude keeps its id on --resume");
    assert_eq!(last_run(&env, "chat")["kind"], "ok");
}

#[test]
fn real_claude_stale_session_is_replaced_in_one_call() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    store_session(&env, "chat", UNKNOWN);
    let out = claude_run(&env, &mock, &claude, &["-c", "chat"], "after-stale-1");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(&format!("no longer knows session {UNKNOWN}")), "no warning: {stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("no longer knows")).count(), 1, "{stderr}");
    let new = session(&env, "chat").expect("no new session stored");
    assert_ne!(new, UNKNOWN);
    assert_eq!(mock.requests().len(), 1, "the model was asked more than once");
    let entry = &history(&env, "chat")[0];
    assert_eq!(entry["kind"], "ok");
    assert!(entry["session_note"].as_str().unwrap().contains("stale session"), "{entry}");
    // The replacement is a real session: the next run resumes it.
    let next = claude_run(&env, &mock, &claude, &["-c", "chat"], "after-stale-2");
    assert_eq!(next.status.code(), Some(0), "{}", text(&next.stderr));
    assert!(mock.turns_with("after-stale-2").iter().any(|t| t.contains("after-stale-1")));
}

#[test]
fn real_claude_stale_session_with_fail_is_named_and_kept() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    store_session(&env, "chat", UNKNOWN);
    let out = claude_run(&env, &mock, &claude, &["-c", "chat", "--on-stale-session=fail"], "x");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--on-stale-session fail"), "{}", text(&out.stderr));
    assert_eq!(last_run(&env, "chat")["kind"], "stale_session");
    assert_eq!(session(&env, "chat").as_deref(), Some(UNKNOWN));
    assert!(mock.requests().is_empty());
}

#[test]
fn real_claude_529_keeps_the_session_that_holds_the_prompt() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    mock.answer("529");
    let out = claude_run(&env, &mock, &claude, &["-c", "chat"], "refused-marker-529");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let last = last_run(&env, "chat");
    assert_eq!(
        (&last["kind"], &last["api_status"], &last["outcome"]),
        (&"overloaded".into(), &529.into(), &"failed".into())
    );
    assert!(session(&env, "chat").is_some(), "the 529 result's session was dropped");
    assert_eq!(history(&env, "chat")[0]["kind"], "overloaded");
    let table = env.command().args(["status", "chat"]).output().unwrap();
    assert!(text(&table.stdout).contains("overloaded(529)"), "{}", text(&table.stdout));

    mock.answer("ok");
    let out = claude_run(&env, &mock, &claude, &["-c", "chat"], "next-marker");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let turns = mock.turns_with("next-marker");
    assert!(turns.iter().any(|t| t.contains("refused-marker-529")), "the refused prompt was lost: {turns:?}");
}

#[test]
fn real_claude_stream_json_keeps_the_session_of_a_run_that_timed_out() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    mock.answer("hang");
    let args = ["-p", "hanging-marker", "--output-format", "stream-json", "--verbose"];
    let out =
        claude_cmd(&env, &mock, &claude, &["-c", "chat", "-t", "8", "-k", "1"], &args).output().unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    let first: Value = serde_json::from_str(text(&out.stdout).lines().next().expect("no event")).unwrap();
    let id = first["session_id"].as_str().expect("the first event names no session");
    assert_eq!(session(&env, "chat").as_deref(), Some(id));
    assert_eq!(last_run(&env, "chat")["kind"], "timed_out");

    mock.answer("ok");
    let out = claude_run(&env, &mock, &claude, &["-c", "chat"], "after-timeout");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(mock.turns_with("after-timeout").iter().any(|t| t.contains("hanging-marker")));
}

/// A script shaped like `codex exec --json`: notes its arguments in `$T/codex.args`, and
/// prints `thread.started` with the id it resumed (or `t-new`) and a turn.
fn fake_codex() -> Vec<String> {
    let script = r#"printf '%s\n' "$@" > "$T/codex.args"
id=t-new; [ "$2" = resume ] && id=$3
printf '{"type":"thread.started","thread_id":"%s"}\n{"type":"turn.started"}\n{"type":"turn.completed"}\n' "$id""#;
    vec!["sh".into(), "-c".into(), script.into(), "codex".into(), "exec".into(), "--json".into(), "hi".into()]
}

#[test]
fn codex_profile_resumes_with_the_subcommand_and_keeps_the_thread_id() {
    let env = TestEnv::new();
    env.run(&["-c", "x", "--profile", "codex"], &fake_codex()).assert().success();
    assert_eq!(env.read("codex.args"), "exec\n--json\nhi\n");
    assert_eq!(session(&env, "x").as_deref(), Some("t-new"));
    env.run(&["-c", "x"], &fake_codex()).env("CHAN_RUN_PROFILE", "codex").assert().success();
    assert_eq!(env.read("codex.args"), "exec\nresume\nt-new\n--json\nhi\n");
}

#[test]
fn a_profile_that_cannot_pass_the_session_is_refused_before_running() {
    let env = TestEnv::new();
    let out = env.run(&["-c", "x", "--profile", "codex"], &prints("hi")).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("--session-arg"), "{}", text(&out.stderr));
    let out = env.run(&["-c", "x", "--on-stale-session", "fresh"], &prints("hi")).output().unwrap();
    assert_eq!(out.status.code(), Some(125), "--on-stale-session without a profile");
    let out = env.run(&["-c", "x", "--profile", "gemini"], &prints("hi")).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("claude"), "the message does not list the profiles");
    assert!(!env.state().join("active.json").exists(), "a refused run ran");
}

#[test]
fn fresh_after_says_when_it_drops_a_session() {
    let env = TestEnv::new();
    store_session(&env, "x", "s1");
    let fail = ["sh", "-c", "exit 3"];
    let out = env.run(&["-c", "x", "--fresh-after", "2"], &fail).output().unwrap();
    assert!(!text(&out.stderr).contains("dropped"), "{}", text(&out.stderr));
    let out = env.run(&["-c", "x", "--fresh-after", "2"], &fail).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("channel x: dropped its session after 2 failures"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(session(&env, "x"), None);
    assert!(history(&env, "x")[0]["session_note"].as_str().unwrap().contains("--fresh-after"));
    store_session(&env, "x", "s2");
    env.run(&["-c", "x", "--fresh-after", "1", "-q"], &fail).assert().stderr("");
}

/// Holds `channel` and SIGKILLs that holder's chan-run; its pid.
fn holder_killed(env: &TestEnv, channel: &str) -> u32 {
    let mut victim = env.hold(channel, "holding", "never");
    victim.signal(rustix::process::Signal::KILL);
    let _ = victim.child().wait();
    victim.pid()
}

#[test]
fn a_run_whose_chan_run_died_is_in_history_as_died() {
    let env = TestEnv::new();
    store_session(&env, "x", "s1");
    let dead_pid = holder_killed(&env, "x");
    let out = env.run(&["-c", "x"], &prints("next")).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("the run of pid {dead_pid} ")), "{}", text(&out.stderr));
    let entries = history(&env, "x");
    let died = &entries[1];
    assert_eq!((&died["kind"], &died["pid"]), (&"died".into(), &dead_pid.into()), "{entries:?}");
    assert_eq!(died["command"][0], "sh");
    assert_eq!(died["session_before"], "s1");
    assert_eq!(entries[0]["kind"], "ok");
    assert_eq!(entries.len(), 3, "{entries:?}");
    let table = env.command().args(["history", "x"]).output().unwrap();
    assert!(text(&table.stdout).contains("died"), "{}", text(&table.stdout));
    // Said once: the next run finds a clean record.
    let out = env.run(&["-c", "x"], &prints("again")).output().unwrap();
    assert!(!text(&out.stderr).contains("died"), "{}", text(&out.stderr));
}

#[test]
fn a_reset_after_a_dead_run_records_it_too() {
    let env = TestEnv::new();
    store_session(&env, "x", "s1");
    let dead_pid = holder_killed(&env, "x");
    let out = env.command().args(["reset", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("the run of pid {dead_pid} ")), "{}", text(&out.stderr));
    let entries = history(&env, "x");
    assert_eq!((&entries[0]["kind"], &entries[0]["pid"]), (&"died".into(), &dead_pid.into()), "{entries:?}");
    // Recorded once: the next run finds a clean record.
    let out = env.run(&["-c", "x"], &prints("next")).output().unwrap();
    assert!(!text(&out.stderr).contains("died"), "{}", text(&out.stderr));
}

#[test]
fn real_claude_burst_on_three_channels_loses_and_forks_nothing() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    let per_channel = crate::common::scaled(3, 8);
    let mut runs = Vec::new();
    for i in 0..per_channel {
        for ch in 0..3 {
            let prompt = format!("burst-c{ch}-m{i}-end");
            let args = ["-p", prompt.as_str(), "--output-format", "json"];
            let cmd = claude_cmd(&env, &mock, &claude, &["-c", &format!("chat{ch}")], &args);
            runs.push((ch, crate::common::Running::start(cmd)));
        }
    }
    for (ch, run) in runs {
        let out = run.finish(std::time::Duration::from_secs(300));
        assert_eq!(out.code(), 0, "channel {ch}: {}", out.stderr());
    }
    for ch in 0..3 {
        // The longest conversation the model saw on this channel holds every message.
        let requests = mock.requests();
        let longest = requests
            .iter()
            .filter(|r| r.to_string().contains(&format!("burst-c{ch}-")))
            .max_by_key(|r| r["n_messages"].as_u64())
            .unwrap();
        let seen = longest.to_string();
        let lost: Vec<usize> =
            (0..per_channel).filter(|i| !seen.contains(&format!("burst-c{ch}-m{i}-end"))).collect();
        assert!(lost.is_empty(), "channel {ch} lost messages {lost:?} (forked or dropped): {longest}");
        let other = (0..3).filter(|&o| o != ch).any(|o| seen.contains(&format!("burst-c{o}-")));
        assert!(!other, "channel {ch}'s conversation holds another channel's message");
        assert_eq!(runs_of(&env, ch), per_channel as u64);
    }
}

fn runs_of(env: &TestEnv, ch: usize) -> u64 {
    runs(env, &format!("chat{ch}"))
}

/// A script shaped like claude: with `--resume ID` it fails as claude does for an
/// unknown session (noting the call in `$T/calls`), else it answers with `fresh-1`.
fn fake_claude_that_knows_no_session() -> Vec<String> {
    let script = r#"echo call >> "$T/calls"
case " $* " in *" --resume "*) echo "No conversation found with session ID: $CHAN_RUN_SESSION_ID" >&2; exit 1;; esac
printf '{"type":"result","is_error":false,"session_id":"fresh-1","result":"hi"}\n'"#;
    vec!["sh".into(), "-c".into(), script.into(), "claude".into(), "-p".into(), "hi".into()]
}

#[test]
fn a_stale_session_is_replaced_in_the_same_run() {
    let env = TestEnv::new();
    store_session(&env, "x", "gone");
    let out =
        env.run(&["-c", "x", "--profile", "claude"], &fake_claude_that_knows_no_session()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(env.read("calls"), "call\ncall\n");
    assert_eq!(session(&env, "x").as_deref(), Some("fresh-1"));
    assert_eq!(runs(&env, "x"), 2, "the retry counted as a run of its own");
    let entry = &history(&env, "x")[0];
    assert_eq!((&entry["session_before"], &entry["session_after"]), (&"gone".into(), &"fresh-1".into()));
    let table = env.command().args(["history", "x"]).output().unwrap();
    assert!(text(&table.stdout).contains("stale session gone replaced"), "{}", text(&table.stdout));

    // -q: no line; `fail`: no second call, the kind named, the id kept.
    store_session(&env, "y", "gone");
    let opts = ["-c", "y", "--profile", "claude", "-q", "--on-stale-session", "fail"];
    let out = env.run(&opts, &fake_claude_that_knows_no_session()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).contains("chan-run"), "{}", text(&out.stderr));
    assert_eq!(env.read("calls"), "call\ncall\ncall\n");
    assert_eq!(
        (last_run(&env, "y")["kind"].clone(), session(&env, "y")),
        ("stale_session".into(), Some("gone".into()))
    );
    let table = env.command().args(["status", "y"]).output().unwrap();
    assert!(text(&table.stdout).contains("stale_session"), "{}", text(&table.stdout));
}

/// `--collect` (issue 16): `claude -p` with no prompt argument reads the batch on stdin;
/// one request carries the queued messages, and the session goes on from it.
#[test]
fn real_claude_answers_a_collected_burst_in_one_call() {
    let Some(claude) = real_claude() else { return };
    let env = TestEnv::new();
    let mock = Mock::start(&env);
    let holder = env.hold("chat", "held", "go");
    let callers: Vec<crate::common::Running> = ["burst-a", "burst-b", "burst-c"]
        .iter()
        .map(|m| {
            let opts = ["-c", "chat", "--collect", "--message", m];
            let mut run = crate::common::Running::start(claude_cmd(
                &env,
                &mock,
                &claude,
                &opts,
                &["-p", "--output-format", "json"],
            ));
            let pid = run.pid();
            wait_until("a caller to queue", || env.queued_pids("chat").contains(&pid) || !run.is_running());
            run
        })
        .collect();
    env.open_gate("go");
    holder.finish(crate::common::PATIENCE).assert_code(0);
    let codes: Vec<i32> = callers.into_iter().map(|c| c.finish(crate::common::PATIENCE).code()).collect();
    assert_eq!(codes, [0, 80, 80]);
    assert_eq!(mock.requests().len(), 1, "one model call for the burst");
    let turns = mock.turns_with("burst-c");
    assert!(turns.iter().any(|t| t.contains("burst-a\n\nburst-b\n\nburst-c")), "{turns:?}");
    let next = claude_run(&env, &mock, &claude, &["-c", "chat"], "after-burst");
    assert_eq!(next.status.code(), Some(0), "{}", text(&next.stderr));
    assert!(mock.turns_with("after-burst").iter().any(|t| t.contains("burst-b")), "the session went on");
}
