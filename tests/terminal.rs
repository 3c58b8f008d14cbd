//! chan-run on a terminal (SPEC `run` items 3 and 5), under a pseudo-terminal made by
//! `script(1)`: the command is handed the terminal (it can read it and change its
//! modes) and the terminal is taken back afterwards; the waiting line shows only there.

use crate::common::*;
use predicates::prelude::*;
use std::io::Write;

/// Runs the shell script `body` on a new pseudo-terminal (its stdin, stdout and stderr),
/// typing `input` into it; returns what the terminal showed, with `\r` removed. With
/// `hang_up` the input ends there (script(1) then types an end-of-file); otherwise the
/// keyboard stays silent and open until the script ends.
fn on_terminal(env: &TestEnv, body: &str, input: &[u8], hang_up: bool) -> Outcome {
    let mut run = start_on_terminal(env, body);
    let mut stdin = run.child().stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    let keyboard = (!hang_up).then_some(stdin);
    let mut out = run.finish(PATIENCE);
    drop(keyboard);
    out.stdout.retain(|&b| b != b'\r');
    out
}

/// Starts the shell script `body` on a new pseudo-terminal made by script(1); its
/// keyboard is the returned run's stdin.
fn start_on_terminal(env: &TestEnv, body: &str) -> Running {
    let script = env.path("on-terminal.sh");
    std::fs::write(&script, body).unwrap();
    let mut cmd = std::process::Command::new("script");
    env.apply(&mut cmd);
    cmd.env("SHELL", "/bin/sh").arg("-qec").arg(format!("sh '{}'", script.display())).arg("/dev/null");
    Running::start_with_stdin(cmd)
}

#[test]
fn command_can_read_the_terminal_and_change_its_modes() {
    let env = TestEnv::new();
    std::fs::write(
        env.path("cmd.sh"),
        r#"
        read line; echo "got:$line"
        set -- $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3,6)
        [ "$1" = "$2" ] && echo "foreground"
        stty raw -echo && stty sane && echo "stty ok"
        "#,
    )
    .unwrap();
    let out = on_terminal(&env, r#""$B" run -c tty -t 5 -- sh "$T/cmd.sh"; echo "rc=$?""#, b"hello\n", true);
    out.assert_code(0);
    let shown = out.stdout();
    for want in ["got:hello\n", "foreground\n", "stty ok\n", "rc=0\n"] {
        assert!(shown.contains(want), "missing {want:?} in what the terminal showed:\n{shown}");
    }
}

#[test]
fn terminal_is_taken_back_after_the_run() {
    let env = TestEnv::new();
    let body = r#"
    "$B" run -c tty -t 5 -- sh -c 'stty -echo; echo inside'; echo "rc=$?"
    set -- $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3,6)
    [ "$1" = "$2" ] && echo "shell is foreground again"
    stty echo && echo "shell can set modes"
    "#;
    let out = on_terminal(&env, body, b"", true);
    out.assert_code(0);
    let shown = out.stdout();
    for want in ["inside\n", "rc=0\n", "shell is foreground again\n", "shell can set modes\n"] {
        assert!(shown.contains(want), "missing {want:?} in what the terminal showed:\n{shown}");
    }
}

#[test]
fn terminal_is_taken_back_when_the_command_cannot_start() {
    let env = TestEnv::new();
    let body = r#"
    "$B" run -c tty -- /nonexistent/command; echo "rc=$?"
    set -- $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3,6)
    [ "$1" = "$2" ] && echo "shell is foreground again"
    stty echo && echo "shell can set modes"
    "#;
    let out = on_terminal(&env, body, b"", true);
    let shown = out.stdout();
    for want in ["rc=127\n", "shell is foreground again\n", "shell can set modes\n"] {
        assert!(shown.contains(want), "missing {want:?} in what the terminal showed:\n{shown}");
    }
}

#[test]
fn timeout_reaches_an_interactive_command() {
    let env = TestEnv::new();
    let body = r#"
    "$B" run -c tty -t 0.3 -k 0.3 -- sh -c 'read never'; echo "rc=$?"
    set -- $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3,6)
    [ "$1" = "$2" ] && echo "shell is foreground again"
    "#;
    let out = on_terminal(&env, body, b"", false);
    let shown = out.stdout();
    assert!(shown.contains("rc=124\n"), "{shown}");
    assert!(shown.contains("shell is foreground again\n"), "{shown}");
    assert!(out.elapsed < secs(3.0), "took {:?}", out.elapsed);
}

