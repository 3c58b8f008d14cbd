//! Step 6, the lease's end (step 5, while it lasts, is the heartbeat): the record
//! written only under this run's fence, then the unlock. `PgLease` is what `acquire`
//! hands out.
//!
//! 6. One statement writes the record and its history row `WHERE fence = <this
//!    run's>`, and must change exactly one row; else "lock lost, state not written" and
//!    exit 122. The same statement ends the lease (deletes its row). Only after it
//!    committed does `pg_advisory_unlock` grant the next waiter (an unlock inside the
//!    statement would let the next holder read the old record). Both are bounded by the
//!    run's return-time promise. *Death between*: the record, history and lease end are
//!    committed or not, together; the lock goes with the connection.

use super::collect::Batch;
use super::conn::{ANSWER_WITHIN, Conn, pg_error};
use super::heartbeat::{Beat, Heartbeat, HolderColumns, LOST_GRACE};
use super::schema::{HISTORY_KEEP, NS};
use super::wait::Waiting;
use crate::state::ChannelRecord;
use crate::store::{Holder, Lease, LockLost, RecordError};
use anyhow::bail;
use postgres::types::Type;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Step 6's statement: the record under the fence; with `$12`, the lease's end; with
/// `$10`, the history row (the oldest beyond `$11` dropped); with `$13`, a `--collect`
/// batch's outcome for the messages it took (`$14` the runner's pid, `$15` the batch's
/// size: collect.rs step 6).
const FINAL_WRITE: &str = "WITH updated AS (UPDATE {s}.chan_run_channel SET session_id = $3, session_cwd = $4, runs = $5, \
             failures_in_a_row = $6, last_run = $7::jsonb, last_finished = $8::timestamptz, extra = $9::jsonb \
             WHERE id = $1 AND fence = $2 RETURNING runs), \
             ended AS (DELETE FROM {s}.chan_run_lease WHERE channel_id = $1 AND fence = $2 AND $12 \
             AND EXISTS (SELECT 1 FROM updated)), \
             added AS (INSERT INTO {s}.chan_run_history (channel_id, run_no, entry) \
             SELECT $1, runs, $10::jsonb FROM updated WHERE $10 IS NOT NULL \
             ON CONFLICT (channel_id, run_no, dead_no) DO UPDATE SET entry = EXCLUDED.entry RETURNING run_no), \
             dropped AS (DELETE FROM {s}.chan_run_history WHERE channel_id = $1 \
             AND run_no <= (SELECT run_no FROM added) - $11), \
             answered AS (UPDATE {s}.chan_run_message SET state = 'answered', code = $13, runner_pid = $14, \
             messages = $15, touched = pg_catalog.now() WHERE $13 IS NOT NULL AND channel_id = $1 AND fence = $2 \
             AND state = 'taken' AND EXISTS (SELECT 1 FROM updated)) \
             SELECT pg_catalog.pg_backend_pid() FROM updated";

/// However late the run is, its final write gets this long.
const FINAL_WRITE_FLOOR: Duration = Duration::from_millis(100);

