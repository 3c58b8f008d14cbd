//! The test environment: a private state directory and scratch folder per test, the
//! `chan-run` binary with an environment that can never reach the real user's state,
//! background runs that are always cleaned up, and waits that synchronise on markers
//! (files the commands create, queue tickets) with a bound instead of sleeping.
//!
//! Commands are usually `sh -c` scripts built with [`sh`], which prepends a few helpers:
//! `started NAME` creates `$T/NAME`; `gate NAME` blocks until `$T/NAME` exists (bounded,
//! exit 98 when it never comes); `alive PID` says whether a process is alive (not a zombie).
//! `$T` is the test's scratch folder and `$B` the chan-run binary.

pub mod pg;
pub mod state;

use rustix::process::{Pid, Signal};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The chan-run under test: this build's, or `CHAN_RUN_TEST_BIN` (to show that a test
/// fails on an older build).
pub static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("CHAN_RUN_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_chan-run").to_owned())
});

/// The longest any single wait of the suite may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

const PRELUDE: &str = r#"
started() { : > "$T/$1"; }
gate() { _i=0; while [ ! -e "$T/$1" ]; do _i=$((_i+1)); [ $_i -le 2000 ] || exit 98; sleep 0.01; done; }
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }
"#;

/// `sh -c SCRIPT` with the helpers above defined.
pub fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), format!("{PRELUDE}{script}")]
}

/// Environment variables of chan-run's that must not leak in from the caller.
const CHAN_RUN_VARS: [&str; 9] = [
    "CHAN_RUN_CHANNEL",
    "CHAN_RUN_HELD",
    "CHAN_RUN_POOL",
    "CHAN_RUN_SEATS",
    "CHAN_RUN_STATE_DIR",
    "CHAN_RUN_STORE",
    "CHAN_RUN_SESSION_ID",
    "CHAN_RUN_QUIET",
    "CHAN_RUN_PROFILE",
];

