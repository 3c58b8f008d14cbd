//! Load (SPEC `run` items 1, 3 and 8): many callers on one channel never overlap and
//! all succeed; many channels at once each keep an exact run count; waiters arriving
//! a few ms apart are served in arrival order, with and without `--wait`; a bot's
//! bursts with `--collect` are answered once each, in order, in fewer model calls.
//!
//! 32 channels × 20 runs with `CHAN_RUN_HEAVY=1`, 8 × 10 otherwise.

use crate::common::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A step that fails (exit 99, and leaves `$T/overlap-<key>`) if another step with the
/// same key is inside at the same time: it creates a marker folder that must not exist.
fn exclusive_step(key: &str, extra: &str) -> Vec<String> {
    sh(&format!(
        r#"
        if ! mkdir "$T/inside-{key}" 2>/dev/null; then : > "$T/overlap-{key}"; exit 99; fi
        echo x >> "$T/done-{key}"
        {extra}
        rmdir "$T/inside-{key}"
        "#
    ))
}

#[test]
fn sixty_four_concurrent_callers_on_one_channel_never_overlap_and_all_succeed() {
    // Invariant: 64 callers started at once on one channel all exit 0, no two of their
    // commands are ever inside at the same time, and all 64 runs are counted.
    let env = TestEnv::new();
    let started = Instant::now();
    let runs: Vec<Running> =
        (0..64).map(|_| env.spawn(&["-c", "shared"], &exclusive_step("shared", "sleep 0.01"))).collect();
    let tried = runs.len();
    for run in runs {
        let out = run.finish(PATIENCE);
        out.assert_code(0);
        assert_eq!(out.stderr(), "");
    }
    assert!(!env.exists("overlap-shared"), "two runs of one channel overlapped");
    assert_eq!(env.read("done-shared").lines().count(), tried);
    assert_eq!(runs_in(state_json(&env).as_ref(), "shared"), tried as u64);
    assert_eq!(env.tickets("shared"), 0, "tickets left behind");
    env.assert_released("shared", "shared");
    eprintln!("load: {tried} callers on one channel in {:?}", started.elapsed());
}

