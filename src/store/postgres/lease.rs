//! Steps 4 and 6, the lease: the grant (proof of the lock, a new fence, the lease
//! row), and the end (the record written only under this run's fence, then the
//! unlock). Step 5, between them, is the heartbeat (heartbeat.rs).
//!
//! 4. Granted: one statement checks in `pg_locks` that this very backend holds the lock
//!    (a transaction-mode pooler would run it on another backend: refused), bumps the
//!    channel's `fence` from the global sequence, reads the record, and writes this
//!    run's lease row (`chan_run_lease`: holder, backend, heartbeat and the holder's
//!    own self-stop bound) unless the previous holder's lease may still run. The fence
//!    strictly grows from one holder to the next, across channels, server restarts and
//!    rows removed by `gc`; the command gets it as `CHAN_RUN_FENCE`. A row removed by
//!    `gc` meanwhile: unlock, start over at 2.
//!    A lease row left by a holder that did not end cleanly (killed, cut off, its
//!    backend terminated, the server restarted) means its command may still run. The
//!    lock says nothing about that, so this run starts only once that lease has
//!    certainly run out: its last heartbeat plus its bound, on the server's clock (the
//!    wait counts against `--wait`; with `-n` the channel is busy). On this host (same
//!    boot and pid namespace) it need not wait that long: once the previous chan-run
//!    is gone, what is left of its command's process group is killed (`orphans`, as the
//!    local store does) and the run starts. *Death before the lease row is written*: the
//!    previous lease row stays for the next holder. *After*: this run's row says when
//!    its command is gone at the latest.
//! 6. One statement writes the record and its history row `WHERE fence = <this
//!    run's>`, and must change exactly one row; else "lock lost, state not written" and
//!    exit 122. The same statement ends the lease (deletes its row). Only after it
//!    committed does `pg_advisory_unlock` grant the next waiter (an unlock inside the
//!    statement would let the next holder read the old record). Both are bounded by the
//!    run's return-time promise. *Death between*: the record, history and lease end are
//!    committed or not, together; the lock goes with the connection.

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault, Waiting, pg_error, pooled};
use super::heartbeat::{self, Beat, Heartbeat, HolderColumns, LOST_GRACE, STOPS_WITHIN};
use super::schema::{HISTORY_KEEP, NS, held_here};
use crate::state::ChannelRecord;
use crate::store::{Holder, Lease, LockLost, WriteError};
use anyhow::{Context, anyhow, bail};
use postgres::types::Type;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// However late the run is, its final write gets this long.
const FINAL_WRITE_FLOOR: Duration = Duration::from_millis(100);

/// The lease row: inserted from the `SELECT` between these two, or replacing the row a
/// previous holder left. `$2` host, `$3` pid, `$4` its start ticks, `$5` the bound.
const LEASE_INSERT: &str = "INSERT INTO {s}.chan_run_lease AS l (channel_id, fence, host, pid, pid_ticks, backend, \
     since, heartbeat, stops_within) ";
const LEASE_VALUES: &str = "$2, $3, $4, pg_catalog.pg_backend_pid(), pg_catalog.now(), pg_catalog.now(), \
     pg_catalog.make_interval(secs => $5)";
const LEASE_REPLACE: &str = " ON CONFLICT (channel_id) DO UPDATE SET fence = EXCLUDED.fence, host = EXCLUDED.host, \
     pid = EXCLUDED.pid, pid_ticks = EXCLUDED.pid_ticks, backend = EXCLUDED.backend, since = EXCLUDED.since, \
     heartbeat = EXCLUDED.heartbeat, stops_within = EXCLUDED.stops_within, command = NULL, command_pid = NULL, \
     space = NULL, spawn_ticks = NULL, spawned_ticks = NULL";

/// The previous holder's lease, when it did not end cleanly.
pub struct Previous {
    host: Option<String>,
    pid: Option<u32>,
    pid_ticks: Option<u64>,
    space: Option<String>,
    leftover: Option<crate::orphans::Leftover>,
    /// Until its bound has passed, on the server's clock (0 or less: over).
    left: f64,
}

