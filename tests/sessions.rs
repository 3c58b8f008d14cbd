//! Sessions (SPEC item 7): the stored id is passed with `--session-arg` and in
//! `CHAN_RUN_SESSION_ID`, and the id the command prints is stored, found in whole JSON
//! documents or the last line of JSON Lines, whatever the exit status.

use crate::common::state as state_helpers;

use crate::common::{PATIENCE, TestEnv, sh};
use serde_json::Value;
use state_helpers::*;

const RESUME: &str = "--session-arg=--resume";

/// The example model, wrapped so that it first notes its arguments and its
/// `CHAN_RUN_SESSION_ID` / `CHAN_RUN_CHANNEL` in `$T/<tag>.args` and `$T/<tag>.env`.
fn model(tag: &str) -> Vec<String> {
    let script = r#"tag=$1; shift
printf '%s\n' "$@" > "$T/$tag.args"
printf '%s|%s' "${CHAN_RUN_SESSION_ID-<unset>}" "${CHAN_RUN_CHANNEL-<unset>}" > "$T/$tag.env"
exec "$0" "$@""#;
    vec!["sh".into(), "-c".into(), script.into(), fake_model(), tag.into(), "-p".into(), "hello".into()]
}

/// The JSON the example model printed.
fn answer(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(stdout)))
}

#[test]
fn session_round_trip_with_the_example_model() {
    let env = TestEnv::new();
    // A session id in the caller's own environment must not reach a first run.
    let first = env.run(&["-c", "chat", RESUME], &model("one")).env("CHAN_RUN_SESSION_ID", "leaked").output();
    let first = first.unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    let first = answer(&first.stdout);
    assert_eq!(first["resumed"], "", "the first run was asked to resume something");
    assert_eq!(env.read("one.args"), "-p\nhello\n", "the first run got a session flag");
    assert_eq!(env.read("one.env"), "<unset>|chat");
    let id1 = first["session_id"].as_str().unwrap().to_owned();
    assert_eq!(session(&env, "chat").as_deref(), Some(id1.as_str()));

    let second = env.run(&["-c", "chat", RESUME], &model("two")).output().unwrap();
    assert_eq!(second.status.code(), Some(0));
    let second = answer(&second.stdout);
    assert_eq!(second["resumed"], id1.as_str(), "the second run did not resume the first's session");
    assert_eq!(env.read("two.args"), format!("-p\nhello\n--resume\n{id1}\n"));
    assert_eq!(env.read("two.env"), format!("{id1}|chat"));
    let id2 = second["session_id"].as_str().unwrap();
    assert_ne!(id2, id1);
    assert_eq!(
        session(&env, "chat").as_deref(),
        Some(id2),
        "the id returned must be stored, not the one sent"
    );
    assert_eq!(runs(&env, "chat"), 2);

    // Without --session-arg no flag is appended, but the environment still names the id.
    let third = env.run(&["-c", "chat"], &model("three")).output().unwrap();
    assert_eq!(answer(&third.stdout)["resumed"], "");
    assert_eq!(env.read("three.args"), "-p\nhello\n");
    assert_eq!(env.read("three.env"), format!("{id2}|chat"));

    // Another channel has a session of its own.
    let other = env.run(&["-c", "other", RESUME], &model("four")).output().unwrap();
    assert_eq!(answer(&other.stdout)["resumed"], "");
}

#[test]
fn json_lines_output_stores_the_id_of_the_last_line() {
    let env = TestEnv::new();
    let lines = [
        r#"{"type":"system","subtype":"init","session_id":"from-init"}"#,
        r#"{"type":"assistant","message":"hi","session_id":"from-message"}"#,
        r#"{"type":"result","is_error":false,"session_id":"from-result"}"#,
        "",
    ];
    let text = lines.join("\n");
    env.run(&["-c", "jl"], &prints(&text)).assert().success().stdout(format!("{text}\n"));
    assert_eq!(session(&env, "jl").as_deref(), Some("from-result"));
}

#[test]
fn pretty_printed_json_stores_its_id() {
    let env = TestEnv::new();
    let text = "{\n  \"type\": \"result\",\n  \"session_id\": \"pretty-1\",\n  \"result\": \"line one\\nline two\"\n}";
    env.run(&["-c", "pp"], &prints(text)).assert().success();
    assert_eq!(session(&env, "pp").as_deref(), Some("pretty-1"));
}

#[test]
fn output_without_an_id_keeps_the_stored_one() {
    let env = TestEnv::new();
    store_session(&env, "keep", "old-id");
    for text in ["plain text, not JSON", r#"{"result":"no id here"}"#, r#"{"session_id":42}"#, "", "[1,2]"] {
        env.run(&["-c", "keep"], &prints(text)).assert().success();
        assert_eq!(session(&env, "keep").as_deref(), Some("old-id"), "after output {text:?}");
    }
    // Also when the command printed nothing and failed.
    env.run(&["-c", "keep"], &sh("exit 2")).assert().code(2);
    assert_eq!(session(&env, "keep").as_deref(), Some("old-id"));
    assert_eq!(runs(&env, "keep"), 7);
}

