//! `run --collect` on the PostgreSQL store (issue 16): callers on any host queued behind a
//! busy run with the same command are answered by one run, their messages travelling
//! through the database; a batch whose runner dies loses no message. And a run whose
//! chan-run died is in the history as such (issue 14).

use crate::common::*;
use crate::postgres::{queued_pids, status};
use rustix::process::Signal;
use std::collections::HashMap;

const COLLECTED: i32 = 80;

fn setup() -> Option<(TestEnv, String)> {
    let server = pg::server()?;
    let store = pg::fresh_store(&server);
    Some((TestEnv::with_store(&store), store))
}

/// A batch's command: keeps its stdin as `$T/in.<pid>`, appends its stdin and a newline
/// to `$T/order`, and prints a session id naming the batch.
fn batch_command() -> Vec<String> {
    sh(r#"cat > "$T/in.$$"; { cat "$T/in.$$"; echo; } >> "$T/order"; printf '{"session_id":"b%s"}\n' $$"#)
}

/// `chan-run run OPTS -- COMMAND`, as if on `host` (its own UTS namespace) when given.
fn run_as(env: &TestEnv, host: Option<&str>, opts: &[&str], command: &[String]) -> Running {
    let mut cmd = match host {
        Some(host) => {
            let mut cmd = std::process::Command::new("unshare");
            cmd.args([
                "--uts",
                "--",
                "sh",
                "-c",
                r#"hostname "$1" && shift && exec "$@""#,
                "sh",
                host,
                &*BIN,
            ]);
            env.apply(&mut cmd);
            cmd.arg("run").args(opts).arg("--").args(command);
            cmd
        }
        None => env.std_run(opts, command),
    };
    cmd.stdin(std::process::Stdio::null());
    Running::start(cmd)
}

/// Starts a `--collect` caller with message `m<i>` (on `host`) and returns once it is
/// queued (or has ended).
fn collector_on(
    env: &TestEnv,
    host: Option<&str>,
    channel: &str,
    i: usize,
    extra: &[&str],
    command: &[String],
) -> Running {
    let message = format!("m{i}");
    let mut opts = vec!["-c", channel, "--collect", "--message", &message];
    opts.extend_from_slice(extra);
    let mut run = run_as(env, host, &opts, command);
    let pid = run.pid();
    wait_until(&format!("caller {i} to queue"), || {
        // Under unshare the caller is the child of the process started.
        let queued = queued_pids(env, channel);
        queued.contains(&pid) || queued.iter().any(|q| parent_of(*q) == Some(pid)) || !run.is_running()
    });
    run
}

fn collector(env: &TestEnv, channel: &str, i: usize, extra: &[&str], command: &[String]) -> Running {
    collector_on(env, None, channel, i, extra, command)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

fn runs(env: &TestEnv) -> Vec<String> {
    if !env.exists("order") {
        return Vec::new();
    }
    env.read("order").lines().map(str::to_owned).collect()
}

fn history(env: &TestEnv, channel: &str) -> Vec<serde_json::Value> {
    let out = env.command().args(["history", channel, "--json"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The message rows left for `channel`.
fn rows_left(store: &str, channel: &str) -> String {
    pg::psql(
        store,
        &format!(
            "SELECT count(*) FROM chan_run_message m JOIN chan_run_channel c ON c.id = m.channel_id \
             WHERE c.channel = '{channel}'"
        ),
    )
}

#[test]
fn five_messages_queued_behind_a_busy_run_are_answered_by_one_run() {
    let Some((env, store)) = setup() else { return };
    let holder = env.hold("burst", "held", "go");
    let callers: Vec<Running> = (0..5).map(|i| collector(&env, "burst", i, &[], &batch_command())).collect();

    let queue = status(&env, "burst")["queue"].as_array().unwrap().clone();
    assert_eq!(queue.len(), 5, "{queue:?}");
    assert!(queue.iter().all(|w| w["collect"] == "queued"), "status marks the collect callers: {queue:?}");

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let outcomes: Vec<Outcome> = callers.into_iter().map(|c| c.finish(PATIENCE)).collect();
    outcomes[0].assert_code(0);
    let batch = outcomes[0].stdout();
    assert!(batch.starts_with("{\"session_id\":\"b"), "the first caller prints the reply: {batch:?}");
    for other in &outcomes[1..] {
        other.assert_code(COLLECTED);
        assert_eq!(other.stdout(), "", "a collected caller prints nothing on stdout");
        assert!(other.stderr().contains("answered by the run of pid"), "{}", other.stderr());
    }
    let ins: Vec<String> = list(env.t()).into_iter().filter(|n| n.starts_with("in.")).collect();
    assert_eq!(ins.len(), 1, "one run for the five messages: {ins:?}");
    assert_eq!(env.read(&ins[0]), "m0\n\nm1\n\nm2\n\nm3\n\nm4");
    let record = status(&env, "burst");
    let batch_id = format!("b{}", ins[0].trim_start_matches("in."));
    assert_eq!(record["session_id"], batch_id.as_str(), "the session advanced once: {record}");
    assert_eq!(record["runs"], 2, "{record}");
    let last = &history(&env, "burst")[0];
    assert_eq!(last["messages"], 5, "history shows the batch as one run of 5 messages: {last}");
    assert_eq!(rows_left(&store, "burst"), "0", "no message is left behind");
}

#[test]
fn a_window_collects_a_burst_that_reaches_an_idle_channel() {
    let Some((env, _)) = setup() else { return };
    let window = ["--collect-window", "0.5s"];
    let first =
        env.spawn(&["-c", "idle", "--collect", "--message", "m0", window[0], window[1]], &batch_command());
    // The first holds the channel (in its window) before the others queue: the order
    // the test names, however slow the machine.
    wait_until("the first caller to hold the channel", || {
        let out = env.command().args(["status", "--json", "idle"]).output().unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["channels"][0]["state"] == "running"
    });
    let second = collector(&env, "idle", 1, &window, &batch_command());
    std::thread::sleep(secs(0.1));
    let third = collector(&env, "idle", 2, &window, &batch_command());
    first.finish(PATIENCE).assert_code(0);
    second.finish(PATIENCE).assert_code(COLLECTED);
    third.finish(PATIENCE).assert_code(COLLECTED);
    assert_eq!(runs(&env), ["m0", "", "m1", "", "m2"], "one run, the three messages in order");
}

#[test]
fn nothing_is_merged_across_a_caller_that_differs() {
    let Some((env, _)) = setup() else { return };
    let holder = env.hold("mix", "held", "go");
    let sep = ["--collect-separator", ","];
    let plain = |i: usize| {
        let mut run = env.spawn(&["-c", "mix"], &sh(&format!(r#"echo n{i} >> "$T/order""#)));
        let pid = run.pid();
        wait_until("a plain caller to queue", || {
            queued_pids(&env, "mix").contains(&pid) || !run.is_running()
        });
        run
    };
    let other_timeout = [sep[0], sep[1], "-t", "100"];
    let callers = vec![
        (collector(&env, "mix", 0, &sep, &batch_command()), 0),
        (collector(&env, "mix", 1, &sep, &batch_command()), COLLECTED),
        (plain(2), 0),
        (collector(&env, "mix", 3, &sep, &batch_command()), 0),
        (collector(&env, "mix", 4, &sep, &batch_command()), COLLECTED),
        (plain(5), 0),
        (collector(&env, "mix", 6, &sep, &batch_command()), 0),
        (collector(&env, "mix", 7, &other_timeout, &batch_command()), 0),
    ];
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for (i, (run, code)) in callers.into_iter().enumerate() {
        let out = run.finish(PATIENCE);
        assert_eq!(out.code(), code, "caller {i}: {}", out.stderr());
    }
    assert_eq!(runs(&env), ["m0,m1", "n2", "m3,m4", "n5", "m6", "m7"]);
}

#[test]
fn collect_max_cuts_a_queue_into_batches_in_order() {
    let Some((env, _)) = setup() else { return };
    let holder = env.hold("max", "held", "go");
    let opts = ["--collect-max", "2", "--collect-separator", ","];
    let callers: Vec<Running> = (0..5).map(|i| collector(&env, "max", i, &opts, &batch_command())).collect();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let codes: Vec<i32> = callers.into_iter().map(|c| c.finish(PATIENCE).code()).collect();
    assert_eq!(codes, [0, COLLECTED, 0, COLLECTED, 0]);
    assert_eq!(runs(&env), ["m0,m1", "m2,m3", "m4"]);
}

#[test]
fn callers_on_two_hosts_are_collected_into_one_run() {
    let Some((env, store)) = setup() else { return };
    if !std::process::Command::new("unshare").args(["--uts", "true"]).status().is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: this machine cannot give a process its own host name (unshare --uts)");
        return;
    }
    let holder = env.hold("hosts", "held", "go");
    let hosts = [Some("alpha"), Some("beta"), None, Some("beta"), Some("alpha")];
    let callers: Vec<Running> = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| collector_on(&env, *host, "hosts", i, &[], &batch_command()))
        .collect();
    let queue = status(&env, "hosts")["queue"].as_array().unwrap().clone();
    let shown: Vec<&str> = queue.iter().filter_map(|w| w["host"].as_str()).collect();
    assert!(shown.contains(&"alpha") && shown.contains(&"beta"), "{queue:?}");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let codes: Vec<i32> = callers.into_iter().map(|c| c.finish(PATIENCE).code()).collect();
    assert_eq!(codes, [0, COLLECTED, COLLECTED, COLLECTED, COLLECTED]);
    let ins: Vec<String> = list(env.t()).into_iter().filter(|n| n.starts_with("in.")).collect();
    assert_eq!(ins.len(), 1, "one run for the five messages of three hosts: {ins:?}");
    assert_eq!(env.read(&ins[0]), "m0\n\nm1\n\nm2\n\nm3\n\nm4");
    assert_eq!(rows_left(&store, "hosts"), "0");
}

#[test]
fn an_interrupted_caller_withdraws_its_message_unless_a_batch_took_it() {
    let Some((env, _)) = setup() else { return };
    let holder = env.hold("int", "held", "go");
    let command = sh(r#"cat > "$T/in.$$"; started batch; gate batch-go"#);
    let first = collector(&env, "int", 0, &[], &command);
    let withdrawn = collector(&env, "int", 1, &[], &command);
    withdrawn.signal(Signal::TERM);
    let out = withdrawn.finish(PATIENCE);
    out.assert_code(143);
    assert!(!out.stderr().contains("already been taken"), "{}", out.stderr());
    let taken = collector(&env, "int", 2, &[], &command);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    env.wait_for_file("batch");
    let queue = status(&env, "int")["queue"].as_array().unwrap().clone();
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0]["collect"], "taken", "status marks the taken caller: {queue:?}");
    taken.signal(Signal::TERM);
    let out = taken.finish(PATIENCE);
    out.assert_code(143);
    assert!(out.stderr().contains("already been taken into the batch"), "{}", out.stderr());
    env.open_gate("batch-go");
    first.finish(PATIENCE).assert_code(0);
    let ins: Vec<String> = list(env.t()).into_iter().filter(|n| n.starts_with("in.")).collect();
    assert_eq!(ins.len(), 1);
    assert_eq!(env.read(&ins[0]), "m0\n\nm2", "the withdrawn message is not in the batch");
}

/// Each surviving caller's exit code and stdout, by message index; whether a collected
/// caller names the killed runner's run (it was killed after its outcome committed).
fn crash_round(env: &TestEnv, channel: &str, rng: &mut Rng) -> (HashMap<usize, (i32, String)>, bool) {
    let holder = env.hold(channel, &format!("held-{channel}"), &format!("go-{channel}"));
    let command = sh(&format!(
        r#"cat > "$T/in-{channel}.$$"; sleep 0.$(( $$ % 3 + 1 )); printf '{{"session_id":"b%s"}}\n' $$"#
    ));
    let callers: Vec<Running> = (0..5).map(|i| collector(env, channel, i, &[], &command)).collect();
    env.open_gate(&format!("go-{channel}"));
    std::thread::sleep(rng.duration_up_to(secs(0.5)));
    callers[0].signal(Signal::KILL);
    let killed = format!("run of pid {} ", callers[0].pid());
    holder.finish(PATIENCE).assert_code(0);
    let mut survivors = HashMap::new();
    let mut killed_after_verdict = false;
    for (i, run) in callers.into_iter().enumerate() {
        let out = run.finish(PATIENCE);
        if i > 0 {
            killed_after_verdict |= out.code() == COLLECTED && out.stderr().contains(&killed);
            survivors.insert(i, (out.code(), out.stdout()));
        }
    }
    (survivors, killed_after_verdict)
}

#[test]
fn a_batch_runner_killed_at_random_moments_loses_no_message() {
    let Some((env, store)) = setup() else { return };
    let seed = Rng::seed();
    let mut rng = Rng::new(seed);
    let rounds = scaled(12, 50);
    let mut reruns = 0;
    for round in 0..rounds {
        let channel = format!("crash-{round}");
        let (survivors, killed_after_verdict) = crash_round(&env, &channel, &mut rng);
        assert_eq!(rows_left(&store, &channel), "0", "round {round} (seed {seed}): rows left behind");
        let mut answered: HashMap<String, usize> = survivors
            .iter()
            .filter(|(_, (code, _))| *code == 0)
            .map(|(&i, (_, out))| {
                let id =
                    out.trim().trim_start_matches("{\"session_id\":\"").trim_end_matches("\"}").to_owned();
                (id, i)
            })
            .collect();
        reruns += usize::from(survivors.get(&1).is_some_and(|(code, _)| *code == 0));
        if killed_after_verdict {
            let prefix = format!("in-{channel}.");
            let killed_batch = list(env.t())
                .into_iter()
                .filter_map(|n| n.strip_prefix(&prefix).map(str::to_owned))
                .find(|pid| env.read(&format!("{prefix}{pid}")).starts_with("m0"))
                .expect("the killed runner's batch");
            answered.insert(format!("b{killed_batch}"), 0);
        }
        let mut answers: HashMap<usize, usize> = HashMap::new();
        for (id, runner) in &answered {
            let input = env.read(&format!("in-{channel}.{}", id.trim_start_matches('b')));
            let got: Vec<usize> =
                input.split("\n\n").map(|m| m.trim_start_matches('m').parse().unwrap()).collect();
            assert_eq!(
                got[0], *runner,
                "round {round} (seed {seed}): a batch starts with its runner's message"
            );
            assert!(got.windows(2).all(|w| w[0] < w[1]), "round {round}: batch out of order: {got:?}");
            for m in got {
                *answers.entry(m).or_default() += 1;
            }
        }
        if !killed_after_verdict {
            assert!(
                !answers.contains_key(&0),
                "round {round} (seed {seed}): the killed runner's message was answered"
            );
        }
        for (i, (code, _)) in &survivors {
            assert!(
                *code == 0 || *code == COLLECTED,
                "round {round} (seed {seed}): caller {i} exited {code}, neither answered nor collected"
            );
            assert_eq!(
                answers.get(i),
                Some(&1),
                "round {round} (seed {seed}): message {i} answered {answers:?}"
            );
        }
    }
    eprintln!(
        "{rounds} rounds: in {reruns} the runner died before its batch's outcome and the next caller ran it again"
    );
}

/// Holds `channel` and SIGKILLs that holder's chan-run once its command is in its lease
/// row (from the first beat, as the command starts); its pid.
fn holder_killed(env: &TestEnv, store: &str, channel: &str) -> u32 {
    let mut victim = env.hold(channel, "holding", "never");
    wait_until("the lease to name the command", || {
        pg::psql(store, &format!("SELECT count(*) FROM {} WHERE command IS NOT NULL", crate::postgres::LEASE))
            == "1"
    });
    victim.signal(Signal::KILL);
    let _ = victim.child().wait();
    victim.pid()
}

#[test]
fn a_run_whose_chan_run_died_is_in_history_as_died() {
    let Some((env, store)) = setup() else { return };
    env.run(&["-c", "x"], &sh(r#"echo '{"session_id":"s1"}'"#)).assert().code(0);
    let dead_pid = holder_killed(&env, &store, "x");
    let out = env.run(&["-c", "x"], &sh("echo next")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(&format!("the run of pid {dead_pid} ")), "{stderr}");
    let entries = history(&env, "x");
    assert_eq!(entries.len(), 3, "{entries:?}");
    let died = &entries[1];
    assert_eq!((&died["kind"], &died["pid"]), (&"died".into(), &dead_pid.into()), "{entries:?}");
    assert_eq!(died["command"][0], "sh");
    assert_eq!(died["session_before"], "s1");
    assert_eq!(entries[0]["kind"], "ok");
    assert_eq!(status(&env, "x")["runs"], 2, "the dead run is in the history, not counted (as locally)");
    let table = env.command().args(["history", "x"]).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("died"));
    // Said once: the next run finds a clean lease.
    let out = env.run(&["-c", "x"], &sh("echo again")).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("died"));
    assert_eq!(history(&env, "x").len(), 4);
}

#[test]
fn a_reset_after_a_dead_run_records_it_too() {
    let Some((env, store)) = setup() else { return };
    let dead_pid = holder_killed(&env, &store, "x");
    let out = env.command().args(["reset", "x"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(&format!("the run of pid {dead_pid} ")), "{stderr}");
    let entries = history(&env, "x");
    assert_eq!((&entries[0]["kind"], &entries[0]["pid"]), (&"died".into(), &dead_pid.into()), "{entries:?}");
    let out = env.run(&["-c", "x"], &sh("echo next")).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("died"));
}
