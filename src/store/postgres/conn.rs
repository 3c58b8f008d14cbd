//! Step 1, the connection: the client socket's timeouts, the session's settings, the
//! backend it talks to (checked on every statement: a transaction-mode pooler would
//! switch it and void session locks), and the server's errors as one line.
//!
//! The first statement reads the backend's pid and, with `set_config`, turns off the
//! server's statement, lock and idle timeouts, sets its TCP keepalives and
//! `tcp_user_timeout` (server side: a silent client is dropped after
//! [`SERVER_DROPS_AFTER`] at the earliest), and `client_connection_check_interval`, so
//! a waiter whose process died leaves the queue within a second even while it waits.
//! `application_name` is `chan-run <pid> <host>`, which is how `status` names waiters.

use super::PgStore;
use anyhow::{anyhow, bail};
use postgres::{Client, NoTls};
use std::time::Duration;

/// The client socket's bound on a beat over a dead network (`tcp_user_timeout`, and
/// keepalives of 2 s idle + 3 × 1 s).
pub const CLIENT_GIVES_UP_AFTER: Duration = Duration::from_secs(5);
/// The server's bound, set per session: keepalives of 10 s idle + 3 × 5 s and
/// `tcp_user_timeout` 20 s, so a silent client keeps its lock at least this long.
pub const SERVER_DROPS_AFTER: Duration = Duration::from_secs(20);

/// The session's settings, set by the first statement (not as startup `options`, which
/// PgBouncer refuses or drops): no server timeout may cut a wait or a holder short, a
/// dead waiter leaves the queue within a second, and a silent client keeps its session
/// for [`SERVER_DROPS_AFTER`] at least.
const SESSION_SETTINGS: &str = "SELECT pg_backend_pid(), set_config('statement_timeout', '0', false), \
     set_config('lock_timeout', '0', false), set_config('idle_in_transaction_session_timeout', '0', false), \
     set_config('idle_session_timeout', '0', false), set_config('client_connection_check_interval', '1000', false), \
     set_config('tcp_keepalives_idle', '10', false), set_config('tcp_keepalives_interval', '5', false), \
     set_config('tcp_keepalives_count', '3', false), set_config('tcp_user_timeout', '20000', false)";

/// A connection and the backend it talks to: every statement checks the backend is
/// still the same (a transaction-mode pooler would switch it and void session locks).
pub struct Conn {
    pub client: Client,
    pub backend: i32,
}

impl PgStore {
    pub(super) fn connect(&self) -> anyhow::Result<Conn> {
        let mut config = self.config.clone();
        let mut name = format!("chan-run {} {}", std::process::id(), self.host);
        truncate(&mut name, 63);
        config.application_name(&name);
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(2))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(CLIENT_GIVES_UP_AFTER);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let connected = match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(NoTls),
        };
        let mut client = connected.map_err(|e| {
            let hint = match &self.tls {
                Some(_) => "; with sslmode=require chan-run verifies the server's certificate: name its CA with sslrootcert=FILE in the URL or PGSSLROOTCERT",
                None => "",
            };
            anyhow!(
                "cannot connect to PostgreSQL at {} ({}); check --store / CHAN_RUN_STORE{hint}",
                self.shown,
                pg_error(&e)
            )
        })?;
        // Unnamed statements only (`query_typed`: parse, bind and execute in one round
        // trip), here and wherever no transaction is open: a transaction-mode pooler would
        // run a named statement's parse and execute on different backends, and fail with
        // "prepared statement does not exist" instead of the pooler check's message.
        let rows =
            client.query_typed(SESSION_SETTINGS, &[]).map_err(|e| self.failed("set up the session", &e))?;
        let backend = rows.first().ok_or_else(|| anyhow!("SELECT pg_backend_pid() returned no row"))?.get(0);
        Ok(Conn { client, backend })
    }

    pub(super) fn failed(&self, what: &str, e: &postgres::Error) -> anyhow::Error {
        anyhow!("PostgreSQL at {}: cannot {what}: {}", self.shown, pg_error(e))
    }
}

impl Conn {
    pub fn check_backend(&self, backend: i32) -> anyhow::Result<()> {
        if backend != self.backend {
            bail!(pooled(
                "the server",
                &format!("the backend changed from pid {} to {backend} between two statements", self.backend)
            ));
        }
        Ok(())
    }
}

/// `chan-run <pid> <host>` → (pid, host).
pub fn from_application_name(name: Option<&str>) -> (Option<u32>, Option<String>) {
    let Some(rest) = name.and_then(|n| n.strip_prefix("chan-run ")) else { return (None, None) };
    let (pid, host) = rest.split_once(' ').unwrap_or((rest, ""));
    (pid.parse().ok(), Some(host.to_owned()).filter(|h| !h.is_empty()))
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The server's message (with its detail and hint), or the client's error chain.
pub fn pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_owned();
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" ({hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

pub fn pooled(shown: &str, what: &str) -> String {
    format!(
        "{shown}: {what}; a connection pooler in transaction mode (e.g. PgBouncer) voids session locks: point --store at PostgreSQL itself or at a session-mode pool"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_round_trip() {
        assert_eq!(from_application_name(Some("chan-run 42 gw-1")), (Some(42), Some("gw-1".into())));
        assert_eq!(from_application_name(Some("chan-run 42")), (Some(42), None));
        assert_eq!(from_application_name(Some("psql")), (None, None));
        let mut long = "é".repeat(40);
        truncate(&mut long, 63);
        assert_eq!(long.len(), 62);
    }
}
