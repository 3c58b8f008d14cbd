//! Pass-through of stdin, stdout and stderr (SPEC `run` item 6): byte-exact, live,
//! bounded in memory, closing the caller's pipes when chan-run ends, and a closed
//! stdout reaching the command as it would without chan-run.

use crate::common::*;
use std::io::Read;

/// `len` bytes cycling through every byte value, in an order that is not a plain ramp.
fn all_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8).collect()
}

#[test]
fn binary_stdout_passes_through_byte_exact() {
    let env = TestEnv::new();
    let data = all_bytes(5 * 1024 * 1024);
    std::fs::write(env.path("data"), &data).unwrap();
    let out =
        env.spawn(&["-c", "io"], &sh(r#"head -c 5242880 "$T/data"; printf '\0\377\n'"#)).finish(PATIENCE);
    out.assert_code(0);
    assert_eq!(out.stderr(), "");
    assert_eq!(out.stdout.len(), data.len() + 3);
    assert!(out.stdout[..data.len()] == data[..], "stdout differs from the command's output");
    assert_eq!(&out.stdout[data.len()..], b"\0\xff\n");
}

#[test]
fn slow_reader_gets_all_of_the_output_of_a_command_that_exited() {
    // The command writes 3 MB and exits. The reader takes its time: it reads until the
    // command is gone, then pauses as a busy consumer may, then reads on. All 3 MB
    // must arrive; what chan-run may drop is only what descendants write after the
    // command's exit, never what the command itself wrote.
    let env = TestEnv::new();
    let data = all_bytes(3_000_000);
    std::fs::write(env.path("data"), &data).unwrap();
    let cmd = env.std_run(&["-c", "io"], &sh(r#"echo $$ > "$T/pid"; cat "$T/data""#));
    let mut run = Running::start_streaming(cmd);
    let mut stdout = run.child().stdout.take().unwrap();
    let pid = env.read_pid("pid");
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while is_alive(pid) {
        let n = stdout.read(&mut chunk).unwrap();
        if n == 0 {
            // The command may have ended since the loop's check; it must have by now.
            assert!(!is_alive(pid), "stdout ended while the command was still writing");
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    // The command is gone; a pause of the reader must not cost any of its output.
    let paused = std::time::Instant::now();
    while paused.elapsed() < secs(1.5) && run.is_running() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    stdout.read_to_end(&mut got).unwrap();
    let out = run.finish(PATIENCE);
    out.assert_code(0);
    assert_eq!(got.len(), data.len(), "bytes received of the command's output");
    assert!(got == data);
}

#[test]
fn binary_stdout_to_a_file_passes_through_byte_exact() {
    let env = TestEnv::new();
    let data = all_bytes(3 * 1024 * 1024);
    std::fs::write(env.path("data"), &data).unwrap();
    let sink = std::fs::File::create(env.path("sink")).unwrap();
    let mut cmd = env.std_run(&["-c", "io"], &sh(r#"cat "$T/data""#));
    cmd.stdin(std::process::Stdio::null()).stdout(sink).stderr(std::process::Stdio::piped());
    let out = Running::start_as_configured(cmd).finish(PATIENCE);
    out.assert_code(0);
    assert_eq!(out.stderr(), "");
    assert!(std::fs::read(env.path("sink")).unwrap() == data, "the file differs from the command's output");
}

#[test]
fn stderr_passes_through_apart_from_stdout() {
    let env = TestEnv::new();
    let command = sh(r#"printf 'to out\n'; printf 'to err\0\377\n' >&2; printf 'out again'; exit 4"#);
    let out = env.spawn(&["-c", "io"], &command).finish(PATIENCE);
    out.assert_code(4);
    assert_eq!(out.stdout, b"to out\nout again");
    assert_eq!(out.stderr, b"to err\0\xff\n");
}

#[test]
fn arguments_reach_the_command_unchanged() {
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::new();
    let args = [&b"\xff\xfe not UTF-8"[..], b"", b"  spaces  ", b"--help", b"-c", "ünï".as_bytes()];
    let mut command = vec![std::ffi::OsStr::new("printf"), std::ffi::OsStr::new("[%s]")];
    command.extend(args.iter().map(|a| std::ffi::OsStr::from_bytes(a)));
    let want: Vec<u8> = args.iter().flat_map(|a| [&b"["[..], a, b"]"].concat()).collect();
    env.run(&["-c", "io"], &command).assert().success().stdout(want);
}

#[test]
fn stdin_passes_through() {
    let env = TestEnv::new();
    let data = all_bytes(1024 * 1024 + 7);
    env.run(&["-c", "io"], &["cat"]).write_stdin(data.clone()).assert().success().stdout(data);
}

#[test]
fn output_is_passed_on_live() {
    // The command prints a line and then waits for the test to have read it: output
    // held back until the command exits would leave the gate shut (exit 98).
    let env = TestEnv::new();
    let cmd = env.std_run(&["-c", "io"], &sh("echo first; gate seen; echo second"));
    let mut run = Running::start_streaming(cmd);
    let mut stdout = run.child().stdout.take().unwrap();
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"first\n");
    env.open_gate("seen");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "second\n");
    run.finish(PATIENCE).assert_code(0);
}

#[test]
fn detached_descendant_holding_stdout_does_not_keep_the_caller_waiting() {
    let env = TestEnv::new();
    let command = sh(r#"
    setsid sh -c 'echo $$ > "$T/descendant"; exec sleep 30' &
    echo done
    "#);
    let out = env.spawn(&["-c", "io"], &command).finish(PATIENCE);
    let descendant = env.read_pid("descendant");
    let _cleanup = KillOnDrop(vec![descendant]);
    out.assert_code(0);
    assert_eq!(out.stdout(), "done\n");
    // `finish` also checked that the caller's stdout and stderr reached end-of-file.
    assert!(out.elapsed < secs(1.5), "chan-run took {:?} after its command exited", out.elapsed);
    assert!(is_alive(descendant), "test premise: the descendant still holds the command's stdout");
}

#[test]
fn descendant_in_the_group_holding_stdout_does_not_keep_the_caller_waiting() {
    // A command that exits on its own leaves its group alone, but chan-run still ends.
    let env = TestEnv::new();
    let command = sh(r#"sh -c 'echo $$ > "$T/descendant"; exec sleep 30' & echo done"#);
    let out = env.spawn(&["-c", "io"], &command).finish(PATIENCE);
    let descendant = env.read_pid("descendant");
    let _cleanup = KillOnDrop(vec![descendant]);
    out.assert_code(0);
    assert_eq!(out.stdout(), "done\n");
    assert!(out.elapsed < secs(1.5), "chan-run took {:?} after its command exited", out.elapsed);
}

/// Runs `command`, reads 10 bytes of its output through chan-run and closes the pipe,
/// as `chan-run ... | head -c 10` does.
fn read_ten_then_close(command: &[String]) -> Outcome {
    let env = TestEnv::new();
    let cmd = env.std_run(&["-c", "io"], command);
    let mut run = Running::start_streaming(cmd);
    let mut stdout = run.child().stdout.take().unwrap();
    let mut ten = [0u8; 10];
    stdout.read_exact(&mut ten).unwrap();
    assert_eq!(&ten, b"y\ny\ny\ny\ny\n");
    drop(stdout);
    let closed = std::time::Instant::now();
    let out = run.finish(PATIENCE);
    assert!(
        closed.elapsed() < secs(2.0),
        "chan-run took {:?} to end after its reader left",
        closed.elapsed()
    );
    out
}

#[test]
fn closed_stdout_ends_the_command_with_sigpipe() {
    let out = read_ten_then_close(&["yes".to_owned()]);
    out.assert_code(128 + 13);
}

#[test]
fn closed_stdout_gives_epipe_to_a_command_that_ignores_sigpipe() {
    let out = read_ten_then_close(&sh("trap '' PIPE; exec yes"));
    out.assert_code(1);
    assert!(out.stderr().contains("Broken pipe"), "stderr: {:?}", out.stderr());
}

#[test]
fn shell_pipeline_into_head_ends_promptly() {
    let env = TestEnv::new();
    let mut cmd = std::process::Command::new("bash");
    env.apply(&mut cmd);
    cmd.arg("-c").arg(r#""$B" run -c io -- yes | head -c 10; echo " status=${PIPESTATUS[0]}""#);
    let out = Running::start(cmd).finish(PATIENCE);
    out.assert_code(0);
    assert_eq!(out.stdout(), "y\ny\ny\ny\ny\n status=141\n");
    assert!(out.elapsed < secs(2.0), "took {:?}", out.elapsed);
}

#[test]
fn memory_stays_bounded_however_much_the_command_prints() {
    let env = TestEnv::new();
    const MIB: usize = 1024 * 1024;
    let cmd = env.std_run(&["-c", "io"], &sh("head -c 100000000 /dev/zero; gate measured"));
    let mut run = Running::start_streaming(cmd);
    let pid = run.pid();
    let mut stdout = run.child().stdout.take().unwrap();
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    while total < 100_000_000 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "stdout ended early");
        total += n;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    env.open_gate("measured");
    drop(stdout);
    run.finish(PATIENCE).assert_code(0);
    assert!(peak_kib < 40 * 1024, "chan-run's peak RSS was {peak_kib} KiB after passing on 100 MB");
}