#[test]
fn many_channels_at_once_keep_exact_run_counts() {
    // Invariant: with `n` channels × `per` runs issued in a shuffled order by 2n workers
    // (so runs of one channel contend while records of others are appended, rewritten
    // in place and moved to bigger slots), every run exits 0, runs of one channel never
    // overlap, each channel's `runs` is exactly `per`, its session id is one its own
    // commands printed, and active.json parses and holds exactly those channels.
    let (n, per) = (scaled(8, 32), scaled(10, 20));
    let env = Arc::new(TestEnv::new());
    let seed = Rng::seed();
    eprintln!("load: seed {seed} (CHAN_RUN_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let mut jobs: Vec<(usize, usize, usize)> =
        (0..n).flat_map(|c| (0..per).map(move |i| (c, i, 0))).collect();
    for job in &mut jobs {
        job.2 = rng.between(1, 700) as usize; // session id length: slots grow at random
    }
    rng.shuffle(&mut jobs);
    let jobs = Arc::new(Mutex::new(jobs));
    let started = Instant::now();
    let workers: Vec<_> = (0..2 * n)
        .map(|_| {
            let (env, jobs) = (Arc::clone(&env), Arc::clone(&jobs));
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                loop {
                    let Some((c, i, len)) = jobs.lock().unwrap().pop() else { break };
                    let channel = format!("ch-{c}");
                    let id = format!("{channel}.{i}.{}", "p".repeat(len));
                    let print = format!(r#"printf '{{"session_id":"%s"}}\n' "{id}""#);
                    let out =
                        env.spawn(&["-c", &channel], &exclusive_step(&channel, &print)).finish(PATIENCE);
                    if out.status.code() != Some(0) || !out.stderr.is_empty() {
                        failures.push(format!("{channel} run {i}: {:?} {}", out.status, out.stderr()));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed();
    assert!(failures.is_empty(), "seed {seed}: failed runs: {failures:#?}");
    let state = state_json(&env).expect("active.json");
    let channels = state["channels"].as_object().unwrap();
    assert_eq!(channels.len(), n, "seed {seed}: channels in active.json");
    for c in 0..n {
        let channel = format!("ch-{c}");
        assert!(!env.exists(&format!("overlap-{channel}")), "seed {seed}: runs of {channel} overlapped");
        assert_eq!(env.read(&format!("done-{channel}")).lines().count(), per);
        let record = &channels[&channel];
        assert_eq!(record["runs"], per as u64, "seed {seed}: {channel}'s runs: {record}");
        assert_eq!(record["failures_in_a_row"], 0);
        let id = record["session_id"].as_str().unwrap_or_default();
        assert!(id.starts_with(&format!("{channel}.")), "seed {seed}: {channel}'s session id is {id:?}");
        assert_eq!(env.tickets(&channel), 0);
    }
    assert!(quarantined(&env).is_empty() && stray_temp_files(&env).is_empty(), "{:?}", list(env.state()));
    // `status --json` reads the same counts.
    let out = env.command().args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = status["channels"].as_array().unwrap().iter().map(|c| c["runs"].as_u64().unwrap()).sum();
    assert_eq!(total, (n * per) as u64);
    eprintln!("load: {n} channels × {per} runs by {} workers in {elapsed:?} (seed {seed})", 2 * n);
}

/// A holder, then 16 waiters arriving 20 ms apart, each registered before the next
/// starts; the waiters must run in arrival order, and all succeed.
fn arrivals_are_served_in_order(opts: &[&str]) {
    let env = TestEnv::new();
    let holder = env.hold("fifo", "held", "go");
    let first = Instant::now();
    let waiters: Vec<Running> = (0..16)
        .map(|i| {
            // Arrival i is due 20 ms after arrival i-1 (later if registration was slow).
            let due = first + Duration::from_millis(20 * i as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let mut run = env.enqueue("fifo", "fifo", i, opts);
            assert!(run.is_running(), "waiter {i} ended before the holder did");
            run
        })
        .collect();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for run in waiters {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(env.order(), (0..16).collect::<Vec<_>>(), "the waiters ran out of arrival order");
    assert_eq!(runs_in(state_json(&env).as_ref(), "fifo"), 17);
    assert_eq!(env.tickets("fifo"), 0);
}

#[test]
fn holder_and_sixteen_waiters_arriving_20ms_apart_run_in_arrival_order() {
    arrivals_are_served_in_order(&[]);
}

#[test]
fn with_a_wait_limit_waiters_still_run_in_arrival_order() {
    arrivals_are_served_in_order(&["--wait", "30s"]);
}

/// Whether `pid` holds a lock (not merely waits for one), per the kernel's lock table.
fn holds_a_lock(pid: u32) -> bool {
    let table = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    table.lines().any(|l| !l.contains("->") && l.split_whitespace().nth(4) == Some(&pid.to_string()))
}

#[test]
fn bot_replay_bursts_are_answered_once_each_in_fewer_model_calls() {
    // Invariant (issue 16): 6 channels each get bursts of 1-5 messages (`--collect
    // --collect-window 0.3s`, 30 ms apart, a pause between bursts, no caller waiting for
    // another): every caller exits 0 (it printed its batch's reply) or 80 (collected);
    // each message is in exactly one batch, and a batch's reply went to the caller of its
    // first message; per channel, the batches in the order they ran hold the messages in
    // the order they arrived; the model calls (batches) are fewer than the messages.
    let seed = Rng::seed();
    eprintln!("load: seed {seed} (CHAN_RUN_SEED={seed} replays it)");
    let env = Arc::new(TestEnv::new());
    let bursts = scaled(5, 15);
    let started = Instant::now();
    let channels: Vec<_> = (0..6)
        .map(|c| {
            let env = Arc::clone(&env);
            let mut rng = Rng::new(seed.wrapping_add(c));
            std::thread::spawn(move || {
                let channel = format!("bot-{c}");
                let command = sh(&format!(
                    r#"cat > "$T/in-{channel}.$$"; echo $$ >> "$T/calls-{channel}"; sleep 0.1; printf '{{"session_id":"%s"}}\n' $$"#
                ));
                let mut callers = Vec::new();
                for _ in 0..bursts {
                    for _ in 0..rng.between(1, 5) {
                        let message = format!("{}", callers.len());
                        let opts = ["-c", &channel, "--collect", "--collect-window", "0.3s", "--message", &message];
                        let mut run = env.spawn(&opts, &command);
                        let pid = run.pid();
                        // Arrived: queued, or holding the channel, or done.
                        wait_until("a message to arrive", || {
                            env.queued_pids(&channel).contains(&pid) || holds_a_lock(pid) || !run.is_running()
                        });
                        callers.push(run);
                        std::thread::sleep(Duration::from_millis(30));
                    }
                    std::thread::sleep(rng.duration_up_to(Duration::from_millis(600)));
                }
                let outcomes: Vec<(i32, String)> = callers
                    .into_iter()
                    .map(|r| {
                        let out = r.finish(PATIENCE);
                        (out.code(), out.stdout())
                    })
                    .collect();
                (channel, outcomes)
            })
        })
        .collect();
    let (mut messages, mut calls) = (0, 0);
    for handle in channels {
        let (channel, outcomes) = handle.join().unwrap();
        let batches: Vec<String> = env.read(&format!("calls-{channel}")).lines().map(str::to_owned).collect();
        let mut answered = Vec::new();
        for batch in &batches {
            let input = env.read(&format!("in-{channel}.{batch}"));
            let got: Vec<usize> = input.split("\n\n").map(|m| m.parse().unwrap()).collect();
            let (code, stdout) = &outcomes[got[0]];
            assert_eq!(*code, 0, "seed {seed}: {channel}: batch {batch}'s first caller");
            assert!(stdout.contains(&format!("\"{batch}\"")), "seed {seed}: {channel}: {stdout:?}");
            answered.extend(got);
        }
        assert_eq!(answered, (0..outcomes.len()).collect::<Vec<_>>(), "seed {seed}: {channel}: order");
        let collected = outcomes.iter().filter(|(code, _)| *code == 80).count();
        assert_eq!(collected + batches.len(), outcomes.len(), "seed {seed}: {channel}: {outcomes:?}");
        messages += outcomes.len();
        calls += batches.len();
    }
    eprintln!(
        "load: bot replay, 6 channels × {bursts} bursts: {messages} messages answered by {calls} model calls in {:?} (seed {seed})",
        started.elapsed()
    );
    assert!(calls < messages, "seed {seed}: no burst was collected");
}
