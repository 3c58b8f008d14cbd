//! The store's verbs: `acquire` runs the protocol's steps 1 to 4 in order; `status`
//! reads holders and queues from `pg_locks` joined with `pg_stat_activity` (taking
//! nothing); `history` reads the history table; `gc` removes idle channels while it
//! holds their lock with nobody queued.

use super::PgStore;
use super::collect::{Batch, Joining, new_token};
use super::conn::{ANSWER_WITHIN, Conn, Fault, from_application_name};
use super::heartbeat::{Heartbeat, STOPS_WITHIN};
use super::lease::PgLease;
use super::queue::{NO_WAIT_WITHIN, Waited};
use super::schema::{LOCK_ROWS, NS, UTC_MS, json_column, waiting_for};
use super::wait::Waiting;
use crate::channel::Channel;
use crate::control::Control;
use crate::state::ChannelRecord;
use crate::store::{
    AcquireError, ChannelStatus, CollectEntry, GcItem, GcReport, HolderView, Lease, Store, Turn, Wait,
    WaitNote, Waiter,
};
use anyhow::Context;
use postgres::error::SqlState;
use postgres::types::Type;
use std::time::{Duration, Instant};

impl Store for PgStore {
    fn id(&self) -> String {
        format!("postgres:{}", self.shown).replace('%', "%25").replace(' ', "%20").replace('\n', "%0A")
    }

    fn url_without_password(&self) -> Option<String> {
        Some(self.public_url.clone())
    }

    fn acquire(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &Control,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<Box<dyn Lease>, AcquireError> {
        match self.acquire_as(channel, wait, control, on_wait, None)? {
            Acquired::Lease(lease) => Ok(lease),
            Acquired::Answered(_) => {
                Err(anyhow::anyhow!("a verdict for a caller that queued no message").into())
            }
        }
    }

    fn acquire_collect(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&WaitNote),
        entry: &CollectEntry,
    ) -> Result<Turn, AcquireError> {
        let mut joining = Joining { entry, token: new_token(&self.host), conn: None };
        match self.acquire_as(channel, wait, control, on_wait, Some(&mut joining)) {
            Ok(Acquired::Lease(mut lease)) => {
                lease.collect = Some(Batch {
                    fingerprint: entry.fingerprint.clone(),
                    taken: Vec::new(),
                    code: None,
                    settled: false,
                });
                Ok(Turn::Run(lease))
            }
            Ok(Acquired::Answered(verdict)) => Ok(Turn::Answered(verdict)),
            Err(AcquireError::Interrupted(sig)) if self.withdraw(&joining) => {
                Ok(Turn::TakenThenInterrupted(sig))
            }
            Err(e) => {
                self.withdraw(&joining);
                Err(e)
            }
        }
    }

    fn pools(&self, only: &[Channel]) -> anyhow::Result<Vec<crate::store::PoolStatus>> {
        self.pool_statuses(only)
    }

    fn pool_ledgers(&self, only: &[Channel]) -> anyhow::Result<Vec<crate::store::PoolLedger>> {
        self.ledgers(only)
    }