pub struct PgLease {
    /// The store, for a seat's queue connection.
    pub store: super::PgStore,
    pub channel: String,
    /// The seat rows held (pool.rs).
    pub seats: Vec<i32>,
    /// The pools (by id) whose probe this run is, once per take (ledger.rs): unlocked
    /// when the command has ended.
    pub probes: Vec<i32>,
    pub conn: Conn,
    pub heartbeat: Heartbeat,
    pub id: i32,
    pub fence: i64,
    pub record: ChannelRecord,
    /// The run's return-time promise, from `announce`.
    pub ends_by: Option<Instant>,
    /// The final write ended the lease row.
    pub ended: bool,
    /// The previous holder's run, if its chan-run died holding the channel.
    pub died: Option<crate::store::DeadRun>,
    /// `--collect`: this run's batch.
    pub collect: Option<super::collect::Batch>,
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
    ) -> Result<(), RecordError> {
        if let Some(why) = self.heartbeat.stop() {
            return Err(LockLost(why).into());
        }
        let mut record = self.record.clone();
        change(&mut record);
        let ends = entry.is_some();
        let json = |e: serde_json::Error| RecordError::Failed(e.into());
        let entry = entry.map(|make| serde_json::to_string(&make(&record))).transpose().map_err(json)?;
        let last_run = record.last_run.as_ref().map(serde_json::to_string).transpose().map_err(json)?;
        let finished = record.last_run.as_ref().map(|r| r.finished_at.clone());
        let extra = serde_json::to_string(&record.extra).map_err(json)?;
        let (runs, failures) = (record.runs as i64, record.failures_in_a_row as i64);
        let (id, fence, keep) = (self.id, self.fence, HISTORY_KEEP);
        let (session_id, session_cwd) = (record.session_id.clone(), record.session_cwd.clone());
        let sql = self.conn.sql(FINAL_WRITE);
        let settles = ends && self.collect.as_ref().is_some_and(|b| b.code.is_some() && !b.taken.is_empty());
        let (code, runner, messages) = match &self.collect {
            Some(batch) if settles => batch.verdict(),
            _ => (None, None, None),
        };
        let answer =
            self.conn.call(&Waiting::plain(), Some(self.within()), "record the run", move |client| {
                let params: [(&(dyn postgres::types::ToSql + Sync), Type); 15] = [
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
                    (&code, Type::INT4),
                    (&runner, Type::INT4),
                    (&messages, Type::INT4),
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
        if let (true, Some(batch)) = (settles, &mut self.collect) {
            batch.settled = true;
        }
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

    fn pid_field(&self) -> Option<(RawFd, u64, usize)> {
        None
    }

    fn take_seat(
        &mut self,
        pool: &crate::pool::Pool,
        wait: crate::store::Wait,
        control: &'static crate::control::Control,
        on_wait: &mut dyn FnMut(&crate::store::SeatNote),
    ) -> Result<(), crate::store::AcquireError> {
        let taker = super::pool::Taker { channel: &self.channel, fence: self.fence };
        let seat = self.store.take_seat(&self.conn, &taker, pool, wait, control, on_wait)?;
        self.seats.push(seat);
        Ok(())
    }

    /// The command has ended: the probe locks go (the probe's outcome is in the ledger)
    /// and the seats with them (pool.rs step 6, early: the rows cleared under this run's
    /// fence), so a retry's back-off holds no seat.
    fn free_seats(&mut self) {
        if self.probes.is_empty() && self.seats.is_empty() {
            return;
        }
        let (probes, seats, fence) = (self.probes.clone(), self.seats.clone(), self.fence);
        let (unlock_probes, release_seats) =
            (super::PgStore::unlock_probes_sql(&self.conn), super::PgStore::release_seats_sql(&self.conn));
        let freed = self.conn.call(&Waiting::plain(), Some(self.within()), "free the seats", move |client| {
            if !probes.is_empty() {
                client.query_typed(&unlock_probes, &[(&probes, Type::INT4_ARRAY)])?;
            }
            if !seats.is_empty() {
                client.query_typed(&release_seats, &[(&seats, Type::INT4_ARRAY), (&fence, Type::INT8)])?;
            }
            Ok(())
        });
        if let Err(e) = freed {
            // Kept for `release` to try again (the session's end frees them at the latest).
            crate::ui::warn(format!("the run's seats were not freed early ({:#})", anyhow::Error::from(e)));
            return;
        }
        self.probes.clear();
        self.seats.clear();
    }

    fn update_pool_ledger(
        &mut self,
        pool: &crate::pool::Pool,
        change: &mut dyn FnMut(&mut serde_json::Map<String, serde_json::Value>),
    ) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        self.store.update_ledger(&self.conn, pool, change)
    }

    fn charge_pool(&mut self, pool: &crate::pool::Pool, cost: f64) -> anyhow::Result<()> {
        self.store.charge_ledger(&self.conn, pool, cost)
    }

    fn take_pool_probe(&mut self, pool: &crate::pool::Pool) -> anyhow::Result<bool> {
        let taken = self.store.try_probe(&self.conn, pool)?;
        self.probes.extend(taken);
        Ok(taken.is_some())
    }

    fn wait_pool_probe(
        &mut self,
        pool: &crate::pool::Pool,
        deadline: Option<Instant>,
        control: &'static crate::control::Control,
    ) -> Result<(), crate::store::AcquireError> {
        self.store.wait_probe(pool, deadline, control)
    }

    fn command_started(&mut self, pid: u32, ticks: u64) {
        self.heartbeat.send(Beat::CommandPid(pid, ticks));
    }

    fn record(&mut self) -> Result<ChannelRecord, RecordError> {
        Ok(self.record.clone())
    }

    fn fence(&self) -> Option<i64> {
        Some(self.fence)
    }

    fn lost_grace(&self) -> Option<Duration> {
        Some(LOST_GRACE)
    }

    fn update(&mut self, change: &mut dyn FnMut(&mut ChannelRecord)) -> Result<(), RecordError> {
        self.write(change, None)
    }

    fn record_run(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: &mut dyn FnMut(&ChannelRecord) -> crate::history::Entry,
    ) -> (Result<(), RecordError>, anyhow::Result<()>) {
        (self.write(change, Some(entry)), Ok(()))
    }

    fn died(&mut self) -> Option<crate::store::DeadRun> {
        self.died.take()
    }

    /// The dead run is not counted (as on the local store): its row follows the last
    /// recorded run's, numbered after the dead runs already there.
    fn append_history(&mut self, entry: &crate::history::Entry) -> anyhow::Result<()> {
        let sql = self.conn.sql(&format!(
            "INSERT INTO {{s}}.chan_run_history (channel_id, run_no, dead_no, entry) \
             SELECT $1, c.runs, COALESCE((SELECT pg_catalog.max(h.dead_no) FROM {{s}}.chan_run_history h \
               WHERE h.channel_id = $1 AND h.run_no = c.runs), 0) + 1, $3::jsonb \
             FROM {{s}}.chan_run_channel c WHERE c.id = $1 AND c.fence = $2 AND {} RETURNING run_no",
            super::schema::held_here("$1")
        ));
        let (id, fence, entry) = (self.id, self.fence, serde_json::to_string(entry)?);
        let added =
            self.conn.call(&Waiting::plain(), Some(self.within()), "add the dead run", move |client| {
                let params: [(&(dyn postgres::types::ToSql + Sync), Type); 3] =
                    [(&id, Type::INT4), (&fence, Type::INT8), (&entry, Type::TEXT)];
                Ok(!client.query_typed(&sql, &params)?.is_empty())
            })?;
        if !added {
            bail!("{}", LockLost(format!("the channel's fence moved past {fence}: another holder took it")));
        }
        Ok(())
    }

    fn collect_window(
        &mut self,
        quiet: Duration,
        max: u32,
        control: &'static crate::control::Control,
    ) -> Result<(), crate::store::AcquireError> {
        match &self.collect {
            Some(batch) => self.store.quiet_window(self, &batch.fingerprint, quiet, max, control),
            None => Ok(()),
        }
    }

    fn take_batch(&mut self, max: u32) -> anyhow::Result<Vec<std::sync::Arc<[u8]>>> {
        let Some(mut batch) = self.collect.take() else { return Ok(Vec::new()) };
        let taken = self.store.take_messages(self, &mut batch, max);
        self.collect = Some(batch);
        taken
    }

    fn stage_batch(&mut self, code: u8) {
        if let Some(batch) = &mut self.collect {
            batch.code = Some(code);
        }
    }

    fn settle_batch(&mut self, code: u8) -> anyhow::Result<()> {
        let Some(batch) = &mut self.collect else { return Ok(()) };
        if batch.settled || batch.taken.is_empty() {
            return Ok(());
        }
        batch.code = Some(code);
        let batch = self.collect.take().expect("a batch");
        let settled = self.store.answer_batch(self, &batch);
        self.collect = Some(Batch { settled: settled.is_ok(), ..batch });
        settled
    }

    fn release(mut self: Box<Self>) -> anyhow::Result<()> {
        if let Some(why) = self.heartbeat.stop() {
            bail!("{}", LockLost(why));
        }
        let (id, fence, ended, seats) = (self.id, self.fence, self.ended, std::mem::take(&mut self.seats));
        let probes = std::mem::take(&mut self.probes);
        let (release_seats, unlock_probes) =
            (super::PgStore::release_seats_sql(&self.conn), super::PgStore::unlock_probes_sql(&self.conn));
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
                if !probes.is_empty() {
                    client.query_typed(&unlock_probes, &[(&probes, Type::INT4_ARRAY)])?;
                }
                // Step 6 of pool.rs, after the lease's end committed.
                if !seats.is_empty() {
                    client
                        .query_typed(&release_seats, &[(&seats, Type::INT4_ARRAY), (&fence, Type::INT8)])?;
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
