//! Steps 4 and 6, the lease: the grant (proof of the lock, a new fence, the holder
//! recorded), and the end (the record written only under this run's fence, then the
//! unlock). Step 5, between them, is the heartbeat (heartbeat.rs).
//!
//! 4. Granted: one statement checks in `pg_locks` that this very backend holds the lock
//!    (a transaction-mode pooler would run it on another backend: refused), bumps the
//!    row's `fence` from the global sequence, records the holder and returns the
//!    channel's record. The fence strictly grows from one holder to the next, across
//!    channels, server restarts and rows removed by `gc`; the command gets it as
//!    `CHAN_RUN_FENCE`. A row removed by `gc` meanwhile: unlock, start over at 2.
//!    The same statement returns the previous holder's process group if that holder
//!    died uncleanly: when it died on this host (same boot, same pid namespace), what is
//!    left of its group is killed before this run starts (`orphans`, as the local store
//!    does). *Death before*: as 2. *After*: the lock is dropped; the holder columns stay
//!    until the next holder overwrites them, and `status` trusts them only while the
//!    backend they name holds the lock.
//! 6. One statement writes the record and its history row `WHERE fence = <this
//!    run's>`, and must change exactly one row; else "lock lost, state not written" and
//!    exit 122. Only after it committed does `pg_advisory_unlock` grant the next waiter
//!    (an unlock inside the statement would let the next holder read the old record).
//!    The connection then closes with the process. *Death between*: the record and
//!    history are committed or not, together; the lock goes with the connection.

use super::PgStore;
use super::conn::{Conn, pg_error, pooled};
use super::heartbeat::{self, Beat, Heartbeat, HolderColumns, LOST_GRACE};
use super::schema::{HISTORY_KEEP, NS, held_here};
use crate::control::LockLostAlarm;
use crate::state::ChannelRecord;
use crate::store::{Holder, Lease, LockLost, WriteError};
use anyhow::{Context, anyhow, bail};
use postgres::types::Type;
use std::os::fd::RawFd;
use std::sync::mpsc;
use std::time::Duration;

pub struct PgLease {
    pub shown: String,
    /// `None` while the heartbeat thread has it.
    pub conn: Option<Conn>,
    pub heartbeat: Option<Heartbeat>,
    pub alarm: Option<LockLostAlarm>,
    pub id: i32,
    pub fence: i64,
    pub record: ChannelRecord,
    /// Why the lock is known lost.
    pub lost: Option<String>,
}

impl PgStore {
    /// Step 4: proves this backend holds the lock, bumps the fence, records the holder
    /// and reads the record. `None`: the row was removed by `gc` meanwhile (unlocked).
    pub(super) fn grant(&self, conn: &mut Conn, id: i32) -> anyhow::Result<Option<(i64, ChannelRecord)>> {
        // `old`: the previous holder's process group, still there if it died uncleanly.
        let sql = format!(
            "UPDATE chan_run_channel c SET fence = nextval('chan_run_fence'), holder_host = $2, holder_pid = $3, \
             holder_backend = pg_backend_pid(), holder_since = now(), heartbeat = now(), holder_command = NULL, \
             holder_command_pid = NULL, holder_space = NULL, holder_spawn_ticks = NULL, holder_spawned_ticks = NULL \
             FROM (SELECT holder_space, holder_command_pid, holder_spawn_ticks, holder_spawned_ticks \
             FROM chan_run_channel WHERE id = $1) AS old \
             WHERE c.id = $1 AND {} \
             RETURNING c.fence, c.session_id, c.session_cwd, c.runs, c.failures_in_a_row, c.last_run::text, \
             c.extra::text, pg_backend_pid(), old.holder_space, old.holder_command_pid, old.holder_spawn_ticks, \
             old.holder_spawned_ticks",
            held_here("$1")
        );
        let pid = std::process::id() as i32;
        let rows = conn
            .client
            .query_typed(&sql, &[(&id, Type::INT4), (&self.host, Type::TEXT), (&pid, Type::INT4)])
            .map_err(|e| self.failed("take the channel", &e))?;
        let Some(row) = rows.into_iter().next() else {
            return self.not_granted(conn, id).map(|()| None);
        };
        conn.check_backend(row.get(7))?;
        let record = record_from(&row)?;
        kill_leftover(&row);
        Ok(Some((row.get(0), record)))
    }

    /// The grant changed no row: the row is gone (removed by `gc`: unlocked, so the
    /// caller starts over), or the lock is not this backend's (a pooler).
    fn not_granted(&self, conn: &mut Conn, id: i32) -> anyhow::Result<()> {
        let row = conn
            .client
            .query_typed(
                "SELECT EXISTS (SELECT 1 FROM chan_run_channel WHERE id = $1), pg_backend_pid()",
                &[(&id, Type::INT4)],
            )
            .map_err(|e| self.failed("take the channel", &e))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no row"))?;
        conn.check_backend(row.get(1))?;
        if row.get::<_, bool>(0) {
            bail!(pooled(
                &self.shown,
                "the backend that took the lock no longer runs this session's statements"
            ));
        }
        conn.client
            .query_typed(&format!("SELECT pg_advisory_unlock({NS}, $1)"), &[(&id, Type::INT4)])
            .map_err(|e| self.failed("unlock a removed channel", &e))?;
        Ok(())
    }
}

