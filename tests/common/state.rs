//! Helpers for the state, session and status tests: reading `active.json` and
//! `status --json`, commands that print a given output, the example model, modes and
//! timestamps. Free functions only, so this file can be included both as
//! `common::state` and through `#[path]` by a test crate without clashing.
#![allow(dead_code)]

use crate::common::{TestEnv, is_alive, list, wait_until};
use serde_json::Value;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// `examples/fake-model`: prints claude-like JSON with a new `session_id` per call
/// and `resumed` naming the id it was given with `--resume`.
pub fn fake_model() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fake-model").to_owned()
}

/// A command that prints `text` and a newline on stdout (whatever arguments
/// chan-run appends after it).
pub fn prints(text: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), r#"printf '%s\n' "$1""#.into(), "sh".into(), text.into()]
}

/// Creates the state directory (0700) so a test can plant files in it first.
pub fn make_state_dir(env: &TestEnv) {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(env.state()).unwrap();
}

pub fn active_path(env: &TestEnv) -> PathBuf {
    env.state().join("active.json")
}

/// The exact bytes of `active.json`.
pub fn active_bytes(env: &TestEnv) -> Vec<u8> {
    std::fs::read(active_path(env)).unwrap_or_else(|e| panic!("reading active.json: {e}"))
}

/// `active.json`, parsed; fails the test if it is not JSON.
pub fn active(env: &TestEnv) -> Value {
    let bytes = active_bytes(env);
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("active.json is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// The channel's record in `active.json` (`Null` if it has none).
pub fn record(env: &TestEnv, channel: &str) -> Value {
    active(env)["channels"][channel].clone()
}

/// The channel's stored session id.
pub fn session(env: &TestEnv, channel: &str) -> Option<String> {
    record(env, channel)["session_id"].as_str().map(str::to_owned)
}

pub fn runs(env: &TestEnv, channel: &str) -> u64 {
    record(env, channel)["runs"].as_u64().unwrap_or_else(|| panic!("no run count for {channel}"))
}

/// Runs the command on `channel` with sessions on, and checks the id it printed was stored.
pub fn store_session(env: &TestEnv, channel: &str, id: &str) {
    let json = format!(r#"{{"type":"result","is_error":false,"session_id":"{id}"}}"#);
    env.run(&["-c", channel], &prints(&json)).assert().success();
    assert_eq!(session(env, channel).as_deref(), Some(id), "the seeding run did not store its id");
}

/// `chan-run status --json ARGS...`: exit 0, and its output parsed.
pub fn status_json(env: &TestEnv, args: &[&str]) -> Value {
    let out = env.command().arg("status").arg("--json").args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// One channel's entry in `status --json CHANNEL`.
pub fn status_of(env: &TestEnv, channel: &str) -> Value {
    let all = status_json(env, &[channel]);
    let list = all["channels"].as_array().expect("channels is a list");
    assert_eq!(list.len(), 1, "status {channel}: {all:#}");
    assert_eq!(list[0]["channel"], channel);
    list[0].clone()
}

/// Permission bits of `path` (not following a symlink).
pub fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode()
        & 0o7777
}

/// Checks `text` is an RFC 3339 time in UTC (`...Z`) and returns it.
#[track_caller]
pub fn utc(text: &Value) -> SystemTime {
    let s = text.as_str().unwrap_or_else(|| panic!("not a time string: {text}"));
    assert!(s.ends_with('Z'), "not UTC: {s}");
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {s}"))
}

/// Names in the state directory that are quarantined state files, sorted.
pub fn quarantined(env: &TestEnv) -> Vec<String> {
    list(env.state()).into_iter().filter(|n| n.starts_with("active.json.corrupt-")).collect()
}

/// Names in the state directory that look like a leftover temporary state file.
pub fn stray_temp_files(env: &TestEnv) -> Vec<String> {
    list(env.state()).into_iter().filter(|n| n.starts_with(".active.json")).collect()
}

/// The pids written in `stem`'s queue tickets, in queue order, of callers still alive.
/// A ticket is locked before its pid is written in it, so these are live waiters; a
/// ticket left by a caller that gave up (until the next in line removes it) is skipped.
pub fn queued(env: &TestEnv, stem: &str) -> Vec<u32> {
    let dir = env.state().join("queue").join(stem);
    list(&dir)
        .iter()
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            text.split_ascii_whitespace().next().and_then(|w| w.parse().ok())
        })
        .filter(|&pid| is_alive(pid))
        .collect()
}

/// Waits until `n` live callers stand in `stem`'s queue; returns their pids in order.
pub fn wait_for_queued(env: &TestEnv, stem: &str, n: usize) -> Vec<u32> {
    wait_until(&format!("{n} live callers in queue/{stem}"), || queued(env, stem).len() == n);
    queued(env, stem)
}

/// Waits until exactly `pids` stand in `stem`'s queue, in that order.
pub fn wait_for_waiters(env: &TestEnv, stem: &str, pids: &[u32]) {
    wait_until(&format!("{pids:?} queued in queue/{stem}"), || queued(env, stem) == pids);
}

/// Runs `f` and returns its result with how long it took.
pub fn timed<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}