#[test]
fn an_error_result_keeps_the_stored_id() {
    let env = TestEnv::new();
    store_session(&env, "err", "good-id");
    let text = r#"{"type":"result","is_error":true,"result":"overloaded","session_id":"broken-id"}"#;
    env.run(&["-c", "err"], &prints(text)).assert().success();
    assert_eq!(session(&env, "err").as_deref(), Some("good-id"));
    // As JSON Lines too.
    let lines = format!("{}\n{text}", r#"{"type":"system","session_id":"init-id"}"#);
    env.run(&["-c", "err"], &prints(&lines)).assert().success();
    assert_eq!(session(&env, "err").as_deref(), Some("good-id"));
}

#[test]
fn a_result_printed_before_a_timeout_is_recorded() {
    let env = TestEnv::new();
    store_session(&env, "late", "before");
    let cmd = sh(r#"echo '{"type":"result","session_id":"answered"}'; exec sleep 30"#);
    let out = env.spawn(&["-c", "late", "-t", "0.5", "-k", "5"], &cmd).finish(PATIENCE);
    out.assert_code(124);
    let rec = record(&env, "late");
    assert_eq!(rec["last_run"]["outcome"], "timed_out");
    assert_eq!(rec["session_id"], "answered", "{rec:#}");
}

#[test]
fn fresh_after_drops_the_id_after_that_many_failures_in_a_row() {
    let env = TestEnv::new();
    let c = "fresh";
    store_session(&env, c, "stale");
    let fail = |code: i32| {
        env.run(&["-c", c, "--fresh-after", "2", RESUME], &sh("exit 1")).assert().code(1);
        assert_eq!(record(&env, c)["failures_in_a_row"], code);
    };
    fail(1);
    assert_eq!(session(&env, c).as_deref(), Some("stale"), "dropped after one failure");
    fail(2);
    assert_eq!(session(&env, c), None, "kept after two failures in a row");
    // The next run starts a fresh conversation.
    let out = env.run(&["-c", c, RESUME], &model("next")).output().unwrap();
    assert_eq!(answer(&out.stdout)["resumed"], "");
    assert_eq!(env.read("next.env"), format!("<unset>|{c}"));

    // A success in between starts the count again.
    store_session(&env, c, "stale-2");
    fail(1);
    env.run(&["-c", c], &sh("true")).assert().success();
    fail(1);
    assert_eq!(session(&env, c).as_deref(), Some("stale-2"));
}

#[test]
fn no_session_neither_passes_nor_records() {
    let env = TestEnv::new();
    store_session(&env, "ns", "stored");
    let cmd = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        r#"echo "$#" > "$T/argc"; printf '%s' "${CHAN_RUN_SESSION_ID-<unset>}" > "$T/env"; echo '{"session_id":"new"}'"#
            .to_owned(),
    ];
    env.run(&["-c", "ns", "--no-session"], &cmd).env("CHAN_RUN_SESSION_ID", "from-caller").assert().success();
    assert_eq!(env.read("argc").trim(), "0", "an argument was appended");
    assert_eq!(env.read("env"), "<unset>", "a session id reached the command");
    assert_eq!(session(&env, "ns").as_deref(), Some("stored"), "--no-session recorded an id");
    assert_eq!(runs(&env, "ns"), 2, "it is still a run");
}

#[test]
fn a_custom_session_key_is_a_json_pointer() {
    let env = TestEnv::new();
    let text = r#"{"session_id":"top-level","a":{"b":"nested-id"},"c~d":{"e/f":"escaped-id"}}"#;
    env.run(&["-c", "key", "--session-key", "/a/b"], &prints(text)).assert().success();
    assert_eq!(session(&env, "key").as_deref(), Some("nested-id"));
    env.run(&["-c", "key2", "--session-key", "/c~0d/e~1f"], &prints(text)).assert().success();
    assert_eq!(session(&env, "key2").as_deref(), Some("escaped-id"));
    // The default key is not looked at when another one is given.
    env.run(&["-c", "key3", "--session-key", "/missing"], &prints(text)).assert().success();
    assert_eq!(session(&env, "key3"), None);
    // The stored id is passed on as usual.
    let args = r#"printf '%s\n' "$@" > "$T/args""#;
    env.run(&["-c", "key", RESUME], &[String::from("sh"), "-c".into(), args.into(), "sh".into()])
        .assert()
        .success();
    assert_eq!(env.read("args"), "--resume\nnested-id\n");
}

#[test]
fn a_run_from_another_directory_warns() {
    let env = TestEnv::new();
    std::fs::create_dir(env.path("here")).unwrap();
    std::fs::create_dir(env.path("there")).unwrap();
    let here = env.path("here").canonicalize().unwrap();
    let there = env.path("there").canonicalize().unwrap();
    let run_in = |dir: &std::path::Path, text: &str| {
        let out = env.run(&["-c", "cwd", RESUME], &prints(text)).current_dir(dir).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run_in(&here, r#"{"session_id":"made-here"}"#);
    assert!(!err.contains("warning"), "{err}");
    let rec = record(&env, "cwd");
    assert_eq!(rec["session_cwd"], here.display().to_string(), "{rec:#}");

    let err = run_in(&there, "no id this time");
    assert!(err.contains("warning"), "no warning from another directory: {err:?}");
    assert!(err.contains(&here.display().to_string()) && err.contains(&there.display().to_string()), "{err}");

    let err = run_in(&here, "back home");
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn output_bigger_than_the_tail_cap_still_records_the_last_line() {
    let env = TestEnv::new();
    // 5 MiB of lines (more than the 4 MiB kept), then the result; a stale id early on.
    let script = r#"echo '{"session_id":"too-early"}'
yes 'some streamed output that is not the result' | head -c 5242880
head -c 1048576 /dev/zero | tr '\0' x
echo
echo '{"type":"result","session_id":"after-5-MiB"}'"#;
    let out = env.run(&["-c", "big"], &sh(script)).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let first = r#"{"session_id":"too-early"}"#.len() + 1;
    let last = r#"{"type":"result","session_id":"after-5-MiB"}"#.len() + 1;
    let expected = first + 5 * 1024 * 1024 + 1024 * 1024 + 1 + last;
    assert_eq!(out.stdout.len(), expected, "the output was not passed through whole");
    assert_eq!(session(&env, "big").as_deref(), Some("after-5-MiB"));
}
