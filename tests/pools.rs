//! Pools on the local store (`--pool NAME:N`): at most N commands at once across the
//! channels naming a pool, seats granted in arrival order, never a free seat while
//! someone waits, and a killed or impatient caller holding nobody up.

use crate::common::*;
use rustix::process::Signal;
use std::time::Instant;

/// A command that counts itself in and out of `$T/n` (under flock(1)), logging the
/// count it saw on entry to `$T/seen` and `<channel> <i>` to `$T/order`.
fn counted(channel: &str, i: usize, sleep: f64) -> Vec<String> {
    sh(&format!(
        r#"flock "$T/n.lock" sh -c 'n=$(cat "$T/n" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$T/n"; echo $n >> "$T/seen"'
echo "{channel} {i}" >> "$T/order"
sleep {sleep}
flock "$T/n.lock" sh -c 'n=$(cat "$T/n"); echo $((n-1)) > "$T/n"'"#
    ))
}

/// The pids holding a flock, from the kernel's lock table.
fn flock_holders() -> Vec<u32> {
    let table = std::fs::read_to_string("/proc/locks").unwrap();
    table
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("FLOCK"))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

/// The pids in pool `stem`'s queue tickets, in queue order.
fn pool_queue(env: &TestEnv, stem: &str) -> Vec<u32> {
    let dir = env.state().join("pools").join(stem);
    list(&dir)
        .iter()
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|name| std::fs::read_to_string(dir.join(name)).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Starts a run of `channel` in pool `pool` whose command appends `i` to `$T/order`,
/// and returns once it waits in the pool's queue.
fn enqueue_seat(env: &TestEnv, channel: &str, pool: &str, i: usize, opts: &[&str]) -> Running {
    let mut all = vec!["-c", channel, "--pool", pool];
    all.extend_from_slice(opts);
    let mut run = env.spawn(&all, &sh(&format!(r#"echo {i} >> "$T/order""#)));
    let pid = run.pid();
    let stem = pool.rsplit_once(':').unwrap().0;
    wait_until(&format!("caller {i} to queue for a seat"), || {
        pool_queue(env, stem).contains(&pid) || !run.is_running()
    });
    run
}

/// Holds a seat of `pool` (and channel `channel`) until `$T/<gate>` exists.
fn hold_seat(env: &TestEnv, channel: &str, pool: &str, marker: &str, gate: &str) -> Running {
    let run = env.spawn(&["-c", channel, "--pool", pool], &sh(&format!("started {marker}; gate {gate}")));
    env.wait_for_file(marker);
    run
}

#[test]
fn twelve_channels_five_runs_each_share_three_seats_in_order() {
    let env = TestEnv::new();
    let mut runs: Vec<Running> = Vec::new();
    for i in 0..5 {
        let round = runs.len();
        for c in 0..12 {
            let channel = format!("c{c}");
            runs.push(env.spawn(&["-c", &channel, "--pool", "p:3"], &counted(&channel, i, 0.15)));
        }
        // Each channel's i-th caller registers before its (i+1)-th: it holds a lock (the
        // channel's, a ticket, or the queue's registration lock, behind which the next
        // one would queue) or has ended.
        for run in &mut runs[round..] {
            let pid = run.pid();
            wait_until("a caller to register", || flock_holders().contains(&pid) || !run.is_running());
        }
    }
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    let seen: Vec<usize> = env.read("seen").lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(seen.len(), 60);
    assert!(seen.iter().all(|&n| n <= 3), "never more than 3 at once: {seen:?}");
    // Work-conserving: with 12 channels ready, most starts find the 2 other seats taken
    // (a start can see fewer only when two runs ended at the same instant).
    let full = seen.iter().filter(|&&n| n == 3).count();
    assert!(full >= 30, "the pool ran short of 3 at {} of 60 starts: {seen:?}", 60 - full);
    for c in 0..12 {
        let mine: Vec<usize> = env
            .read("order")
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("c{c} ")).map(|i| i.parse().unwrap()))
            .collect();
        assert_eq!(mine, (0..5).collect::<Vec<_>>(), "channel c{c}'s runs in arrival order");
    }
}

#[test]
fn a_freed_seat_goes_to_the_next_waiter_while_the_other_seats_stay_held() {
    let env = TestEnv::new();
    let holders: Vec<Running> = (0..3)
        .map(|i| hold_seat(&env, &format!("h{i}"), "p:3", &format!("held{i}"), &format!("go{i}")))
        .collect();
    let first = env.spawn(&["-c", "w0", "--pool", "p:3"], &sh("started w0; gate end"));
    wait_until("w0 to queue", || pool_queue(&env, "p").contains(&first.pid()));
    let second = enqueue_seat(&env, "w1", "p:3", 1, &[]);
    let status = env.command().args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let pool = &status["pools"][0];
    assert_eq!(
        (pool["pool"].as_str(), pool["seats"].as_u64(), pool["held"].as_u64()),
        (Some("p"), Some(3), Some(3))
    );
    let waiting: Vec<_> = pool["queue"].as_array().unwrap().iter().map(|w| w["channel"].clone()).collect();
    assert_eq!(waiting, ["w0", "w1"], "{status:#}");
    let w0 = status["channels"].as_array().unwrap().iter().find(|c| c["channel"] == "w0").unwrap();
    assert_eq!(
        (w0["state"].as_str(), w0["waiting_for_pool"].as_str()),
        (Some("waiting"), Some("p")),
        "{w0:#}"
    );

    let freed = Instant::now();
    env.open_gate("go1");
    env.wait_for_file("w0");
    println!("a freed seat reached the next waiter's command in {:?}", freed.elapsed());
    assert!(freed.elapsed() < secs(3.0), "{:?}", freed.elapsed());
    assert!(!env.exists("order"), "the caller behind did not take a second seat");
    env.open_gate("go0");
    env.open_gate("go2");
    env.open_gate("end");
    for run in holders.into_iter().chain([first, second]) {
        run.finish(PATIENCE).assert_code(0);
    }
}

#[test]
fn sixty_four_callers_get_seats_in_arrival_order() {
    let env = TestEnv::new();
    let holder = hold_seat(&env, "h", "p:1", "held", "go");
    let callers: Vec<Running> =
        (0..64).map(|i| enqueue_seat(&env, &format!("c{i}"), "p:1", i, &[])).collect();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for run in callers {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(env.order(), (0..64).collect::<Vec<_>>());
    assert!(pool_queue(&env, "p").is_empty(), "every ticket is cleaned up");
}

#[test]
fn a_sigkilled_seat_holder_frees_its_seat_at_once() {
    let env = TestEnv::new();
    let holder = hold_seat(&env, "h", "p:1", "held", "never");
    let waiter = env.spawn(&["-c", "w", "--pool", "p:1"], &sh("started w"));
    wait_until("w to queue", || pool_queue(&env, "p").contains(&waiter.pid()));
    let killed = Instant::now();
    holder.signal(Signal::KILL);
    env.wait_for_file("w");
    println!("the seat of a SIGKILLed holder reached the next waiter in {:?}", killed.elapsed());
    assert!(killed.elapsed() < secs(2.0), "{:?}", killed.elapsed());
    waiter.finish(PATIENCE).assert_code(0);
}

#[test]
fn killed_and_impatient_seat_waiters_hold_nobody_up() {
    let env = TestEnv::new();
    let holder = hold_seat(&env, "h", "p:1", "held", "go");
    let killed = enqueue_seat(&env, "a", "p:1", 0, &[]);
    let impatient = enqueue_seat(&env, "b", "p:1", 1, &["-w", "1"]);
    let last = enqueue_seat(&env, "c", "p:1", 2, &[]);
    killed.signal(Signal::KILL);
    let gave_up = impatient.finish(PATIENCE);
    gave_up.assert_code(75);
    // Their channels are free again.
    for channel in ["a", "b"] {
        env.run(&["-c", channel, "-n"], &["true"]).assert().code(0);
    }
    let opened = Instant::now();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    last.finish(PATIENCE).assert_code(0);
    assert!(opened.elapsed() < secs(3.0), "the last waiter was delayed: {:?}", opened.elapsed());
    assert_eq!(env.order(), [2]);
}

#[test]
fn no_wait_and_wait_give_up_on_a_full_pool_and_release_the_channel() {
    let env = TestEnv::new();
    let holder = hold_seat(&env, "h", "p:1", "held", "go");
    let start = Instant::now();
    env.run(&["-c", "x", "--pool", "p:1", "-n"], &["touch", "ran"]).assert().code(75);
    env.run(&["-c", "x", "--pool", "p:1", "-w", "0.3", "-E", "9"], &["touch", "ran"]).assert().code(9);
    assert!(start.elapsed() < secs(5.0));
    // The channel itself was never the problem, and is free.
    env.run(&["-c", "x", "-n"], &["true"]).assert().code(0);
    // A pool with a free seat does not make -n wait.
    env.run(&["-c", "x", "--pool", "q:1", "-n"], &["true"]).assert().code(0);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert!(!env.path("ran").exists());
}

#[test]
fn pools_named_in_opposite_orders_never_deadlock() {
    let env = TestEnv::new();
    let runs: Vec<Running> = (0..16)
        .map(|i| {
            let pools: [&str; 4] = if i % 2 == 0 {
                ["--pool", "a:1", "--pool", "b:1"]
            } else {
                ["--pool", "b:1", "--pool", "a:1"]
            };
            let channel = format!("c{i}");
            let mut opts = vec!["-c", channel.as_str()];
            opts.extend(pools);
            env.spawn(&opts, &["sleep", "0.02"])
        })
        .collect();
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
}

#[test]
fn a_nested_run_shares_its_ancestors_seat() {
    let env = TestEnv::new();
    // With one seat, a nested run that took a seat of its own would wait forever.
    let inner = r#""$B" run -c inner --pool p:1 -- sh -c 'echo "$CHAN_RUN_SEATS" > "$T/seats"'"#;
    env.run(&["-c", "outer", "--pool", "p:1", "-w", "10"], &sh(inner)).timeout(PATIENCE).assert().code(0);
    let seats = env.read("seats");
    assert!(seats.lines().count() == 1 && seats.trim_end().ends_with(" p"), "{seats:?}");
}

#[test]
fn bad_pools_are_usage_errors_and_nothing_runs() {
    let env = TestEnv::new();
    for pool in ["p", "p:0", "p:10001", "p:x", ":2", "p:-3"] {
        let out = env.run(&["-c", "x", "--pool", pool], &["touch", "ran"]).assert().code(125);
        let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
        assert_eq!(stderr.lines().count(), 1, "{pool}: {stderr}");
        assert!(stderr.contains("--pool"), "{pool}: {stderr}");
    }
    let out = env.run(&["-c", "x", "--pool", "p:1", "--pool", "p:2"], &["touch", "ran"]).assert().code(125);
    assert!(String::from_utf8_lossy(&out.get_output().stderr).contains("named twice"));
    env.command()
        .env("CHAN_RUN_POOL", "p:0")
        .args(["run", "-c", "x", "--", "touch", "ran"])
        .assert()
        .code(125);
    assert!(!env.path("ran").exists());
}

#[test]
fn gc_removes_idle_pools_and_keeps_held_ones() {
    let env = TestEnv::new();
    env.run(&["-c", "x", "--pool", "idle:2"], &["true"]).assert().code(0);
    let holder = hold_seat(&env, "h", "busy:1", "held", "go");
    let out = env.command().args(["gc", "--idle-for", "0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("removed pool idle"), "{text}");
    assert!(text.contains("kept pool busy"), "{text}");
    assert!(!env.state().join("pools").join("idle").exists());
    assert!(env.state().join("pools").join("busy").exists());
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    // A removed pool is made again on its next use.
    env.run(&["-c", "x", "--pool", "idle:2"], &["true"]).assert().code(0);
}