#[test]
fn waiting_line_on_a_terminal_names_the_holder_and_the_place() {
    let env = TestEnv::new();
    let holder = env.hold("busy", "held", "go");
    let queued = env.spawn(&["-c", "busy"], &["true"]);
    env.wait_for_tickets("busy", 1);

    let out = on_terminal(&env, r#""$B" run -c busy -w 0.3 -- touch "$T/ran"; echo "rc=$?""#, b"", true);
    let shown = out.stdout();
    let line = format!(
        r"(?m)^chan-run: waiting for channel busy \(held by pid {} for \d+(ms|s); 1 ahead\)$",
        holder.pid()
    );
    assert!(predicate::str::is_match(line.as_str()).unwrap().eval(&shown), "no waiting line:\n{shown}");
    assert_eq!(shown.matches("waiting for channel").count(), 1, "{shown}");
    assert!(shown.contains("rc=75\n"), "{shown}");
    assert!(!env.exists("ran"));

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    queued.finish(PATIENCE).assert_code(0);
}

#[test]
fn waiting_line_on_a_terminal_names_the_pool_and_the_place() {
    let env = TestEnv::new();
    let holder = env.spawn(&["-c", "h", "--pool", "p:1"], &sh("started held; gate go"));
    env.wait_for_file("held");
    let queued = env.spawn(&["-c", "q", "--pool", "p:1"], &["true"]);
    wait_until("a caller to queue for the seat", || {
        list(&env.state().join("pools").join("p")).iter().any(|n| n.bytes().all(|b| b.is_ascii_digit()))
    });

    let out =
        on_terminal(&env, r#""$B" run -c x --pool p:1 -w 0.3 -- touch "$T/ran"; echo "rc=$?""#, b"", true);
    let shown = out.stdout();
    assert!(
        shown
            .lines()
            .any(|l| l.trim_end() == "chan-run: waiting for a seat in pool p (1 of 1 seats held; 1 ahead)"),
        "no waiting line:\n{shown}"
    );
    assert!(!shown.contains("waiting for channel"), "{shown}");
    assert!(shown.contains("rc=75"), "{shown}");
    assert!(!env.exists("ran"));

    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    queued.finish(PATIENCE).assert_code(0);
}

#[test]
fn no_waiting_line_when_stderr_is_not_a_terminal_or_with_quiet() {
    let env = TestEnv::new();
    let holder = env.hold("busy", "held", "go");
    // stderr piped, though stdin and stdout are the terminal.
    let out = on_terminal(&env, r#""$B" run -c busy -w 0.3 -- true 2>"$T/err"; echo "rc=$?""#, b"", true);
    assert!(out.stdout().contains("rc=75\n"), "{}", out.stdout());
    assert_eq!(env.read("err"), "", "chan-run wrote to a stderr that is not a terminal");
    // stderr a terminal, but --quiet.
    let out = on_terminal(&env, r#""$B" run -c busy -q -w 0.3 -- true; echo "rc=$?""#, b"", true);
    assert_eq!(out.stdout(), "rc=75\n");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
}

#[test]
fn background_run_leaves_the_terminal_to_the_shell() {
    // Started with `&` under job control, chan-run is not in the terminal's foreground
    // group and must not take the terminal from the shell.
    let env = TestEnv::new();
    let body = r#"
    set -m
    { "$B" run -c tty -t 5 -- sh -c 'echo ran'; echo "rc=$?"; } &
    wait
    set -- $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3,6)
    [ "$1" = "$2" ] && echo "shell kept the terminal"
    "#;
    let out = on_terminal(&env, body, b"", true);
    let shown = out.stdout();
    for want in ["ran\n", "rc=0\n", "shell kept the terminal\n"] {
        assert!(shown.contains(want), "missing {want:?} in what the terminal showed:\n{shown}");
    }
}

#[test]
fn ctrl_c_on_the_terminal_stops_the_command() {
    let env = TestEnv::new();
    let mut run = start_on_terminal(
        &env,
        r#""$B" run -c tty -t 10 -- sh -c 'echo $$ > "$T/pid"; : > "$T/in"; exec sleep 30'; echo "rc=$?""#,
    );
    let mut keyboard = run.child().stdin.take().unwrap();
    env.wait_for_file("in");
    let pid = env.read_pid("pid");
    let _cleanup = KillOnDrop(vec![pid]);
    keyboard.write_all(b"\x03").unwrap();
    keyboard.flush().unwrap();
    let out = run.finish(PATIENCE);
    drop(keyboard);
    assert!(out.stdout().contains("rc=130"), "{:?}", out.stdout());
    assert!(!is_alive(pid));
}

/// The fields `pgrp` and `tpgid` of `/proc/$$/stat` in a shell: equal when its process
/// group is the terminal's foreground group.
const FOREGROUND: &str = r#"set -- $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3,6); [ "$1" = "$2" ]"#;

/// A shell with job control (`set -m`) on a new terminal runs `run_opts` on a command
/// that writes its pid to `$T/pid`, creates `$T/in` and waits for a writer to open the
/// FIFO `$T/go` (see [`open_fifo_gate`]); the test types ^Z.  The command forks nothing
/// while it waits: a ^Z that stops a `vfork` child before its `exec` would leave the
/// shell stuck in the kernel, never stopped, with or without chan-run. The shell, once it has the prompt back, creates `$T/back`, waits for `$T/resume`
/// and runs `then` (`fg` or `bg; wait`). Returns the keyboard (kept open), the run, and
/// the pids of chan-run and its command.
fn stopped_with_ctrl_z(
    env: &TestEnv,
    run_opts: &str,
    then: &str,
) -> (std::process::ChildStdin, Running, u32, u32) {
    let command = format!(
        r#"echo $$ > "$T/pid"; : > "$T/in"; read go < "$T/go"; {FOREGROUND} && echo "command has the terminal"; echo done"#
    );
    std::fs::write(env.path("cmd.sh"), command).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(env.path("go")).status().unwrap().success());
    let body = format!(
        r#"set -m
        "$B" run -c tty {run_opts} -- sh "$T/cmd.sh"
        echo "stopped rc=$?"
        {FOREGROUND} && echo "shell has the terminal"
        : > "$T/back"
        while [ ! -e "$T/resume" ]; do sleep 0.01; done
        {then}
        echo "rc=$?"
        {FOREGROUND} && echo "shell has the terminal at the end"
        "#
    );
    let mut run = start_on_terminal(env, &body);
    let mut keyboard = run.child().stdin.take().unwrap();
    env.wait_for_file("in");
    let command = env.read_pid("pid");
    let chan_run = proc_stat(command).1;
    keyboard.write_all(b"\x1a").unwrap();
    keyboard.flush().unwrap();
    (keyboard, run, chan_run, command)
}

/// Lets the command past `read go < "$T/go"`: opens the FIFO for writing (as soon as the
/// command has it open for reading) and closes it, an end-of-file for `read`.
fn open_fifo_gate(env: &TestEnv) {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(env.path("go"));
    wait_until("the command to open $T/go", || open().is_ok());
}

/// Field 3 (state) and 4 (parent) of `/proc/PID/stat`.
fn proc_stat(pid: u32) -> (char, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let mut fields = stat[stat.rfind(')').map_or(0, |i| i + 2)..].split_whitespace();
    let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
    (state, fields.next().and_then(|p| p.parse().ok()).unwrap_or(0))
}

#[test]
fn ctrl_z_stops_the_run_and_fg_hands_the_terminal_back_to_the_command() {
    let env = TestEnv::new();
    let (keyboard, run, chan_run, command) = stopped_with_ctrl_z(&env, "-t 30", "fg");
    let _cleanup = KillOnDrop(vec![command, chan_run]);
    // The shell has its prompt back, with chan-run and its command both stopped.
    env.wait_for_file("back");
    assert_eq!(proc_stat(chan_run).0, 'T', "chan-run is not stopped");
    assert_eq!(proc_stat(command).0, 'T', "the command is not stopped");
    env.open_gate("resume");
    open_fifo_gate(&env);
    let mut out = run.finish(PATIENCE);
    drop(keyboard);
    out.stdout.retain(|&b| b != b'\r');
    let shown = out.stdout();
    for want in [
        "shell has the terminal\n",
        "command has the terminal\n",
        "done\n",
        "rc=0\n",
        "shell has the terminal at the end\n",
    ] {
        assert!(shown.contains(want), "missing {want:?} in what the terminal showed:\n{shown}");
    }
}

#[test]
fn a_stopped_spell_does_not_count_toward_the_timeout() {
    // Stopped for 4 s against a 3 s timeout, and then left to finish: not timed out.
    let env = TestEnv::new();
    let (keyboard, run, chan_run, command) = stopped_with_ctrl_z(&env, "-t 3", "fg");
    let _cleanup = KillOnDrop(vec![command, chan_run]);
    env.wait_for_file("back");
    std::thread::sleep(secs(4.0));
    env.open_gate("resume");
    open_fifo_gate(&env);
    let mut out = run.finish(PATIENCE);
    drop(keyboard);
    out.stdout.retain(|&b| b != b'\r');
    let shown = out.stdout();
    assert!(shown.contains("done\n") && shown.contains("rc=0\n"), "{shown}");
}

#[test]
fn bg_after_ctrl_z_leaves_the_terminal_to_the_shell() {
    let env = TestEnv::new();
    let (keyboard, run, chan_run, command) = stopped_with_ctrl_z(&env, "-t 30", r#"bg; : > "$T/go"; wait"#);
    let _cleanup = KillOnDrop(vec![command, chan_run]);
    env.wait_for_file("back");
    env.open_gate("resume");
    let mut out = run.finish(PATIENCE);
    drop(keyboard);
    out.stdout.retain(|&b| b != b'\r');
    let shown = out.stdout();
    for want in ["done\n", "rc=0\n", "shell has the terminal at the end\n"] {
        assert!(shown.contains(want), "missing {want:?} in what the terminal showed:\n{shown}");
    }
    assert!(!shown.contains("command has the terminal"), "{shown}");
}
