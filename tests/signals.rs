//! Signals to chan-run (forwarded to the command's group, exit 128+N), its death by
//! SIGKILL (the channel is freed and nothing of the run survives the next holder's
//! start), and bounded endings when descendants ignore signals or hold stdout open.

use crate::common::*;
use rustix::process::Signal;
use std::os::unix::process::ExitStatusExt;

/// A command with a grandchild; both pids recorded, then it blocks.
const FAMILY: &str = r#"
sleep 30 & echo $! > "$T/grandchild"
echo $$ > "$T/child"
started in
wait
"#;

fn forwarded(sig: Signal, want: i32) {
    let env = TestEnv::new();
    let run = env.spawn(&["-c", "sig"], &sh(FAMILY));
    env.wait_for_file("in");
    let (child, grandchild) = (env.read_pid("child"), env.read_pid("grandchild"));
    let _cleanup = KillOnDrop(vec![child, grandchild]);
    run.signal(sig);
    let out = run.finish(PATIENCE);
    out.assert_code(want);
    // The command dies of the signal at once; the default --kill-after (10 s) never comes.
    assert!(out.elapsed < secs(3.0), "took {:?}", out.elapsed);
    assert!(!is_alive(child), "the command survived");
    wait_dead(grandchild);
    env.run(&["-c", "sig", "-n"], &["true"]).assert().success();
}

#[test]
fn sigterm_exits_143_and_stops_the_command_group() {
    forwarded(Signal::TERM, 143);
}

#[test]
fn sigint_exits_130_and_stops_the_command_group() {
    forwarded(Signal::INT, 130);
}

#[test]
fn sighup_exits_129_and_stops_the_command_group() {
    forwarded(Signal::HUP, 129);
}

#[test]
fn forwarded_signal_escalates_to_sigkill_after_kill_after() {
    let env = TestEnv::new();
    let run = env.spawn(&["-c", "sig", "-k", "0.3"], &sh(&format!("trap '' TERM; {FAMILY}")));
    env.wait_for_file("in");
    let (child, grandchild) = (env.read_pid("child"), env.read_pid("grandchild"));
    let _cleanup = KillOnDrop(vec![child, grandchild]);
    let sent = std::time::Instant::now();
    run.signal(Signal::TERM);
    let out = run.finish(PATIENCE);
    out.assert_code(143);
    assert_between(sent.elapsed(), secs(0.2), secs(2.0));
    assert!(!is_alive(child));
    wait_dead(grandchild);
}

#[test]
fn interrupted_run_exits_128_plus_n_even_if_the_command_then_exits_0() {
    let env = TestEnv::new();
    let run = env.spawn(&["-c", "sig"], &sh("trap 'exit 0' TERM; started in; sleep 30 & wait"));
    env.wait_for_file("in");
    run.signal(Signal::TERM);
    run.finish(PATIENCE).assert_code(143);
}

#[test]
fn sigterm_while_waiting_exits_143_and_runs_nothing() {
    let env = TestEnv::new();
    let holder = env.hold("busy", "held", "go");
    let mut waiter = env.spawn(&["-c", "busy"], &sh("started ran"));
    env.wait_for_tickets("busy", 1);
    assert!(waiter.is_running());
    let sent = std::time::Instant::now();
    waiter.signal(Signal::TERM);
    let out = waiter.finish(PATIENCE);
    out.assert_code(143);
    assert!(sent.elapsed() < secs(2.0), "took {:?}", sent.elapsed());
    assert!(!env.exists("ran"), "an interrupted waiter ran its command");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert!(!env.exists("ran"), "an interrupted waiter ran its command later");
    env.run(&["-c", "busy", "-n"], &["true"]).assert().success();
}

