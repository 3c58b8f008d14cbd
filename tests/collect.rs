//! `run --collect` (issue 16): callers queued behind a busy run with the same command
//! are answered by one run, their messages joined on its stdin, in arrival order; the
//! others exit with the collected code (80); nothing is merged across a caller that
//! differs; a batch whose runner dies loses no message.

use crate::common::*;
use rustix::process::Signal;
use std::collections::HashMap;

const COLLECTED: i32 = 80;

/// A batch's command: keeps its stdin as `$T/in.<pid>`, appends its stdin and a newline
/// to `$T/order`, and prints a session id naming the batch.
fn batch_command() -> Vec<String> {
    sh(r#"cat > "$T/in.$$"; { cat "$T/in.$$"; echo; } >> "$T/order"; printf '{"session_id":"b%s"}\n' $$"#)
}

/// Starts a `--collect` caller with message `m<i>` and returns once it is queued (or
/// has ended).
fn collector(env: &TestEnv, channel: &str, i: usize, extra: &[&str], command: &[String]) -> Running {
    let message = format!("m{i}");
    let mut opts = vec!["-c", channel, "--collect", "--message", &message];
    opts.extend_from_slice(extra);
    let mut run = env.spawn(&opts, command);
    let pid = run.pid();
    wait_until(&format!("caller {i} to queue"), || {
        env.queued_pids(channel).contains(&pid) || !run.is_running()
    });
    run
}

/// The lines of `$T/order`: one per run, in the order they ran.
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

#[test]
fn five_messages_queued_behind_a_busy_run_are_answered_by_one_run() {
    let env = TestEnv::new();
    let holder = env.hold("burst", "held", "go");
    let callers: Vec<Running> = (0..5).map(|i| collector(&env, "burst", i, &[], &batch_command())).collect();

    let status = env.command().args(["status", "burst", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let queue = status["channels"][0]["queue"].as_array().unwrap().clone();
    assert_eq!(queue.len(), 5, "{status}");
    assert!(queue.iter().all(|w| w["collect"] == "queued"), "status marks the collect callers: {status}");

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
    // One more run, its stdin the five messages in arrival order, a blank line apart.
    let ins: Vec<String> = list(env.t()).into_iter().filter(|n| n.starts_with("in.")).collect();
    assert_eq!(ins.len(), 1, "one run for the five messages: {ins:?}");
    assert_eq!(env.read(&ins[0]), "m0\n\nm1\n\nm2\n\nm3\n\nm4");
    // The session advanced once, to the batch's id.
    let state = state_json(&env).unwrap();
    let batch_id = format!("b{}", ins[0].trim_start_matches("in."));
    assert_eq!(state["channels"]["burst"]["session_id"], batch_id.as_str());
    assert_eq!(state["channels"]["burst"]["runs"], 2);
    let last = &history(&env, "burst")[0];
    assert_eq!(last["messages"], 5, "history shows the batch as one run of 5 messages: {last}");
    assert_eq!(list(&env.state().join("queue/burst")), ["verdict"], "no message is left behind");
}

#[test]
fn a_window_collects_a_burst_that_reaches_an_idle_channel() {
    let env = TestEnv::new();
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
    let env = TestEnv::new();
    let holder = env.hold("mix", "held", "go");
    let sep = ["--collect-separator", ","];
    let plain = |i: usize| {
        let mut run = env.spawn(&["-c", "mix"], &sh(&format!(r#"echo n{i} >> "$T/order""#)));
        let pid = run.pid();
        wait_until("a plain caller to queue", || env.queued_pids("mix").contains(&pid) || !run.is_running());
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
        // Same command, other options: not collectable with the one before.
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
    let env = TestEnv::new();
    let holder = env.hold("max", "held", "go");
    let opts = ["--collect-max", "2", "--collect-separator", ","];
    let callers: Vec<Running> = (0..5).map(|i| collector(&env, "max", i, &opts, &batch_command())).collect();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let codes: Vec<i32> = callers.into_iter().map(|c| c.finish(PATIENCE).code()).collect();
    assert_eq!(codes, [0, COLLECTED, 0, COLLECTED, 0]);
    assert_eq!(runs(&env), ["m0,m1", "m2,m3", "m4"]);
    let sizes: Vec<_> = history(&env, "max").iter().map(|e| e["messages"].clone()).collect();
    assert_eq!(
        sizes,
        [serde_json::json!(1), serde_json::json!(2), serde_json::json!(2), serde_json::Value::Null]
    );
}

#[test]
fn a_large_message_reaches_a_command_that_prints_before_it_reads() {
    let env = TestEnv::new();
    let message = "x".repeat(1 << 20);
    // 2 MiB out before a byte is read: neither side may wait for the other.
    let mut cmd =
        env.std_run(&["-c", "big", "--collect"], &sh(r#"head -c 2097152 /dev/zero; wc -c > "$T/count""#));
    cmd.stdin(std::process::Stdio::piped());
    let mut run = Running::start_as_configured({
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        cmd
    });
    std::io::Write::write_all(run.child().stdin.as_mut().unwrap(), message.as_bytes()).unwrap();
    drop(run.child().stdin.take());
    run.finish(PATIENCE).assert_code(0);
    assert_eq!(env.read("count").trim(), "1048576");
    // One byte over the cap: refused, nothing run.
    env.run(&["-c", "big", "--collect"], &sh(r#"started ran"#))
        .write_stdin(format!("{message}x"))
        .assert()
        .code(125)
        .stderr(predicates::str::contains("at most 1 MiB"));
    assert!(!env.exists("ran"));
}

#[test]
fn collect_refuses_what_it_cannot_keep() {
    let env = TestEnv::new();
    let cases: [(&[&str], &str); 3] = [
        (&["--collect", "--message", "m", "-w", "1"], "--wait"),
        (&["--collect", "--message", "m", "--collect-window", "11s"], "--collect-window"),
        (&["--message", "m"], "--collect"),
    ];
    for (opts, names) in cases {
        let mut all = vec!["-c", "bad"];
        all.extend_from_slice(opts);
        env.run(&all, &sh("started ran")).assert().code(125).stderr(predicates::str::contains(names));
    }
    assert!(!env.exists("ran"));
}

/// What the crash test learns from one round.
struct Round {
    /// Each surviving caller's exit code and stdout, by message index.
    survivors: HashMap<usize, (i32, String)>,
    /// Whether a collected caller names the killed runner's run as the one that answered
    /// it: the runner was killed after it wrote the batch's outcome (the commit point).
    killed_after_verdict: bool,
}

/// One round: five collect callers queued behind a holder; the first (the batch's
/// runner) is SIGKILLed at a random moment once the holder lets go.
fn crash_round(env: &TestEnv, channel: &str, rng: &mut Rng) -> Round {
    let holder = env.hold(channel, &format!("held-{channel}"), &format!("go-{channel}"));
    let command = sh(&format!(
        r#"cat > "$T/in-{channel}.$$"; sleep 0.$(( $$ % 3 + 1 )); printf '{{"session_id":"b%s"}}\n' $$"#
    ));
    let callers: Vec<Running> = (0..5).map(|i| collector(env, channel, i, &[], &command)).collect();
    env.open_gate(&format!("go-{channel}"));
    std::thread::sleep(rng.duration_up_to(secs(0.4)));
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
    Round { survivors, killed_after_verdict }
}

#[test]
fn a_batch_runner_killed_at_random_moments_loses_no_message() {
    let env = TestEnv::new();
    let mut rng = Rng::new(Rng::seed());
    let rounds = scaled(20, 50);
    let mut reruns = 0;
    for round in 0..rounds {
        let channel = format!("crash-{round}");
        let Round { survivors, killed_after_verdict } = crash_round(&env, &channel, &mut rng);
        let left = list(&env.state().join("queue").join(&channel));
        assert!(left.iter().all(|f| f == "verdict"), "round {round}: left behind: {left:?}");
        // The batches that were answered: their runner exited 0 and printed the id, or
        // wrote the outcome for the callers it took before it was killed.
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
            assert_eq!(got[0], *runner, "round {round}: a batch starts with its runner's message");
            assert!(got.windows(2).all(|w| w[0] < w[1]), "round {round}: batch out of order: {got:?}");
            for m in got {
                *answers.entry(m).or_default() += 1;
            }
        }
        if !killed_after_verdict {
            assert!(!answers.contains_key(&0), "round {round}: the killed runner's message was answered");
        }
        for (i, (code, _)) in &survivors {
            assert!(
                *code == 0 || *code == COLLECTED,
                "round {round}: caller {i} exited {code}, neither answered nor collected"
            );
            assert_eq!(answers.get(i), Some(&1), "round {round}: message {i} answered {answers:?}");
        }
    }
    eprintln!(
        "{rounds} rounds: in {reruns} the runner died before its batch's outcome and the next caller ran it again"
    );
}

#[test]
fn an_interrupted_caller_withdraws_its_message_unless_a_batch_took_it() {
    let env = TestEnv::new();
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

#[test]
fn the_message_of_a_caller_killed_while_waiting_is_neither_run_nor_kept() {
    let env = TestEnv::new();
    let holder = env.hold("dead", "held", "go");
    let first = collector(&env, "dead", 0, &[], &batch_command());
    let killed = collector(&env, "dead", 1, &[], &batch_command());
    killed.signal(Signal::KILL);
    killed.finish(PATIENCE);
    let last = collector(&env, "dead", 2, &[], &batch_command());
    assert!(list(&env.state().join("queue/dead")).iter().any(|f| f.starts_with("msg-")));
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    first.finish(PATIENCE).assert_code(0);
    last.finish(PATIENCE).assert_code(COLLECTED);
    assert_eq!(runs(&env), ["m0", "", "m2"]);
    assert_eq!(list(&env.state().join("queue/dead")), ["verdict"], "the dead caller's message is removed");
}