impl Previous {
    /// Kills what is left of the previous holder's command if it ran on this host.
    pub fn kill_leftover_here(&self) {
        if let (Some(space), Some(leftover)) = (&self.space, &self.leftover)
            && Some(space) == heartbeat::process_space().as_ref()
        {
            crate::orphans::kill(leftover);
        }
    }
}

/// What the grant found: the fence and record, and whether this run's lease row is
/// written or waits for the previous one to run out.
pub struct Granted {
    pub fence: i64,
    pub record: ChannelRecord,
    pub previous: Option<Previous>,
    /// When this run's lease row was written (the proof its heartbeat counts from).
    pub proven_at: Option<Instant>,
}

impl PgStore {
    /// Step 4: proves this backend holds the lock, bumps the fence, reads the record and
    /// writes the lease row if the previous lease is over. `None`: the row was removed
    /// by `gc` meanwhile (unlocked).
    pub(super) fn grant(&self, conn: &Conn, id: i32, wait: &Waiting) -> Result<Option<Granted>, Fault> {
        let sql = conn.sql(&format!(
            "WITH old AS (SELECT host, pid, pid_ticks, space, command_pid, spawn_ticks, spawned_ticks, \
               EXTRACT(EPOCH FROM heartbeat + stops_within - pg_catalog.now())::float8 AS left \
               FROM {{s}}.chan_run_lease WHERE channel_id = $1), \
             ch AS (UPDATE {{s}}.chan_run_channel c SET fence = pg_catalog.nextval('{{s_lit}}.chan_run_fence') \
               WHERE c.id = $1 AND {} RETURNING c.fence, c.session_id, c.session_cwd, c.runs, c.failures_in_a_row, \
               c.last_run::text, c.extra::text), \
             lease AS ({LEASE_INSERT} SELECT $1, ch.fence, {LEASE_VALUES} FROM ch \
               WHERE NOT EXISTS (SELECT 1 FROM old WHERE old.left > 0) {LEASE_REPLACE}) \
             SELECT ch.*, pg_catalog.pg_backend_pid(), old.host, old.pid, old.pid_ticks, old.space, old.command_pid, \
               old.spawn_ticks, old.spawned_ticks, old.left FROM ch LEFT JOIN old ON true",
            held_here("$1"),
        ));
        let (host, pid, ticks) = (self.host.clone(), std::process::id() as i32, own_start_ticks());
        let sent = Instant::now();
        let stops = STOPS_WITHIN.as_secs_f64();
        let row = conn.call(wait, Some(ANSWER_WITHIN), "take the channel", move |client| {
            let params: [(&(dyn postgres::types::ToSql + Sync), Type); 5] = [
                (&id, Type::INT4),
                (&host, Type::TEXT),
                (&pid, Type::INT4),
                (&ticks, Type::INT8),
                (&stops, Type::FLOAT8),
            ];
            Ok(client.query_typed(&sql, &params)?.into_iter().next())
        })?;
        let Some(row) = row else {
            return self.not_granted(conn, id, wait).map(|()| None);
        };
        conn.check_backend(row.get(7))?;
        let previous = previous_from(&row);
        let waits = previous.as_ref().is_some_and(|p| p.left > 0.0);
        Ok(Some(Granted {
            fence: row.get(0),
            record: record_from(&row)?,
            previous,
            proven_at: (!waits).then_some(sent),
        }))
    }

