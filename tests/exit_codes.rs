//! Every row of SPEC's exit-status table: the command's own code, 124, the busy code
//! (75 or `-E N`), 125, 126, 127 and 128+N.

use crate::common::*;
use predicates::prelude::*;
use predicates::str::contains;

#[test]
fn command_exit_code_passes_through() {
    let env = TestEnv::new();
    for code in [0, 1, 3, 42, 124, 125, 255] {
        env.run(&["-c", "x"], &sh(&format!("exit {code}"))).assert().code(code).stderr("");
    }
}

#[test]
fn timeout_exits_124_and_stops_the_command() {
    let env = TestEnv::new();
    let out =
        env.spawn(&["-c", "x", "-t", "0.3"], &sh(r#"echo $$ > "$T/pid"; exec sleep 30"#)).finish(PATIENCE);
    out.assert_code(124);
    assert_between(out.elapsed, secs(0.2), secs(2.0));
    assert!(out.stderr().starts_with("chan-run: "), "{:?}", out.stderr());
    assert!(out.stderr().contains("timed out"), "{:?}", out.stderr());
    assert_eq!(out.stdout(), "", "chan-run's own notes never go to stdout");
    assert!(!is_alive(env.read_pid("pid")));
}

#[test]
fn timeout_exits_124_even_when_sigkill_was_needed() {
    let env = TestEnv::new();
    // The shell and its sleep both ignore SIGTERM: only the SIGKILL 0.2 s later stops them.
    let command = sh(r#"trap '' TERM; echo $$ > "$T/pid"; sleep 30; echo survived"#);
    let out = env.spawn(&["-c", "x", "-t", "0.3", "-k", "0.2"], &command).finish(PATIENCE);
    out.assert_code(124);
    assert_between(out.elapsed, secs(0.45), secs(2.5));
    assert_eq!(out.stdout(), "");
    assert!(!is_alive(env.read_pid("pid")));
}

#[test]
fn timeout_exits_124_even_when_the_command_exits_0_on_sigterm() {
    let env = TestEnv::new();
    let out =
        env.spawn(&["-c", "x", "-t", "0.3"], &sh("trap 'exit 0' TERM; sleep 30 & wait")).finish(PATIENCE);
    out.assert_code(124);
    assert_between(out.elapsed, secs(0.2), secs(2.0));
}

#[test]
fn quiet_silences_notes_but_not_errors() {
    let env = TestEnv::new();
    env.run(&["-c", "x", "-q", "-t", "0.1"], &["sleep", "30"]).assert().code(124).stderr("");
    env.run(&["-c", "x", "-q"], &["/nonexistent/cmd"]).assert().code(127).stderr(contains("chan-run: "));
}

#[test]
fn timeout_zero_means_no_limit() {
    let env = TestEnv::new();
    env.run(&["-c", "x", "-t", "0"], &["sleep", "0.3"]).assert().success();
}

#[test]
fn durations_accept_the_documented_forms() {
    let env = TestEnv::new();
    for d in ["300", "0.5", "250ms", "1.5s", "90s", "5m", "1h30m"] {
        env.run(&["-c", "x", "-t", d, "-k", d, "-w", d], &["true"]).assert().success();
    }
}

/// The parts of the holder record that say who holds the channel.
fn holder_of(env: &TestEnv, stem: &str) -> serde_json::Value {
    let record = env.holder_record(stem).expect("a holder record");
    let keys = ["pid", "command_pid", "started_at", "channel", "command"];
    keys.iter().map(|k| (k.to_string(), record[k].clone())).collect()
}

/// `opts` on a busy channel exit with `want` at once (or after the wait) and never run.
fn busy(opts: &[&str], want: i32, min: f64) {
    let env = TestEnv::new();
    let holder = env.hold("busy", "held", "go");
    let holder_before = holder_of(&env, "busy");
    let mut all = vec!["-c", "busy"];
    all.extend_from_slice(opts);
    let out = env.spawn(&all, &sh("started ran")).finish(PATIENCE);
    out.assert_code(want);
    assert_between(out.elapsed, secs(min), secs(min + 1.7));
    assert!(!env.exists("ran"), "the command ran although the channel was busy");
    assert_eq!(out.stdout(), "");
    assert_eq!(holder_of(&env, "busy"), holder_before, "the holder's record changed");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    // The caller that gave up is not in anybody's way.
    env.run(&["-c", "busy", "-n"], &["true"]).assert().success();
}

#[test]
fn no_wait_on_a_busy_channel_exits_75_at_once_and_runs_nothing() {
    busy(&["--no-wait"], 75, 0.0);
    busy(&["-n"], 75, 0.0);
}

#[test]
fn wait_deadline_on_a_busy_channel_exits_75_and_runs_nothing() {
    busy(&["--wait", "0.3"], 75, 0.2);
}

#[test]
fn conflict_exit_code_replaces_75() {
    busy(&["-n", "-E", "9"], 9, 0.0);
    busy(&["-w", "300ms", "--conflict-exit-code", "9"], 9, 0.2);
}

#[test]
fn no_wait_on_a_free_channel_runs() {
    let env = TestEnv::new();
    env.run(&["-c", "free", "-n"], &sh("echo ran")).assert().success().stdout("ran\n");
}

#[test]
fn usage_errors_exit_125() {
    let env = TestEnv::new();
    let cases: &[&[&str]] = &[
        &["run", "--", "true"],                             // no channel
        &["run", "-c", "x"],                                // no command
        &["run", "-c", "x", "--"],                          // no command after --
        &["run", "-c", "x", "--bogus", "--", "true"],       // unknown option
        &["run", "-c", "x", "-n", "-w", "1", "--", "true"], // --no-wait with --wait
        &["run", "-c", "x", "-E", "300", "--", "true"],     // busy code out of range
        &["frobnicate"],                                    // unknown subcommand
        &[],                                                // nothing at all
    ];
    for args in cases {
        env.command()
            .args(*args)
            .assert()
            .code(125)
            .stdout("")
            .stderr(predicate::str::starts_with("chan-run: "));
    }
    assert!(env.lock_files().is_empty(), "nothing ran");
}

#[test]
fn bad_durations_exit_125_naming_the_flag() {
    let env = TestEnv::new();
    for (flag, long) in [("-t", "--timeout"), ("-k", "--kill-after"), ("-w", "--wait")] {
        for bad in ["abc", "5x", "-1", "", "1e3", "1..2", "1h30"] {
            let attached = format!("{long}={bad}");
            let forms: Vec<Vec<&str>> = if bad.starts_with('-') {
                vec![vec![&attached]]
            } else {
                vec![vec![flag, bad], vec![&attached]]
            };
            for form in forms {
                let mut opts = vec!["-c", "x"];
                opts.extend(form);
                env.run(&opts, &sh("started ran"))
                    .assert()
                    .code(125)
                    .stderr(contains(long).and(contains("chan-run: ")));
                assert!(!env.exists("ran"), "{opts:?} was accepted");
            }
        }
    }
}

#[test]
fn negative_duration_after_a_short_flag_names_the_flag() {
    let env = TestEnv::new();
    for (flag, long) in [("-t", "--timeout"), ("-k", "--kill-after"), ("-w", "--wait")] {
        env.run(&["-c", "x", flag, "-1"], &["true"]).assert().code(125).stderr(contains(long));
    }
}

#[test]
fn huge_durations_never_crash() {
    // 10^19 s parses (it fits a Duration) but overflows a deadline. Either refusing it
    // (125) or taking it as no practical limit (the command's 0) is fine; a panic is not.
    let env = TestEnv::new();
    let huge = "10000000000000000000";
    for opts in [["-t", huge], ["-w", huge], ["-k", huge]] {
        let mut all = vec!["-c", "x"];
        all.extend(opts);
        let extra: &[&str] = if opts[0] == "-k" { &["-t", "0.1"] } else { &[] };
        all.extend(extra);
        let out = env.spawn(&all, &["true"]).finish(PATIENCE);
        assert!([0, 125].contains(&out.code()), "{opts:?}: exit {}, stderr {}", out.code(), out.stderr());
        assert!(!out.stderr().contains("panicked"), "{opts:?}: {}", out.stderr());
    }
}

#[test]
fn not_executable_exits_126() {
    let env = TestEnv::new();
    let script = env.path("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    let dir = env.t().to_str().unwrap().to_owned();
    for program in [script.to_str().unwrap(), &dir] {
        env.run(&["-c", "x"], &[program])
            .assert()
            .code(126)
            .stdout("")
            .stderr(contains("chan-run: ").and(contains(program)));
    }
}

#[test]
fn not_found_exits_127() {
    let env = TestEnv::new();
    for program in ["/nonexistent/command", "no-such-command-chan-run-test"] {
        env.run(&["-c", "x"], &[program])
            .assert()
            .code(127)
            .stdout("")
            .stderr(contains("chan-run: ").and(contains(program)));
    }
}

#[test]
fn command_killed_by_a_signal_exits_128_plus_n() {
    let env = TestEnv::new();
    for (sig, code) in
        [("KILL", 137), ("USR1", 138), ("SEGV", 139), ("TERM", 143), ("HUP", 129), ("INT", 130)]
    {
        env.run(&["-c", "x"], &sh(&format!("kill -{sig} $$"))).assert().code(code);
    }
}

#[test]
fn closed_stderr_does_not_change_the_exit_code() {
    // A caller that stopped reading stderr (or `2>&1 | head` that already ended) must
    // still get the exit status of the table, not a crash.
    let env = TestEnv::new();
    let cases: [(&[&str], &[&str], i32); 3] = [
        (&["-c", "x", "-t", "0.2"], &["sleep", "5"], 124),
        (&["-c", "x"], &["/nonexistent/command"], 127),
        (&["-c", ""], &["true"], 125),
    ];
    for (opts, command, want) in cases {
        let (read_end, write_end) = rustix::pipe::pipe().unwrap();
        drop(read_end);
        let mut cmd = env.std_run(opts, command);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(write_end));
        let out = Running::start_as_configured(cmd).finish(PATIENCE);
        assert_eq!(out.code(), want, "{opts:?} -- {command:?} with stderr closed");
    }
}

#[test]
fn started_with_stdin_stdout_and_stderr_closed_it_runs_the_command_as_usual() {
    // As a careless daemon may start it. chan-run must not take 0, 1 or 2 for its own
    // files or pipes: the command gets /dev/null as stdin and chan-run's output pipes.
    let env = TestEnv::new();
    let inner =
        env.std_run(&["-c", "x"], &sh(r#"fds=$(ls -l /proc/$$/fd/); echo "$fds" > "$T/fds"; echo out"#));
    let mut outer = std::process::Command::new("sh");
    outer.args(["-c", r#"exec "$@" <&- >&- 2>&-"#, "sh"]).arg(inner.get_program()).args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    Running::start(outer).finish(PATIENCE).assert_code(0);
    let fds = std::fs::read_to_string(env.path("fds")).unwrap();
    let target = |fd: &str| {
        let line = fds.lines().find(|l| l.contains(&format!(" {fd} -> "))).unwrap_or_else(|| panic!("{fds}"));
        line.rsplit(" -> ").next().unwrap().to_owned()
    };
    assert_eq!(target("0"), "/dev/null", "{fds}");
    assert!(target("1").starts_with("pipe:") && target("2").starts_with("pipe:"), "{fds}");
    assert_ne!(target("1"), target("2"), "{fds}");
}
