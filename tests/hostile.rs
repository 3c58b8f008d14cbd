//! Hostile commands (SPEC `run` items 2, 4 and 6). Whatever the command does, chan-run
//! - returns within its bound: timeout + kill-after + 1.5 s (SPEC: + 1 s; 0.5 s of
//!   slack for a loaded machine), or within 1.5 s of the command's own exit;
//! - closes the caller's stdout and stderr when it exits (`Running::finish` checks);
//! - frees the channel: a `--no-wait` run succeeds right after;
//! - leaves nothing of the run alive but what detached itself with `setsid` (every
//!   process of the run carries a unique `HOSTILE_TAG` in its environment);
//! - keeps its peak RSS (`VmHWM`) under 64 MiB.
//!
//! The 1 GiB pass-through runs with `CHAN_RUN_HEAVY=1`; 256 MiB otherwise.

use crate::common::*;
use std::io::Read;
use std::time::Duration;

const MAX_RSS_KIB: u64 = 64 * 1024;

struct Hostile<'a> {
    opts: &'a [&'a str],
    script: &'a str,
    want: i32,
    /// Lower bound of chan-run's run time (lopsided: generous).
    min: f64,
    /// Upper bound: the SPEC's bound plus slack.
    max: f64,
    /// A stdin pipe that is never written to nor closed.
    open_stdin: bool,
}

/// Field 6 of `/proc/PID/stat`: the session id.
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(3)?.parse().ok()
}

/// Runs the case; returns the outcome, the test env, and the pids of the run still
/// alive once everything that belongs to its group has died (the detached ones).
fn hostile(case: Hostile) -> (Outcome, TestEnv, Vec<u32>) {
    let env = TestEnv::new();
    let tag = env.root().file_name().unwrap().to_string_lossy().into_owned();
    let mut opts = vec!["-c", "hostile"];
    opts.extend_from_slice(case.opts);
    let mut cmd = env.std_run(&opts, &sh(case.script));
    cmd.env("HOSTILE_TAG", &tag);
    let mut run = if case.open_stdin { Running::start_with_stdin(cmd) } else { Running::start(cmd) };
    let _stdin = run.child().stdin.take(); // held open until the end of the test
    let peak = PeakWatch::start(run.pid());
    let out = run.finish(secs(case.max + 5.0));
    let peak = peak.join();
    assert_eq!(out.code(), case.want, "exit code; stderr: {}", out.stderr());
    assert_between(out.elapsed, secs(case.min), secs(case.max));
    assert!(peak < MAX_RSS_KIB, "chan-run's peak RSS was {peak} KiB");
    env.run(&["-c", "hostile", "-n"], &["true"]).assert().success();
    // What is left of the run: only processes that left its session may remain.
    let detached = |pid: &u32| session_of(*pid).is_some_and(|s| Some(s) != session_of(std::process::id()));
    wait_until("the run's group to be gone", || processes_with_env("HOSTILE_TAG", &tag).iter().all(detached));
    let left = processes_with_env("HOSTILE_TAG", &tag);
    (out, env, left)
}

