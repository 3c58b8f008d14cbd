//! `--collect` on PostgreSQL: callers on any host queued on one channel answered by one
//! run, their messages travelling through `chan_run_message` (at most 1 MiB each). It
//! rides on the channel's lock queue (queue.rs), where the server grants in arrival
//! order; a message row names its caller's backend (pid and start), and a caller's
//! place in line is its backend's wait in `pg_locks` (by `waitstart`).
//!
//! Protocol (each step's crash outcome in brackets):
//! 1. Join: a caller that must wait (the try failed) writes its row, `queued`, with its
//!    token (host, pid, time: never reused), fingerprint, message and backend, and
//!    `NOTIFY`s the channel's collect channel, in one statement; then it queues for the
//!    lock as any caller (queue.rs step 3). A caller whose connection the server dropped
//!    writes its new backend into its row again before it queues anew [dies before the
//!    lock wait: its row names a backend that waits for nothing, is never taken, and the
//!    next runner's take removes it once that backend is gone; dies waiting: the same].
//! 2. Its turn (the lock granted): it deletes its row, reading it: `answered` (a batch
//!    took it and committed its outcome): exit with that outcome, unlock, nothing run.
//!    Else (never taken, or taken by a runner that died or lost its lease before its
//!    outcome committed) this caller runs its message, in its own place in line, with
//!    those behind it [dies: as any holder; its message goes with it, unanswered, as
//!    any run's that dies].
//! 3. Window (`--collect-window`): holding the channel, the runner `LISTEN`s on a second
//!    connection until no caller has joined for DUR; it re-reads the queue at least every
//!    [`RECHECK`], the fallback for a caller that cannot be collected (it sends no
//!    notification) [dies: as any holder].
//! 4. Take (right before the command, under the runner's proven fence): the waiters of
//!    the channel's lock in `pg_locks`, in `waitstart` order, joined to their rows; those
//!    with this fingerprint, `queued` or `taken` under an earlier fence (a runner gone:
//!    the grant waited its lease out), are taken (`state = 'taken'`, `fence` = the
//!    runner's) up to the batch's size, stopping at the first waiter without a row (not a
//!    collect caller) or with another fingerprint. The `UPDATE` checks each row's state
//!    again, so a caller that withdrew meanwhile is skipped [dies: its fence is never
//!    answered; the taken callers find their rows unanswered at step 2 and run again, in
//!    order].
//! 5. Run the command once, all messages on its stdin.
//! 6. Settle: the taken rows become `answered` (code, runner pid, message count) in the
//!    statement that writes the run's record under its fence (lease.rs step 6): a runner
//!    that lost its lease cannot answer anyone, and a recorded batch is an answered one
//!    [dies before the commit: as 4; after: answered].
//!
//! A caller interrupted while waiting withdraws: `DELETE` of its row while still
//! `queued` (row locks order it against a take: either it is gone before the take, or
//! the take wins and the caller is told the batch answers it). `status` marks waiters
//! by their rows; `gc` removes a channel's rows with the channel, and rows of callers
//! gone for [`FORGET_AFTER`].

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault};
use super::lease::PgLease;
use super::schema::{LOCK_ROWS, NS, held_here};
use super::wait::Waiting;
use crate::control::Control;
use crate::store::{AcquireError, CollectEntry, Verdict};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The window re-reads the queue at least this often: the bound on noticing a caller
/// that cannot be collected (no notification comes for it).
pub const RECHECK: Duration = Duration::from_millis(100);
/// A row whose caller's backend is gone is removed once untouched this long (a caller
/// reconnecting writes its new backend within [`super::queue::RECONNECT_WITHIN`]).
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// A `--collect` caller while it waits: its entry, token, and the connection its row
/// names (for a withdrawal).
pub struct Joining<'a> {
    pub entry: &'a CollectEntry,
    pub token: String,
    pub conn: Option<Conn>,
}

/// What a `--collect` runner's lease keeps: its fingerprint, the rows it took, and the
/// batch's outcome once told (written with the run's record).
pub struct Batch {
    pub fingerprint: String,
    pub taken: Vec<i64>,
    pub code: Option<u8>,
    pub settled: bool,
}

impl Batch {
    /// The verdict's parameters for the final write: code, runner pid, messages (all
    /// `None` when there is nothing to answer).
    pub fn verdict(&self) -> (Option<i32>, Option<i32>, Option<i32>) {
        match (self.code, self.taken.is_empty()) {
            (Some(code), false) => {
                (Some(i32::from(code)), Some(std::process::id() as i32), Some(self.taken.len() as i32 + 1))
            }
            _ => (None, None, None),
        }
    }
}