    fn status(&self, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)> {
        let wait = Waiting::plain();
        let conn = self.connect(&wait)?;
        let names: Vec<String> = only.iter().map(|c| c.name().to_owned()).collect();
        let sql = conn.sql(&format!(
            "SELECT c.id, c.channel, c.session_id, c.session_cwd, c.runs, c.failures_in_a_row, c.last_run::text, \
             c.extra::text, l.host, l.pid, l.backend, pg_catalog.to_char(l.since AT TIME ZONE 'UTC', {UTC_MS}), \
             l.command::text, l.command_pid, EXTRACT(EPOCH FROM pg_catalog.now() - l.heartbeat)::float8 \
             FROM {{s}}.chan_run_channel c LEFT JOIN {{s}}.chan_run_lease l ON l.channel_id = c.id \
             WHERE pg_catalog.cardinality($1::text[]) = 0 OR c.channel = ANY($1) ORDER BY c.channel"
        ));
        // Each waiter's `--collect` row, if any (collect.rs); none in a schema older than
        // the table (status never migrates).
        let locks = |messages: &str| {
            conn.sql(&format!(
                "SELECT l.objid::int8, l.granted, l.pid, a.application_name, \
                 pg_catalog.to_char(COALESCE(l.waitstart, a.backend_start) AT TIME ZONE 'UTC', {UTC_MS}), m.state \
                 FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
                 LEFT JOIN {messages} m ON m.channel_id::int8 = l.objid::int8 AND m.backend = l.pid \
                   AND m.backend_start = a.backend_start WHERE {LOCK_ROWS} \
                 ORDER BY l.objid, l.granted DESC, l.waitstart NULLS LAST, l.pid"
            ))
        };
        let locks_sql = locks("{s}.chan_run_message");
        let older_sql = locks(
            "(SELECT NULL::int AS channel_id, NULL::int AS backend, NULL::timestamptz AS backend_start, \
             NULL::text AS state)",
        );
        let read = conn.call(&wait, Some(ANSWER_WITHIN), "read the channels", move |client| {
            let rows = match client.query_typed(&sql, &[(&names, Type::TEXT_ARRAY)]) {
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
                other => other?,
            };
            let locks = match client.query_typed(&locks_sql, &[]) {
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                    client.query_typed(&older_sql, &[])?
                }
                other => other?,
            };
            Ok(Some((rows, locks)))
        })?;
        let Some((rows, locks)) = read else { return Ok((Vec::new(), Vec::new())) };
        let mut warnings = Vec::new();
        let out = rows.iter().map(|row| channel_status(row, &locks, &mut warnings)).collect();
        Ok((out, warnings))
    }

    fn history(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<crate::history::Entry>> {
        let wait = Waiting::plain();
        let conn = self.connect(&wait)?;
        let sql = conn.sql(
            "SELECT h.entry::text FROM {s}.chan_run_history h JOIN {s}.chan_run_channel c ON c.id = h.channel_id \
             WHERE c.channel = $1 ORDER BY h.run_no DESC, h.dead_no DESC LIMIT $2",
        );
        let (name, n) = (channel.name().to_owned(), n.min(i64::MAX as usize) as i64);
        let rows = conn.call(&wait, Some(ANSWER_WITHIN), "read the history", move |client| {
            match client.query_typed(&sql, &[(&name, Type::TEXT), (&n, Type::INT8)]) {
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(Vec::new()),
                other => other,
            }
        })?;
        Ok(rows.iter().filter_map(|r| serde_json::from_str(&r.get::<_, String>(0)).ok()).collect())
    }

    fn gc(&self, idle_for: Duration, dry_run: bool, control: &'static Control) -> anyhow::Result<GcReport> {
        let wait = Waiting::watched(control, None);
        let conn = self.connect(&wait)?;
        // A channel whose last holder's lease may still run (its command too) is kept:
        // removing its row would forget what the next holder must wait out.
        let sql = conn.sql(
            "SELECT c.id, c.channel, EXTRACT(EPOCH FROM pg_catalog.now() - COALESCE(c.last_finished, c.created))::float8, \
             EXISTS (SELECT 1 FROM {s}.chan_run_lease l WHERE l.channel_id = c.id \
               AND l.heartbeat + l.stops_within > pg_catalog.now()) \
             FROM {s}.chan_run_channel c \
             WHERE COALESCE(c.last_finished, c.created) < pg_catalog.now() - pg_catalog.make_interval(secs => $1) \
             ORDER BY c.channel",
        );
        let secs = idle_for.as_secs_f64().min(1e15);
        let rows = conn.call(&wait, Some(ANSWER_WITHIN), "find idle channels", move |client| match client
            .query_typed(&sql, &[(&secs, Type::FLOAT8)])
        {
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(Vec::new()),
            other => other,
        })?;
        let mut items = Vec::new();
        for row in rows {
            let idle = Duration::try_from_secs_f64(row.get::<_, f64>(2)).unwrap_or_default();
            let mut item = GcItem { pool: false, channel: row.get(1), idle, kept: None };
            item.kept = match row.get::<_, bool>(3) {
                true => Some("its last holder's lease may still run"),
                false => self.remove_if_idle(&conn, row.get(0), dry_run)?,
            };
            items.push(item);
        }
        items.extend(self.gc_pools(&conn, idle_for, dry_run)?);
        Ok(GcReport { items, notes: Vec::new() })
    }
}

/// How `acquire_as` ended.
enum Acquired {
    Lease(Box<PgLease>),
    /// A `--collect` caller's message was answered by an earlier caller's batch.
    Answered(crate::store::Verdict),
}

impl PgStore {
    /// Steps 1 to 4; with `joining`, a `--collect` caller's steps 1 and 2 (collect.rs)
    /// around the wait.
    fn acquire_as(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &Control,
        on_wait: &mut dyn FnMut(&WaitNote),
        mut joining: Option<&mut Joining>,
    ) -> Result<Acquired, AcquireError> {
        let until = match wait {
            Wait::No => Instant::now().checked_add(NO_WAIT_WITHIN),
            Wait::Until(d) => Some(d),
            Wait::Forever => None,
        };
        let waiting = Waiting::watched(control, until);
        let mut conn = self.connect(&waiting)?;
        loop {
            let (id, got) = self.try_lock(&conn, channel, &waiting)?;
            if !got {
                if wait == Wait::No {
                    return Err(AcquireError::Busy);
                }
                if let Some(joining) = joining.as_deref_mut() {
                    self.join(&conn, id, joining, &waiting)?;
                }
                if !self.wait_turn(&mut conn, channel, id, &waiting, on_wait)? {
                    continue;
                }
            }
            if let Some(joining) = joining.as_deref().filter(|j| j.conn.is_some())
                && let Some(verdict) = self.turn(&conn, id, joining, &waiting)?
            {
                return Ok(Acquired::Answered(verdict));
            }
            let Some(granted) = self.grant(&conn, id, &waiting)? else { continue };
            let proven_at = match (granted.proven_at, &granted.previous) {
                (Some(at), previous) => {
                    previous.iter().for_each(|p| p.kill_leftover_here());
                    at
                }
                (None, previous) => {
                    let previous = previous.as_ref().context("a lease without its predecessor")?;
                    self.outlast(&conn, id, granted.fence, previous, &waiting)?
                }
            };
            let alarm = control.lock_lost_alarm();
            let heartbeat = Heartbeat::start(conn.clone(), id, granted.fence, proven_at, alarm);
            return Ok(Acquired::Lease(Box::new(PgLease {
                store: self.clone(),
                channel: channel.name().to_owned(),
                seats: Vec::new(),
                probes: Vec::new(),
                conn,
                heartbeat,
                id,
                fence: granted.fence,
                record: granted.record,
                ends_by: None,
                ended: false,
                died: granted.died,
                collect: None,
            })));
        }
    }

