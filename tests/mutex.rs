//! Mutual exclusion per channel, parallelism across channels, release of the lock on
//! every ending, and first-come-first-served waiting (SPEC `run` items 1-3).

use crate::common::*;
use std::time::{Duration, Instant};

/// A command that fails if another run of its channel is inside at the same time: it
/// creates a marker folder that must not exist yet, stays a moment, and removes it.
fn exclusive_step() -> Vec<String> {
    sh(r#"
    if ! mkdir "$T/inside" 2>/dev/null; then : > "$T/overlap"; exit 99; fi
    sleep 0.02
    echo x >> "$T/done"
    rmdir "$T/inside"
    "#)
}

fn callers_never_overlap(n: usize) {
    let env = TestEnv::new();
    let runs: Vec<Running> = (0..n).map(|_| env.spawn(&["-c", "shared"], &exclusive_step())).collect();
    for run in runs {
        let out = run.finish(PATIENCE);
        out.assert_code(0);
        assert_eq!(out.stderr(), "");
    }
    assert!(!env.exists("overlap"), "two runs of one channel overlapped");
    assert_eq!(env.read("done").lines().count(), n);
}

#[test]
fn same_channel_two_callers_never_overlap() {
    callers_never_overlap(2);
}

#[test]
fn same_channel_sixteen_callers_never_overlap() {
    callers_never_overlap(16);
}

#[test]
fn different_channels_run_in_parallel() {
    let env = TestEnv::new();
    let start = Instant::now();
    let runs: Vec<Running> =
        ["one", "two", "three"].iter().map(|c| env.spawn(&["-c", c], &["sleep", "0.4"])).collect();
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
    // One after another they would take 1.2 s.
    assert_between(start.elapsed(), secs(0.39), secs(1.0));
}

#[test]
fn different_channels_never_wait_for_each_other() {
    // All three commands must be running at the same moment for their markers to
    // appear while each blocks on the gate: a channel that waited for another would
    // leave its marker missing and the wait below would fail.
    let env = TestEnv::new();
    let runs: Vec<Running> = ["one", "two", "three"]
        .iter()
        .map(|c| env.spawn(&["-c", c], &sh(&format!("started in-{c}; gate all-in"))))
        .collect();
    for name in ["in-one", "in-two", "in-three"] {
        env.wait_for_file(name);
    }
    env.open_gate("all-in");
    for run in runs {
        run.finish(PATIENCE).assert_code(0);
    }
}

#[test]
fn contended_caller_blocks_then_proceeds() {
    let env = TestEnv::new();
    let holder = env.spawn(&["-c", "c"], &sh("started h-in; gate go; started h-out"));
    env.wait_for_file("h-in");
    let waiter = env.spawn(&["-c", "c"], &sh(r#"[ -e "$T/h-out" ] || exit 97; started w-ran"#));
    env.wait_for_tickets("c", 1);
    let mut waiter = waiter;
    assert!(waiter.is_running(), "the contended caller should be waiting");
    assert!(!env.exists("w-ran"), "the contended caller ran while the channel was held");

    let released = Instant::now();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let out = waiter.finish(PATIENCE);
    assert!(released.elapsed() < secs(1.5), "the waiter took {:?} to follow the holder", released.elapsed());
    out.assert_code(0);
    assert_eq!(out.stderr(), "", "a waiter whose stderr is not a terminal prints nothing");
    assert!(env.exists("w-ran"));
    assert_eq!(env.tickets("c"), 0, "the waiter's ticket is gone");
}

/// After a run that ended as `command` makes it end, the channel is free at once.
fn lock_is_released_after(opts: &[&str], command: &[String], want: i32) {
    let env = TestEnv::new();
    let mut all = vec!["-c", "c"];
    all.extend_from_slice(opts);
    env.run(&all, command).assert().code(want);
    env.run(&["-c", "c", "--no-wait"], &["true"]).assert().success();
    env.assert_released("c", "c");
}

#[test]
fn lock_released_after_command_fails() {
    lock_is_released_after(&[], &sh("exit 3"), 3);
}

#[test]
fn lock_released_after_command_dies_of_a_signal() {
    lock_is_released_after(&[], &sh("kill -KILL $$"), 137);
}

#[test]
fn lock_released_after_timeout() {
    lock_is_released_after(&["-t", "0.2"], &sh("exec sleep 30"), 124);
}

#[test]
fn lock_released_after_command_cannot_start() {
    lock_is_released_after(&[], &["/nonexistent/command".to_owned()], 127);
}

#[test]
fn holder_record_names_the_run_while_held() {
    let env = TestEnv::new();
    let script = r#"echo $$ > "$T/cmd-pid"; started in; gate go"#;
    let command = sh(script);
    let holder = env.spawn(&["-c", "rec"], &command);
    env.wait_for_file("in");
    let command_pid = env.read_pid("cmd-pid");

    let text = std::fs::read_to_string(env.lock_file("rec")).unwrap();
    assert!(
        text.starts_with("rec\n") && text.ends_with("}\n"),
        "name first, record one whole line: {text:?}"
    );
    let record = env.holder_record("rec").expect("a holder record");
    assert_eq!(record["pid"], holder.pid(), "{record}");
    assert_eq!(record["command_pid"], command_pid, "{record}");
    assert_eq!(record["command"], serde_json::json!(command), "{record}");
    let started_at = record["started_at"].as_str().expect("started_at");
    assert!(started_at.ends_with('Z') && started_at.contains('T'), "RFC 3339 UTC: {started_at}");

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    env.assert_released("rec", "rec");
}

/// Whether every thread of `pid` is in the stopped state.
fn all_threads_stopped(pid: u32) -> bool {
    let tasks = list(std::path::Path::new(&format!("/proc/{pid}/task")));
    !tasks.is_empty()
        && tasks.iter().all(|tid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
            let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            after_name.split_whitespace().next() == Some("T")
        })
}

/// Sends SIGCONT to a stopped process when dropped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        send(self.0, rustix::process::Signal::CONT);
    }
}

