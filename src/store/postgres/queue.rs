//! Steps 2 and 3, the queue: a try for the channel's lock, then a wait in the server's
//! own queue of that lock, which grants in arrival order across hosts.
//!
//! 2. One statement finds the channel's row and tries its lock: a session-level
//!    advisory lock keyed by (the table's oid, the row's id): never a hash of the name,
//!    so two channels never share a lock, and two installations (schemas) in one
//!    database never meet. A missing row is inserted (`ON CONFLICT DO NOTHING`) and the
//!    statement repeated. The lock is tried only on the backend the connection started
//!    with, and refused if that backend holds it already (advisory locks are reentrant:
//!    a transaction-mode pooler's one server connection would serve two holders).
//!    *Death*: the connection closes, the server drops the lock.
//! 3. Busy: `--no-wait` exits; else `pg_advisory_lock` waits on the connection's own
//!    backend (as in 2). PostgreSQL grants an advisory lock's waiters in arrival order,
//!    and a release grants the next waiter in the same instant, so a newcomer's try never
//!    jumps the queue: that is SPEC's order, across hosts. `--wait` running out or a
//!    signal sends the server a cancel request for the waiting statement, which leaves
//!    the queue at once. A wait the server ends (a restart, `pg_terminate_backend`, an
//!    administrator's `pg_cancel_backend`) is taken up again: the caller reconnects if
//!    it must (retrying for up to [`RECONNECT_WITHIN`]) and queues anew, at the end of
//!    the queue as it then stands: after a restart, waiters line up again in the order
//!    they reconnect, and a caller that arrives meanwhile may come first. *Death*: the
//!    server notices the closed socket within `client_connection_check_interval` and
//!    removes the waiter.

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault, pg_error, pooled, transient};
use super::schema::{MIGRATIONS, NS, held_here, newer_schema, waiting_for};
use super::wait::Waiting;
use crate::channel::Channel;
use crate::store::WaitNote;
use anyhow::anyhow;
use postgres::error::SqlState;
use postgres::types::Type;
use std::time::{Duration, Instant};

/// `-n`'s budget for reaching the server and trying the lock: a server (or a full
/// connection pool in front of it) that has not answered by then counts as busy.
pub const NO_WAIT_WITHIN: Duration = Duration::from_secs(2);
/// How long a waiter whose connection the server dropped keeps trying to reconnect.
pub const RECONNECT_WITHIN: Duration = Duration::from_secs(60);

/// What the channel's row and the try found.
enum Lookup {
    /// No tables yet (or no `chan_run_meta` row).
    NoTables,
    Found {
        version: i32,
        id: Option<i32>,
        got: bool,
        backend: i32,
        held: bool,
    },
}

/// How a wait in the queue ended.
pub enum Waited {
    /// Granted, on the connection's backend (as the server said).
    Got(i32),
    /// The server cancelled the wait (an administrator's `pg_cancel_backend`): the
    /// connection is still good.
    Cancelled(String),
    /// The server dropped the connection (a restart, `pg_terminate_backend`).
    Dropped(String),
}