    /// The grant changed no row: the row is gone (removed by `gc`: unlocked, so the
    /// caller starts over), or the lock is not this backend's (a pooler).
    fn not_granted(&self, conn: &Conn, id: i32, wait: &Waiting) -> Result<(), Fault> {
        let (exists, unlock) = (
            conn.sql("SELECT EXISTS (SELECT 1 FROM {s}.chan_run_channel WHERE id = $1), pg_catalog.pg_backend_pid()"),
            conn.sql(&format!("SELECT pg_catalog.pg_advisory_unlock({NS}, $1)")),
        );
        let (found, backend) = conn.call(wait, Some(ANSWER_WITHIN), "take the channel", move |client| {
            let row = client.query_typed_one(&exists, &[(&id, Type::INT4)])?;
            Ok((row.get::<_, bool>(0), row.get::<_, i32>(1)))
        })?;
        conn.check_backend(backend)?;
        if found {
            let why = "the backend that took the lock no longer runs this session's statements";
            return Err(Fault::Failed(anyhow!(pooled(&self.shown, why))));
        }
        conn.call(wait, Some(ANSWER_WITHIN), "unlock a removed channel", move |client| {
            client.query_typed(&unlock, &[(&id, Type::INT4)]).map(drop)
        })
    }

    /// Waits until the previous holder's lease has run out (or, on this host, its
    /// chan-run is gone and its leftovers killed), then writes this run's lease row.
    /// Returns when that row was written.
    pub(super) fn outlast(
        &self,
        conn: &Conn,
        id: i32,
        fence: i64,
        previous: &Previous,
        wait: &Waiting,
    ) -> Result<Instant, Fault> {
        let left = Duration::try_from_secs_f64(previous.left).unwrap_or_default();
        let here = previous.space.is_some() && previous.space == heartbeat::process_space();
        let who = match (&previous.pid, &previous.host) {
            (Some(pid), Some(host)) => format!("pid {pid} on {host}"),
            _ => "an earlier holder".to_owned(),
        };
        if wait.until().is_some_and(|u| u <= Instant::now() + left) && !here {
            return Err(Fault::Busy);
        }
        crate::ui::warn(format!(
            "the channel's previous holder ({who}) ended without releasing it (killed, cut off, or its session ended); \
             its command may still run, so this run waits for its lease to run out ({} at most)",
            crate::duration::short(left)
        ));
        let deadline = Instant::now() + left;
        let alive =
            if here { previous.pid.zip(previous.pid_ticks).and_then(|(p, t)| pidfd_of(p, t)) } else { None };
        match &alive {
            Some(fd) => wait.sleep(deadline, &[rustix::fd::AsFd::as_fd(fd)]),
            None if here => Ok(()),
            None => wait.sleep(deadline, &[]),
        }
        .map_err(|gave| self.gave_up(gave, "wait for the previous lease", left))?;
        previous.kill_leftover_here();
        self.write_lease(conn, id, fence, wait)
    }

    fn write_lease(&self, conn: &Conn, id: i32, fence: i64, wait: &Waiting) -> Result<Instant, Fault> {
        let sql = conn.sql(&format!("{LEASE_INSERT} SELECT $1, $6, {LEASE_VALUES} {LEASE_REPLACE}"));
        let (host, pid, ticks) = (self.host.clone(), std::process::id() as i32, own_start_ticks());
        let stops = STOPS_WITHIN.as_secs_f64();
        let sent = Instant::now();
        conn.call(wait, Some(ANSWER_WITHIN), "record the lease", move |client| {
            let params: [(&(dyn postgres::types::ToSql + Sync), Type); 6] = [
                (&id, Type::INT4),
                (&host, Type::TEXT),
                (&pid, Type::INT4),
                (&ticks, Type::INT8),
                (&stops, Type::FLOAT8),
                (&fence, Type::INT8),
            ];
            client.query_typed(&sql, &params).map(drop)
        })?;
        Ok(sent)
    }
}

/// This process's start, in clock ticks since boot (with its pid, its identity).
fn own_start_ticks() -> Option<i64> {
    crate::procfs::stat(std::process::id()).and_then(|s| i64::try_from(s.start_ticks).ok())
}

