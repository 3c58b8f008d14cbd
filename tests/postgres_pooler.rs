//! The PostgreSQL store behind a real PgBouncer (`scripts/test-postgres pgbouncer`): a
//! pool in transaction mode voids session advisory locks, so the store must refuse it
//! (exit 125, naming the pooler) without running the command or leaving a lock behind;
//! a pool in session mode is a plain connection and works. PgBouncer ignores the
//! `options` startup parameter, so these stores use the server's `public` schema.

use crate::common::*;
use std::process::Command;

/// A private server and the URL of a PgBouncer in front of it, or `None` (skipped loudly).
fn bouncer(tag: &str, mode: &str, size: u32) -> Option<(pg::PrivateServer, String)> {
    let server = pg::PrivateServer::start(tag)?;
    let url = server.pgbouncer(mode, size)?;
    Some((server, url))
}

/// Opens `n` server connections in the pool: `n` clients at once in a statement.
fn warm(url: &str, n: usize) {
    let clients: Vec<_> = (0..n)
        .map(|_| {
            Command::new("psql")
                .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", url, "-c", "SELECT pg_sleep(0.3)"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("psql")
        })
        .collect();
    for mut client in clients {
        assert!(client.wait().unwrap().success(), "warming the pool");
    }
}

/// The backends that one client's consecutive statements ran on.
fn backends_of_one_client(url: &str) -> Vec<String> {
    let sql = "SELECT pg_backend_pid()";
    let out = Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", url, "-c", sql, "-c", sql, "-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Advisory locks held or awaited on the server (behind the pool).
fn advisory_locks(server: &pg::PrivateServer) -> String {
    pg::psql(server.url(), "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
}

fn assert_refused_as_pooled(out: &Outcome) {
    out.assert_code(125);
    let stderr = out.stderr();
    assert!(stderr.contains("pooler") && stderr.contains("PgBouncer"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_transaction_mode_pool_that_switches_backends_is_refused_before_the_command_runs() {
    let Some((server, url)) = bouncer("txn", "transaction", 4) else { return };
    warm(&url, 4);
    let backends = backends_of_one_client(&url);
    assert!(backends.windows(2).all(|w| w[0] != w[1]), "the pool does not switch backends: {backends:?}");

    // The channel's row exists (made by a run on the server itself), so a try through
    // the pool would take the lock if the store let it.
    let direct = TestEnv::with_store(server.url());
    direct.run(&["-c", "x"], &["true"]).assert().code(0);
    let env = TestEnv::with_store(&url);
    for _ in 0..3 {
        let out = env.spawn(&["-c", "x"], &sh(r#"started ran"#)).finish(PATIENCE);
        assert_refused_as_pooled(&out);
        assert!(!env.exists("ran"), "the command ran");
        assert_eq!(advisory_locks(&server), "0", "a refused run left a lock on a pooled backend");
    }
    direct.run(&["-n", "-c", "x"], &["true"]).assert().code(0);
}

#[test]
fn a_transaction_mode_pool_on_one_backend_cannot_give_a_held_channel_to_a_second_caller() {
    // One server connection: every statement of every client runs on it, so nothing
    // switches; but a second caller would find the first one's session lock its own.
    let Some((server, url)) = bouncer("txn1", "transaction", 1) else { return };
    let env = TestEnv::with_store(&url);
    let holder = env.hold("x", "held", "go");
    let out = env.spawn(&["-c", "x"], &sh(r#"started second"#)).finish(PATIENCE);
    assert_refused_as_pooled(&out);
    assert!(!env.exists("second"), "a second caller ran while the channel was held");
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert_eq!(advisory_locks(&server), "0");
}

#[test]
fn a_session_mode_pool_is_a_plain_connection() {
    let Some((server, url)) = bouncer("sess", "session", 4) else { return };
    warm(&url, 4);
    let env = TestEnv::with_store(&url);
    for i in 0..3 {
        let out = env.spawn(&["-c", "x"], &sh(&format!(r#"started ran{i}"#))).finish(PATIENCE);
        out.assert_code(0);
        assert!(env.exists(&format!("ran{i}")));
    }
    let holder = env.hold("y", "held", "go");
    env.run(&["-n", "-c", "y"], &["true"]).assert().code(75);
    env.open_gate("go");
    holder.finish(PATIENCE).assert_code(0);
    assert_eq!(pg::psql(server.url(), "SELECT runs FROM chan_run_channel WHERE channel = 'x'"), "3");
    assert_eq!(advisory_locks(&server), "0", "no lock stays behind");
}
