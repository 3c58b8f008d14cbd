//! The store's verbs: `acquire` runs the protocol's steps 1 to 4 in order; `status`
//! reads holders and queues from `pg_locks` joined with `pg_stat_activity` (taking
//! nothing); `history` reads the history table; `gc` removes idle channels while it
//! holds their lock with nobody queued.

use super::PgStore;
use super::conn::from_application_name;
use super::lease::PgLease;
use super::schema::{LOCK_ROWS, NS, UTC_MS, json_column, waiting_for};
use crate::channel::Channel;
use crate::control::Control;
use crate::state::ChannelRecord;
use crate::store::{AcquireError, ChannelStatus, GcItem, HolderView, Lease, Store, Wait, WaitNote, Waiter};
use anyhow::Context;
use postgres::error::SqlState;
use postgres::types::Type;
use std::time::Duration;

impl Store for PgStore {
    fn id(&self) -> String {
        format!("postgres:{}", self.shown).replace('%', "%25").replace(' ', "%20").replace('\n', "%0A")
    }

    fn acquire(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &Control,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let mut conn = self.connect()?;
        loop {
            let (id, got) = self.try_lock(&mut conn, channel)?;
            if !got {
                if wait == Wait::No {
                    return Err(AcquireError::Busy);
                }
                on_wait(&self.wait_note(&mut conn, id));
                conn = self.wait_in_line(conn, id, wait, control)?;
            }
            if let Some((fence, record)) = self.grant(&mut conn, id)? {
                let alarm = control.lock_lost_alarm().context("cannot set up the heartbeat")?;
                return Ok(Box::new(PgLease {
                    shown: self.shown.clone(),
                    conn: Some(conn),
                    heartbeat: None,
                    alarm: Some(alarm),
                    id,
                    fence,
                    record,
                    lost: None,
                }));
            }
        }
    }

    fn status(&self, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)> {
        let mut conn = self.connect()?;
        let names: Vec<&str> = only.iter().map(Channel::name).collect();
        let sql = format!(
            "SELECT id, channel, session_id, session_cwd, runs, failures_in_a_row, last_run::text, extra::text, \
             holder_host, holder_pid, holder_backend, to_char(holder_since AT TIME ZONE 'UTC', {UTC_MS}), \
             holder_command::text, holder_command_pid \
             FROM chan_run_channel WHERE cardinality($1::text[]) = 0 OR channel = ANY($1) ORDER BY channel"
        );
        let rows = match conn.client.query_typed(&sql, &[(&names, Type::TEXT_ARRAY)]) {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok((Vec::new(), Vec::new())),
            other => other.map_err(|e| self.failed("read the channels", &e))?,
        };
        let locks_sql = format!(
            "SELECT l.objid::int8, l.granted, l.pid, a.application_name, \
             to_char(COALESCE(l.waitstart, a.backend_start) AT TIME ZONE 'UTC', {UTC_MS}) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE {LOCK_ROWS} \
             ORDER BY l.objid, l.granted DESC, l.waitstart NULLS FIRST"
        );
        let locks = conn.client.query_typed(&locks_sql, &[]).map_err(|e| self.failed("read pg_locks", &e))?;
        let out = rows.iter().map(|row| channel_status(row, &locks)).collect();
        Ok((out, Vec::new()))
    }

    fn history(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<crate::history::Entry>> {
        let mut conn = self.connect()?;
        let rows = conn.client.query_typed(
            "SELECT h.entry::text FROM chan_run_history h JOIN chan_run_channel c ON c.id = h.channel_id \
             WHERE c.channel = $1 ORDER BY h.run_no DESC LIMIT $2",
            &[(&channel.name(), Type::TEXT), (&(n.min(i64::MAX as usize) as i64), Type::INT8)],
        );
        let rows = match rows {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Vec::new()),
            other => other.map_err(|e| self.failed("read the history", &e))?,
        };
        Ok(rows.iter().filter_map(|r| serde_json::from_str(&r.get::<_, String>(0)).ok()).collect())
    }