    /// Step 3 for `acquire`: says who holds the channel, then waits in its queue. `false`:
    /// the server ended the wait (the connection renewed if it dropped it): start over.
    fn wait_turn(
        &self,
        conn: &mut Conn,
        channel: &Channel,
        id: i32,
        waiting: &Waiting,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<bool, Fault> {
        let note = match self.wait_note(conn, id, waiting) {
            Err(Fault::Failed(_)) => WaitNote::default(),
            other => other?,
        };
        on_wait(&note);
        match self.wait_in_line(conn, id, waiting)? {
            Waited::Got(_) => Ok(true),
            Waited::Cancelled(why) => {
                crate::ui::warn(format!(
                    "channel {channel}: the wait was cancelled ({why}); queueing again, at the end"
                ));
                Ok(false)
            }
            Waited::Dropped(why) => {
                crate::ui::warn(format!(
                    "channel {channel}: the server dropped this waiter's connection ({why}); reconnecting to queue again, at the end"
                ));
                *conn = self.reconnect(waiting)?;
                Ok(false)
            }
        }
    }

    /// Removes the channel `id` while holding its lock with nobody queued; else why not.
    fn remove_if_idle(&self, conn: &Conn, id: i32, dry_run: bool) -> anyhow::Result<Option<&'static str>> {
        let (try_lock, waiters, delete, unlock) = (
            conn.sql(&format!("SELECT pg_catalog.pg_try_advisory_lock({NS}, $1)")),
            conn.sql(&format!("SELECT {}", waiting_for("$1"))),
            conn.sql("DELETE FROM {s}.chan_run_channel WHERE id = $1"),
            conn.sql(&format!("SELECT pg_catalog.pg_advisory_unlock({NS}, $1)")),
        );
        let kept =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "remove an idle channel", move |client| {
                let id = [(&id as &(dyn postgres::types::ToSql + Sync), Type::INT4)];
                if !client.query_typed_one(&try_lock, &id)?.get::<_, bool>(0) {
                    return Ok(Some("running"));
                }
                let kept = match client.query_typed_one(&waiters, &id)?.get::<_, i64>(0) {
                    0 if !dry_run => client.query_typed(&delete, &id).map(|_| None)?,
                    0 => None,
                    _ => Some("callers waiting"),
                };
                client.query_typed(&unlock, &id)?;
                Ok(kept)
            })?;
        Ok(kept)
    }
}

/// One channel's status: its row, and its locks from `pg_locks` (holders first, then
/// waiters by `waitstart`). The lease row is trusted only while the backend it names
/// holds the lock; one that holds it but stopped beating is worth a warning.
fn channel_status(row: &postgres::Row, locks: &[postgres::Row], warnings: &mut Vec<String>) -> ChannelStatus {
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
        if !lock.get::<_, bool>(1) {
            status.queue.push(Waiter { host, pid, since: lock.get(4) });
            status.collect.push(lock.get::<_, Option<String>>(5).map(|state| match state.as_str() {
                "queued" => "queued",
                _ => "taken",
            }));
            continue;
        }
        status.running = true;
        if row.get::<_, Option<i32>>(10) != Some(backend) {
            status.holder = Some(HolderView { host, pid, ..Default::default() });
            continue;
        }
        let holder = HolderView {
            host: row.get(8),
            pid: row.get::<_, Option<i32>>(9).map(|p| p as u32),
            command_pid: row.get::<_, Option<i32>>(13).map(|p| p as u32),
            started_at: row.get(11),
            command: json_column(row, 12).unwrap_or_default(),
        };
        let silent = row.get::<_, Option<f64>>(14).unwrap_or_default();
        if silent > STOPS_WITHIN.as_secs_f64() {
            warnings.push(format!(
                "channel {}: its holder (pid {} on {}) has not beaten for {}, yet its session (backend {backend}) still \
                 holds the lock: a stopped chan-run (SIGSTOP), or a connection pooler keeping a dead client's session \
                 (PgBouncer needs server_reset_query = DISCARD ALL)",
                status.channel,
                holder.pid.map_or("?".into(), |p| p.to_string()),
                holder.host.as_deref().unwrap_or("?"),
                crate::duration::short(Duration::from_secs_f64(silent)),
            ));
        }
        status.holder = Some(holder);
    }
    status.running |= !status.queue.is_empty();
    status
}
