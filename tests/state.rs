//! `active.json`: no lost update under concurrency, the shape of a run's record for
//! every ending, damaged / newer / unreadable files, a full disk while recording, and
//! the modes of the state directory's files (SPEC item 8, "State directory").

use crate::common::state as state_helpers;

use crate::common::{PATIENCE, Running, TestEnv, secs, sh};
use rustix::process::Signal;
use serde_json::Value;
use state_helpers::*;
use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, SystemTime};

// ---------------------------------------------------------------------------------
// No lost update

#[test]
fn concurrent_runs_on_eight_channels_lose_no_update() {
    let env = TestEnv::new();
    let mut runs: Vec<(String, Running)> = Vec::new();
    for c in 0..8 {
        let channel = format!("ch{c}");
        for i in 0..12 {
            let cmd = sh(&format!(r#"gate go; printf '{{"session_id":"{channel}-{i}"}}\n'"#));
            runs.push((channel.clone(), env.spawn(&["-c", &channel], &cmd)));
        }
    }
    // Every channel's holder and its 11 waiters are in place before any of them ends,
    // so the eight first recordings race each other, and the rest overlap too.
    for c in 0..8 {
        wait_for_queued(&env, &format!("ch{c}"), 11);
    }
    env.open_gate("go");
    for (channel, run) in runs {
        let out = run.finish(PATIENCE);
        assert_eq!(out.code(), 0, "a run on {channel} failed: {}", out.stderr());
    }
    let state = active(&env);
    assert_eq!(state["version"], 1);
    let channels = state["channels"].as_object().expect("channels is an object");
    assert_eq!(channels.len(), 8, "{state:#}");
    for c in 0..8 {
        let channel = format!("ch{c}");
        let rec = &channels[&channel];
        assert_eq!(rec["runs"], 12, "{channel} lost an update: {rec:#}");
        assert_eq!(rec["failures_in_a_row"], 0, "{channel}: {rec:#}");
        assert_eq!(rec["last_run"]["outcome"], "ok", "{channel}: {rec:#}");
        let id = rec["session_id"].as_str().expect("a session id");
        assert!(id.starts_with(&format!("{channel}-")), "{channel} got another channel's session {id}");
    }
    assert_eq!(stray_temp_files(&env), Vec::<String>::new(), "temporary state files left behind");
}

// ---------------------------------------------------------------------------------
// The record of each ending

/// Runs one command on a fresh channel and returns chan-run's exit code and the
/// channel's record, checking the times in it.
fn record_of(env: &TestEnv, channel: &str, opts: &[&str], cmd: &[String], min_ms: u64) -> (i32, Value) {
    let mut all = vec!["-c", channel];
    all.extend_from_slice(opts);
    let before = SystemTime::now();
    let out = env.spawn(&all, cmd).finish(PATIENCE);
    let after = SystemTime::now();
    let rec = record(env, channel);
    check_times(&rec["last_run"], before, after, min_ms);
    (out.code(), rec)
}

/// started_at / finished_at are RFC 3339 UTC within the run's wall-clock window,
/// and duration_ms agrees with them.
#[track_caller]
fn check_times(last: &Value, before: SystemTime, after: SystemTime, min_ms: u64) {
    let slack = Duration::from_millis(5); // the record keeps milliseconds
    let started = utc(&last["started_at"]);
    let finished = utc(&last["finished_at"]);
    assert!(started + slack >= before && finished <= after + slack, "times outside the run: {last:#}");
    assert!(started <= finished, "{last:#}");
    let wall = finished.duration_since(started).unwrap().as_millis() as u64;
    let ms = last["duration_ms"].as_u64().unwrap_or_else(|| panic!("duration_ms: {last:#}"));
    assert!(ms >= min_ms && ms <= wall + 5, "duration_ms {ms}, wall {wall} ms, min {min_ms}: {last:#}");
}

#[track_caller]
fn check(rec: &Value, runs: u64, failures: u64, outcome: &str, exit_code: Value, signal: Value) {
    let last = &rec["last_run"];
    assert_eq!(rec["runs"], runs, "{rec:#}");
    assert_eq!(rec["failures_in_a_row"], failures, "{rec:#}");
    assert_eq!(last["outcome"], outcome, "{rec:#}");
    assert_eq!(last["exit_code"], exit_code, "{rec:#}");
    assert_eq!(last["signal"], signal, "{rec:#}");
}

#[test]
fn record_of_an_ok_run() {
    let env = TestEnv::new();
    let (code, rec) = record_of(&env, "ok", &[], &sh("true"), 0);
    assert_eq!(code, 0);
    check(&rec, 1, 0, "ok", 0.into(), Value::Null);
}

#[test]
fn record_of_a_failed_run() {
    let env = TestEnv::new();
    let (code, rec) = record_of(&env, "failed", &[], &sh("exit 3"), 0);
    assert_eq!(code, 3);
    check(&rec, 1, 1, "failed", 3.into(), Value::Null);
}

#[test]
fn record_of_a_timed_out_run() {
    let env = TestEnv::new();
    let (code, rec) = record_of(&env, "slow", &["-t", "0.3", "-k", "5"], &sh("exec sleep 30"), 300);
    assert_eq!(code, 124);
    check(&rec, 1, 1, "timed_out", Value::Null, 15.into());
}

#[test]
fn record_of_a_timed_out_run_that_needed_sigkill_names_sigkill() {
    let env = TestEnv::new();
    let cmd = sh("trap '' TERM; exec sleep 30");
    let (code, rec) = record_of(&env, "stubborn", &["-t", "0.3", "-k", "0.3"], &cmd, 600);
    assert_eq!(code, 124, "still 124, not 137");
    check(&rec, 1, 1, "timed_out", Value::Null, 9.into());
}

#[test]
fn record_of_a_command_that_killed_itself() {
    let env = TestEnv::new();
    let (code, rec) = record_of(&env, "selfkill", &[], &sh("kill -USR1 $$; sleep 5"), 0);
    assert_eq!(code, 128 + 10);
    check(&rec, 1, 1, "signaled", Value::Null, 10.into());
}

#[test]
fn record_of_an_interrupted_run() {
    let env = TestEnv::new();
    let before = SystemTime::now();
    let run = env.spawn(&["-c", "intr"], &sh("started m; gate never"));
    env.wait_for_file("m");
    run.signal(Signal::TERM);
    let out = run.finish(PATIENCE);
    let after = SystemTime::now();
    out.assert_code(143);
    let rec = record(&env, "intr");
    check_times(&rec["last_run"], before, after, 0);
    check(&rec, 1, 1, "interrupted", Value::Null, 15.into());
}

#[test]
fn record_of_a_command_not_found_or_not_executable() {
    let env = TestEnv::new();
    let missing = vec![env.path("no-such-command").display().to_string()];
    let (code, rec) = record_of(&env, "spawn", &[], &missing, 0);
    assert_eq!(code, 127);
    check(&rec, 1, 1, "spawn_failed", Value::Null, Value::Null);

    std::fs::write(env.path("not-executable"), "#!/bin/sh\n").unwrap();
    let denied = vec![env.path("not-executable").display().to_string()];
    let (code, rec) = record_of(&env, "spawn", &[], &denied, 0);
    assert_eq!(code, 126);
    check(&rec, 2, 2, "spawn_failed", Value::Null, Value::Null);
}

#[test]
fn failures_in_a_row_count_every_kind_of_failure_and_reset_on_success() {
    let env = TestEnv::new();
    let c = "streak";
    env.run(&["-c", c], &sh("exit 1")).assert().code(1);
    env.run(&["-c", c, "-t", "0.2"], &sh("exec sleep 30")).assert().code(124);
    env.run(&["-c", c], &[env.path("missing").display().to_string()]).assert().code(127);
    env.run(&["-c", c], &sh("kill -KILL $$")).assert().code(137);
    check(&record(&env, c), 4, 4, "signaled", Value::Null, 9.into());
    env.run(&["-c", c], &sh("true")).assert().code(0);
    check(&record(&env, c), 5, 0, "ok", 0.into(), Value::Null);
}

#[test]
fn a_busy_channel_leaves_the_state_untouched() {
    let env = TestEnv::new();
    store_session(&env, "busy", "s-1");
    let holder = env.hold("busy", "held", "go");
    let before = active_bytes(&env);
    env.run(&["-c", "busy", "-n"], &sh("started ran")).assert().code(75);
    env.run(&["-c", "busy", "-w", "0.2", "-E", "42"], &sh("started ran")).assert().code(42);
    // A waiter interrupted before its turn: nothing ran, nothing recorded.
    let waiter = env.spawn(&["-c", "busy"], &sh("started ran"));
    wait_for_waiters(&env, "busy", &[waiter.pid()]);
    waiter.signal(Signal::TERM);
    waiter.finish(PATIENCE).assert_code(143);
    assert!(!env.exists("ran"));
    assert_eq!(active_bytes(&env), before, "a run that never got the channel changed active.json");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert_eq!(runs(&env, "busy"), 2, "only the seeding run and the holder count");
}

// ---------------------------------------------------------------------------------
// Damaged, newer and unreadable files

/// Plants `bytes` as active.json, runs, and checks the quarantine.
fn assert_quarantined(what: &str, bytes: &[u8]) {
    let env = TestEnv::new();
    make_state_dir(&env);
    std::fs::write(active_path(&env), bytes).unwrap();
    let out = env.spawn(&["-c", "q"], &sh("started ran")).finish(PATIENCE);
    assert_eq!(out.code(), 0, "{what}: {}", out.stderr());
    assert!(env.exists("ran"), "{what}: the command did not run");

    let moved = quarantined(&env);
    assert_eq!(moved.len(), 1, "{what}: {moved:?}");
    let moved_path = env.state().join(&moved[0]);
    assert_eq!(std::fs::read(&moved_path).unwrap(), bytes, "{what}: the quarantined bytes changed");
    let year = &humantime::format_rfc3339(SystemTime::now()).to_string()[..4];
    assert!(moved[0]["active.json.corrupt-".len()..].starts_with(year), "{what}: not a UTC time: {moved:?}");

    let err = out.stderr();
    assert!(err.contains("warning"), "{what}: {err}");
    assert!(err.contains(&active_path(&env).display().to_string()), "{what}: names the file: {err}");
    assert!(err.contains(&moved_path.display().to_string()), "{what}: names where it went: {err}");

    let state = active(&env);
    assert_eq!(state["version"], 1, "{what}");
    assert_eq!(state["channels"].as_object().unwrap().len(), 1, "{what}: not an empty state: {state:#}");
    assert_eq!(state["channels"]["q"]["runs"], 1, "{what}: {state:#}");
}

#[test]
fn damaged_state_is_quarantined_with_its_exact_bytes() {
    let example = include_bytes!("../sessions.example.json");
    let cases: [(&str, &[u8]); 10] = [
        ("not JSON", b"hello, this is not JSON\n"),
        ("wrong shape", br#"{"channels": 5}"#),
        ("wrong record shape", br#"{"version":1,"channels":{"a":{"runs":"many"}}}"#),
        ("a list", b"[1, 2, 3]\n"),
        ("null", b"null"),
        ("truncated", &example[..example.len() / 2]),
        ("not UTF-8", b"\xff\xfe\x00\x01\x80 binary"),
        ("not UTF-8 inside a string", b"{\"version\":1,\"channels\":{\"caf\xe9\":{}}}"),
        ("empty file", b""),
        ("trailing garbage", br#"{"version":1,"channels":{}} and more"#),
    ];
    for (what, bytes) in cases {
        assert_quarantined(what, bytes);
    }
}

#[test]
fn concurrent_runs_quarantine_a_damaged_file_once_and_all_record() {
    let env = TestEnv::new();
    make_state_dir(&env);
    let damaged = b"{\"version\":1,\"channels\":{\"lost\":";
    std::fs::write(active_path(&env), damaged).unwrap();
    let runs: Vec<Running> = (0..8).map(|c| env.spawn(&["-c", &format!("c{c}")], &sh("true"))).collect();
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    let moved = quarantined(&env);
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(std::fs::read(env.state().join(&moved[0])).unwrap(), damaged);
    let state = active(&env);
    for c in 0..8 {
        assert_eq!(state["channels"][format!("c{c}")]["runs"], 1, "{state:#}");
    }
}

#[test]
fn a_fifo_in_place_of_the_state_file_is_refused_not_waited_on() {
    let env = TestEnv::new();
    make_state_dir(&env);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        active_path(&env),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let status = Running::start({
        let mut cmd = env.std_command();
        cmd.arg("status");
        cmd
    });
    let out = status.finish(secs(5.0));
    assert_eq!(out.code(), 125, "{}", out.stderr());
    let out = env.spawn(&["-c", "f"], &sh("started ran")).finish(secs(5.0));
    assert_eq!(out.code(), 125, "{}", out.stderr());
    assert!(!env.exists("ran"));
    assert!(std::fs::symlink_metadata(active_path(&env)).unwrap().file_type().is_fifo());
}

#[test]
fn a_directory_in_place_of_the_state_file_is_moved_aside_whole() {
    let env = TestEnv::new();
    make_state_dir(&env);
    std::fs::create_dir(active_path(&env)).unwrap();
    std::fs::write(active_path(&env).join("keep"), b"precious").unwrap();
    let out = env.spawn(&["-c", "d"], &sh("started ran")).finish(PATIENCE);
    out.assert_code(0);
    assert!(env.exists("ran"));
    let moved = quarantined(&env);
    assert_eq!(moved.len(), 1, "{moved:?}");
    let moved_path = env.state().join(&moved[0]);
    assert_eq!(
        std::fs::read(moved_path.join("keep")).unwrap(),
        b"precious",
        "the directory's content was lost"
    );
    assert!(out.stderr().contains(&moved_path.display().to_string()), "{}", out.stderr());
    assert!(active_path(&env).is_file());
    assert_eq!(runs(&env, "d"), 1);
}

#[test]
fn quarantine_names_are_unique_even_within_one_second() {
    let env = TestEnv::new();
    make_state_dir(&env);
    std::fs::write(active_path(&env), b"damage A").unwrap();
    let before = SystemTime::now();
    env.run(&["-c", "q"], &sh("true")).assert().success();
    let after = SystemTime::now();
    let first = quarantined(&env);
    assert_eq!(first.len(), 1);
    // The name is the UTC time to the millisecond: occupy every such name from one second
    // ago to four seconds ahead, so the next quarantines must find names of their own.
    let pattern = |t: SystemTime| {
        format!("active.json.corrupt-{}", humantime::format_rfc3339_millis(t).to_string().replace(':', ""))
    };
    let window = after.duration_since(before).unwrap().as_millis() as u64 + 2;
    assert!(
        (0..window).any(|ms| pattern(before + Duration::from_millis(ms)) == first[0]),
        "the quarantine name format changed ({first:?}); update this test's decoys"
    );
    let now = SystemTime::now();
    let mut decoys = BTreeSet::new();
    for ms in 0..5000u64 {
        let name = pattern(now - Duration::from_secs(1) + Duration::from_millis(ms));
        if name != first[0] {
            std::fs::write(env.state().join(&name), b"decoy").unwrap();
            decoys.insert(name);
        }
    }
    let mut seen: BTreeSet<String> = first.iter().cloned().collect();
    seen.extend(decoys.iter().cloned());
    for damage in [&b"damage B"[..], b"damage C"] {
        std::fs::write(active_path(&env), damage).unwrap();
        env.run(&["-c", "q"], &sh("true")).assert().success();
        let new: Vec<String> = quarantined(&env).into_iter().filter(|n| !seen.contains(n)).collect();
        assert_eq!(new.len(), 1, "{new:?}");
        assert_eq!(std::fs::read(env.state().join(&new[0])).unwrap(), damage);
        seen.insert(new[0].clone());
    }
    assert_eq!(std::fs::read(env.state().join(&first[0])).unwrap(), b"damage A");
    for name in &decoys {
        assert_eq!(std::fs::read(env.state().join(name)).unwrap(), b"decoy", "{name} was overwritten");
    }
    assert_eq!(quarantined(&env).len(), decoys.len() + 3);
}

#[test]
fn empty_object_and_missing_file_are_an_empty_state() {
    for content in [None, Some(&b"{}"[..]), Some(b"{}\n"), Some(b" { } ")] {
        let env = TestEnv::new();
        make_state_dir(&env);
        if let Some(bytes) = content {
            std::fs::write(active_path(&env), bytes).unwrap();
        }
        let out = env.spawn(&["-c", "e"], &sh("true")).finish(PATIENCE);
        out.assert_code(0);
        assert!(!out.stderr().contains("warning"), "{content:?}: {}", out.stderr());
        assert_eq!(quarantined(&env), Vec::<String>::new(), "{content:?}");
        let state = active(&env);
        assert_eq!(state["version"], 1);
        assert_eq!(state["channels"]["e"]["runs"], 1, "{content:?}: {state:#}");
    }
}

#[test]
fn a_newer_state_version_is_refused_untouched() {
    let env = TestEnv::new();
    make_state_dir(&env);
    let newer = br#"{"version":2,"channels":{"n":{"runs":5,"session_id":"s"}},"from":"the future"}"#;
    std::fs::write(active_path(&env), newer).unwrap();
    let out = env.spawn(&["-c", "n"], &sh("started ran")).finish(PATIENCE);
    out.assert_code(125);
    assert!(!env.exists("ran"), "the command ran");
    assert!(out.stderr().contains("active.json"), "{}", out.stderr());
    env.command().args(["reset", "n"]).assert().code(125);
    assert_eq!(active_bytes(&env), newer, "the newer file was changed");
    assert_eq!(quarantined(&env), Vec::<String>::new(), "a newer file is not damage");
}

#[test]
fn a_symlink_planted_at_the_state_file_is_refused_and_not_followed() {
    let env = TestEnv::new();
    make_state_dir(&env);
    let target = env.path("elsewhere.json");
    let content = br#"{"version":1,"channels":{}}"#;
    std::fs::write(&target, content).unwrap();
    std::os::unix::fs::symlink(&target, active_path(&env)).unwrap();
    let out = env.spawn(&["-c", "l"], &sh("started ran")).finish(PATIENCE);
    out.assert_code(125);
    assert!(!env.exists("ran"), "the command ran");
    assert!(out.stderr().contains("symbolic link"), "{}", out.stderr());
    env.command().args(["reset", "l"]).assert().code(125);
    assert_eq!(std::fs::read(&target).unwrap(), content, "the link's target was written");
    assert_eq!(std::fs::read_link(active_path(&env)).unwrap(), target, "the link was replaced");

    // A dangling link must not make chan-run create its target either.
    let dangling = env.path("would-be-created.json");
    std::fs::remove_file(active_path(&env)).unwrap();
    std::os::unix::fs::symlink(&dangling, active_path(&env)).unwrap();
    env.run(&["-c", "l"], &sh("started ran")).assert().code(125);
    assert!(!env.exists("ran"));
    assert!(!dangling.exists(), "chan-run created the dangling link's target");
}

// ---------------------------------------------------------------------------------
// A full disk while recording

/// A session id long enough to make active.json bigger than `ulimit -f 1` allows.
fn long_id() -> String {
    "x".repeat(1000)
}

#[test]
fn a_file_size_limit_while_recording_keeps_the_exit_status_and_the_old_file() {
    let env = TestEnv::new();
    store_session(&env, "fs", &long_id());
    let before = active_bytes(&env);
    assert!(before.len() > 1024, "active.json must exceed the limit: {} bytes", before.len());

    // The command prints a new (long) id and exits 7; chan-run cannot write the new
    // state (1 KiB limit, 512-byte blocks in dash).
    let answer = format!(r#"{{"session_id":"{}"}}"#, "y".repeat(1000));
    let mut cmd = std::process::Command::new("sh");
    env.apply(&mut cmd);
    cmd.args(["-c", r#"ulimit -f 1; exec "$B" "$@""#, "sh", "run", "-c", "fs", "--"]);
    cmd.args(sh(&format!("echo '{answer}'; exit 7")));
    let out = Running::start(cmd).finish(PATIENCE);
    assert_eq!(out.code(), 7, "the command's status must be kept: {}", out.stderr());
    assert_eq!(out.stdout(), format!("{answer}\n"));
    let err = out.stderr();
    assert!(err.contains("warning") && err.contains("active.json"), "{err}");
    assert_eq!(active_bytes(&env), before, "the previous active.json was damaged");
    assert_eq!(stray_temp_files(&env), Vec::<String>::new());

    // Without the limit, recording works again.
    env.run(&["-c", "fs"], &sh("true")).assert().success();
    assert_eq!(runs(&env, "fs"), 2);
}

#[test]
fn the_command_gets_the_default_sigxfsz_back() {
    let env = TestEnv::new();
    let mut cmd = std::process::Command::new("sh");
    env.apply(&mut cmd);
    cmd.args(["-c", r#"ulimit -f 1; exec "$B" "$@""#, "sh", "run", "-c", "xfsz", "--"]);
    cmd.args(sh(r#"exec head -c 100000 /dev/zero > "$T/big""#));
    let out = Running::start(cmd).finish(PATIENCE);
    // `head` dies of SIGXFSZ, as it would without chan-run; the shell reports 128+25.
    assert_eq!(out.code(), 128 + 25, "{}", out.stderr());
}

/// On a full disk, an existing channel's record is still updated (it is rewritten in
/// its slot, which needs no new space); a new channel's record cannot be appended:
/// then the exit status is kept, a warning names the file, and the file is unchanged.
#[test]
fn no_space_left_while_recording_keeps_the_exit_status_and_the_old_file() {
    if !std::process::Command::new("unshare").args(["-m", "true"]).status().is_ok_and(|s| s.success()) {
        eprintln!("skipped: `unshare -m` is not permitted here");
        return;
    }
    let env = TestEnv::new();
    std::fs::create_dir(env.path("mnt")).unwrap();
    let script = r#"
        mount -t tmpfs -o size=64k tmpfs "$T/mnt" || exit 90
        export CHAN_RUN_STATE_DIR="$T/mnt/state"
        "$B" run -c d -- sh -c 'echo "{\"session_id\":\"first\"}"' > /dev/null || exit 91
        # Seven more channels: the file then ends 3 bytes into its second page, so the
        # long record below (a 2 KiB slot) needs a page the full disk cannot give.
        for c in 1 2 3 4 5 6 7; do "$B" run -c "c$c" -- true || exit 94; done
        head -c 1000000 /dev/zero > "$T/mnt/filler" 2> /dev/null
        [ "$(stat -f -c %a "$T/mnt")" = 0 ] || exit 93
        "$B" run -c d -- sh -c 'echo "{\"session_id\":\"second\"}"; exit 7' > "$T/out" 2> "$T/err"
        echo $? > "$T/rc"
        cp "$CHAN_RUN_STATE_DIR/active.json" "$T/before.json" || exit 92
        long=$(head -c 1000 /dev/zero | tr '\0' x)
        "$B" run -c new -- sh -c "echo '{\"session_id\":\"$long\"}'; exit 5" > "$T/out-new" 2> "$T/err-new"
        echo $? > "$T/rc-new"
        cp "$CHAN_RUN_STATE_DIR/active.json" "$T/after.json"
        ls -A "$CHAN_RUN_STATE_DIR" > "$T/ls"
    "#;
    let mut cmd = std::process::Command::new("unshare");
    env.apply(&mut cmd);
    let status = cmd.args(["-m", "sh", "-c", script]).status().unwrap();
    if status.code() == Some(90) {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    assert_eq!(status.code(), Some(0), "the ENOSPC set-up failed");
    // The existing channel: recorded in place, despite the full disk.
    assert_eq!(env.read("rc").trim(), "7", "stderr: {}", env.read("err"));
    assert_eq!(env.read("out"), "{\"session_id\":\"second\"}\n");
    assert_eq!(env.read("err"), "", "an in-place update needs no space");
    let before: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("before.json")).unwrap()).unwrap();
    assert_eq!(before["channels"]["d"]["session_id"], "second");
    assert_eq!(before["channels"]["d"]["runs"], 2);
    // The new channel: not recorded, status kept, file intact.
    assert_eq!(env.read("rc-new").trim(), "5", "stderr: {}", env.read("err-new"));
    assert_eq!(env.read("out-new"), format!("{{\"session_id\":\"{}\"}}\n", "x".repeat(1000)));
    let err = env.read("err-new");
    assert!(err.contains("warning") && err.contains("active.json"), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert!(err.contains("running without a holder record"), "{err}");
    assert_eq!(
        std::fs::read(env.path("after.json")).unwrap(),
        std::fs::read(env.path("before.json")).unwrap(),
        "the previous active.json must be byte-for-byte intact"
    );
    let listing = env.read("ls");
    assert!(!listing.lines().any(|n| n.starts_with(".active.json")), "temporary files left: {listing}");
}

// ---------------------------------------------------------------------------------
// Modes

#[test]
fn state_files_are_private_whatever_the_umask() {
    let env = TestEnv::new();
    let under_umask_0 = |args: &[String]| {
        let mut cmd = std::process::Command::new("sh");
        env.apply(&mut cmd);
        cmd.args(["-c", r#"umask 000; exec "$B" "$@""#, "sh", "run", "-c", "m", "--"]).args(args);
        Running::start(cmd)
    };
    let holder = under_umask_0(&sh("started held; gate go"));
    env.wait_for_file("held");
    let waiter = under_umask_0(&sh("true"));
    wait_for_waiters(&env, "m", &[waiter.pid()]);

    let state = env.state();
    assert_eq!(mode(state), 0o700, "state directory");
    assert_eq!(mode(&state.join("locks")), 0o700, "locks/");
    assert_eq!(mode(&state.join("queue")), 0o700, "queue/");
    assert_eq!(mode(&state.join("queue/m")), 0o700, "queue/m/");
    assert_eq!(mode(&env.lock_file("m")), 0o600, "the lock file");
    for ticket in crate::common::list(&state.join("queue/m")) {
        assert_eq!(mode(&state.join("queue/m").join(&ticket)), 0o600, "queue ticket {ticket}");
    }
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    waiter.finish(PATIENCE).assert_code(0);
    assert_eq!(mode(&active_path(&env)), 0o600, "active.json");
    assert_eq!(runs(&env, "m"), 2);
}
