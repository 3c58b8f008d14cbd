//! chan-run's own resource limits (issue 11, item 5): out of file descriptors
//! (`ulimit -n`) or of processes and threads (`ulimit -u`), chan-run either exits 125
//! before the command runs, saying so, with the channel's record untouched, or runs the
//! command and passes on every byte of its output. Never 126/127 (those are the
//! command's), never a panic, never lost output.

use crate::common::*;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One run of `chan-run run -c CHANNEL --fresh-after 1 -- sh -c SCRIPT` under `limit`
/// (`ulimit -n 12`), by `sh` so that the limit is in place before chan-run starts.
fn limited(env: &TestEnv, limit: &str, channel: &str, script: &str) -> Outcome {
    let mut cmd = Command::new("sh");
    env.apply(&mut cmd);
    cmd.args([
        "-c",
        &format!(r#"{limit} && exec "$B" "$@""#),
        "sh",
        "run",
        "-c",
        channel,
        "--fresh-after",
        "1",
    ])
    .args(["--", "sh", "-c", script]);
    Running::start(cmd).finish(PATIENCE)
}

/// What a run under a limit may do: exit 125 with a message and no output, or run the
/// command and pass all of its output on. Returns whether it ran.
#[track_caller]
fn ran_whole_or_not_at_all(out: &Outcome, want_stdout: &str, what: &str) -> bool {
    match out.code() {
        0 => {
            assert_eq!(out.stdout(), want_stdout, "{what}: output lost; stderr: {}", out.stderr());
            true
        }
        125 => {
            assert_eq!(out.stdout(), "", "{what}: exit 125 after the command ran");
            assert!(out.stderr().starts_with("chan-run: "), "{what}: {:?}", out.stderr());
            false
        }
        code => panic!("{what}: exit {code}; stderr: {}", out.stderr()),
    }
}

#[test]
fn out_of_file_descriptors_is_chan_runs_failure_and_keeps_the_session() {
    let env = TestEnv::new();
    env.run(&["-c", "fd"], &sh(r#"echo '{"session_id":"good"}'"#)).assert().success();
    let (mut ran, mut recorded, mut at_spawn) = (0, 0, 0);
    // Every limit from too few to start at all to enough for a whole run: one of them
    // leaves the store its descriptors but not the command its pipes.
    for n in 4..=48 {
        let out = limited(&env, &format!("ulimit -n {n}"), "fd", "echo hi");
        if ran_whole_or_not_at_all(&out, "hi\n", &format!("ulimit -n {n}")) {
            ran += 1;
            recorded += usize::from(!out.stderr().contains("not recorded"));
        } else if out.stderr().contains("cannot start 'sh'") {
            at_spawn += 1;
            let message = out.stderr();
            assert!(
                message.contains("out of file descriptors") && message.contains("raise `ulimit -n`"),
                "{message}"
            );
        }
    }
    assert!(ran > 0 && at_spawn > 0, "premise: some limits stop the spawn ({at_spawn}), some run ({ran})");
    let state = state_json(&env).unwrap();
    let record = &state["channels"]["fd"];
    assert_eq!(record["session_id"], "good", "a run that never started dropped the session: {record}");
    assert_eq!(record["failures_in_a_row"], 0, "{record}");
    assert_eq!(runs_in(Some(&state), "fd"), 1 + recorded as u64, "{record}");
}

/// A user of its own for one test, so that `ulimit -u` counts only the test's processes
/// (root ignores `RLIMIT_NPROC`); removed when dropped. `None`, with a notice, when the
/// test does not run as root.
struct ThrowawayUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl ThrowawayUser {
    fn create() -> Option<ThrowawayUser> {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: a throw-away user for `ulimit -u` needs root");
            return None;
        }
        let name = format!("chrun{}x{}", std::process::id(), MADE.fetch_add(1, Ordering::SeqCst));
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", &name])
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: useradd could not create a throw-away user");
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        Some(ThrowawayUser { name, uid, gid })
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A folder the throw-away user can reach, with a copy of chan-run and a home of its own
/// (its state directory and scratch files).
struct NprocPlace {
    user: ThrowawayUser,
    dir: tempfile::TempDir,
}

impl NprocPlace {
    fn new(user: ThrowawayUser) -> NprocPlace {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("chan-run-nproc.").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(&*BIN, dir.path().join("chan-run")).unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        std::os::unix::fs::chown(dir.path().join("home"), Some(user.uid), Some(user.gid)).unwrap();
        NprocPlace { user, dir }
    }

    fn home(&self) -> std::path::PathBuf {
        self.dir.path().join("home")
    }

    /// `chan-run run ARGS` as the user, under `ulimit -u n` (`prlimit`, then `setpriv`).
    fn run(&self, n: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new("prlimit");
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("T", self.home())
            .env("CHAN_RUN_STATE_DIR", self.home().join("state"))
            .args([&format!("--nproc={n}:{n}"), "setpriv"])
            .args(["--reuid", &self.user.uid.to_string(), "--regid", &self.user.gid.to_string()])
            .arg("--clear-groups")
            .arg(self.dir.path().join("chan-run"))
            .arg("run")
            .args(args);
        cmd
    }
}

#[test]
fn at_the_process_limit_nothing_runs_or_all_output_passes_through() {
    let Some(user) = ThrowawayUser::create() else { return };
    let place = NprocPlace::new(user);
    // Builtins only: the command forks nothing, so only chan-run's own needs count.
    let lines = 3000;
    let script = format!(
        r#"i=0; while [ $i -lt {lines} ]; do echo "line $i"; i=$((i+1)); done; echo '{{"session_id":"s2"}}'"#
    );
    let mut want: String = (0..lines).map(|i| format!("line {i}\n")).collect();
    want.push_str("{\"session_id\":\"s2\"}\n");
    let (mut main_thread_copies, mut refusals) = (0, Vec::new());
    // `ulimit -u 1`: chan-run cannot fork the command; 2: it can, but cannot start its
    // output thread (as the test's other uid, the limit holds: root's is not enforced).
    for n in 1..=4 {
        let out = Running::start(place.run(n, &["-c", "nproc", "--", "sh", "-c", &script])).finish(PATIENCE);
        let what = format!("ulimit -u {n}");
        if ran_whole_or_not_at_all(&out, &want, &what) {
            main_thread_copies += usize::from(out.stderr().contains("copying on the main thread"));
        } else {
            refusals.push(out.stderr());
        }
    }
    assert!(main_thread_copies > 0, "premise: at some limit the output thread could not start");
    for message in refusals {
        assert!(message.contains("cannot make a process") && message.contains("ulimit -u"), "{message}");
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(place.home().join("state/active.json")).unwrap()).unwrap();
    assert_eq!(state["channels"]["nproc"]["session_id"], "s2", "the tail kept on the main thread");
}

#[test]
fn copying_on_the_main_thread_a_reader_that_stops_reading_never_holds_off_the_timeout() {
    let Some(user) = ThrowawayUser::create() else { return };
    let place = NprocPlace::new(user);
    let flood = r#"echo $$ > "$T/pid"; while :; do echo flood; done"#;
    let cmd = place.run(2, &["-c", "flood", "-t", "0.5", "-k", "0.5", "--", "sh", "-c", flood]);
    // Its stdout is a pipe the test never reads: full at once.
    let mut run = Running::start_streaming(cmd);
    let stdout = run.child().stdout.take();
    let pid_file = place.home().join("pid");
    wait_until("the command's pid", || std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')));
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let _cleanup = KillOnDrop(vec![pid]);
    let started = std::time::Instant::now();
    wait_until("the timeout to stop the command", || !is_alive(pid));
    assert!(started.elapsed() < secs(2.5), "the command was stopped after {:?}", started.elapsed());
    // What chan-run read it still owes the reader; once the reader is gone, it is done.
    drop(stdout);
    let out = run.finish(PATIENCE);
    out.assert_code(124);
    assert!(out.stderr().contains("copying on the main thread"), "{}", out.stderr());
}
