//! First come, first served (SPEC item 3): callers are served strictly in the order
//! they registered in the channel's queue, whatever the others do, and a waiter that
//! dies or gives up never holds up those behind it.

use crate::common::*;
use rustix::process::Signal;

#[test]
fn sixty_four_callers_run_in_registration_order() {
    let env = TestEnv::new();
    let holder = env.hold("fifo", "held", "go");
    let callers: Vec<Running> = (0..64)
        .map(|i| {
            let run = env.enqueue("fifo", "fifo", i, &[]);
            std::thread::sleep(secs(0.005));
            run
        })
        .collect();
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    for run in callers {
        run.finish(PATIENCE).assert_code(0);
    }
    assert_eq!(env.order(), (0..64).collect::<Vec<_>>());
    assert_eq!(env.tickets("fifo"), 0, "every ticket is cleaned up");
}

#[test]
fn killed_and_impatient_waiters_never_reorder_or_block_the_rest() {
    let env = TestEnv::new();
    let holder = env.hold("mixed", "held", "go");
    let killed: Vec<usize> = (0..10).map(|k| 3 + 6 * k).collect(); // 3, 9, ..., 57
    let impatient: Vec<usize> = (0..10).map(|k| 5 + 6 * k).collect(); // 5, 11, ..., 59
    let mut callers: Vec<Option<Running>> = (0..64)
        .map(|i| {
            let opts: &[&str] = if impatient.contains(&i) { &["-w", "1.5"] } else { &[] };
            let run = env.enqueue("mixed", "mixed", i, opts);
            std::thread::sleep(secs(0.005));
            Some(run)
        })
        .collect();
    for &i in &killed {
        callers[i].as_ref().unwrap().signal(Signal::KILL);
    }
    // The impatient ones give up while the holder still holds the channel.
    for &i in &impatient {
        callers[i].take().unwrap().finish(PATIENCE).assert_code(75);
    }
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let mut served = Vec::new();
    for (i, run) in callers.into_iter().enumerate() {
        let Some(run) = run else { continue };
        if killed.contains(&i) {
            continue;
        }
        run.finish(PATIENCE).assert_code(0);
        served.push(i);
    }
    assert_eq!(env.order(), served, "the rest ran in registration order, and nobody else ran");
    assert_eq!(served.len(), 44);
    assert_eq!(env.tickets("mixed"), 0, "dead tickets are cleaned up");
}

#[test]
fn a_holder_killed_mid_run_hands_over_to_the_next_in_line() {
    let env = TestEnv::new();
    let holder = env.hold("handover", "held", "never");
    let callers: Vec<Running> = (0..3).map(|i| env.enqueue("handover", "handover", i, &[])).collect();
    let started = std::time::Instant::now();
    holder.signal(Signal::KILL);
    for run in callers {
        run.finish(PATIENCE).assert_code(0);
    }
    assert!(started.elapsed() < secs(5.0), "hand-over took {:?}", started.elapsed());
    assert_eq!(env.order(), [0, 1, 2]);
}

#[test]
fn no_wait_is_busy_while_anyone_waits_and_reset_queues_like_a_run() {
    let env = TestEnv::new();
    let holder = env.hold("q", "held", "go");
    let first = env.enqueue("q", "q", 0, &[]);
    let mut reset = env.std_command();
    reset.args(["reset", "q"]);
    let reset = Running::start(reset);
    let reset_pid = reset.pid();
    wait_until("reset to register", || env.queued_pids("q").contains(&reset_pid));
    let second = env.enqueue("q", "q", 1, &[]);
    env.run(&["-c", "q", "-n"], &["true"]).assert().code(75);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    first.finish(PATIENCE).assert_code(0);
    reset.finish(PATIENCE).assert_code(0);
    second.finish(PATIENCE).assert_code(0);
    assert_eq!(env.order(), [0, 1]);
    // The reset ran between the two: the first run's record was already there.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.state().join("active.json")).unwrap()).unwrap();
    assert_eq!(state["channels"]["q"]["runs"], 3);
}