#[test]
fn no_wait_is_busy_while_callers_wait_even_if_the_lock_is_free() {
    // The first waiter is stopped (SIGSTOP) so that, when the holder ends, the lock is
    // free while two callers still wait: a newcomer must queue behind them, and a
    // --no-wait caller must not jump the queue.
    let env = TestEnv::new();
    let holder = env.hold("q", "held", "go");
    let w1 = env.spawn(&["-c", "q"], &sh(r#"echo 1 >> "$T/order""#));
    env.wait_for_tickets("q", 1);
    let w2 = env.spawn(&["-c", "q"], &sh(r#"echo 2 >> "$T/order""#));
    env.wait_for_tickets("q", 2);
    w1.signal(rustix::process::Signal::STOP);
    let resume = Resume(w1.pid());
    // kill() returns before every thread has stopped; the lock must not be freed earlier.
    wait_until("the first waiter to be stopped", || all_threads_stopped(w1.pid()));
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);

    env.run(&["-c", "q", "-n"], &sh("started jumped")).assert().code(75);
    assert!(!env.exists("jumped"), "a --no-wait caller ran ahead of waiting callers");
    let w3 = env.spawn(&["-c", "q"], &sh(r#"echo 3 >> "$T/order""#));
    env.wait_for_tickets("q", 3);
    assert!(!env.exists("order"), "somebody ran ahead of the first waiter");

    drop(resume);
    for run in [w1, w2, w3] {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(env.read("order"), "1\n2\n3\n");
}

#[test]
fn holder_record_caps_a_long_command() {
    let env = TestEnv::new();
    let prompt = "p".repeat(100_000);
    let mut command = sh("started in; gate go");
    command.push(prompt.clone());
    command.push(prompt);
    let holder = env.spawn(&["-c", "long"], &command);
    env.wait_for_file("in");
    let size = std::fs::metadata(env.lock_file("long")).unwrap().len();
    assert!(size < 16 * 1024, "the holder record takes {size} bytes");
    let record = env.holder_record("long").expect("a holder record");
    assert_eq!(record["command"][0], "sh", "{record}");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
}

/// Voluntary context switches of all of `pid`'s threads so far.
fn context_switches(pid: u32) -> u64 {
    list(std::path::Path::new(&format!("/proc/{pid}/task")))
        .iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:").map(|v| v.trim().parse::<u64>().unwrap())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

#[test]
fn waiting_blocks_in_the_kernel_without_polling() {
    let env = TestEnv::new();
    let holder = env.hold("idle", "held", "go");
    let first = env.spawn(&["-c", "idle"], &["true"]);
    let second = env.spawn(&["-c", "idle", "--wait", "60"], &["true"]);
    env.wait_for_tickets("idle", 2);
    let before = [context_switches(first.pid()), context_switches(second.pid())];
    // A measurement window, not a synchronisation: a waiter that polled (even every
    // 50 ms) would wake up several times in it.
    std::thread::sleep(Duration::from_millis(500));
    let after = [context_switches(first.pid()), context_switches(second.pid())];
    assert!(after[0] - before[0] <= 2, "a waiter woke {} times in 0.5 s", after[0] - before[0]);
    assert!(after[1] - before[1] <= 2, "a --wait waiter woke {} times in 0.5 s", after[1] - before[1]);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    first.finish(PATIENCE).assert_code(0);
    second.finish(PATIENCE).assert_code(0);
}

#[test]
fn waiters_run_in_arrival_order() {
    let env = TestEnv::new();
    let holder = env.hold("fifo", "held", "go");
    let waiters: Vec<Running> = (1..=12)
        .map(|i| {
            let run = env.spawn(&["-c", "fifo"], &sh(&format!(r#"echo {i} >> "$T/order""#)));
            // Arrivals 30 ms apart: chan-run registers a caller within a few ms of its start.
            std::thread::sleep(Duration::from_millis(30));
            run
        })
        .collect();
    env.wait_for_tickets("fifo", 12);
    assert!(!env.exists("order"), "a waiter ran while the channel was held");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for run in waiters {
        run.finish(PATIENCE).assert_code(0);
    }
    let order: Vec<u32> = env.read("order").lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(order, (1..=12).collect::<Vec<_>>(), "waiters were not served in arrival order");
}

#[test]
fn queue_order_survives_waiters_that_die_or_give_up() {
    let env = TestEnv::new();
    let holder = env.hold("q", "held", "go");
    let mut waiters = Vec::new();
    for i in 1..=6 {
        let opts: &[&str] = if i == 2 { &["-c", "q", "--wait", "1"] } else { &["-c", "q"] };
        waiters.push(env.spawn(opts, &sh(&format!(r#"echo {i} >> "$T/order""#))));
        env.wait_for_tickets("q", i);
    }
    // Waiter 4 dies while waiting; waiter 2 gives up at its deadline.
    let w4 = waiters.remove(3);
    w4.signal(rustix::process::Signal::KILL);
    let w4 = w4.finish(PATIENCE);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&w4.status), Some(9));
    let w2 = waiters.remove(1).finish(PATIENCE);
    w2.assert_code(75);
    assert!(w2.elapsed > secs(0.9), "gave up after {:?}", w2.elapsed);

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for run in waiters {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(env.read("order"), "1\n3\n5\n6\n");
    assert_eq!(env.tickets("q"), 0, "every ticket is cleaned up");
}
