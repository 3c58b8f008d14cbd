//! Pools (`--pool NAME:N`) on the PostgreSQL store, against a real server: the cap
//! counted by the commands themselves (each takes a free `$T/slotK` with mkdir, so a
//! run over the cap finds none), seat order, hand-offs from a killed holder or waiter,
//! several pools, two "hosts", and what `status` and `gc` show. Each test gets its own
//! schema.

use crate::common::*;
use rustix::process::Signal;
use serde_json::Value;
use std::time::Instant;

fn setup() -> Option<TestEnv> {
    let server = pg::server()?;
    Some(TestEnv::with_store(&pg::fresh_store(&server)))
}

/// A command that holds one of `$T/slot1..=cap` while it runs (appending `over` to
/// `$T/over` if none is free: the cap was broken), appends `line` to `$T/order`, and
/// sleeps `secs`.
fn in_a_slot(cap: usize, line: &str, secs: f64) -> Vec<String> {
    sh(&format!(
        r#"s=; for k in $(seq 1 {cap}); do if mkdir "$T/slot$k" 2>/dev/null; then s=$k; break; fi; done
[ -n "$s" ] || echo over >> "$T/over"
echo "{line}" >> "$T/order"; sleep {secs}; [ -z "$s" ] || rmdir "$T/slot$s""#
    ))
}