pub fn new_token(host: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{host}-{}-{nanos}", std::process::id())
}

/// The channel the collect callers of channel row `$1` notify.
fn notify_channel() -> String {
    "'chan_run_collect_' || ('{s_lit}.chan_run_channel'::regclass::oid)::text || '_' || $1::text".to_owned()
}

/// The waiters of channel row `$1`'s lock in arrival order, with their rows if any:
/// (row id, fingerprint, state, fence).
fn waiters_sql(conn: &Conn) -> String {
    conn.sql(&format!(
        "SELECT m.id, m.fingerprint, m.state, m.fence FROM pg_catalog.pg_locks l \
         JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
         LEFT JOIN {{s}}.chan_run_message m ON m.channel_id = $1 AND m.backend = l.pid \
           AND m.backend_start = a.backend_start \
         WHERE {LOCK_ROWS} AND l.objid::int8 = $1 AND NOT l.granted ORDER BY l.waitstart NULLS LAST, l.pid"
    ))
}

type WaiterRow = (Option<i64>, Option<String>, Option<String>, Option<i64>);

/// The rows a runner of `fingerprint` under `fence` may take, in order, before the first
/// waiter that cannot join its batch; and whether such a waiter is queued.
fn collectable(waiters: &[WaiterRow], fingerprint: &str, fence: i64) -> (Vec<i64>, bool) {
    let mut ids = Vec::new();
    for (id, fp, state, taken_by) in waiters {
        let (Some(id), Some(fp), Some(state)) = (id, fp, state) else { return (ids, true) };
        let takeable = state == "queued" || (state == "taken" && *taken_by != Some(fence));
        if fp != fingerprint || !takeable {
            return (ids, true);
        }
        ids.push(*id);
    }
    (ids, false)
}