    fn gc(&self, idle_for: Duration, dry_run: bool) -> anyhow::Result<Vec<GcItem>> {
        let mut conn = self.connect()?;
        let rows = conn.client.query_typed(
            "SELECT id, channel, EXTRACT(EPOCH FROM now() - COALESCE(last_finished, created))::float8 \
             FROM chan_run_channel WHERE COALESCE(last_finished, created) < now() - make_interval(secs => $1) \
             ORDER BY channel",
            &[(&idle_for.as_secs_f64().min(1e15), Type::FLOAT8)],
        );
        let rows = match rows {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Vec::new()),
            other => other.map_err(|e| self.failed("find idle channels", &e))?,
        };
        let try_lock = format!("SELECT pg_try_advisory_lock({NS}, $1)");
        let unlock = format!("SELECT pg_advisory_unlock({NS}, $1)");
        let waiters = format!("SELECT {}", waiting_for("$1"));
        let mut items = Vec::new();
        for row in rows {
            let id: i32 = row.get(0);
            let idle = Duration::try_from_secs_f64(row.get::<_, f64>(2)).unwrap_or_default();
            let mut item = GcItem { channel: row.get(1), idle, kept: None };
            let got: bool = conn
                .client
                .query_typed(&try_lock, &[(&id, Type::INT4)])
                .map_err(|e| self.failed("lock an idle channel", &e))?[0]
                .get(0);
            if !got {
                item.kept = Some("running");
            } else {
                let waiting: i64 = conn
                    .client
                    .query_typed(&waiters, &[(&id, Type::INT4)])
                    .map_err(|e| self.failed("count waiters", &e))?[0]
                    .get(0);
                if waiting > 0 {
                    item.kept = Some("callers waiting");
                } else if !dry_run {
                    conn.client
                        .query_typed("DELETE FROM chan_run_channel WHERE id = $1", &[(&id, Type::INT4)])
                        .map_err(|e| self.failed("remove an idle channel", &e))?;
                }
                conn.client
                    .query_typed(&unlock, &[(&id, Type::INT4)])
                    .map_err(|e| self.failed("unlock", &e))?;
            }
            items.push(item);
        }
        Ok(items)
    }
}

/// One channel's status: its row, and its locks from `pg_locks` (holders first, then
/// waiters by `waitstart`). The holder columns are trusted only while the backend they
/// name holds the lock.
fn channel_status(row: &postgres::Row, locks: &[postgres::Row]) -> ChannelStatus {
    let id: i32 = row.get(0);
    let mut status = ChannelStatus { channel: row.get(1), ..Default::default() };
    status.record = Some(ChannelRecord {
        session_id: row.get(2),
        session_cwd: row.get(3),
        runs: row.get::<_, i64>(4) as u64,
        failures_in_a_row: row.get::<_, i64>(5) as u64,
        last_run: json_column(row, 6),
        extra: json_column(row, 7).unwrap_or_default(),
    });
    for lock in locks.iter().filter(|l| l.get::<_, i64>(0) == i64::from(id)) {
        let backend: i32 = lock.get(2);
        let (pid, host) = from_application_name(lock.get::<_, Option<String>>(3).as_deref());
        if lock.get::<_, bool>(1) {
            status.running = true;
            status.holder = Some(if row.get::<_, Option<i32>>(10) == Some(backend) {
                HolderView {
                    host: row.get(8),
                    pid: row.get::<_, Option<i32>>(9).map(|p| p as u32),
                    command_pid: row.get::<_, Option<i32>>(13).map(|p| p as u32),
                    started_at: row.get(11),
                    command: json_column(row, 12).unwrap_or_default(),
                }
            } else {
                HolderView { host, pid, ..Default::default() }
            });
        } else {
            status.queue.push(Waiter { host, pid, since: lock.get(4) });
        }
    }
    status.running |= !status.queue.is_empty();
    status
}
