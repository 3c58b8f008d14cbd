//! What operators use beyond `run`: `history`, `gc`, completions and the man page.

use crate::common::*;

fn history_json(env: &TestEnv, channel: &str, n: usize) -> Vec<serde_json::Value> {
    let out = env.command().args(["history", channel, "-n", &n.to_string(), "--json"]).assert().success();
    String::from_utf8(out.get_output().stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn history_lists_mixed_outcomes_newest_first_with_sessions() {
    let env = TestEnv::new();
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fake-model");
    env.run(&["-c", "h", "--session-arg=--resume"], &[model, "-p", "one"]).assert().success();
    env.run(&["-c", "h"], &sh("exit 3")).assert().code(3);
    env.run(&["-c", "h", "-t", "0.2"], &sh("exec sleep 5")).assert().code(124);
    env.run(&["-c", "h", "--session-arg=--resume"], &[model, "-p", "two"]).assert().success();
    let runs = history_json(&env, "h", 10);
    let outcomes: Vec<&str> = runs.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["ok", "timed_out", "failed", "ok"], "newest first");
    assert_eq!(runs[2]["exit_code"], 3);
    assert_eq!(runs[1]["signal"], 15);
    let first_id = runs[3]["session_after"].as_str().unwrap().to_owned();
    assert_eq!(runs[3]["session_before"], serde_json::Value::Null);
    assert_eq!(runs[0]["session_before"], first_id.as_str(), "the last run resumed the first one's session");
    assert_ne!(runs[0]["session_after"], first_id.as_str());
    assert_eq!(history_json(&env, "h", 2).len(), 2, "-n limits the count");
    let table = env.command().args(["history", "h"]).assert().success();
    let table = String::from_utf8(table.get_output().stdout.clone()).unwrap();
    assert!(table.starts_with("STARTED") && table.lines().count() == 5, "{table}");
}

#[test]
fn a_torn_history_line_is_skipped() {
    let env = TestEnv::new();
    env.run(&["-c", "torn"], &["true"]).assert().success();
    let log = env.state().join("history/torn.log");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(r#"{"started_at":"2026-11-26T09:00:00.000Z","finish"#); // a crash mid-append
    std::fs::write(&log, text).unwrap();
    env.run(&["-c", "torn"], &sh("exit 4")).assert().code(4);
    let runs = history_json(&env, "torn", 10);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["exit_code"], 4);
}

#[test]
fn history_of_an_unknown_channel_is_empty_and_creates_nothing() {
    let env = TestEnv::new();
    env.command()
        .args(["history", "nobody"])
        .assert()
        .success()
        .stdout("no runs recorded for channel nobody\n");
    assert!(!env.state().exists());
}

#[test]
fn gc_dry_run_changes_nothing() {
    let env = TestEnv::new();
    for c in ["a", "b"] {
        env.run(&["-c", c], &["true"]).assert().success();
    }
    let snapshot = |env: &TestEnv| {
        let mut files = Vec::new();
        for dir in ["", "locks", "queue", "history"] {
            for name in list(&env.state().join(dir)) {
                let path = env.state().join(dir).join(&name);
                files.push((path.clone(), std::fs::read(&path).ok()));
            }
        }
        files
    };
    let before = snapshot(&env);
    let out = env.command().args(["gc", "--idle-for", "0", "--dry-run"]).assert().success();
    let shown = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(shown.contains("would remove a") && shown.contains("would remove b"), "{shown}");
    assert_eq!(snapshot(&env), before);
}

#[test]
fn gc_removes_idle_channels_and_keeps_busy_and_recent_ones() {
    let env = TestEnv::new();
    env.run(&["-c", "old"], &["true"]).assert().success();
    env.run(&["-c", "busy"], &["true"]).assert().success();
    let holder = env.hold("busy", "held", "go");
    std::thread::sleep(secs(1.1));
    env.run(&["-c", "recent"], &["true"]).assert().success();
    let out = env.command().args(["gc", "--idle-for", "1s"]).assert().success();
    let shown = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(shown.contains("removed old"), "{shown}");
    assert!(shown.contains("kept busy") && !shown.contains("recent"), "{shown}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.state().join("active.json")).unwrap()).unwrap();
    assert!(state["channels"].get("old").is_none());
    assert_eq!(state["channels"]["recent"]["runs"], 1);
    assert!(!env.lock_file("old").exists() && !env.state().join("history/old.log").exists());
    assert!(!env.state().join("queue/old").exists());
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert_eq!(state["channels"]["busy"]["runs"], 1, "busy was not removed while held");
    // A removed channel simply starts again.
    env.run(&["-c", "old"], &["true"]).assert().success();
}

/// gc races runs and waiters on the same channels: it must never let two runs of one
/// channel overlap, nor reorder its waiters, however its removals interleave.
#[test]
fn gc_racing_runs_and_waiters_breaks_neither_exclusion_nor_order() {
    let env = TestEnv::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc_loop = {
        let (stop, state) = (stop.clone(), env.state().to_owned());
        let mut base = env.std_command();
        base.env("CHAN_RUN_STATE_DIR", &state);
        let program = base.get_program().to_owned();
        let envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> =
            base.get_envs().map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned()))).collect();
        std::thread::spawn(move || {
            let (mut rounds, mut removed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut gc = std::process::Command::new(&program);
                for (k, v) in &envs {
                    match v {
                        Some(v) => gc.env(k, v),
                        None => gc.env_remove(k),
                    };
                }
                let out = gc.args(["gc", "--idle-for", "0"]).output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                removed += String::from_utf8_lossy(&out.stdout).matches("removed").count();
                rounds += 1;
            }
            (rounds, removed)
        })
    };
    let body = |c: &str, i: usize| {
        sh(&format!(
            r#"mkdir "$T/in-{c}" || echo OVERLAP >> "$T/errors"; echo {i} >> "$T/order-{c}"; rmdir "$T/in-{c}""#
        ))
    };
    for round in 0..6 {
        for c in ["x", "y", "z"] {
            // A holder and waiters registered one after the other, then a pause in
            // which the channel is idle and gc may remove it.
            let holder = env.hold(c, &format!("held-{c}-{round}"), &format!("go-{c}-{round}"));
            let mut waiters = Vec::new();
            for i in 0..4 {
                let run = env.spawn(&["-c", c], &body(c, round * 10 + i));
                let pid = run.pid();
                wait_until("a waiter to register", || env.queued_pids(c).contains(&pid));
                waiters.push(run);
            }
            env.open_gate(&format!("go-{c}-{round}"));
            holder.finish(PATIENCE).assert_code(0);
            for w in waiters {
                w.finish(PATIENCE).assert_code(0);
            }
        }
    }
    // Bursts of callers arriving together, right as gc removes the idle channel: each
    // must run (none may fail on a removed queue folder), never two at once.
    for burst in 0..25 {
        let runs: Vec<Running> =
            (0..6).map(|i| env.spawn(&["-c", "w"], &body("w", 1000 + burst * 10 + i))).collect();
        for run in runs {
            let out = run.finish(PATIENCE);
            assert_eq!(out.code(), 0, "a caller failed while gc ran: {}", out.stderr());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (rounds, removed) = gc_loop.join().unwrap();
    assert!(removed > 0, "gc never removed a channel in {rounds} rounds: the race was not exercised");
    assert!(!env.exists("errors"), "overlap: {}", env.read("errors"));
    for c in ["x", "y", "z"] {
        let order: Vec<usize> = env.read(&format!("order-{c}")).lines().map(|l| l.parse().unwrap()).collect();
        let want: Vec<usize> = (0..6).flat_map(|r| (0..4).map(move |i| r * 10 + i)).collect();
        assert_eq!(order, want, "channel {c} served out of order with gc racing ({rounds} gc rounds)");
    }
}

#[test]
fn completions_and_man_page_generate() {
    let env = TestEnv::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = env.command().args(["completions", shell]).assert().success();
        let script = String::from_utf8(out.get_output().stdout.clone()).unwrap();
        assert!(script.contains("chan-run") && script.contains("session-arg"), "{shell}");
    }
    let out = env.command().arg("man").assert().success();
    let page = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(page.contains(".TH chan-run 1") && page.contains("status"), "{page}");
    env.command().args(["completions", "tcsh"]).assert().code(125);
}

#[test]
fn without_home_the_state_directory_is_found_through_the_password_database() {
    // A service started with no HOME (cron, some init systems): chan-run finds the home
    // directory as the C library looks users up (glibc's NSS, or musl's own reader of
    // /etc/passwd in the static build), and reads the same state as with HOME set to it.
    let uid = rustix::process::getuid().as_raw().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let Some(home) = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[2] == uid)
        .map(|f| f[5].to_owned())
    else {
        eprintln!("SKIPPED: uid {uid} is not in /etc/passwd");
        return;
    };
    let status = |home: Option<&str>| {
        let mut cmd = assert_cmd::Command::new(&*BIN);
        cmd.args(["status", "--json"])
            .env_remove("HOME")
            .env_remove("XDG_STATE_HOME")
            .env_remove("XDG_DATA_HOME");
        cmd.env_remove("CHAN_RUN_STATE_DIR").env_remove("CHAN_RUN_STORE");
        if let Some(home) = home {
            cmd.env("HOME", home);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(status(None), status(Some(&home)));
}
