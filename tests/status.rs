//! `chan-run status` (running or idle from the lock itself, holder, queue, the stored
//! record; never blocks, never disturbs a run, creates nothing) and `chan-run reset`
//! (forgets the session, queues like a run, is not a run).

use crate::common::state as state_helpers;

use crate::common::{PATIENCE, Running, TestEnv, is_alive, secs, sh};
use serde_json::Value;
use state_helpers::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A holder whose command writes its pid to `$T/cmdpid`, creates `$T/held` and waits
/// for `$T/go`; its last argument is `marker-arg`, to find it in `holder.command`.
fn hold_with_pid(env: &TestEnv, channel: &str) -> (Running, u32) {
    let mut cmd = sh(r#"echo $$ > "$T/cmdpid"; started held; gate go"#);
    cmd.extend(["sh".to_owned(), "marker-arg".to_owned()]);
    let run = env.spawn(&["-c", channel], &cmd);
    env.wait_for_file("held");
    let pid = env.read_pid("cmdpid");
    (run, pid)
}

fn pids(queue: &Value) -> Vec<u64> {
    queue.as_array().expect("queue is a list").iter().map(|w| w["pid"].as_u64().expect("a pid")).collect()
}

#[test]
fn status_json_while_a_run_holds_the_channel_and_after() {
    let env = TestEnv::new();
    env.run(&["-c", "s"], &sh("true")).assert().success();
    let before = status_of(&env, "s");
    assert_eq!((before["state"].as_str(), before["runs"].as_u64()), (Some("idle"), Some(1)), "{before:#}");

    let (holder, command_pid) = hold_with_pid(&env, "s");
    let (now, took) = timed(|| status_json(&env, &[]));
    assert!(took < Duration::from_secs(1), "status took {took:?} while the channel was held");
    assert_eq!(now["version"], 1, "{now:#}");
    let now: Vec<&Value> =
        now["channels"].as_array().unwrap().iter().filter(|c| c["channel"] == "s").collect();
    assert_eq!(now.len(), 1);
    let s = now[0];
    assert_eq!(s["state"], "running", "{s:#}");
    let h = &s["holder"];
    assert_eq!(h["pid"], holder.pid(), "holder.pid is chan-run's pid: {s:#}");
    assert!(is_alive(holder.pid()));
    assert_eq!(h["command_pid"], command_pid, "holder.command_pid is the command's pid: {s:#}");
    assert!(is_alive(command_pid));
    utc(&h["started_at"]);
    let command: Vec<&str> = h["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!((command[0], command[1]), ("sh", "-c"), "{s:#}");
    assert_eq!(command.last(), Some(&"marker-arg"), "{s:#}");
    assert_eq!(s["waiting"], 0);
    assert_eq!(s["queue"], Value::Array(vec![]));
    assert_eq!(s["runs"], 1, "the run in progress is not counted yet");

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let after = status_of(&env, "s");
    assert_eq!(after["state"], "idle", "{after:#}");
    assert_eq!(after["holder"], Value::Null, "{after:#}");
    assert_eq!(after["waiting"], 0);
    assert_eq!(after["runs"], 2, "{after:#}");
    assert_eq!(after["last_run"]["outcome"], "ok", "{after:#}");
    assert!(!is_alive(command_pid));
}

#[test]
fn status_shows_waiters_in_arrival_order_and_never_the_holder() {
    let env = TestEnv::new();
    let (holder, _) = hold_with_pid(&env, "q");
    let first = env.spawn(&["-c", "q"], &sh("started first"));
    wait_for_waiters(&env, "q", &[first.pid()]);
    let second = env.spawn(&["-c", "q"], &sh("started second"));
    wait_for_waiters(&env, "q", &[first.pid(), second.pid()]);

    let (s, took) = timed(|| status_of(&env, "q"));
    assert!(took < Duration::from_secs(1), "status took {took:?}");
    assert_eq!(s["state"], "running", "{s:#}");
    assert_eq!(s["holder"]["pid"], holder.pid(), "{s:#}");
    assert_eq!(s["waiting"], 2, "{s:#}");
    assert_eq!(pids(&s["queue"]), [u64::from(first.pid()), u64::from(second.pid())], "{s:#}");
    let since: Vec<_> = s["queue"].as_array().unwrap().iter().map(|w| utc(&w["since"])).collect();
    assert!(since[0] <= since[1], "{s:#}");

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    first.finish(PATIENCE).assert_code(0);
    second.finish(PATIENCE).assert_code(0);
    let s = status_of(&env, "q");
    assert_eq!((s["state"].as_str(), s["waiting"].as_u64()), (Some("idle"), Some(0)), "{s:#}");
    assert_eq!(s["runs"], 3);
}

#[test]
fn a_new_holder_is_not_listed_as_waiting() {
    let env = TestEnv::new();
    let (holder, _) = hold_with_pid(&env, "h");
    let next = env.spawn(&["-c", "h"], &sh("started next-held; gate go2"));
    wait_for_waiters(&env, "h", &[next.pid()]);
    let last = env.spawn(&["-c", "h"], &sh("true"));
    wait_for_waiters(&env, "h", &[next.pid(), last.pid()]);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    env.wait_for_file("next-held");
    let s = status_of(&env, "h");
    assert_eq!(s["state"], "running", "{s:#}");
    assert_eq!(s["holder"]["pid"], next.pid(), "{s:#}");
    assert_eq!(pids(&s["queue"]), [u64::from(last.pid())], "{s:#}");
    assert_eq!(s["waiting"], 1, "{s:#}");
    env.open_gate("go2");
    next.finish(PATIENCE).assert_code(0);
    last.finish(PATIENCE).assert_code(0);
}

#[test]
fn status_in_a_loop_never_makes_a_no_wait_run_fail() {
    let env = Arc::new(TestEnv::new());
    env.run(&["-c", "idle"], &sh("true")).assert().success();
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    // A few status loops at once, in JSON and as a table, for all channels and for this one.
    let pollers: Vec<_> = [&["--json"][..], &["idle"], &["--json", "idle"]]
        .into_iter()
        .map(|args| {
            let (env, stop, polls) = (Arc::clone(&env), Arc::clone(&stop), Arc::clone(&polls));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let out = env.command().arg("status").args(args).output().unwrap();
                    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
                    polls.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let until = Instant::now() + PATIENCE;
    let mut done = 0;
    while done < 50 || polls.load(Ordering::SeqCst) < 50 {
        assert!(Instant::now() < until, "too slow: {done} runs, {} polls", polls.load(Ordering::SeqCst));
        let out = env.run(&["-c", "idle", "-n"], &sh("true")).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "a --no-wait run failed beside status: {out:?}");
        done += 1;
    }
    stop.store(true, Ordering::SeqCst);
    for poller in pollers {
        poller.join().expect("status failed");
    }
    assert_eq!(runs(&env, "idle"), 1 + done);
}

#[test]
fn status_without_a_state_directory_lists_nothing_and_creates_nothing() {
    let env = TestEnv::new();
    let before = crate::common::list(env.root());
    let out = env.command().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("idle"));
    let json = status_json(&env, &[]);
    assert_eq!(json["channels"], Value::Array(vec![]), "{json:#}");
    status_json(&env, &["some-channel"]);
    assert!(!env.state().exists(), "status created the state directory");
    assert_eq!(crate::common::list(env.root()), before);

    // With a state directory, naming an unknown channel creates no file for it either.
    env.run(&["-c", "known"], &sh("true")).assert().success();
    let files = |env: &TestEnv| {
        (crate::common::list(env.state()), env.lock_files(), crate::common::list(&env.state().join("queue")))
    };
    let before = files(&env);
    let unknown = status_of(&env, "unknown");
    assert_eq!((unknown["state"].as_str(), unknown["runs"].as_u64()), (Some("idle"), Some(0)), "{unknown:#}");
    assert_eq!(files(&env), before, "status created files");
}

#[test]
fn status_reports_a_damaged_state_file_but_leaves_it_alone() {
    let env = TestEnv::new();
    make_state_dir(&env);
    std::fs::write(active_path(&env), b"{ damaged").unwrap();
    let out = env.command().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
    assert_eq!(active_bytes(&env), b"{ damaged");
    assert_eq!(quarantined(&env), Vec::<String>::new(), "status moved the file");
}

#[test]
fn status_table_is_aligned_fits_100_columns_and_flags_failing_channels() {
    let env = TestEnv::new();
    let long_name = format!("discord:{}", "9".repeat(90));
    let long_id = format!("{}-session", "f".repeat(200));
    env.run(&["-c", "fine"], &sh("true")).assert().success();
    env.run(&["-c", &long_name], &prints(&format!(r#"{{"session_id":"{long_id}"}}"#))).assert().success();
    for _ in 0..3 {
        env.run(&["-c", "failing"], &sh("exit 4")).assert().code(4);
    }
    for _ in 0..2 {
        env.run(&["-c", "shaky"], &sh("exit 4")).assert().code(4);
    }
    let (holder, _) = hold_with_pid(&env, "busy");

    let out = env.command().arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "a header and 5 channels:\n{table}");
    for line in &lines {
        assert!(line.chars().count() <= 100, "{} columns:\n{table}", line.chars().count());
    }
    // Every cell starts where its header does.
    let header: Vec<char> = lines[0].chars().collect();
    let starts: Vec<usize> =
        (0..header.len()).filter(|&i| header[i] != ' ' && (i == 0 || header[i - 1] == ' ')).collect();
    let starts: Vec<usize> =
        starts.into_iter().filter(|&i| i == 0 || (i >= 2 && header[i - 2] == ' ')).collect();
    assert!(starts.len() >= 6, "{table}");
    for line in &lines[1..] {
        let row: Vec<char> = line.chars().collect();
        for &i in &starts {
            let ok = i < row.len() && row[i] != ' ' && (i == 0 || row[i - 1] == ' ');
            assert!(ok, "column at {i} not aligned:\n{table}");
        }
    }
    let row = |name: &str| {
        *lines.iter().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}:\n{table}"))
    };
    assert!(row("failing").contains("!3x"), "3 failures in a row not flagged:\n{table}");
    assert!(!row("shaky").contains('!'), "2 failures flagged:\n{table}");
    assert!(!row("fine").contains('!'), "{table}");
    let busy: Vec<&str> = row("busy").split_whitespace().collect();
    assert_eq!((busy[1], busy[2]), ("running", holder.pid().to_string().as_str()), "{table}");
    let held_for = busy[3].trim_end_matches(char::is_alphabetic);
    assert!(
        held_for.parse::<u64>().is_ok() && ["ms", "s"].contains(&&busy[3][held_for.len()..]),
        "how long it has run, in human form: {table}"
    );
    assert!(row("discord:99").contains("idle"), "{table}");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
}

// ---------------------------------------------------------------------------------
// reset

#[test]
fn reset_forgets_the_session_and_is_not_a_run() {
    let env = TestEnv::new();
    let model = || vec![fake_model(), "-p".to_owned(), "hi".to_owned()];
    env.run(&["-c", "r", "--session-arg=--resume"], &model()).assert().success();
    let before = record(&env, "r");
    assert!(before["session_id"].is_string());

    let out = env.command().args(["reset", "r"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let after = record(&env, "r");
    assert_eq!(after["session_id"], Value::Null, "{after:#}");
    assert_eq!(after["runs"], before["runs"], "reset counted as a run");
    assert_eq!(after["last_run"], before["last_run"], "reset changed the last run");

    let out = env.run(&["-c", "r", "--session-arg=--resume"], &model()).output().unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["resumed"], "", "the run after reset still resumed a session");

    // Resetting a channel with no session, or one never seen, succeeds.
    env.command().args(["reset", "never-seen"]).assert().success();
}

#[test]
fn reset_queues_behind_a_running_holder() {
    let env = TestEnv::new();
    store_session(&env, "rq", "old");
    // The holder's command answers (a new id) only after the gate opens.
    let holder =
        env.spawn(&["-c", "rq"], &sh(r#"started held; gate go; echo '{"session_id":"from-holder"}'"#));
    env.wait_for_file("held");
    let mut reset = Running::start({
        let mut cmd = env.std_command();
        cmd.args(["reset", "rq"]);
        cmd
    });
    wait_for_waiters(&env, "rq", &[reset.pid()]);
    assert!(reset.is_running(), "reset returned while the channel was held");
    assert_eq!(session(&env, "rq").as_deref(), Some("old"));
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let out = reset.finish(PATIENCE);
    out.assert_code(0);
    // Had reset run beside the holder, the holder's answer would have been stored after it.
    assert_eq!(session(&env, "rq"), None, "reset did not wait for the holder");
    assert!(out.stderr().contains("from-holder"), "reset forgot another id: {}", out.stderr());
    assert_eq!(runs(&env, "rq"), 2);
}

#[test]
fn reset_no_wait_on_a_busy_channel_exits_75() {
    let env = TestEnv::new();
    store_session(&env, "rb", "kept");
    let holder = env.hold("rb", "held", "go");
    env.command().args(["reset", "rb", "-n"]).assert().code(75);
    env.command().args(["reset", "rb", "-n", "-E", "9"]).assert().code(9);
    let started = Instant::now();
    env.command().args(["reset", "rb", "-w", "0.3"]).assert().code(75);
    assert!(started.elapsed() >= secs(0.3), "gave up after {:?}", started.elapsed());
    assert_eq!(session(&env, "rb").as_deref(), Some("kept"));
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert_eq!(session(&env, "rb").as_deref(), Some("kept"));
}