/// The channel's record from the grant's row (columns 1 to 6).
fn record_from(row: &postgres::Row) -> anyhow::Result<ChannelRecord> {
    let json = |i: usize| -> anyhow::Result<Option<serde_json::Value>> {
        Ok(row.get::<_, Option<String>>(i).map(|t| serde_json::from_str(&t)).transpose()?)
    };
    let extra = match json(6)? {
        Some(serde_json::Value::Object(map)) => map,
        _ => Default::default(),
    };
    Ok(ChannelRecord {
        session_id: row.get(1),
        session_cwd: row.get(2),
        runs: row.get::<_, i64>(3) as u64,
        failures_in_a_row: row.get::<_, i64>(4) as u64,
        last_run: json(5)?.map(serde_json::from_value).transpose().context("the stored last run")?,
        extra,
    })
}

/// What is left of a holder that died on this very host (same boot, same pid
/// namespace) is killed before this run starts, as the local store does.
fn kill_leftover(row: &postgres::Row) {
    if let (Some(space), Some(pgid), Some(spawn_ticks)) =
        (row.get::<_, Option<String>>(8), row.get::<_, Option<i32>>(9), row.get::<_, Option<i64>>(10))
        && Some(space) == heartbeat::process_space()
    {
        let left = crate::orphans::Leftover {
            pgid: pgid as u32,
            spawn_ticks: spawn_ticks as u64,
            spawned_ticks: row.get::<_, Option<i64>>(11).map(|t| t as u64),
        };
        crate::orphans::kill(&left);
    }
}

impl PgLease {
    /// The connection back from the heartbeat thread, unless the lock is lost.
    fn conn(&mut self) -> anyhow::Result<&mut Conn> {
        if let Some(beat) = self.heartbeat.take() {
            drop(beat.tx); // the thread's next wait sees the hang-up and returns
            let (conn, lost) = beat.thread.join().map_err(|_| anyhow!("the heartbeat thread panicked"))?;
            self.conn = Some(conn);
            self.lost = self.lost.take().or(lost);
        }
        if let Some(why) = &self.lost {
            return Err(LockLost(why.clone()).into());
        }
        self.conn.as_mut().ok_or_else(|| anyhow!("the connection is gone"))
    }

    /// A failed statement while holding: a broken connection means the lock went with it.
    fn check(
        &mut self,
        what: &str,
        result: Result<Vec<postgres::Row>, postgres::Error>,
    ) -> anyhow::Result<Vec<postgres::Row>> {
        match result {
            Ok(rows) => Ok(rows),
            Err(e) if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) || e.code().is_none() => {
                let why = format!("the connection to PostgreSQL at {} broke ({})", self.shown, pg_error(&e));
                self.lost = Some(why.clone());
                Err(LockLost(why).into())
            }
            Err(e) => Err(anyhow!("PostgreSQL at {}: cannot {what}: {}", self.shown, pg_error(&e))),
        }
    }

    /// Step 6, the final write, `WHERE fence = <this run's>`: the record, and with
    /// `entry` the history row (the oldest beyond [`HISTORY_KEEP`] dropped), in one
    /// statement.
    fn write(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: Option<&mut dyn FnMut(&ChannelRecord) -> crate::history::Entry>,
    ) -> anyhow::Result<()> {
        let mut record = self.record.clone();
        change(&mut record);
        let entry = entry.map(|make| serde_json::to_string(&make(&record))).transpose()?;
        let last_run = record.last_run.as_ref().map(serde_json::to_string).transpose()?;
        let finished = record.last_run.as_ref().map(|r| r.finished_at.clone());
        let extra = serde_json::to_string(&record.extra)?;
        let (runs, failures) = (record.runs as i64, record.failures_in_a_row as i64);
        let (id, fence, keep) = (self.id, self.fence, HISTORY_KEEP);
        let result = self.conn()?.client.query_typed(
            "WITH updated AS (UPDATE chan_run_channel SET session_id = $3, session_cwd = $4, runs = $5, \
             failures_in_a_row = $6, last_run = $7::jsonb, last_finished = $8::timestamptz, extra = $9::jsonb, \
             holder_host = NULL, holder_pid = NULL, holder_backend = NULL, holder_since = NULL, \
             holder_command = NULL, holder_command_pid = NULL, heartbeat = NULL, holder_space = NULL, \
             holder_spawn_ticks = NULL, holder_spawned_ticks = NULL \
             WHERE id = $1 AND fence = $2 RETURNING runs), \
             added AS (INSERT INTO chan_run_history (channel_id, run_no, entry) \
             SELECT $1, runs, $10::jsonb FROM updated WHERE $10 IS NOT NULL \
             ON CONFLICT (channel_id, run_no) DO UPDATE SET entry = EXCLUDED.entry RETURNING run_no), \
             dropped AS (DELETE FROM chan_run_history WHERE channel_id = $1 \
             AND run_no <= (SELECT run_no FROM added) - $11) \
             SELECT pg_backend_pid() FROM updated",
            &[
                (&id, Type::INT4),
                (&fence, Type::INT8),
                (&record.session_id, Type::TEXT),
                (&record.session_cwd, Type::TEXT),
                (&runs, Type::INT8),
                (&failures, Type::INT8),
                (&last_run, Type::TEXT),
                (&finished, Type::TEXT),
                (&extra, Type::TEXT),
                (&entry, Type::TEXT),
                (&keep, Type::INT8),
            ],
        );
        let rows = self.check("record the run", result)?;
        self.changed_one(&rows)?;
        self.record = record;
        Ok(())
    }

    /// The row must have changed, on this run's backend.
    fn changed_one(&mut self, rows: &[postgres::Row]) -> anyhow::Result<()> {
        let Some(row) = rows.first() else {
            let why = format!("the channel's fence moved past {}: another holder took it", self.fence);
            self.lost = Some(why.clone());
            return Err(LockLost(why).into());
        };
        self.conn()?.check_backend(row.get(0))
    }
}