/// A pidfd of `pid` if it is still the process that started at `ticks` (readable once
/// it exits).
fn pidfd_of(pid: u32, ticks: u64) -> Option<rustix::fd::OwnedFd> {
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
    // Checked after the open: a pid reused before it would show another start.
    let same = crate::procfs::stat(pid).is_some_and(|s| s.start_ticks == ticks && !s.is_dead());
    same.then_some(fd)
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

/// The previous lease from the grant's row (columns 8 to 15), if there was one.
fn previous_from(row: &postgres::Row) -> Option<Previous> {
    let left: f64 = row.get::<_, Option<f64>>(15)?;
    let leftover = match (row.get::<_, Option<i32>>(12), row.get::<_, Option<i64>>(13)) {
        (Some(pgid), Some(spawn_ticks)) => Some(crate::orphans::Leftover {
            pgid: pgid as u32,
            spawn_ticks: spawn_ticks as u64,
            spawned_ticks: row.get::<_, Option<i64>>(14).map(|t| t as u64),
        }),
        _ => None,
    };
    Some(Previous {
        host: row.get(8),
        pid: row.get::<_, Option<i32>>(9).map(|p| p as u32),
        pid_ticks: row.get::<_, Option<i64>>(10).map(|t| t as u64),
        space: row.get(11),
        leftover,
        left,
    })
}

pub struct PgLease {
    pub conn: Conn,
    pub heartbeat: Heartbeat,
    pub id: i32,
    pub fence: i64,
    pub record: ChannelRecord,
    /// The run's return-time promise, from `announce`.
    pub ends_by: Option<Instant>,
    /// The final write ended the lease row.
    pub ended: bool,
}

impl PgLease {
    /// How long the next statement may take: [`ANSWER_WITHIN`], and within the run's
    /// return-time promise (at least [`FINAL_WRITE_FLOOR`]).
    fn within(&self) -> Duration {
        let promise =
            self.ends_by.map(|by| by.saturating_duration_since(Instant::now()).max(FINAL_WRITE_FLOOR));
        promise.map_or(ANSWER_WITHIN, |p| p.min(ANSWER_WITHIN))
    }

    /// Step 6, the write, `WHERE fence = <this run's>`: the record, and with `entry` the
    /// history row (the oldest beyond [`HISTORY_KEEP`] dropped) and the lease's end, in
    /// one statement.
    fn write(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: Option<&mut dyn FnMut(&ChannelRecord) -> crate::history::Entry>,
    ) -> anyhow::Result<()> {
        if let Some(why) = self.heartbeat.stop() {
            return Err(LockLost(why).into());
        }
        let mut record = self.record.clone();
        change(&mut record);
        let ends = entry.is_some();
        let entry = entry.map(|make| serde_json::to_string(&make(&record))).transpose()?;
        let last_run = record.last_run.as_ref().map(serde_json::to_string).transpose()?;
        let finished = record.last_run.as_ref().map(|r| r.finished_at.clone());
        let extra = serde_json::to_string(&record.extra)?;
        let (runs, failures) = (record.runs as i64, record.failures_in_a_row as i64);
        let (id, fence, keep) = (self.id, self.fence, HISTORY_KEEP);
        let (session_id, session_cwd) = (record.session_id.clone(), record.session_cwd.clone());
        let sql = self.conn.sql(
            "WITH updated AS (UPDATE {s}.chan_run_channel SET session_id = $3, session_cwd = $4, runs = $5, \
             failures_in_a_row = $6, last_run = $7::jsonb, last_finished = $8::timestamptz, extra = $9::jsonb \
             WHERE id = $1 AND fence = $2 RETURNING runs), \
             ended AS (DELETE FROM {s}.chan_run_lease WHERE channel_id = $1 AND fence = $2 AND $12 \
             AND EXISTS (SELECT 1 FROM updated)), \
             added AS (INSERT INTO {s}.chan_run_history (channel_id, run_no, entry) \
             SELECT $1, runs, $10::jsonb FROM updated WHERE $10 IS NOT NULL \
             ON CONFLICT (channel_id, run_no) DO UPDATE SET entry = EXCLUDED.entry RETURNING run_no), \
             dropped AS (DELETE FROM {s}.chan_run_history WHERE channel_id = $1 \
             AND run_no <= (SELECT run_no FROM added) - $11) \
             SELECT pg_catalog.pg_backend_pid() FROM updated",
        );
        let answer =
            self.conn.call(&Waiting::plain(), Some(self.within()), "record the run", move |client| {
                let params: [(&(dyn postgres::types::ToSql + Sync), Type); 12] = [
                    (&id, Type::INT4),
                    (&fence, Type::INT8),
                    (&session_id, Type::TEXT),
                    (&session_cwd, Type::TEXT),
                    (&runs, Type::INT8),
                    (&failures, Type::INT8),
                    (&last_run, Type::TEXT),
                    (&finished, Type::TEXT),
                    (&extra, Type::TEXT),
                    (&entry, Type::TEXT),
                    (&keep, Type::INT8),
                    (&ends, Type::BOOL),
                ];
                match client.query_typed(&sql, &params) {
                    Ok(rows) => Ok(Ok(rows.first().map(|r| r.get::<_, i32>(0)))),
                    // A broken connection: the lock went with it.
                    Err(e) if client.is_closed() || e.code().is_none() => Ok(Err(pg_error(&e))),
                    Err(e) => Err(e),
                }
            });
        let backend = match answer.map_err(anyhow::Error::from)? {
            Ok(backend) => backend,
            Err(why) => {
                let shown = self.conn.shown();
                return Err(LockLost(format!("the connection to PostgreSQL at {shown} broke ({why})")).into());
            }
        };
        let Some(backend) = backend else {
            return Err(
                LockLost(format!("the channel's fence moved past {fence}: another holder took it")).into()
            );
        };
        self.conn.check_backend(backend)?;
        self.record = record;
        self.ended |= ends;
        Ok(())
    }
}

impl Lease for PgLease {
    fn announce(&mut self, holder: &Holder) -> anyhow::Result<()> {
        let command = serde_json::to_string(&crate::store::capped(holder.command))?;
        let since = humantime::format_rfc3339_millis(holder.started_at).to_string();
        self.ends_by = holder.ends_by;
        // The heartbeat's next beat writes the holder's command and start with the
        // command's pid, as the command starts: no round trip between grant and spawn.
        self.heartbeat.send(Beat::Holder(HolderColumns { since, command, spawn_ticks: holder.spawn_ticks }));
        Ok(())
    }

    fn pid_slot(&self) -> Option<(RawFd, u64, usize)> {
        None
    }

    fn command_started(&mut self, pid: u32, ticks: u64) {
        self.heartbeat.send(Beat::CommandPid(pid, ticks));
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
        if let Some(why) = self.heartbeat.stop() {
            bail!("{}", LockLost(why));
        }
        let (id, fence, ended) = (self.id, self.fence, self.ended);
        let (end, unlock) = (
            self.conn.sql("DELETE FROM {s}.chan_run_lease WHERE channel_id = $1 AND fence = $2"),
            self.conn
                .sql(&format!("SELECT pg_catalog.pg_advisory_unlock({NS}, $1), pg_catalog.pg_backend_pid()")),
        );
        let within = self.within();
        let (unlocked, backend) = self
            .conn
            .call(&Waiting::plain(), Some(within), "unlock the channel", move |client| {
                if !ended {
                    client.query_typed(&end, &[(&id, Type::INT4), (&fence, Type::INT8)])?;
                }
                let row = client.query_typed_one(&unlock, &[(&id, Type::INT4)])?;
                Ok((row.get::<_, bool>(0), row.get::<_, i32>(1)))
            })
            .map_err(|f| {
                anyhow::Error::from(f).context("the server drops the lock as the connection closes")
            })?;
        if !unlocked {
            bail!(
                "the unlock found no lock of this session's on the channel (backend {backend}, expected {}); a pooler may keep it",
                self.conn.backend
            );
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
