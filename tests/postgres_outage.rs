//! The PostgreSQL store through outages (issue 18, items 2 to 5): a holder whose backend
//! is terminated (the next holder, in another pid namespace, waits its lease out: no
//! overlap), a crash with asynchronous commit (fences never reused), a server that never
//! answers, an administrator's row lock, a full pool (every wait bounded, `-n`/`-w` and
//! signals respected), a restart and cancelled or terminated waiters (they queue again).

use crate::common::*;
use crate::postgres::{LEASE, enqueue, queued_pids};
use rustix::process::Signal;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A command that notes `date +%s.%N` in `$T/NAME.alive` every 10 ms until killed, and
/// ignores SIGTERM (so its chan-run must SIGKILL it).
const STUBBORN: &str = r#"trap '' TERM; echo $$ > "$T/stubborn.pid"
    while :; do date +%s.%N > "$T/alive.tmp"; mv "$T/alive.tmp" "$T/alive"; sleep 0.01; done"#;

fn stamp(env: &TestEnv, name: &str) -> f64 {
    env.read(name).lines().next().unwrap().trim().parse().unwrap()
}

#[test]
fn a_terminated_holders_lease_is_waited_out_by_a_waiter_in_another_pid_namespace() {
    let Some(server) = pg::server() else { return };
    let namespaced = rustix::process::geteuid().is_root()
        && std::process::Command::new("unshare")
            .args(["--pid", "--uts", "--fork", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if !namespaced {
        say("\n=== SKIPPED: overlap test: needs root and unshare --pid --uts ===\n");
        return;
    }
    let store = pg::fresh_store(&server);
    let env = TestEnv::with_store(&store);
    let holder = env.spawn(&["-c", "o", "-k", "30s"], &sh(STUBBORN));
    env.wait_for_file("alive");
    // The waiter: another host's name, another pid namespace: it cannot see or kill the
    // holder's command, so only the lease protects.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--pid",
        "--uts",
        "--fork",
        "--kill-child",
        "--",
        "sh",
        "-c",
        r#"hostname other && exec "$@""#,
        "sh",
        &BIN,
    ]);
    env.apply(&mut cmd);
    cmd.args(["run", "-c", "o", "--"]).args(sh(r#"date +%s.%N > "$T/w.tmp"; mv "$T/w.tmp" "$T/w""#));
    let waiter = Running::start(cmd);
    wait_until("the waiter to queue", || {
        pg::psql(
            &store,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = 'chan_run_channel'::regclass",
        ) == "1"
    });
    let terminated = now();
    pg::psql(&store, &format!("SELECT pg_terminate_backend(backend) FROM {LEASE} WHERE channel = 'o'"));
    let h = holder.finish(secs(40.0));
    let w = waiter.finish(secs(40.0));
    h.assert_code(122);
    w.assert_code(0);
    let (last_alive, started) = (stamp(&env, "alive"), stamp(&env, "w"));
    let overlap = (last_alive - started).max(0.0);
    say(&format!(
        "overlap test: the holder's command last alive {:.2} s after pg_terminate_backend, the waiter in another \
         pid namespace started {:.2} s after it: overlap {overlap:.3} s",
        last_alive - terminated,
        started - terminated
    ));
    assert!(
        started > last_alive,
        "the waiter started {:.3} s before the old command died",
        last_alive - started
    );
    assert!(h.stderr().contains("ended this session"), "{}", h.stderr());
    assert!(w.stderr().contains("previous holder") && w.stderr().contains("may still run"), "{}", w.stderr());
}

#[test]
fn fences_are_never_reused_after_a_crash_even_with_asynchronous_commit() {
    let Some(server) = pg::PrivateServer::start("crash") else { return };
    // The cluster commits asynchronously (synchronous_commit = off, as test clusters
    // do); a WAL writer that sleeps 10 s leaves every such commit in memory at the crash.
    pg::psql(server.url(), "ALTER SYSTEM SET wal_writer_delay = '10s'");
    pg::psql(server.url(), "SELECT pg_reload_conf()");
    pg::psql(server.url(), "ALTER ROLE postgres SET synchronous_commit = off");
    let store = pg::fresh_store(server.url());
    let env = TestEnv::with_store(&store);
    env.run(&["-c", "f"], &["true"]).assert().code(0);
    let mut fences = Vec::new();
    for round in 0..5 {
        let name = format!("f{round}");
        let holder =
            env.spawn(&["-c", "f"], &sh(&format!(r#"echo "$CHAN_RUN_FENCE" > "$T/{name}"; sleep 60"#)));
        env.wait_for_file(&name);
        server.crash();
        server.start_again();
        holder.finish(PATIENCE);
        wait_until("the fence to be written", || env.read(&name).ends_with('\n'));
        fences.push(env.read(&name).trim().parse::<i64>().unwrap());
    }
    let last = env.run(&["-c", "f"], &sh(r#"echo "$CHAN_RUN_FENCE""#)).output().unwrap();
    fences.push(String::from_utf8_lossy(&last.stdout).trim().parse().unwrap());
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "a fence was handed out twice: {fences:?}");
}

/// A TCP port that accepts connections and never says a word.
fn silent_server() -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    (port, thread)
}

#[test]
fn a_server_that_never_answers_fails_run_and_status_in_bounded_time_and_signals_still_work() {
    let (port, _keep) = silent_server();
    let quick = TestEnv::with_store(&format!("postgres://u@127.0.0.1:{port}/db?connect_timeout=2"));
    let out = quick.spawn(&["-c", "h"], &["true"]).finish(PATIENCE);
    out.assert_code(69);
    assert!(out.stderr().contains("did not answer within 2s"), "{}", out.stderr());
    assert_between(out.elapsed, secs(1.8), secs(6.0));
    let started = Instant::now();
    let status = quick.command().arg("status").output().unwrap();
    assert_eq!(status.status.code(), Some(69));
    assert_between(started.elapsed(), secs(1.8), secs(6.0));

    let env = TestEnv::with_store(&format!("postgres://u@127.0.0.1:{port}/db"));
    let default = env.spawn(&["-c", "h"], &["true"]);
    let out = env.spawn(&["-c", "h", "-w", "1"], &["true"]).finish(PATIENCE);
    out.assert_code(75);
    assert_between(out.elapsed, secs(0.9), secs(3.0));
    let out = env.spawn(&["-c", "h", "-n"], &["true"]).finish(PATIENCE);
    out.assert_code(75);
    assert_between(out.elapsed, secs(1.9), secs(4.5));
    for (sig, code) in [(Signal::TERM, 143), (Signal::INT, 130), (Signal::HUP, 129)] {
        let run = env.spawn(&["-c", "h"], &["true"]);
        std::thread::sleep(Duration::from_millis(300));
        let sent = Instant::now();
        run.signal(sig);
        let out = run.finish(PATIENCE);
        out.assert_code(code);
        assert!(sent.elapsed() < secs(1.5), "{sig:?} took {:?}", sent.elapsed());
    }
    let mut status = env.std_command();
    status.arg("status");
    let status = Running::start(status);
    std::thread::sleep(Duration::from_millis(300));
    status.signal(Signal::TERM);
    let out = status.finish(secs(3.0));
    assert_eq!(out.status.signal(), Some(15), "status dies of SIGTERM at once");
    let out = default.finish(PATIENCE);
    out.assert_code(69);
    say(&format!(
        "a silent server: run fails after {:.2} s with the default connect_timeout",
        out.elapsed.as_secs_f64()
    ));
    assert_between(out.elapsed, secs(9.5), secs(14.0));
}

#[test]
fn a_stopped_postmaster_fails_run_in_bounded_time() {
    let Some(server) = pg::PrivateServer::start("sigstop") else { return };
    let store = pg::fresh_store(server.url());
    let data = pg::psql(server.url(), "SHOW data_directory");
    let pid: u32 = std::fs::read_to_string(format!("{data}/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    send(pid, Signal::STOP);
    let env = TestEnv::with_store(&format!("{store}&connect_timeout=3"));
    let out = env.spawn(&["-c", "s"], &["true"]).finish(PATIENCE);
    let started = Instant::now();
    let status = env.command().arg("status").output().unwrap();
    let status_took = started.elapsed();
    send(pid, Signal::CONT);
    out.assert_code(69);
    assert_eq!(status.status.code(), Some(69));
    say(&format!(
        "a SIGSTOPped postmaster (connect_timeout=3): run fails after {:.2} s, status after {:.2} s",
        out.elapsed.as_secs_f64(),
        status_took.as_secs_f64()
    ));
    assert_between(out.elapsed, secs(2.8), secs(7.0));
    env.run(&["-c", "s"], &["true"]).assert().code(0);
}

#[test]
fn an_administrators_row_lock_does_not_make_a_run_overrun() {
    let Some(server) = pg::server() else { return };
    let store = pg::fresh_store(&server);
    let env = TestEnv::with_store(&store);
    env.run(&["-c", "r"], &["true"]).assert().code(0);
    let run = env.spawn(&["-c", "r", "-t", "1", "-k", "1"], &sh(r#"started running; sleep 30"#));
    env.wait_for_file("running");
    // Once the command runs, an administrator's transaction locks the channel's row
    // (and the lease's) and sits on them.
    let mut admin = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &store])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admin_pid = admin.id();
    let _cleanup = KillOnDrop(vec![admin_pid]);
    admin
        .stdin
        .as_mut()
        .unwrap()
        .write_all(
            b"BEGIN;\nSELECT 1 FROM chan_run_channel WHERE channel = 'r' FOR UPDATE;\nSELECT pg_sleep(60);\n",
        )
        .unwrap();
    wait_until("the admin's row lock", || {
        pg::psql(&store, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'")
            == "1"
    });
    let out = run.finish(PATIENCE);
    out.assert_code(124);
    assert!(out.elapsed < secs(4.5), "timeout 1 s + kill-after 1 s + 1 s, but it took {:?}", out.elapsed);
    assert!(out.stderr().contains("not recorded"), "{}", out.stderr());
    // Its backend sleeps on, row lock held, until terminated.
    pg::psql(
        &store,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60)%'",
    );
    kill(admin_pid);
    let _ = admin.wait();
    env.run(&["-c", "r", "-w", "5"], &["true"]).assert().code(0);
}

#[test]
fn a_full_session_pool_respects_no_wait_wait_and_signals() {
    let Some(server) = pg::PrivateServer::start("fullpool") else { return };
    let Some(pooled) = server.pgbouncer("session", 1) else { return };
    let env = TestEnv::with_store(&pooled);
    let holder = env.hold("x", "held", "go");
    let out = env.spawn(&["-c", "y", "-n"], &["true"]).finish(PATIENCE);
    out.assert_code(75);
    assert_between(out.elapsed, secs(1.9), secs(4.5));
    let out = env.spawn(&["-c", "y", "-w", "1"], &["true"]).finish(PATIENCE);
    out.assert_code(75);
    assert_between(out.elapsed, secs(0.9), secs(3.0));
    let run = env.spawn(&["-c", "y"], &["true"]);
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    run.signal(Signal::TERM);
    run.finish(PATIENCE).assert_code(143);
    assert!(sent.elapsed() < secs(1.5), "SIGTERM took {:?}", sent.elapsed());
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
}

#[test]
fn a_restart_puts_the_queued_waiters_back_in_line_and_none_overlaps_the_old_holder() {
    let Some(server) = pg::PrivateServer::start("restart") else { return };
    let store = pg::fresh_store(server.url());
    let env = TestEnv::with_store(&store);
    let holder = env.spawn(&["-c", "q", "-k", "30s"], &sh(STUBBORN));
    env.wait_for_file("alive");
    let order_script = |i: usize| {
        sh(&format!(
            r#"mkdir "$T/inside" || exit 99; date +%s.%N > "$T/start{i}"; echo {i} >> "$T/order"; sleep 0.2; rmdir "$T/inside""#
        ))
    };
    let waiters: Vec<Running> = (0..3)
        .map(|i| {
            let run = env.spawn(&["-c", "q"], &order_script(i));
            let pid = run.pid();
            wait_until("a waiter to queue", || queued_pids(&env, "q").contains(&pid));
            run
        })
        .collect();
    let restarted = now();
    server.stop();
    server.start_again();
    let back = now();
    let h = holder.finish(PATIENCE);
    h.assert_code(122);
    let outs: Vec<Outcome> = waiters.into_iter().map(|w| w.finish(secs(40.0))).collect();
    for out in &outs {
        out.assert_code(0);
        assert!(out.stderr().contains("reconnecting to queue again"), "{}", out.stderr());
    }
    let last_alive = stamp(&env, "alive");
    let first = (0..3).map(|i| stamp(&env, &format!("start{i}"))).fold(f64::MAX, f64::min);
    say(&format!(
        "restart: the server was back {:.2} s after the stop began; the first waiter ran {:.2} s after that, the \
         old command last alive {:.2} s before it; order after the restart {:?} (arrival order 0, 1, 2)",
        back - restarted,
        first - back,
        first - last_alive,
        env.order()
    ));
    assert!(first > last_alive, "a waiter started while the old holder's command still ran");
    let mut ran = env.order();
    ran.sort();
    assert_eq!(ran, [0, 1, 2]);
}

#[test]
fn a_waiter_whose_wait_is_cancelled_or_whose_backend_is_terminated_queues_again() {
    let Some(server) = pg::server() else { return };
    let store = pg::fresh_store(&server);
    let env = TestEnv::with_store(&store);
    let holder = env.hold("c", "held", "go");
    let cancelled = enqueue(&env, "c", 0, None);
    let terminated = enqueue(&env, "c", 1, None);
    let waiting = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = 'chan_run_channel'::regclass ORDER BY waitstart";
    let backends: Vec<String> = pg::psql(&store, waiting).lines().map(str::to_owned).collect();
    assert_eq!(backends.len(), 2);
    pg::psql(&store, &format!("SELECT pg_cancel_backend({})", backends[0]));
    pg::psql(&store, &format!("SELECT pg_terminate_backend({})", backends[1]));
    wait_until("both to queue again", || {
        let again: Vec<String> = pg::psql(&store, waiting).lines().map(str::to_owned).collect();
        again.len() == 2 && !again.contains(&backends[1])
    });
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    let (a, b) = (cancelled.finish(PATIENCE), terminated.finish(PATIENCE));
    a.assert_code(0);
    b.assert_code(0);
    assert!(a.stderr().contains("the wait was cancelled"), "{}", a.stderr());
    assert!(b.stderr().contains("reconnecting to queue again"), "{}", b.stderr());
    let mut ran = env.order();
    ran.sort();
    assert_eq!(ran, [0, 1]);
}
