//! A real PostgreSQL server for the store's tests: the shared one (`CHAN_RUN_TEST_PG`, or
//! else `scripts/test-postgres start main` once per test process), an empty schema per
//! test so each gets its own installation, `psql` to read the store's tables, and
//! private clusters for the tests that stop their server, reach it from another network
//! namespace or put a PgBouncer in front of it. Without a server the tests skip, loudly,
//! unless `CHAN_RUN_REQUIRE_PG=1` (CI) makes that a failure.
#![allow(dead_code)]

use std::io::Write;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");

/// The URL of the shared test server, or `None` (after saying so) when there is none.
pub fn server() -> Option<String> {
    static SERVER: OnceLock<Option<String>> = OnceLock::new();
    SERVER
        .get_or_init(|| match std::env::var("CHAN_RUN_TEST_PG") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => script(&["start", "main"]).map_err(unavailable).ok(),
        })
        .clone()
}

/// A new empty schema on the server at `url`, and a store URL whose `search_path` selects
/// it (chan-run creates its tables in the first schema of the search path).
pub fn fresh_store(url: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let schema = format!("t_{}_{}_{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    psql(url, &format!("CREATE SCHEMA {schema}"));
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// The output of `sql` run by psql (unaligned, tuples only), trimmed; panics on failure.
pub fn psql(url: &str, sql: &str) -> String {
    try_psql(url, sql).unwrap_or_else(|err| panic!("psql {url} -c {sql:?}: {err}"))
}

/// As [`psql`], with the failure (psql's stderr) as the error.
pub fn try_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .output()
        .map_err(|err| format!("cannot run psql: {err}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A cluster of the test's own, for tests that stop and restart their server; destroyed
/// (with its PgBouncers) on drop.
pub struct PrivateServer {
    name: String,
    url: String,
    /// The script's `LISTEN`: more addresses to listen on, and networks to trust.
    listen: Option<String>,
}

impl PrivateServer {
    /// Starts a new cluster named after `tag` (letters, digits, `-`, `_`), or `None`
    /// (after saying so) when none can be started.
    pub fn start(tag: &str) -> Option<PrivateServer> {
        Self::start_listening(tag, None)
    }

    /// As [`PrivateServer::start`], also listening on the addresses of `listen`
    /// (`ADDR/BITS,...`, which must exist) and trusting clients in those networks.
    pub fn start_listening(tag: &str, listen: Option<&str>) -> Option<PrivateServer> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("p-{tag}-{}-{n}", std::process::id());
        let listen = listen.map(str::to_owned);
        let url = script_with(&["start", &name], listen.as_deref()).map_err(unavailable).ok()?;
        Some(PrivateServer { name, url, listen })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (fast mode: open sessions are cut); its data and port stay.
    pub fn stop(&self) {
        script(&["stop", &self.name]).unwrap_or_else(|err| panic!("stopping {}: {err}", self.name));
    }

    /// Starts the stopped server again, on the same port.
    pub fn start_again(&self) {
        let url = script_with(&["start", &self.name], self.listen.as_deref())
            .unwrap_or_else(|err| panic!("restarting {}: {err}", self.name));
        assert_eq!(url, self.url, "the server came back on another port");
    }

    /// The URL of a PgBouncer in front of this server, in `mode` (`session` or
    /// `transaction`) with `size` server connections that it hands out round robin; or
    /// `None` (after saying so) when there is no pgbouncer and none can be installed.
    pub fn pgbouncer(&self, mode: &str, size: u32) -> Option<String> {
        script(&["pgbouncer", &self.name, mode, &size.to_string()]).map_err(unavailable).ok()
    }

    /// A PgBouncer as [`PrivateServer::pgbouncer`] whose `server_reset_query` is empty:
    /// a server session goes to the next client as the last one left it.
    pub fn pgbouncer_without_reset(&self, mode: &str, size: u32) -> Option<String> {
        script(&["pgbouncer", &self.name, mode, &size.to_string(), "noreset"]).map_err(unavailable).ok()
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`); `start_again`
    /// brings it back.
    pub fn crash(&self) {
        script(&["crash", &self.name]).unwrap_or_else(|err| panic!("crashing {}: {err}", self.name));
    }

    /// Turns on TLS (a fresh CA and a server certificate for 127.0.0.1) and refuses
    /// plain TCP from now on; returns the CA certificate's path.
    pub fn tls(&self) -> String {
        script(&["ssl", &self.name]).unwrap_or_else(|err| panic!("{err}"))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        let path = script(&["log", &self.name]).unwrap_or_else(|err| panic!("{err}"));
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {path}: {err}"))
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Err(err) = script(&["destroy", &self.name]) {
            eprintln!("could not destroy test cluster {}: {err}", self.name);
        }
    }
}

/// Runs `scripts/test-postgres ARGS`: its trimmed stdout, or its stderr as the error.
fn script(args: &[&str]) -> Result<String, String> {
    script_with(args, None)
}

/// As [`script`], with `LISTEN` set (or cleared, so the caller's never leaks in).
fn script_with(args: &[&str], listen: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(SCRIPT);
    cmd.args(args);
    match listen {
        Some(listen) => cmd.env("LISTEN", listen),
        None => cmd.env_remove("LISTEN"),
    };
    let out = cmd.output().map_err(|err| format!("cannot run {SCRIPT}: {err}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("{SCRIPT} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// No server: a failure under `CHAN_RUN_REQUIRE_PG=1`, else a skip announced once per
/// process, on the real stderr (the test harness captures `eprintln!`).
fn unavailable(reason: String) {
    if std::env::var("CHAN_RUN_REQUIRE_PG").is_ok_and(|v| v == "1") {
        panic!("CHAN_RUN_REQUIRE_PG=1 but no PostgreSQL server could be started: {reason}");
    }
    static SAID: OnceLock<()> = OnceLock::new();
    SAID.get_or_init(|| {
        let _ = writeln!(
            std::io::stderr(),
            "\n=== SKIPPED: PostgreSQL tests: no server could be started: {reason} ===\n"
        );
    });
}