fn status_json(env: &TestEnv) -> Value {
    let out = env.command().args(["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pool(all: &Value, name: &str) -> Value {
    let pools = all["pools"].as_array().cloned().unwrap_or_default();
    pools.into_iter().find(|p| p["pool"] == name).unwrap_or(Value::Null)
}

fn pids(list: &Value) -> Vec<u32> {
    list.as_array()
        .map_or(Vec::new(), |l| l.iter().filter_map(|w| w["pid"].as_u64()).map(|p| p as u32).collect())
}

/// Starts `chan-run run -c CHANNEL OPTS -- COMMAND` and returns once it waits in
/// `pool`'s queue (or has ended).
fn queue_for_seat(
    env: &TestEnv,
    pool_name: &str,
    channel: &str,
    opts: &[&str],
    command: &[String],
) -> Running {
    let mut all = vec!["-c", channel];
    all.extend_from_slice(opts);
    let mut run = env.spawn(&all, command);
    let pid = run.pid();
    wait_until(&format!("{channel} to queue for a seat in {pool_name}"), || {
        pids(&pool(&status_json(env), pool_name)["queue"]).contains(&pid) || !run.is_running()
    });
    run
}

/// Lines of `$T/order`.
fn order_lines(env: &TestEnv) -> Vec<String> {
    if !env.exists("order") {
        return Vec::new();
    }
    env.read("order").lines().map(str::to_owned).collect()
}

#[test]
fn twelve_channels_by_five_runs_never_run_more_than_three_at_once_in_channel_order() {
    let Some(env) = setup() else { return };
    let mut runs = Vec::new();
    for i in 0..5 {
        let round: Vec<Running> = (0..12)
            .map(|c| {
                env.spawn(
                    &["-c", &format!("c{c}"), "--pool", "p:3"],
                    &in_a_slot(3, &format!("c{c} {i}"), 0.1),
                )
            })
            .collect();
        // The next run of a channel arrives once this one is registered (holds the
        // channel or waits for it), so arrival order is spawn order.
        let want: Vec<u32> = round.iter().map(Running::pid).collect();
        wait_until("a round of runs to register", || {
            let all = status_json(&env);
            let channels = all["channels"].as_array().cloned().unwrap_or_default();
            let mut seen: Vec<u32> = channels.iter().flat_map(|c| pids(&c["queue"])).collect();
            seen.extend(channels.iter().filter_map(|c| c["holder"]["pid"].as_u64()).map(|p| p as u32));
            let done = order_lines(&env);
            want.iter().all(|p| seen.contains(p)) || done.len() >= (i + 1) * 12
        });
        runs.extend(round);
    }
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    assert!(!env.exists("over"), "more than 3 commands ran at once");
    let lines = order_lines(&env);
    assert_eq!(lines.len(), 60);
    for c in 0..12 {
        let mine: Vec<String> = lines.iter().filter(|l| l.starts_with(&format!("c{c} "))).cloned().collect();
        let want: Vec<String> = (0..5).map(|i| format!("c{c} {i}")).collect();
        assert_eq!(mine, want, "channel c{c}'s runs out of arrival order");
    }
}

#[test]
fn callers_queued_on_a_full_pool_start_in_arrival_order_and_status_shows_them() {
    let Some(env) = setup() else { return };
    // 24 callers rather than the issue's 64: each waits on two connections on a shared
    // two-core machine; the order does not depend on the count. The callers name 1 seat,
    // so they take seat 1 one after another and their commands' start order is their
    // grant order (two seats granted a moment apart may start either way round).
    const CALLERS: usize = 24;
    let holders: Vec<Running> = (0..2)
        .map(|h| {
            env.spawn(&["-c", &format!("h{h}"), "--pool", "p:2"], &sh(&format!("started held{h}; gate go")))
        })
        .collect();
    env.wait_for_file("held0");
    env.wait_for_file("held1");
    let callers: Vec<Running> = (0..CALLERS)
        .map(|i| {
            queue_for_seat(
                &env,
                "p",
                &format!("w{i}"),
                &["--pool", "p:1"],
                &in_a_slot(1, &i.to_string(), 0.0),
            )
        })
        .collect();

    let all = status_json(&env);
    let p = pool(&all, "p");
    assert_eq!((p["seats"].as_u64(), p["held"].as_u64()), (Some(2), Some(2)), "{p:#}");
    let mut held_by: Vec<&str> =
        p["holders"].as_array().unwrap().iter().map(|h| h["channel"].as_str().unwrap()).collect();
    held_by.sort();
    assert_eq!(held_by, ["h0", "h1"]);
    let seats: Vec<u64> =
        p["holders"].as_array().unwrap().iter().map(|h| h["seat"].as_u64().unwrap()).collect();
    assert_eq!(seats, [1, 2], "{p:#}");
    let queued: Vec<&str> =
        p["queue"].as_array().unwrap().iter().map(|w| w["channel"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..CALLERS).map(|i| format!("w{i}")).collect();
    assert_eq!(queued, want, "status lists the pool's queue in arrival order");
    assert_eq!(pids(&p["queue"]), callers.iter().map(Running::pid).collect::<Vec<_>>());
    let w0 = all["channels"].as_array().unwrap().iter().find(|c| c["channel"] == "w0").unwrap();
    assert_eq!(
        (w0["state"].as_str(), w0["waiting_for_pool"].as_str()),
        (Some("waiting"), Some("p")),
        "{w0:#}"
    );

    env.open_gate("go");
    for run in holders.into_iter().chain(callers) {
        run.finish(PATIENCE).assert_code(0);
    }
    assert!(!env.exists("over"), "two callers held seat 1 at once");
    assert_eq!(env.order(), (0..CALLERS).collect::<Vec<_>>());
}

#[test]
fn a_sigkilled_seat_holder_hands_its_seat_on_within_a_second() {
    let Some(env) = setup() else { return };
    let holder = env.spawn(&["-c", "a", "--pool", "p:1"], &sh("started held; sleep 60"));
    env.wait_for_file("held");
    let next = queue_for_seat(&env, "p", "b", &["--pool", "p:1"], &in_a_slot(1, "b", 0.0));
    let killed_at = Instant::now();
    holder.signal(Signal::KILL);
    drop(holder);
    wait_until("the next caller to run", || env.exists("order"));
    let took = killed_at.elapsed();
    assert!(took < secs(1.5), "the waiter started {took:?} after the seat's holder was SIGKILLed");
    next.finish(PATIENCE).assert_code(0);
    assert!(!env.exists("over"));
}

#[test]
fn a_killed_or_impatient_waiter_does_not_hold_up_the_one_behind() {
    let Some(env) = setup() else { return };
    let holder = env.spawn(&["-c", "h", "--pool", "p:1"], &sh("started held; gate go"));
    env.wait_for_file("held");
    let impatient = queue_for_seat(&env, "p", "i", &["--pool", "p:1", "-w", "1.5"], &in_a_slot(1, "i", 0.0));
    let killed = queue_for_seat(&env, "p", "k", &["--pool", "p:1"], &in_a_slot(1, "k", 0.0));
    let behind = queue_for_seat(&env, "p", "b", &["--pool", "p:1"], &in_a_slot(1, "b", 0.0));
    killed.signal(Signal::KILL);
    drop(killed);
    let out = impatient.finish(PATIENCE);
    out.assert_code(75);
    assert!(out.elapsed < secs(4.0), "{:?}", out.elapsed);
    wait_until("only the last caller to wait", || {
        pids(&pool(&status_json(&env), "p")["queue"]) == [behind.pid()]
    });
    let all = status_json(&env);
    let i = all["channels"].as_array().unwrap().iter().find(|c| c["channel"] == "i").unwrap();
    assert_eq!(i["state"], "idle", "the impatient caller released its channel: {i:#}");

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let freed = Instant::now();
    wait_until("the caller behind to run", || env.exists("order"));
    assert!(freed.elapsed() < secs(1.0), "started {:?} after the seat was freed", freed.elapsed());
    behind.finish(PATIENCE).assert_code(0);
    assert_eq!(order_lines(&env), ["b"]);
}

#[test]
fn two_pools_named_in_opposite_orders_never_deadlock() {
    let Some(env) = setup() else { return };
    let runs: Vec<Running> = (0..12)
        .map(|i| {
            let pools = if i % 2 == 0 { ["a:1", "b:1"] } else { ["b:1", "a:1"] };
            let opts = ["-c", &format!("c{i}"), "--pool", pools[0], "--pool", pools[1]];
            env.spawn(&opts, &in_a_slot(1, &i.to_string(), 0.02))
        })
        .collect();
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    assert!(!env.exists("over"), "two commands held pool a's (and b's) one seat at once");
    assert_eq!(order_lines(&env).len(), 12);
}

/// Whether this host can give a run a host name of its own (a UTS namespace).
pub fn hosts_possible() -> bool {
    std::process::Command::new("unshare").args(["--uts", "true"]).status().is_ok_and(|s| s.success())
}

/// `chan-run ARGS` as if on `host` (its own host name, where `hosts_possible`; else on
/// this host, noted once by the caller).
pub fn on_host(env: &TestEnv, host: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = if hosts_possible() {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--uts", "--", "sh", "-c", r#"hostname "$1" && shift && exec "$@""#, "sh", host, &*BIN]);
        env.apply(&mut cmd);
        cmd
    } else {
        env.std_command()
    };
    cmd.args(args);
    cmd.stdin(std::process::Stdio::null());
    cmd
}

#[test]
fn two_hosts_share_one_cap() {
    let Some(env) = setup() else { return };
    let hosts = hosts_possible();
    if !hosts {
        eprintln!("note: no UTS namespaces here; the 2 hosts share this host's name");
    }
    let runs: Vec<Running> = (0..16)
        .map(|i| {
            let host = format!("host-{}", i % 2);
            let mut cmd = on_host(&env, &host, &["run", "-c", &format!("c{i}"), "--pool", "p:2", "--"]);
            cmd.args(in_a_slot(2, &host, 0.1));
            Running::start(cmd)
        })
        .collect();
    if hosts {
        wait_until("both hosts to hold or wait for seats", || {
            let p = pool(&status_json(&env), "p");
            let named: std::collections::BTreeSet<String> = p["holders"]
                .as_array()
                .into_iter()
                .chain(p["queue"].as_array())
                .flatten()
                .filter_map(|s| s["host"].as_str().map(str::to_owned))
                .collect();
            named.len() == 2 || order_lines(&env).len() == 16
        });
    }
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    assert!(!env.exists("over"), "more than 2 commands ran at once across the two hosts");
    assert_eq!(order_lines(&env).len(), 16);
}

#[test]
fn gc_removes_an_idle_pool_and_keeps_one_in_use() {
    let Some(env) = setup() else { return };
    env.run(&["-c", "a", "--pool", "idle:2"], &["true"]).assert().code(0);
    let holder = env.spawn(&["-c", "b", "--pool", "busy:1"], &sh("started held; gate go"));
    env.wait_for_file("held");
    let out = env.command().args(["gc", "--idle-for", "0s"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("removed pool idle"), "{text}");
    assert!(text.contains("kept pool busy"), "{text}");
    let names: Vec<Value> =
        status_json(&env)["pools"].as_array().unwrap().iter().map(|p| p["pool"].clone()).collect();
    assert_eq!(names, ["busy"]);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    // The pool comes back on its next use.
    env.run(&["-c", "a", "--pool", "idle:2"], &["true"]).assert().code(0);
}

#[test]
fn a_head_that_named_fewer_seats_holds_back_later_callers_strict_fifo() {
    let Some(env) = setup() else { return };
    let holder = env.spawn(&["-c", "h", "--pool", "p:1"], &sh("started held; gate go"));
    env.wait_for_file("held");
    // Seats 2 and 3 are free, but the head of the queue may take only seat 1.
    let small =
        queue_for_seat(&env, "p", "small", &["--pool", "p:1"], &sh(r#"echo small >> "$T/order"; gate done"#));
    // It starts only after the holder of seat 1 was let go (and the head took seat 1).
    let large = queue_for_seat(
        &env,
        "p",
        "large",
        &["--pool", "p:3"],
        &sh(r#"[ -e "$T/go" ] || echo early >> "$T/over"; echo large >> "$T/order""#),
    );
    let out = env.run(&["-c", "other", "-n", "--pool", "p:3"], &["true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(75), "-n with callers queued ahead is busy");
    let p = pool(&status_json(&env), "p");
    assert_eq!(pids(&p["queue"]), [small.pid(), large.pid()], "{p:#}");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    // Once the head has its seat, the next takes seat 2 while the head still holds 1.
    large.finish(PATIENCE).assert_code(0);
    env.open_gate("done");
    small.finish(PATIENCE).assert_code(0);
    assert!(!env.exists("over"), "the caller behind the head started while only seats 2 and 3 were free");
    let mut lines = order_lines(&env);
    lines.sort();
    assert_eq!(lines, ["large", "small"]);
}