#[test]
fn sigkill_of_chan_run_frees_the_channel_and_kills_the_command() {
    let env = TestEnv::new();
    let run = env.spawn(&["-c", "k"], &sh(r#"echo $$ > "$T/child"; started in; exec sleep 30"#));
    env.wait_for_file("in");
    let child = env.read_pid("child");
    let _cleanup = KillOnDrop(vec![child]);
    run.signal(Signal::KILL);
    let out = run.finish(PATIENCE);
    assert_eq!(out.status.signal(), Some(9));
    // The parent-death signal reaches the command without any other chan-run's help.
    wait_dead(child);
    env.run(&["-c", "k", "-n"], &sh("echo next")).assert().success().stdout("next\n");
}

#[test]
fn sigkill_of_chan_run_leaves_no_process_of_its_run_behind() {
    let env = TestEnv::new();
    // The shell gets the parent-death signal; its two sleeps do not.
    let first = env.spawn(
        &["-c", "orphans"],
        &sh(r#"
        sleep 60 & echo $! >> "$T/pids"
        sleep 60 & echo $! >> "$T/pids"
        echo $$ >> "$T/pids"
        started in
        wait
        "#),
    );
    env.wait_for_file("in");
    let pids: Vec<u32> = env.read("pids").lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(pids.len(), 3);
    let _cleanup = KillOnDrop(pids.clone());

    first.signal(Signal::KILL);
    // The next run starts at once; its command checks that the first run is gone.
    let second = env.spawn(
        &["-c", "orphans"],
        &sh(r#"
        for p in $(cat "$T/pids"); do
            if alive "$p"; then echo "pid $p of the previous run is alive"; exit 1; fi
        done
        echo clean
        "#),
    );
    assert_eq!(first.finish(PATIENCE).status.signal(), Some(9));
    let out = second.finish(PATIENCE);
    assert_eq!((out.code(), out.stdout().as_str()), (0, "clean\n"), "stderr: {}", out.stderr());
    for pid in pids {
        assert!(!is_alive(pid), "pid {pid} of the killed run outlived the next run's start");
    }
}

#[test]
fn stale_holder_record_never_kills_a_stranger() {
    // A holder record left by a crash names a process group whose id now belongs to an
    // unrelated process (pid reuse): start times tell them apart, so it must survive.
    let env = TestEnv::new();
    let mut stranger = std::process::Command::new("sleep");
    std::os::unix::process::CommandExt::process_group(&mut stranger, 0);
    let mut stranger = stranger.arg("30").spawn().unwrap();
    let pid = stranger.id();
    let ticks = start_ticks(pid);
    let old = ticks.saturating_sub(1000); // ten seconds or more before it started
    std::fs::create_dir_all(env.locks()).unwrap();
    let record = format!(
        r#"{{"pid":1,"started_at":"2020-01-01T00:00:00.000Z","spawn_ticks":{old},"spawned_ticks":{},"command_pid":{pid},"channel":"stale","command":["sleep","30"]}}"#,
        old + 1
    );
    std::fs::write(env.lock_file("stale"), format!("stale\n{record}\n")).unwrap();

    env.run(&["-c", "stale"], &["true"]).assert().success();
    let alive = is_alive(pid);
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(alive, "chan-run killed an unrelated process named by a stale holder record");
}

#[test]
fn timeout_stops_a_term_ignoring_grandchild_that_holds_stdout() {
    let env = TestEnv::new();
    let command = sh(r#"
    trap '' TERM
    sh -c 'echo $$ > "$T/grandchild"; exec sleep 30' &
    started in
    sleep 30
    "#);
    let out = env.spawn(&["-c", "x", "-t", "0.5", "-k", "0.5"], &command).finish(PATIENCE);
    let grandchild = env.read_pid("grandchild");
    let _cleanup = KillOnDrop(vec![grandchild]);
    out.assert_code(124);
    assert_between(out.elapsed, secs(0.9), secs(2.5));
    wait_dead(grandchild);
}

#[test]
fn timeout_returns_although_a_detached_term_ignoring_grandchild_holds_stdout() {
    let env = TestEnv::new();
    // The grandchild leaves the group (setsid), so no group signal reaches it, and it
    // keeps the command's stdout and stderr open for 30 s.
    let command = sh(r#"
    trap '' TERM
    setsid sh -c 'echo $$ > "$T/grandchild"; exec sleep 30' &
    started in
    sleep 30
    "#);
    let out = env.spawn(&["-c", "x", "-t", "0.5", "-k", "0.5"], &command).finish(PATIENCE);
    let grandchild = env.read_pid("grandchild");
    let _cleanup = KillOnDrop(vec![grandchild]);
    out.assert_code(124);
    assert_between(out.elapsed, secs(0.9), secs(2.5));
    env.run(&["-c", "x", "-n"], &["true"]).assert().success();
}

#[test]
fn signal_ignored_at_start_stays_ignored() {
    // As under nohup: SIGHUP ignored by whoever started chan-run is not forwarded, does
    // not end chan-run, and stays ignored for the command.
    let env = TestEnv::new();
    let mut cmd = std::process::Command::new("sh");
    env.apply(&mut cmd);
    cmd.args([
        "-c",
        r#"trap '' HUP; exec "$B" run -c nohup -- sh -c 'grep SigIgn /proc/$$/status; : > "$T/in"; while [ ! -e "$T/go" ]; do sleep 0.01; done'"#,
    ]);
    let run = Running::start(cmd);
    env.wait_for_file("in");
    run.signal(Signal::HUP);
    // Any reaction to the HUP (exit 129, a forwarded HUP) would come before this run,
    // which must still find the channel held.
    env.run(&["-c", "nohup", "-n"], &["true"]).assert().code(75);
    env.open_gate("go");
    let out = run.finish(PATIENCE);
    out.assert_code(0);
    let mask = u64::from_str_radix(out.stdout().trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
    assert_ne!(mask & 1, 0, "SIGHUP is not ignored in the command: SigIgn {mask:x}");
}

#[test]
fn a_command_whose_chan_run_dies_at_its_first_instruction_leaves_nothing_to_the_next_run() {
    // The command's own process writes its pid (= its group) into the holder record
    // before `exec` (src/store/local/lock.rs says why): however early chan-run dies, the
    // record names the group. Here the command's very first act forks a sleeper into
    // its group and SIGKILLs chan-run; the next run must kill the sleeper before its own
    // command starts.
    let env = TestEnv::new();
    let first = env.spawn(&["-c", "early"], &sh(r#"sleep 60 & echo $! > "$T/sleeper"; kill -9 $PPID; wait"#));
    let sleeper = env.read_pid("sleeper");
    let _cleanup = KillOnDrop(vec![sleeper]);
    assert_eq!(first.finish(PATIENCE).status.signal(), Some(9));
    let out = env.spawn(&["-c", "early"], &sh(&format!(r#"alive {sleeper} && echo alive || echo gone"#)));
    let out = out.finish(PATIENCE);
    assert_eq!((out.code(), out.stdout().as_str()), (0, "gone\n"), "stderr: {}", out.stderr());
}
