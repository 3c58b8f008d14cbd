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
//! 3. Busy: `--no-wait` exits; else `pg_advisory_lock` blocks on a helper thread (on the
//!    connection's own backend, as in 2). PostgreSQL grants an advisory lock's waiters
//!    in arrival order, and a release grants the next waiter in the same instant, so a
//!    newcomer's try never jumps the queue: that is SPEC's order, across hosts. `--wait`
//!    running out or a signal sends the server a cancel request for the waiting
//!    statement, which leaves the queue at once. *Death*: the server notices the closed
//!    socket within `client_connection_check_interval` and removes the waiter.

use super::PgStore;
use super::conn::{Conn, pooled};
use super::schema::{MIGRATIONS, NS, held_here, newer_schema, waiting_for};
use crate::channel::Channel;
use crate::control::Control;
use crate::store::{AcquireError, Wait, WaitNote};
use anyhow::{Context, anyhow, bail};
use postgres::NoTls;
use postgres::error::SqlState;
use postgres::types::Type;
use std::sync::mpsc;
use std::time::{Duration, Instant};

impl PgStore {
    /// Step 2: the channel's row id and whether this session now holds its lock. The lock
    /// is tried only on this session's own backend (a pooler's other backend would keep
    /// it after this session is gone), and only if that backend does not hold it
    /// already: an advisory lock is reentrant, so a backend that holds it serves another
    /// client's session too (a transaction-mode pooler with one server connection).
    pub(super) fn try_lock(&self, conn: &mut Conn, channel: &Channel) -> anyhow::Result<(i32, bool)> {
        let sql = format!(
            "SELECT m.version, c.id, CASE WHEN c.id IS NOT NULL AND m.version = $2 \
             AND pg_backend_pid() = $3 AND NOT h.held THEN pg_try_advisory_lock({NS}, c.id) END, \
             pg_backend_pid(), h.held \
             FROM chan_run_meta m LEFT JOIN chan_run_channel c ON c.channel = $1 \
             CROSS JOIN LATERAL (SELECT {} AS held) h",
            held_here("c.id")
        );
        let known = MIGRATIONS.len() as i32;
        let mut migrated = false;
        loop {
            let rows = conn.client.query_typed(
                &sql,
                &[(&channel.name(), Type::TEXT), (&known, Type::INT4), (&conn.backend, Type::INT4)],
            );
            let row = match rows {
                Err(e) if !migrated && e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                    self.migrate(conn)?;
                    migrated = true;
                    continue;
                }
                Err(e) => return Err(self.failed("look up the channel", &e)),
                Ok(rows) if rows.is_empty() && !migrated => {
                    self.migrate(conn)?;
                    migrated = true;
                    continue;
                }
                Ok(rows) => rows.into_iter().next().ok_or_else(|| anyhow!("chan_run_meta is empty"))?,
            };
            conn.check_backend(row.get(3))?;
            self.refuse_held_elsewhere(conn, row.get(4))?;
            let version: i32 = row.get(0);
            if version > known {
                bail!(newer_schema(&self.shown, version));
            }
            if version < known {
                self.migrate(conn)?;
                continue;
            }
            match row.get::<_, Option<i32>>(1) {
                Some(id) => return Ok((id, row.get::<_, Option<bool>>(2).unwrap_or(false))),
                None => self.add_channel(conn, channel)?,
            }
        }
    }

    /// A backend that holds the lock already holds it for another client's session.
    fn refuse_held_elsewhere(&self, conn: &Conn, held: bool) -> anyhow::Result<()> {
        if held {
            bail!(pooled(
                &self.shown,
                &format!(
                    "backend pid {} already holds the channel's lock, for another client's session",
                    conn.backend
                )
            ));
        }
        Ok(())
    }

    fn add_channel(&self, conn: &mut Conn, channel: &Channel) -> anyhow::Result<()> {
        conn.client
            .query_typed(
                "INSERT INTO chan_run_channel (channel) VALUES ($1) ON CONFLICT (channel) DO NOTHING",
                &[(&channel.name(), Type::TEXT)],
            )
            .map_err(|e| self.failed("add the channel", &e))?;
        Ok(())
    }

    pub(super) fn wait_note(&self, conn: &mut Conn, id: i32) -> WaitNote {
        let sql = format!(
            "SELECT holder_host, holder_pid, EXTRACT(EPOCH FROM now() - holder_since)::float8, \
             {} FROM chan_run_channel WHERE id = $1",
            waiting_for("$1")
        );
        let Ok(Some(row)) = conn.client.query_typed(&sql, &[(&id, Type::INT4)]).map(|r| r.into_iter().next())
        else {
            return WaitNote::default();
        };
        WaitNote {
            holder_host: row.get(0),
            holder_pid: row.get::<_, Option<i32>>(1).map(|p| p as u32),
            held_for: row.get::<_, Option<f64>>(2).and_then(|s| Duration::try_from_secs_f64(s).ok()),
            ahead: row.get::<_, i64>(3) as usize,
        }
    }

    /// Step 3: blocks in `pg_advisory_lock` on a helper thread, so this one can watch
    /// the deadline and signals; giving up cancels the waiting statement.
    pub(super) fn wait_in_line(
        &self,
        conn: Conn,
        id: i32,
        wait: Wait,
        control: &Control,
    ) -> Result<Conn, AcquireError> {
        let token = conn.client.cancel_token();
        let tls = self.tls.clone();
        let waker = control.waker().context("cannot set up waiting")?;
        // As in try_lock: never queue (and so never lock) on another backend.
        let sql = format!(
            "SELECT pg_backend_pid(), CASE WHEN pg_backend_pid() = $2 THEN pg_advisory_lock({NS}, $1)::text END"
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut conn = conn;
            let backend = conn.backend;
            let got = conn
                .client
                .query_typed(&sql, &[(&id, Type::INT4), (&backend, Type::INT4)])
                .map(|rows| rows.first().map(|r| r.get::<_, i32>(0)));
            let _ = tx.send((conn, got)); // sent before the wake-up, so the wake finds it
            waker.wake();
        });
        loop {
            if let Ok((conn, got)) = rx.try_recv() {
                return match got {
                    Ok(Some(backend)) => conn.check_backend(backend).map(|()| conn).map_err(Into::into),
                    Ok(None) => Err(anyhow!("waiting for the channel's lock returned no row").into()),
                    Err(e) => Err(self.failed("wait for the channel's lock", &e).into()),
                };
            }
            let gave_up = match (control.take_signal(), wait) {
                (Some(sig), _) => Some(AcquireError::Interrupted(sig)),
                (None, Wait::Until(d)) if Instant::now() >= d => Some(AcquireError::Busy),
                _ => None,
            };
            if let Some(why) = gave_up {
                // Leaves the queue now rather than when the server notices the closed
                // socket. If the lock was granted meanwhile, the connection's close at
                // exit drops it.
                let _ = match tls {
                    Some(tls) => token.cancel_query(tls),
                    None => token.cancel_query(NoTls),
                };
                return Err(why);
            }
            let deadline = match wait {
                Wait::Until(d) => Some(d),
                _ => None,
            };
            control.wait(deadline).context("cannot wait")?;
        }
    }
}