impl Lease for PgLease {
    fn announce(&mut self, holder: &Holder) -> anyhow::Result<()> {
        let command = serde_json::to_string(&crate::store::capped(holder.command))?;
        let since = humantime::format_rfc3339_millis(holder.started_at).to_string();
        let (id, fence) = (self.id, self.fence);
        // From here until the run is recorded, the heartbeat thread has the connection.
        // Its first beat writes the holder's command and start with the command's pid,
        // while the command starts: no round trip between the grant and the spawn.
        if let (Some(conn), Some(alarm)) = (self.conn.take(), self.alarm.take()) {
            let (tx, rx) = mpsc::channel();
            let holder = HolderColumns { since, command, spawn_ticks: holder.spawn_ticks };
            let thread = std::thread::spawn(move || heartbeat::run(conn, id, fence, holder, rx, alarm));
            self.heartbeat = Some(Heartbeat { tx, thread });
        }
        Ok(())
    }

    fn pid_slot(&self) -> Option<(RawFd, u64, usize)> {
        None
    }

    fn command_started(&mut self, pid: u32, ticks: u64) {
        if let Some(beat) = &self.heartbeat {
            let _ = beat.tx.send(Beat::CommandPid(pid, ticks));
        }
    }

    fn record(&mut self) -> anyhow::Result<ChannelRecord> {
        Ok(self.record.clone())
    }

    fn fence(&self) -> Option<i64> {
        Some(self.fence)
    }

    fn lost_grace(&self) -> Option<Duration> {
        Some(LOST_GRACE)
    }

    fn update(&mut self, change: &mut dyn FnMut(&mut ChannelRecord)) -> Result<(), WriteError> {
        self.write(change, None).map_err(write_error)
    }

    fn record_run(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: &mut dyn FnMut(&ChannelRecord) -> crate::history::Entry,
    ) -> (Result<(), WriteError>, anyhow::Result<()>) {
        (self.write(change, Some(entry)).map_err(write_error), Ok(()))
    }

    fn release(mut self: Box<Self>) -> anyhow::Result<()> {
        let id = self.id;
        let conn = self.conn()?;
        let rows = conn
            .client
            .query_typed(
                &format!("SELECT pg_advisory_unlock({NS}, $1), pg_backend_pid()"),
                &[(&id, Type::INT4)],
            )
            .map_err(|e| {
                anyhow!(
                    "cannot unlock the channel ({}); the server drops the lock as the connection closes",
                    pg_error(&e)
                )
            })?;
        let unlocked = rows.first().is_some_and(|r| r.get::<_, bool>(0));
        if !unlocked {
            let backend = rows.first().map(|r| r.get::<_, i32>(1));
            bail!(
                "the unlock found no lock of this session's on the channel (backend {backend:?}, expected {}); a pooler may keep it",
                conn.backend
            );
        }
        // Not closed politely: that waits for the backend to exit, and the channel is
        // already handed on. The socket closes as this process exits, which the server
        // takes as the quiet end of an idle session.
        if let Some(conn) = self.conn.take() {
            std::mem::forget(conn);
        }
        Ok(())
    }
}

/// A failed write: lock lost (typed), or a plain failure.
fn write_error(e: anyhow::Error) -> WriteError {
    match e.downcast::<LockLost>() {
        Ok(lost) => WriteError::LockLost(lost),
        Err(e) => WriteError::Failed(e),
    }
}