#[test]
fn command_that_ignores_sigterm_is_killed_after_kill_after() {
    let (out, _env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: "trap '' TERM; while :; do sleep 1; done",
        want: 124,
        min: 0.9,
        max: 2.5,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
    assert!(out.stderr().contains("timed out"), "{}", out.stderr());
}

#[test]
fn grandchild_that_ignores_sigterm_and_holds_stdout_is_killed_with_the_group() {
    // The command itself dies of the SIGTERM at once; its grandchild ignores it, keeps
    // the command's stdout open and keeps writing to it.
    let (out, env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: r#"
        sh -c 'trap "" TERM; echo $$ > "$T/gc"; while :; do echo tick; sleep 0.05; done' &
        exec sleep 60
        "#,
        want: 124,
        min: 0.4,
        max: 2.5,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
    assert!(!is_alive(env.read_pid("gc")));
    assert!(out.stdout().starts_with("tick\n"), "{:?}", out.stdout());
}

#[test]
fn both_ignoring_sigterm_with_the_grandchild_holding_stdout() {
    let (_out, env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: r#"
        trap '' TERM
        sh -c 'echo $$ > "$T/gc"; while :; do echo tick; sleep 0.05; done' &
        while :; do sleep 1; done
        "#,
        want: 124,
        min: 0.9,
        max: 2.5,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
    assert!(!is_alive(env.read_pid("gc")));
}

#[test]
fn grandchild_that_setsids_away_holding_stdout_does_not_hold_chan_run() {
    // The grandchild leaves the group and the session, ignores SIGTERM, and keeps the
    // command's stdout and stderr open, writing to them: no group signal reaches it. It
    // ignores SIGPIPE too, so that it is still there to be found once chan-run (the
    // pipes' reader) has exited.
    let (out, env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: r#"
        trap '' TERM
        setsid sh -c 'trap "" PIPE; echo $$ > "$T/gc"; while :; do echo tick; echo tock >&2; sleep 0.05; done' &
        while :; do sleep 1; done
        "#,
        want: 124,
        min: 0.9,
        max: 2.5,
        open_stdin: false,
    });
    let gc = env.read_pid("gc");
    let _cleanup = KillOnDrop(left.clone());
    assert!(left.contains(&gc), "test premise: the detached grandchild survives: {left:?}");
    assert!(out.stdout().contains("tick"), "{:?}", out.stdout());
}

#[test]
fn detached_flood_after_the_command_exits_does_not_hold_chan_run() {
    // The command exits 0 at once, leaving a detached `yes` flooding its stdout: chan-run
    // ends within its 1 s drain bound, and `yes` then meets a closed pipe and dies.
    let (out, _env, left) = hostile(Hostile {
        opts: &[],
        script: "setsid yes &",
        want: 0,
        min: 0.0,
        max: 1.5,
        open_stdin: false,
    });
    let _cleanup = KillOnDrop(left.clone());
    wait_until("the detached yes to die of the closed pipe", || left.iter().all(|&p| !is_alive(p)));
    // What it wrote after the command's exit may or may not have been passed on.
    assert!(out.stdout.iter().all(|&b| b == b'y' || b == b'\n'));
}

#[test]
fn command_that_forks_until_killed_leaves_nothing_behind() {
    let (_out, _env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: "trap '' TERM; while :; do sleep 60 & sleep 0.01; done",
        want: 124,
        min: 0.9,
        max: 2.5,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn stopped_command_is_still_stopped_at_the_timeout() {
    let (_out, _env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: "kill -STOP $$",
        want: 124,
        min: 0.4,
        max: 2.5,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn command_that_closes_its_stdout_early_keeps_its_status_and_stderr() {
    let (out, _env, left) = hostile(Hostile {
        opts: &[],
        script: r#"echo first; exec >&-; sleep 0.3; echo "still here" >&2; exit 3"#,
        want: 3,
        min: 0.25,
        max: 1.8,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(out.stdout(), "first\n");
    assert_eq!(out.stderr(), "still here\n");
}

#[test]
fn command_that_closes_stdout_and_stderr_is_still_timed_out() {
    let (out, _env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: "exec >&- 2>&-; sleep 60",
        want: 124,
        min: 0.4,
        max: 2.5,
        open_stdin: false,
    });
    assert!(left.is_empty(), "{left:?}");
    assert!(out.stderr().contains("timed out"), "chan-run's own note still reaches stderr: {}", out.stderr());
}

#[test]
fn command_reading_a_stdin_that_never_ends_is_timed_out() {
    let (_out, _env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: "exec cat",
        want: 124,
        min: 0.4,
        max: 2.5,
        open_stdin: true,
    });
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn command_reading_stdin_forever_and_ignoring_sigterm_is_killed() {
    let (_out, _env, left) = hostile(Hostile {
        opts: &["-t", "0.5", "-k", "0.5"],
        script: "trap '' TERM; cat; sleep 60",
        want: 124,
        min: 0.9,
        max: 2.5,
        open_stdin: true,
    });
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_gibibyte_of_output_passes_through_in_bounded_memory() {
    // Invariant: every byte reaches the reader, and chan-run's peak RSS stays under
    // 64 MiB (its tail of stdout for the session id is capped at a few MiB).
    const MIB: u64 = 1024 * 1024;
    let total = scaled(256, 1024) as u64 * MIB;
    let env = TestEnv::new();
    let cmd = env.std_run(&["-c", "big"], &sh(&format!("head -c {total} /dev/zero")));
    let mut run = Running::start_streaming(cmd);
    let peak = PeakWatch::start(run.pid());
    let mut stdout = run.child().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; MIB as usize];
        let mut got = 0u64;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got += n as u64,
                Err(e) => panic!("reading chan-run's stdout: {e}"),
            }
        }
    });
    let out = run.finish(secs(120.0));
    let got = reader.join().unwrap();
    let peak = peak.join();
    out.assert_code(0);
    assert_eq!(got, total, "bytes passed through");
    assert!(peak < MAX_RSS_KIB, "chan-run's peak RSS was {peak} KiB after {total} bytes");
    env.run(&["-c", "big", "-n"], &["true"]).assert().success();
    let rate = total as f64 / out.elapsed.as_secs_f64() / MIB as f64;
    eprintln!("hostile: {} MiB in {:?} ({rate:.0} MiB/s), peak RSS {peak} KiB", total / MIB, out.elapsed);
    assert!(out.elapsed < Duration::from_secs(120));
}

/// A leader that clears its parent-death signal, moves to a process group of its own
/// child's (in the same session, so `setsid` would not do), writes its pid to `$T/pid`
/// and its child's to `$T/kid`, creates `$T/in` and then sleeps; with `ignore_term` it
/// also ignores SIGTERM. No group signal reaches it: only its pid does.
fn leader_that_leaves_its_group(ignore_term: bool) -> Vec<String> {
    let ignore = if ignore_term { "$SIG{TERM} = 'IGNORE';" } else { "" };
    let perl = format!(
        r#"{ignore}
        my $kid = fork // die "fork: $!";
        if (!$kid) {{ setpgrp(0, 0); sleep 60; exit 0 }}
        setpgrp($kid, $kid);
        setpgrp(0, $kid) or die "setpgrp: $!";
        die "still in my group" if getpgrp() == $$;
        for (["pid", $$], ["kid", $kid], ["in", ""]) {{
            open(my $f, '>', "$ENV{{T}}/$_->[0]") or die; print $f $_->[1]; close $f;
        }}
        sleep 1 while 1;
        "#
    );
    ["setpriv", "--pdeathsig", "clear", "perl", "-e", &perl].map(str::to_owned).to_vec()
}

#[test]
fn leader_that_leaves_its_group_and_ignores_sigterm_is_killed_and_reaped() {
    let env = TestEnv::new();
    let run = env.spawn(&["-c", "left", "-t", "0.5", "-k", "0.5"], &leader_that_leaves_its_group(true));
    let out = run.finish(PATIENCE);
    let (leader, kid) = (env.read_pid("pid"), env.read_pid("kid"));
    let _cleanup = KillOnDrop(vec![leader, kid]);
    out.assert_code(124);
    assert_between(out.elapsed, secs(0.9), secs(2.5));
    // Gone, not only signalled: chan-run reaped it before it exited.
    assert!(!is_alive(leader), "the leader outlived chan-run's 'stopped it'");
    assert!(std::fs::metadata(format!("/proc/{leader}")).is_err(), "the leader was not reaped");
    assert!(is_alive(kid), "test premise: the child that left the group is out of reach");
}

#[test]
fn leader_that_leaves_its_group_gets_the_timeouts_sigterm() {
    let env = TestEnv::new();
    let run = env.spawn(&["-c", "left", "-t", "0.5", "-k", "10"], &leader_that_leaves_its_group(false));
    let out = run.finish(PATIENCE);
    let (leader, kid) = (env.read_pid("pid"), env.read_pid("kid"));
    let _cleanup = KillOnDrop(vec![leader, kid]);
    out.assert_code(124);
    // The SIGTERM ended it; SIGKILL 10 s later was not needed.
    assert_between(out.elapsed, secs(0.4), secs(3.0));
    assert!(!is_alive(leader));
    env.run(&["-c", "left", "-n"], &["true"]).assert().success();
}
