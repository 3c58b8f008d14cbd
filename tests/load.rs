//! Load (SPEC `run` items 1, 3 and 8): many callers on one channel never overlap and
//! all succeed; many channels at once each keep an exact run count; waiters arriving
//! a few ms apart are served in arrival order, with and without `--wait`.
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