fn read_waiters(
    client: &mut postgres::Client,
    sql: &str,
    id: i32,
) -> Result<Vec<WaiterRow>, postgres::Error> {
    Ok(client
        .query_typed(sql, &[(&id, Type::INT4)])?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

impl PgStore {
    /// Step 1: writes (or re-points at this connection's backend) the caller's row and
    /// wakes a runner's window.
    pub(super) fn join(
        &self,
        conn: &Conn,
        id: i32,
        joining: &mut Joining,
        wait: &Waiting,
    ) -> Result<(), Fault> {
        let sql = conn.sql(&format!(
            "WITH j AS (INSERT INTO {{s}}.chan_run_message AS m (channel_id, token, backend, backend_start, \
               fingerprint, message) SELECT $1, $2, a.pid, a.backend_start, $3, $4 FROM pg_catalog.pg_stat_activity a \
               WHERE a.pid = pg_catalog.pg_backend_pid() \
               ON CONFLICT (token) DO UPDATE SET channel_id = EXCLUDED.channel_id, backend = EXCLUDED.backend, \
               backend_start = EXCLUDED.backend_start, touched = pg_catalog.now() RETURNING m.id) \
             SELECT (SELECT pg_catalog.count(*) FROM j), pg_catalog.pg_notify({}, '')::text",
            notify_channel()
        ));
        let (token, fingerprint) = (joining.token.clone(), joining.entry.fingerprint.clone());
        let message = Arc::clone(&joining.entry.message);
        let written = conn.call(wait, Some(ANSWER_WITHIN), "queue the message", move |client| {
            let params: [(&(dyn postgres::types::ToSql + Sync), Type); 4] = [
                (&id, Type::INT4),
                (&token, Type::TEXT),
                (&fingerprint, Type::TEXT),
                (&&message[..], Type::BYTEA),
            ];
            Ok(client.query_typed_one(&sql, &params)?.get::<_, i64>(0))
        })?;
        if written != 1 {
            return Err(Fault::Failed(anyhow::anyhow!(
                "the message was not queued: this session's backend is missing from pg_stat_activity"
            )));
        }
        joining.conn = Some(conn.clone());
        Ok(())
    }

    /// Step 2, holding the lock: removes the caller's row; its verdict if a batch that
    /// took it committed one (then the lock is released: nothing runs).
    pub(super) fn turn(
        &self,
        conn: &Conn,
        id: i32,
        joining: &Joining,
        wait: &Waiting,
    ) -> Result<Option<Verdict>, Fault> {
        let sql = conn.sql(
            "DELETE FROM {s}.chan_run_message WHERE token = $1 RETURNING state, code, runner_pid, messages",
        );
        let unlock = conn.sql(&format!("SELECT pg_catalog.pg_advisory_unlock({NS}, $1)"));
        let token = joining.token.clone();
        conn.call(wait, Some(ANSWER_WITHIN), "read the message's fate", move |client| {
            let row = client.query_typed(&sql, &[(&token, Type::TEXT)])?.into_iter().next();
            let verdict = row.filter(|r| r.get::<_, String>(0) == "answered").map(|r| Verdict {
                code: r.get::<_, Option<i32>>(1).unwrap_or(0).clamp(0, 255) as u8,
                runner_pid: r.get::<_, Option<i32>>(2).unwrap_or(0) as u32,
                messages: r.get::<_, Option<i32>>(3).unwrap_or(0) as u32,
            });
            if verdict.is_some() {
                client.query_typed(&unlock, &[(&id, Type::INT4)])?;
            }
            Ok(verdict)
        })
    }

    /// An interrupted caller's withdrawal: `true` if its message had been taken already.
    pub(super) fn withdraw(&self, joining: &Joining) -> bool {
        let Some(conn) = &joining.conn else { return false };
        let (delete, read) = (
            conn.sql("DELETE FROM {s}.chan_run_message WHERE token = $1 AND state = 'queued' RETURNING id"),
            conn.sql("SELECT state FROM {s}.chan_run_message WHERE token = $1"),
        );
        let token = joining.token.clone();
        let taken =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "withdraw the message", move |client| {
                if !client.query_typed(&delete, &[(&token, Type::TEXT)])?.is_empty() {
                    return Ok(false);
                }
                // A new statement, a new snapshot: sees the take that won the row.
                Ok(!client.query_typed(&read, &[(&token, Type::TEXT)])?.is_empty())
            });
        // Not withdrawn (a broken connection): the row names a backend that waits for
        // nothing, which no take picks.
        taken.unwrap_or(false)
    }

    /// Step 3.
    pub(super) fn quiet_window(
        &self,
        lease: &PgLease,
        fingerprint: &str,
        quiet: Duration,
        max: u32,
        control: &Control,
    ) -> Result<(), AcquireError> {
        let wait = Waiting::watched(control, None);
        let watch = self.connect(&wait)?;
        let listen = watch.sql(&format!("SELECT {}", notify_channel()));
        let (id, fence) = (lease.id, lease.fence);
        watch.call(&wait, Some(ANSWER_WITHIN), "listen for collect callers", move |client| {
            let name: String = client.query_typed_one(&listen, &[(&id, Type::INT4)])?.get(0);
            client.batch_execute(&format!("LISTEN \"{}\"", name.replace('"', "")))
        })?;
        let waiters = waiters_sql(&watch);
        let mut deadline = Instant::now() + quiet;
        loop {
            let sql = waiters.clone();
            let rows = watch.call(&wait, Some(ANSWER_WITHIN), "read the queue", move |client| {
                read_waiters(client, &sql, id)
            })?;
            let (ids, blocked) = collectable(&rows, fingerprint, fence);
            if blocked || ids.len() + 1 >= max as usize || Instant::now() >= deadline {
                return Ok(());
            }
            let slice = deadline.saturating_duration_since(Instant::now()).min(RECHECK);
            let given_up = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&given_up);
            let heard =
                watch.call(&wait, Some(slice + ANSWER_WITHIN), "wait for collect callers", move |client| {
                    let until = Instant::now() + slice;
                    let mut notes = client.notifications();
                    let mut heard = false;
                    while !flag.load(Ordering::SeqCst) {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        if notes.timeout_iter(left.min(Duration::from_millis(50))).next()?.is_some() {
                            heard = true;
                            while notes.iter().next()?.is_some() {}
                            break;
                        }
                    }
                    Ok(heard)
                });
            match heard {
                Ok(true) => deadline = Instant::now() + quiet,
                Ok(false) => {}
                Err(fault) => {
                    given_up.store(true, Ordering::SeqCst);
                    return Err(fault.into());
                }
            }
        }
    }

    /// Step 4, on the lease's connection: takes the rows of the callers right behind, up
    /// to `max` messages with the runner's own; their messages in order. Also removes the
    /// rows of callers that are gone.
    pub(super) fn take_messages(
        &self,
        lease: &PgLease,
        batch: &mut Batch,
        max: u32,
    ) -> anyhow::Result<Vec<Arc<[u8]>>> {
        let conn = &lease.conn;
        let waiters = waiters_sql(conn);
        let take = conn.sql(&format!(
            "UPDATE {{s}}.chan_run_message SET state = 'taken', fence = $2, touched = pg_catalog.now() \
             WHERE channel_id = $1 AND id = ANY($3) AND (state = 'queued' OR (state = 'taken' AND fence <> $2)) \
             AND EXISTS (SELECT 1 FROM {{s}}.chan_run_channel c WHERE c.id = $1 AND c.fence = $2 AND {}) \
             RETURNING id, message",
            held_here("$1")
        ));
        let sweep = conn.sql(
            "DELETE FROM {s}.chan_run_message m WHERE m.channel_id = $1 AND NOT EXISTS (SELECT 1 FROM \
             pg_catalog.pg_stat_activity a WHERE a.pid = m.backend AND a.backend_start = m.backend_start) \
             AND (m.state = 'queued' OR m.touched < pg_catalog.now() - pg_catalog.make_interval(secs => $2))",
        );
        let (id, fence, fingerprint) = (lease.id, lease.fence, batch.fingerprint.clone());
        let (room, forget) = (max.saturating_sub(1) as usize, FORGET_AFTER.as_secs_f64());
        let taken =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "take the queued messages", move |client| {
                client.query_typed(&sweep, &[(&id, Type::INT4), (&forget, Type::FLOAT8)])?;
                let rows = read_waiters(client, &waiters, id)?;
                let (mut ids, _) = collectable(&rows, &fingerprint, fence);
                ids.truncate(room);
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let params: [(&(dyn postgres::types::ToSql + Sync), Type); 3] =
                    [(&id, Type::INT4), (&fence, Type::INT8), (&ids, Type::INT8_ARRAY)];
                let mut got: Vec<(i64, Vec<u8>)> =
                    client.query_typed(&take, &params)?.iter().map(|r| (r.get(0), r.get(1))).collect();
                got.sort_by_key(|(row, _)| ids.iter().position(|i| i == row));
                Ok(got)
            })?;
        batch.taken = taken.iter().map(|(row, _)| *row).collect();
        Ok(taken.into_iter().map(|(_, m)| Arc::from(m)).collect())
    }

    /// Step 6 when the run's record was not written with the outcome: the outcome alone,
    /// under the same fence.
    pub(super) fn answer_batch(&self, lease: &PgLease, batch: &Batch) -> anyhow::Result<()> {
        let conn = &lease.conn;
        let sql = conn.sql(&format!(
            "UPDATE {{s}}.chan_run_message SET state = 'answered', code = $3, runner_pid = $4, messages = $5, \
             touched = pg_catalog.now() WHERE channel_id = $1 AND fence = $2 AND state = 'taken' \
             AND EXISTS (SELECT 1 FROM {{s}}.chan_run_channel c WHERE c.id = $1 AND c.fence = $2 AND {})",
            held_here("$1")
        ));
        let (id, fence) = (lease.id, lease.fence);
        let (code, pid, messages) = batch.verdict();
        conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "write the batch's outcome", move |client| {
            let params: [(&(dyn postgres::types::ToSql + Sync), Type); 5] = [
                (&id, Type::INT4),
                (&fence, Type::INT8),
                (&code, Type::INT4),
                (&pid, Type::INT4),
                (&messages, Type::INT4),
            ];
            client.query_typed(&sql, &params).map(drop)
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, fp: &str, state: &str, fence: Option<i64>) -> WaiterRow {
        (Some(id), Some(fp.into()), Some(state.into()), fence)
    }

    #[test]
    fn a_batch_stops_at_the_first_waiter_that_cannot_join_it() {
        let plain = (None, None, None, None);
        let rows =
            [row(1, "a", "queued", None), row(2, "a", "taken", Some(3)), plain, row(4, "a", "queued", None)];
        assert_eq!(collectable(&rows, "a", 9), (vec![1, 2], true));
        assert_eq!(collectable(&rows[..2], "a", 3), (vec![1], true), "taken by this very run");
        assert_eq!(collectable(&[row(1, "b", "queued", None)], "a", 9), (vec![], true));
        assert_eq!(collectable(&[row(1, "a", "answered", Some(2))], "a", 9), (vec![], true));
        assert_eq!(collectable(&rows[..1], "a", 9), (vec![1], false));
    }
}
