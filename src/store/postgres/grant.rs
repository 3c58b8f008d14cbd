//! Step 4, the grant: proof of the lock, a new fence, the record, and this run's lease
//! row, once the previous holder's lease has certainly run out.
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

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault, pooled};
use super::heartbeat::{self, STOPS_WITHIN};
use super::schema::{NS, UTC_MS, held_here};
use super::wait::{Gave, Waiting};
use crate::state::ChannelRecord;
use crate::store::DeadRun;
use anyhow::{Context, anyhow};
use postgres::types::Type;
use std::time::{Duration, Instant};

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
    /// The previous holder's run, if it had started a command (its lease row names one).
    pub died: Option<DeadRun>,
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
               EXTRACT(EPOCH FROM heartbeat + stops_within - pg_catalog.now())::float8 AS left, \
               pg_catalog.to_char(since AT TIME ZONE 'UTC', {UTC_MS}) AS since, command::text AS command \
               FROM {{s}}.chan_run_lease WHERE channel_id = $1), \
             ch AS (UPDATE {{s}}.chan_run_channel c SET fence = pg_catalog.nextval('{{s_lit}}.chan_run_fence') \
               WHERE c.id = $1 AND {} RETURNING c.fence, c.session_id, c.session_cwd, c.runs, c.failures_in_a_row, \
               c.last_run::text, c.extra::text), \
             lease AS ({LEASE_INSERT} SELECT $1, ch.fence, {LEASE_VALUES} FROM ch \
               WHERE NOT EXISTS (SELECT 1 FROM old WHERE old.left > 0) {LEASE_REPLACE}) \
             SELECT ch.*, pg_catalog.pg_backend_pid(), old.host, old.pid, old.pid_ticks, old.space, old.command_pid, \
               old.spawn_ticks, old.spawned_ticks, old.left, old.since, old.command FROM ch LEFT JOIN old ON true",
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
        let previous = previous_from(&row, 8);
        let waits = previous.as_ref().is_some_and(|p| p.left > 0.0);
        Ok(Some(Granted {
            fence: row.get(0),
            record: record_from(&row)?,
            died: died_from(&row, previous.as_ref()),
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
        self.wait_out(previous, "the channel's", wait)?;
        self.write_lease(conn, id, fence, wait)
    }

    /// Waits until `previous` (the last holder of what `whose` names, e.g. "the
    /// channel's") has certainly stopped its command: its lease has run out, or, on
    /// this host, its chan-run is gone; then kills what is left of its command here.
    pub(super) fn wait_out(&self, previous: &Previous, whose: &str, wait: &Waiting) -> Result<(), Fault> {
        let left = Duration::try_from_secs_f64(previous.left).unwrap_or_default();
        let here = previous.space.is_some() && previous.space == heartbeat::process_space();
        let who = match (&previous.pid, &previous.host) {
            (Some(pid), Some(host)) => format!("pid {pid} on {host}"),
            _ => "an earlier holder".to_owned(),
        };
        let deadline = Instant::now() + left;
        let alive =
            if here { previous.pid.zip(previous.pid_ticks).and_then(|(p, t)| pidfd_of(p, t)) } else { None };
        let waited = match &alive {
            // Gone: what is left of its command is killed below, as the local store does.
            None if here => Ok(()),
            Some(fd) => {
                crate::ui::warn(format!(
                    "{whose} previous holder ({who}) lost it while its command ran; this run waits for it \
                     to stop that command ({} at most)",
                    crate::duration::short(left)
                ));
                wait.sleep(deadline, &[rustix::fd::AsFd::as_fd(fd)])
            }
            None if wait.until().is_some_and(|u| u <= deadline) => Err(Gave::Busy),
            None => {
                crate::ui::warn(format!(
                    "{whose} previous holder ({who}) ended without releasing it (killed, cut off, or its \
                     session ended); its command may still run, so this run waits for its lease to run out ({} at most)",
                    crate::duration::short(left)
                ));
                wait.sleep(deadline, &[])
            }
        };
        waited.map_err(|gave| self.gave_up(gave, "wait for the previous lease", left))?;
        previous.kill_leftover_here();
        Ok(())
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

/// The run an unclean lease row (columns 16 and 17: since, command) names: a run whose
/// chan-run died or was cut off before it wrote its record (which ends the row).
fn died_from(row: &postgres::Row, previous: Option<&Previous>) -> Option<DeadRun> {
    let previous = previous?;
    let command: Vec<String> = serde_json::from_str(&row.get::<_, Option<String>>(17)?).ok()?;
    Some(DeadRun {
        pid: previous.pid?,
        started_at: row.get::<_, Option<String>>(16)?,
        command_pid: row.get::<_, Option<i32>>(12).map(|p| p as u32),
        command,
    })
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

/// The previous lease from a row's columns `at` to `at + 7` (host, pid, pid_ticks,
/// space, command_pid, spawn_ticks, spawned_ticks, left), if there was one.
pub(super) fn previous_from(row: &postgres::Row, at: usize) -> Option<Previous> {
    let left: f64 = row.get::<_, Option<f64>>(at + 7)?;
    let leftover = match (row.get::<_, Option<i32>>(at + 4), row.get::<_, Option<i64>>(at + 5)) {
        (Some(pgid), Some(spawn_ticks)) => Some(crate::orphans::Leftover {
            pgid: pgid as u32,
            spawn_ticks: spawn_ticks as u64,
            spawned_ticks: row.get::<_, Option<i64>>(at + 6).map(|t| t as u64),
        }),
        _ => None,
    };
    Some(Previous {
        host: row.get(at),
        pid: row.get::<_, Option<i32>>(at + 1).map(|p| p as u32),
        pid_ticks: row.get::<_, Option<i64>>(at + 2).map(|t| t as u64),
        space: row.get(at + 3),
        leftover,
        left,
    })
}