pub struct TestEnv {
    root: TempDir,
    state: PathBuf,
    scratch: PathBuf,
    /// `CHAN_RUN_STORE` for every chan-run of the test (the PostgreSQL store).
    store: Option<String>,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let root = tempfile::Builder::new().prefix("chan-run-test.").tempdir().expect("temp dir");
        let state = root.path().join("state");
        let scratch = root.path().join("t");
        std::fs::create_dir(&scratch).unwrap();
        // HOME and XDG dirs point into the temp dir too, so even a run that ignored
        // the state directory it was given could not touch the real user's files.
        std::fs::create_dir(root.path().join("home")).unwrap();
        TestEnv { root, state, scratch, store: None }
    }

    /// A test environment whose chan-runs use the store at `url` (`CHAN_RUN_STORE`).
    pub fn with_store(url: &str) -> TestEnv {
        TestEnv { store: Some(url.to_owned()), ..TestEnv::new() }
    }

    /// The state directory (`CHAN_RUN_STATE_DIR`); chan-run creates it on first use.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The folder holding the state directory and the scratch folder.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The scratch folder, `$T` in commands.
    pub fn t(&self) -> &Path {
        &self.scratch
    }

    /// A path in the scratch folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.path(name).exists()
    }

    /// Creates `$T/NAME`: opens a `gate NAME` in a command.
    pub fn open_gate(&self, name: &str) {
        std::fs::write(self.path(name), b"").unwrap();
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_else(|e| panic!("reading $T/{name}: {e}"))
    }

    /// The pid a command wrote into `$T/NAME` (`echo $$ > "$T/NAME"`).
    pub fn read_pid(&self, name: &str) -> u32 {
        self.wait_for_file(name);
        wait_until(&format!("a pid in $T/{name}"), || self.read(name).trim().parse::<u32>().is_ok());
        self.read(name).trim().parse().unwrap()
    }

    /// Blocks (bounded) until a command has created `$T/NAME`.
    pub fn wait_for_file(&self, name: &str) {
        wait_until(&format!("$T/{name} to appear"), || self.exists(name));
    }

    /// Applies the environment every chan-run of this test gets.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        for var in CHAN_RUN_VARS {
            cmd.env_remove(var);
        }
        cmd.env("CHAN_RUN_STATE_DIR", &self.state)
            .env("HOME", self.root().join("home"))
            .env("XDG_STATE_HOME", self.root().join("home/.local/state"))
            .env("XDG_DATA_HOME", self.root().join("home/.local/share"))
            .env("T", &self.scratch)
            .env("B", &*BIN)
            .env("LC_ALL", "C");
        if let Some(url) = &self.store {
            cmd.env("CHAN_RUN_STORE", url);
        }
    }

    /// `chan-run` with no arguments yet, as a std command.
    pub fn std_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&*BIN);
        self.apply(&mut cmd);
        cmd
    }

    /// `chan-run run OPTS -- COMMAND...`, as a std command.
    pub fn std_run<S: AsRef<OsStr>>(&self, opts: &[&str], command: &[S]) -> std::process::Command {
        let mut cmd = self.std_command();
        cmd.arg("run").args(opts).arg("--").args(command);
        cmd
    }

    /// `chan-run ARGS...` for assert_cmd, bounded so a hang fails the test.
    pub fn command(&self) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::from_std(self.std_command());
        cmd.timeout(PATIENCE);
        cmd
    }

    /// `chan-run run OPTS -- COMMAND...` for assert_cmd, bounded.
    pub fn run<S: AsRef<OsStr>>(&self, opts: &[&str], command: &[S]) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::from_std(self.std_run(opts, command));
        cmd.timeout(PATIENCE);
        cmd
    }

    /// Starts `chan-run run OPTS -- COMMAND...` in the background; stdin is empty,
    /// stdout and stderr are collected.
    pub fn spawn<S: AsRef<OsStr>>(&self, opts: &[&str], command: &[S]) -> Running {
        Running::start(self.std_run(opts, command))
    }

    /// Starts a holder of `channel` whose command creates `$T/<marker>` and then waits
    /// for `gate`; returns once the command runs (so the channel is held).
    pub fn hold(&self, channel: &str, marker: &str, gate: &str) -> Running {
        let run = self.spawn(&["-c", channel], &sh(&format!("started {marker}; gate {gate}")));
        self.wait_for_file(marker);
        run
    }

    pub fn locks(&self) -> PathBuf {
        self.state.join("locks")
    }

    pub fn lock_file(&self, stem: &str) -> PathBuf {
        self.locks().join(format!("{stem}.lock"))
    }

    /// The holder record in `stem`'s lock file (its one JSON line), if there is one.
    pub fn holder_record(&self, stem: &str) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.lock_file(stem)).unwrap();
        let line = text.lines().find(|l| l.starts_with('{'))?;
        Some(serde_json::from_str(line).expect("the holder record is one line of JSON"))
    }

    /// Asserts that `stem`'s lock file holds only its header lines (the channel's name,
    /// then where its record sits in active.json): no holder record.
    pub fn assert_released(&self, stem: &str, channel: &str) {
        let text = std::fs::read_to_string(self.lock_file(stem)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(text.ends_with('\n') && lines.len() == 2, "a released lock file holds two lines: {text:?}");
        assert_eq!(lines[0], channel, "{text:?}");
        assert!(lines[1].starts_with("at "), "{text:?}");
    }

    /// Entries of the `locks/` folder, sorted.
    pub fn lock_files(&self) -> Vec<String> {
        list(&self.locks())
    }

    /// Callers waiting in the queue of the channel whose file stem is `stem`.
    pub fn tickets(&self, stem: &str) -> usize {
        list(&self.state.join("queue").join(stem)).len()
    }

    /// The pids written in `stem`'s queue tickets (registered callers, live or not yet
    /// cleaned up), in queue order.
    pub fn queued_pids(&self, stem: &str) -> Vec<u32> {
        let dir = self.state.join("queue").join(stem);
        list(&dir)
            .iter()
            .filter_map(|name| std::fs::read_to_string(dir.join(name)).ok())
            .filter_map(|text| text.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Starts caller `i` of `channel` (whose queue folder is `stem`), whose command
    /// appends `i` to `$T/order`, and returns once it is registered in the queue (or
    /// has already ended), so that registration order is start order.
    pub fn enqueue(&self, channel: &str, stem: &str, i: usize, opts: &[&str]) -> Running {
        let mut all = vec!["-c", channel];
        all.extend_from_slice(opts);
        let mut run = self.spawn(&all, &sh(&format!(r#"echo {i} >> "$T/order""#)));
        let pid = run.pid();
        wait_until(&format!("caller {i} to register"), || {
            self.queued_pids(stem).contains(&pid) || !run.is_running()
        });
        run
    }

    /// The callers that ran, in the order they ran: the numbers their commands appended
    /// to `$T/order` (see [`TestEnv::enqueue`]).
    pub fn order(&self) -> Vec<usize> {
        if !self.exists("order") {
            return Vec::new();
        }
        self.read("order").lines().map(|l| l.parse().unwrap()).collect()
    }

    /// Blocks (bounded) until `n` callers wait in `stem`'s queue.
    pub fn wait_for_tickets(&self, stem: &str, n: usize) {
        wait_until(&format!("{n} callers queued on {stem}"), || self.tickets(stem) == n);
    }
}

/// File names in `dir`, sorted (empty if it does not exist).
pub fn list(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> =
        entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Polls `done` every few ms until it holds; fails the test after [`PATIENCE`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// Whether `pid` is a live process (present and not a zombie).
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    !matches!(after_name.split_whitespace().next(), Some("Z" | "X" | "x") | None)
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
pub fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    after_name.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Waits (bounded) until `pid` is gone or a zombie.
pub fn wait_dead(pid: u32) {
    wait_until(&format!("pid {pid} to die"), || !is_alive(pid));
}

pub fn send(pid: u32, sig: Signal) {
    let _ = rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), sig);
}

/// SIGKILLs `pid` if it is still alive (clean-up of a process a test left running).
pub fn kill(pid: u32) {
    if is_alive(pid) {
        send(pid, Signal::KILL);
    }
}

/// Kills the listed processes when dropped, so a failing test leaves nothing behind.
#[derive(Default)]
pub struct KillOnDrop(pub Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.iter().copied().for_each(kill);
    }
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    /// From spawn to exit.
    pub elapsed: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Outcome {
    /// The exit code; fails the test if chan-run itself died of a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| {
            panic!("chan-run died of signal {:?}; stderr: {}", self.status.signal(), self.stderr())
        })
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Asserts the exit code, showing stderr when it differs.
    pub fn assert_code(&self, want: i32) -> &Self {
        assert_eq!(self.code(), want, "exit code; stderr: {:?}", self.stderr());
        self
    }
}

/// A chan-run started in the background. Dropping it unfinished stops it (SIGTERM,
/// which it forwards to its command, then SIGKILL) and reaps it.
pub struct Running {
    child: Child,
    started: Instant,
    stdout: Option<mpsc::Receiver<Vec<u8>>>,
    stderr: Option<mpsc::Receiver<Vec<u8>>>,
    finished: bool,
}

impl Running {
    /// Spawns `cmd` with stdin empty and stdout and stderr read to the end by threads.
    pub fn start(mut cmd: std::process::Command) -> Running {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut run = Self::spawn(cmd);
        run.stdout = run.child.stdout.take().map(collect);
        run
    }

    /// Like [`Running::start`] but with stdin a pipe, in `child().stdin`.
    pub fn start_with_stdin(mut cmd: std::process::Command) -> Running {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut run = Self::spawn(cmd);
        run.stdout = run.child.stdout.take().map(collect);
        run
    }

    /// Spawns `cmd` with stdin empty and stderr collected; the test reads stdout
    /// itself from `child().stdout`.
    pub fn start_streaming(mut cmd: std::process::Command) -> Running {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Self::spawn(cmd)
    }

    /// Spawns `cmd` with its stdio as configured; collects stderr if it is piped.
    pub fn start_as_configured(cmd: std::process::Command) -> Running {
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: std::process::Command) -> Running {
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn chan-run");
        let stderr = child.stderr.take().map(collect);
        Running { child, started, stdout: None, stderr, finished: false }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn signal(&self, sig: Signal) {
        send(self.pid(), sig);
    }

    /// Whether chan-run is still running (does not reap it).
    pub fn is_running(&mut self) -> bool {
        !self.finished && self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for chan-run to exit within `limit` (fails the test otherwise), then for
    /// its stdout and stderr to reach end-of-file: a caller's pipes must close when
    /// chan-run exits, whatever the command's descendants still hold.
    pub fn finish(mut self, limit: Duration) -> Outcome {
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if self.started.elapsed() > limit {
                let pid = self.pid();
                self.stop();
                panic!("chan-run (pid {pid}) still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let elapsed = self.started.elapsed();
        self.finished = true;
        let eof = |rx: Option<mpsc::Receiver<Vec<u8>>>, what: &str| {
            rx.map(|rx| {
                rx.recv_timeout(Duration::from_secs(3))
                    .unwrap_or_else(|_| panic!("chan-run exited but its {what} stayed open"))
            })
            .unwrap_or_default()
        };
        let stdout = eof(self.stdout.take(), "stdout");
        let stderr = eof(self.stderr.take(), "stderr");
        Outcome { status, elapsed, stdout, stderr }
    }

    fn stop(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.signal(Signal::TERM);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Lopsided timing check: `elapsed` lies in `(min, max)`.
#[track_caller]
pub fn assert_between(elapsed: Duration, min: Duration, max: Duration) {
    assert!(elapsed > min && elapsed < max, "took {elapsed:?}, expected between {min:?} and {max:?}");
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

// ---------------------------------------------------------------------------------
// Helpers of the fault and load suite (crash.rs, load.rs, hostile.rs, bad_input.rs).

/// Whether the heavy loops are on (`CHAN_RUN_HEAVY=1`; `.ci/run` sets it).
pub fn heavy() -> bool {
    std::env::var("CHAN_RUN_HEAVY").is_ok_and(|v| v == "1")
}

/// `light` for a plain `cargo test`, `heavy_n` under `CHAN_RUN_HEAVY=1`.
pub fn scaled(light: usize, heavy_n: usize) -> usize {
    if heavy() { heavy_n } else { light }
}

/// A small seeded PRNG (xorshift64*). The seed comes from `CHAN_RUN_SEED` when set, so
/// a failing sequence can be replayed; otherwise from the clock, and tests print it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The seed to use: `CHAN_RUN_SEED`, or one made from the clock and the pid.
    pub fn seed() -> u64 {
        if let Some(seed) = std::env::var("CHAN_RUN_SEED").ok().and_then(|s| s.parse().ok()) {
            return seed;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        (nanos as u64) ^ (u64::from(std::process::id()) << 32)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// A uniformly random duration in `0..=max`, at microsecond resolution.
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        Duration::from_micros(self.below(max.as_micros() as u64 + 1))
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// `active.json` parsed whole with serde_json, as any reader (`jq`) would; `None` if
/// there is none. Fails the test if it does not parse or lacks the documented shape.
pub fn state_json(env: &TestEnv) -> Option<serde_json::Value> {
    let bytes = match std::fs::read(env.state().join("active.json")) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("reading active.json: {e}"),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!("active.json ({} bytes) does not parse: {e}; ends with {:?}", bytes.len(), tail_text(&bytes))
    });
    assert_eq!(value["version"], 1, "active.json's version");
    assert!(value["channels"].is_object(), "active.json has a channels object");
    Some(value)
}

/// The last bytes of a file, for a failure message.
pub fn tail_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(80)..]).into_owned()
}

/// The `runs` count of `channel` in a parsed `active.json` (0 if it has no record).
pub fn runs_in(state: Option<&serde_json::Value>, channel: &str) -> u64 {
    state.and_then(|s| s["channels"][channel]["runs"].as_u64()).unwrap_or(0)
}

/// The quarantined copies of a damaged `active.json` in the state directory.
pub fn quarantined(env: &TestEnv) -> Vec<String> {
    list(env.state()).into_iter().filter(|n| n.starts_with("active.json.corrupt-")).collect()
}

/// Temporary files of an interrupted whole-file rewrite of `active.json`.
pub fn stray_temp_files(env: &TestEnv) -> Vec<String> {
    list(env.state()).into_iter().filter(|n| n.starts_with(".active.json.")).collect()
}

/// `VmHWM` (peak resident set) of a live process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Samples a process's peak RSS until it exits; `join` gives the highest value seen.
pub struct PeakWatch(std::thread::JoinHandle<u64>);

impl PeakWatch {
    pub fn start(pid: u32) -> PeakWatch {
        PeakWatch(std::thread::spawn(move || {
            let mut peak = 0;
            while let Some(kib) = peak_rss_kib(pid) {
                peak = peak.max(kib);
                if !is_alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        }))
    }

    pub fn join(self) -> u64 {
        self.0.join().expect("the peak watcher")
    }
}

/// Live processes (not zombies) whose environment holds `VAR=value` exactly: a run
/// started with a unique value is found in all its descendants, even detached ones.
pub fn processes_with_env(var: &str, value: &str) -> Vec<u32> {
    let entry = format!("{var}={value}");
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return found };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if environ.split(|&b| b == 0).any(|kv| kv == entry.as_bytes()) && is_alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// Blocks until `path` exists, checking every 100 µs (for kills timed against it);
/// fails the test after [`PATIENCE`].
pub fn wait_for_path_fast(path: &Path) {
    let until = Instant::now() + PATIENCE;
    while !path.exists() {
        assert!(Instant::now() < until, "timed out waiting for {}", path.display());
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// A throw-away user other than the one running the tests, for what another user can
/// reach: created once when the tests run as root (as CI does); `None`, with a notice,
/// otherwise. Returns (uid, gid).
pub fn other_user() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to make a throw-away user");
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id").args([flag, "chanrun-other"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        // Another test may be making it at the same moment: its failure is fine if the
        // user exists afterwards.
        let _ = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "chanrun-other"])
            .output();
    }
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => {
            eprintln!("skipped: cannot make the throw-away user chanrun-other (useradd)");
            None
        }
    }
}

/// `sh -c SCRIPT` run as `user` (from [`other_user`]).
pub fn as_user(user: (u32, u32), script: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.0)).arg(format!("--regid={}", user.1)).args([
        "--clear-groups",
        "--",
        "sh",
        "-c",
        script,
    ]);
    cmd
}

/// Changes the owner of `path` itself (a symbolic link is not followed).
pub fn chown(path: &Path, user: (u32, u32)) {
    std::os::unix::fs::lchown(path, Some(user.0), Some(user.1)).unwrap();
}