impl PgStore {
    /// Step 2: the channel's row id and whether this session now holds its lock. The lock
    /// is tried only on this session's own backend (a pooler's other backend would keep
    /// it after this session is gone), and only if that backend does not hold it
    /// already: an advisory lock is reentrant, so a backend that holds it serves another
    /// client's session too (a transaction-mode pooler with one server connection).
    pub(super) fn try_lock(
        &self,
        conn: &Conn,
        channel: &Channel,
        wait: &Waiting,
    ) -> Result<(i32, bool), Fault> {
        let sql = conn.sql(&format!(
            "SELECT m.version, c.id, CASE WHEN c.id IS NOT NULL AND m.version = $2 \
             AND pg_catalog.pg_backend_pid() = $3 AND NOT h.held THEN pg_catalog.pg_try_advisory_lock({NS}, c.id) END, \
             pg_catalog.pg_backend_pid(), h.held \
             FROM {{s}}.chan_run_meta m LEFT JOIN {{s}}.chan_run_channel c ON c.channel = $1 \
             CROSS JOIN LATERAL (SELECT {} AS held) h",
            held_here("c.id")
        ));
        let known = MIGRATIONS.len() as i32;
        let mut migrated = false;
        loop {
            let (sql, name, backend) = (sql.clone(), channel.name().to_owned(), conn.backend);
            let lookup = conn.call(wait, Some(ANSWER_WITHIN), "look up the channel", move |client| {
                let rows = match client
                    .query_typed(&sql, &[(&name, Type::TEXT), (&known, Type::INT4), (&backend, Type::INT4)])
                {
                    Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Lookup::NoTables),
                    other => other?,
                };
                Ok(rows.first().map_or(Lookup::NoTables, |row| Lookup::Found {
                    version: row.get(0),
                    id: row.get(1),
                    got: row.get::<_, Option<bool>>(2).unwrap_or(false),
                    backend: row.get(3),
                    held: row.get(4),
                }))
            })?;
            let Lookup::Found { version, id, got, backend, held } = lookup else {
                if migrated {
                    return Err(Fault::Failed(anyhow!("chan_run_meta is empty after the migration")));
                }
                self.migrate(conn, wait)?;
                migrated = true;
                continue;
            };
            conn.check_backend(backend)?;
            self.refuse_held_elsewhere(conn, held)?;
            if version > known {
                return Err(Fault::Failed(anyhow!(newer_schema(&self.shown, version))));
            }
            if version < known {
                self.migrate(conn, wait)?;
                continue;
            }
            match id {
                Some(id) => return Ok((id, got)),
                None => self.add_channel(conn, channel, wait)?,
            }
        }
    }

    /// A backend that holds the lock already holds it for another client's session.
    fn refuse_held_elsewhere(&self, conn: &Conn, held: bool) -> Result<(), Fault> {
        if held {
            return Err(Fault::Failed(anyhow!(pooled(
                &self.shown,
                &format!(
                    "backend pid {} already holds the channel's lock, for another client's session",
                    conn.backend
                )
            ))));
        }
        Ok(())
    }

    fn add_channel(&self, conn: &Conn, channel: &Channel, wait: &Waiting) -> Result<(), Fault> {
        let sql = conn
            .sql("INSERT INTO {s}.chan_run_channel (channel) VALUES ($1) ON CONFLICT (channel) DO NOTHING");
        let name = channel.name().to_owned();
        conn.call(wait, Some(ANSWER_WITHIN), "add the channel", move |client| {
            client.query_typed(&sql, &[(&name, Type::TEXT)]).map(drop)
        })
    }

    pub(super) fn wait_note(&self, conn: &Conn, id: i32, wait: &Waiting) -> Result<WaitNote, Fault> {
        let sql = conn.sql(&format!(
            "SELECT l.host, l.pid, EXTRACT(EPOCH FROM pg_catalog.now() - l.since)::float8, {} \
             FROM (SELECT $1 AS id) c LEFT JOIN {{s}}.chan_run_lease l ON l.channel_id = c.id",
            waiting_for("$1")
        ));
        conn.call(wait, Some(ANSWER_WITHIN), "read who holds the channel", move |client| {
            let row = client.query_typed_one(&sql, &[(&id, Type::INT4)])?;
            Ok(WaitNote {
                holder_host: row.get(0),
                holder_pid: row.get::<_, Option<i32>>(1).map(|p| p as u32),
                held_for: row.get::<_, Option<f64>>(2).and_then(|s| Duration::try_from_secs_f64(s).ok()),
                ahead: row.get::<_, i64>(3) as usize,
            })
        })
    }

    /// Step 3: waits in `pg_advisory_lock` until granted, the caller's deadline or a
    /// signal (then the waiting statement is cancelled: the caller leaves the queue).
    pub(super) fn wait_in_line(&self, conn: &Conn, id: i32, wait: &Waiting) -> Result<Waited, Fault> {
        // As in try_lock: never queue (and so never lock) on another backend.
        let sql = conn.sql(&format!(
            "SELECT pg_catalog.pg_backend_pid(), \
             CASE WHEN pg_catalog.pg_backend_pid() = $2 THEN pg_catalog.pg_advisory_lock({NS}, $1)::text END"
        ));
        let backend = conn.backend;
        let waited = conn.call(wait, None, "wait for the channel's lock", move |client| {
            Ok(match client.query_typed_one(&sql, &[(&id, Type::INT4), (&backend, Type::INT4)]) {
                Ok(row) => Ok(Waited::Got(row.get(0))),
                Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => Ok(Waited::Cancelled(pg_error(&e))),
                Err(e) if transient(&e) => Ok(Waited::Dropped(pg_error(&e))),
                Err(e) => Err(e),
            })
        })?;
        let waited =
            waited.map_err(|e| super::conn::fault(&self.shown, "wait for the channel's lock", &e))?;
        if let Waited::Got(backend) = waited {
            conn.check_backend(backend)?;
        }
        Ok(waited)
    }

    /// A new connection for a waiter whose connection the server dropped: tries again
    /// while the server is unavailable, for up to [`RECONNECT_WITHIN`].
    pub(super) fn reconnect(&self, wait: &Waiting) -> Result<Conn, Fault> {
        let give_up = Instant::now() + RECONNECT_WITHIN;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.connect(wait) {
                Err(Fault::Unavailable(_)) if Instant::now() + pause < give_up => {
                    wait.sleep(Instant::now() + pause, &[])
                        .map_err(|gave| self.gave_up(gave, "reconnect", pause))?;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }
}
