//! Pools on PostgreSQL (`--pool NAME:N`): a seat for a run that holds its channel, first
//! come first served across hosts, at most N holders among seats 1..=N.
//!
//! # Keys
//! A pool is a row of `chan_run_pool`; its *gate* is the advisory lock (the table's oid,
//! the row's id). Each seat is a row of `chan_run_seat` (pool, seat number); the seat's
//! lock is (that table's oid, the row's id), and the row names its current holder, or
//! the last one that did not end cleanly, by that holder's lease `fence` (lease.rs).
//! Seats are taken only by the gate's holder, so the gate is the pool's queue: the
//! server grants it in arrival order, as it grants a channel's lock (queue.rs).
//!
//! # Protocol of one seat (the run already holds its channel: its lease is proven and
//! beating on the lease's connection, L)
//! 1. On L, one statement finds the pool's row (inserted if missing), *tries* the gate
//!    and counts the seat rows 1..=N (missing ones are inserted). *Death*: L closes; the
//!    server drops every lock of its session (channel, gate, seats).
//! 2. Gate got: one statement picks the lowest seat 1..=N whose lock nobody holds, takes
//!    that lock, and (unless the seat's last holder's lease may still run) writes this
//!    run's name and fence in its row; the same statement unlocks the gate. With `-n` a
//!    busy gate (someone queued) or no free seat is the busy code.
//! 3. Else the caller queues: a second connection, W, `LISTEN`s on the pool's channel,
//!    then waits for the gate in `pg_advisory_lock`: arrival order across hosts (the
//!    caller's arrival is when W joins that queue). `--wait` or a signal cancels the
//!    wait and closes W. *Death*: the server removes the waiter within
//!    `client_connection_check_interval` (1 s), or at once when W is idle.
//! 4. At the head (W holds the gate), step 2 runs on L again after every `NOTIFY` on the
//!    pool's channel (each release sends one after its unlock) and at least every
//!    [`RECHECK`]: the fallback for a seat freed by a holder that died (the server ends
//!    a dead client's session, and its locks, but no notification comes). Seat taken: W
//!    closes, and the server grants the gate to the next in line. The head waits only
//!    for a seat among its own 1..=N: strict FIFO, so a head that named a small N holds
//!    back later callers that named a larger one while its seats are all held.
//! 5. A seat whose last holder ended uncleanly (its lease row, found by fence, has not
//!    run out) is held but not used until that holder's command has certainly stopped:
//!    the lease's bound, or at once on this host once its chan-run is gone (grant.rs's
//!    wait-out, its leftovers killed); then the row is written. A holder cut off from
//!    the server loses its seat with its session, and its command is stopped by its
//!    heartbeat's alarm within the bound its lease row promises (heartbeat.rs): so two
//!    commands never hold one seat, fences included.
//! 6. Release (lease.rs), once the command has ended (`free_seats`, or else once the
//!    lease row's end has committed): one statement clears
//!    the seat rows under this run's fence, unlocks the seats and notifies the pools'
//!    channels; then the channel is unlocked. *Death before*: the locks go with L; a
//!    row left naming this run's fence makes the next holder check that lease (step 5).
//!
//! `status` reads holders from `pg_locks` and the seat rows, waiters from the gate's
//! lock queue (their channel: the channel lock held by the same chan-run); `gc` removes
//! a pool while it holds its gate with no seat held, nobody queued and no unclean
//! holder's lease running.

use super::PgStore;
use super::conn::{ANSWER_WITHIN, Conn, Fault, from_application_name};
use super::grant::{Previous, previous_from};
use super::queue::NO_WAIT_WITHIN;
use super::schema::{UTC_MS, lock_rows_of, ns_of};
use super::wait::Waiting;
use crate::channel::Channel;
use crate::control::Control;
use crate::pool::Pool;
use crate::store::{AcquireError, GcItem, PoolStatus, SeatNote, SeatView, Wait};
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The head of a pool's queue checks for a free seat at least this often: the bound on
/// taking a seat freed by a holder that died (no notification comes for it).
pub const RECHECK: Duration = Duration::from_millis(200);
/// How soon a waiter given up on (deadline, signal) closes its queue connection.
const SLICE: Duration = Duration::from_millis(50);

/// The run a seat is taken for.
pub struct Taker<'a> {
    pub channel: &'a str,
    pub fence: i64,
}

/// What step 1 found.
struct Looked {
    id: i32,
    gate: bool,
    rows: i64,
    /// The pool's notification channel.
    listen: String,
}

/// What step 2 did.
enum Took {
    /// The seat's lock is held; `previous`: its last holder may still run (row not written).
    Seat {
        id: i32,
        previous: Option<Previous>,
    },
    NoSeat,
    /// The pool's row was removed by `gc`: start over.
    Gone,
}

fn gate_ns() -> String {
    ns_of("chan_run_pool")
}

fn seat_ns() -> String {
    ns_of("chan_run_seat")
}

impl PgStore {
    /// Takes a seat in `pool` for the run holding `conn`'s lease; the seat row's id.
    pub(super) fn take_seat(
        &self,
        conn: &Conn,
        taker: &Taker,
        pool: &Pool,
        wait: Wait,
        control: &Control,
        on_wait: &mut dyn FnMut(&SeatNote),
    ) -> Result<i32, AcquireError> {
        let until = match wait {
            Wait::No => Instant::now().checked_add(NO_WAIT_WITHIN),
            Wait::Until(d) => Some(d),
            Wait::Forever => None,
        };
        let waiting = Waiting::watched(control, until);
        let mut noted = false;
        loop {
            let looked = self.look_up_pool(conn, pool, &waiting)?;
            if looked.gate {
                match self.take(conn, looked.id, pool.seats, taker, true, &waiting)? {
                    Took::Seat { id, previous } => {
                        return self.settle(conn, id, pool, taker, previous, &waiting);
                    }
                    Took::Gone => continue,
                    Took::NoSeat => {}
                }
            }
            if wait == Wait::No {
                return Err(AcquireError::Busy);
            }
            if !noted {
                noted = true;
                match self.seat_note(conn, looked.id, &waiting) {
                    Ok(note) => on_wait(&note),
                    Err(Fault::Failed(_)) => on_wait(&SeatNote::default()),
                    Err(other) => return Err(other.into()),
                }
            }
            if let Some(id) = self.queue_for_seat(conn, &looked, pool, taker, &waiting)? {
                return Ok(id);
            }
        }
    }

    /// Step 1 (inserting the pool's row or seat rows where missing).
    fn look_up_pool(&self, conn: &Conn, pool: &Pool, wait: &Waiting) -> Result<Looked, Fault> {
        let sql = conn.sql(&format!(
            "SELECT p.id, pg_catalog.pg_try_advisory_lock({}, p.id), \
             (SELECT pg_catalog.count(*) FROM {{s}}.chan_run_seat s WHERE s.pool_id = p.id AND s.seat <= $2), \
             'chan_run_pool_' || ('{{s_lit}}.chan_run_pool'::regclass::oid)::text || '_' || p.id::text, \
             pg_catalog.pg_backend_pid() FROM {{s}}.chan_run_pool p WHERE p.pool = $1",
            gate_ns()
        ));
        let add_pool =
            conn.sql("INSERT INTO {s}.chan_run_pool (pool) VALUES ($1) ON CONFLICT (pool) DO NOTHING");
        let add_seats = conn.sql(
            "INSERT INTO {s}.chan_run_seat (pool_id, seat) SELECT $1, g FROM pg_catalog.generate_series(1, $2) g \
             ON CONFLICT (pool_id, seat) DO NOTHING",
        );
        let (name, n) = (pool.name().to_owned(), pool.seats as i32);
        loop {
            let (sql, add_pool, add_seats, name) =
                (sql.clone(), add_pool.clone(), add_seats.clone(), name.clone());
            let found = conn.call(wait, Some(ANSWER_WITHIN), "look up the pool", move |client| {
                for _ in 0..2 {
                    let rows = client.query_typed(&sql, &[(&name, Type::TEXT), (&n, Type::INT4)])?;
                    let Some(row) = rows.first() else {
                        client.query_typed(&add_pool, &[(&name, Type::TEXT)])?;
                        continue;
                    };
                    let looked =
                        Looked { id: row.get(0), gate: row.get(1), rows: row.get(2), listen: row.get(3) };
                    if looked.rows < i64::from(n) {
                        match client.query_typed(&add_seats, &[(&looked.id, Type::INT4), (&n, Type::INT4)]) {
                            // The pool was removed by gc meanwhile (the gate, if got, is
                            // released by the caller's next step finding it gone).
                            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {}
                            other => drop(other?),
                        }
                    }
                    return Ok(Some((looked, row.get::<_, i32>(4))));
                }
                Ok(None)
            })?;
            if let Some((looked, backend)) = found {
                conn.check_backend(backend)?;
                return Ok(looked);
            }
        }
    }

    /// Step 2 on the lease's connection; `unlock_gate`: the gate is held there, release
    /// it in the same statement.
    fn take(
        &self,
        conn: &Conn,
        pool_id: i32,
        n: u32,
        taker: &Taker,
        unlock_gate: bool,
        wait: &Waiting,
    ) -> Result<Took, Fault> {
        let sql = conn.sql(&format!(
            "WITH pool AS (SELECT EXISTS (SELECT 1 FROM {{s}}.chan_run_pool WHERE id = $1) AS here), \
             pick AS MATERIALIZED (SELECT s.id, s.fence AS old FROM {{s}}.chan_run_seat s \
               WHERE s.pool_id = $1 AND s.seat <= $2 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l \
                 WHERE {seat_rows} AND l.objid::int8 = s.id AND l.granted) ORDER BY s.seat LIMIT 1), \
             got AS MATERIALIZED (SELECT pick.id, pick.old, pg_catalog.pg_try_advisory_lock({seat_ns}, pick.id) AS got \
               FROM pick), \
             old AS (SELECT l.host, l.pid, l.pid_ticks, l.space, l.command_pid, l.spawn_ticks, l.spawned_ticks, \
               EXTRACT(EPOCH FROM l.heartbeat + l.stops_within - pg_catalog.now())::float8 AS left \
               FROM got JOIN {{s}}.chan_run_lease l ON l.fence = got.old WHERE got.got), \
             upd AS (UPDATE {{s}}.chan_run_seat s SET fence = $3, channel = $4, host = $5, pid = $6, \
               backend = pg_catalog.pg_backend_pid(), seats = $2, since = pg_catalog.now(), released = NULL \
               FROM got WHERE s.id = got.id AND got.got AND NOT EXISTS (SELECT 1 FROM old WHERE old.left > 0) \
               RETURNING s.id) \
             SELECT pool.here, got.id, got.got, EXISTS (SELECT 1 FROM upd), \
               old.host, old.pid, old.pid_ticks, old.space, old.command_pid, old.spawn_ticks, old.spawned_ticks, \
               old.left, CASE WHEN $7 THEN pg_catalog.pg_advisory_unlock({gate_ns}, $1) END, \
               pg_catalog.pg_backend_pid() \
             FROM pool LEFT JOIN got ON true LEFT JOIN old ON true",
            seat_rows = lock_rows_of("chan_run_seat", "l"),
            seat_ns = seat_ns(),
            gate_ns = gate_ns(),
        ));
        let (n, fence, channel) = (n as i32, taker.fence, taker.channel.to_owned());
        let (host, pid) = (self.host.clone(), std::process::id() as i32);
        loop {
            let (sql, channel, host) = (sql.clone(), channel.clone(), host.clone());
            let row = conn.call(wait, Some(ANSWER_WITHIN), "take a seat", move |client| {
                let params: [(&(dyn postgres::types::ToSql + Sync), Type); 7] = [
                    (&pool_id, Type::INT4),
                    (&n, Type::INT4),
                    (&fence, Type::INT8),
                    (&channel, Type::TEXT),
                    (&host, Type::TEXT),
                    (&pid, Type::INT4),
                    (&unlock_gate, Type::BOOL),
                ];
                client.query_typed_one(&sql, &params)
            })?;
            conn.check_backend(row.get(13))?;
            if !row.get::<_, bool>(0) {
                return Ok(Took::Gone);
            }
            let Some(id) = row.get::<_, Option<i32>>(1) else { return Ok(Took::NoSeat) };
            if !row.get::<_, bool>(2) {
                // Another session took it between the look in pg_locks and the try
                // (only a gate holder takes seats, so only a gate given up meanwhile).
                if unlock_gate {
                    return Ok(Took::NoSeat);
                }
                continue;
            }
            let previous = previous_from(&row, 4);
            if row.get::<_, bool>(3) {
                previous.iter().for_each(Previous::kill_leftover_here);
                return Ok(Took::Seat { id, previous: None });
            }
            return Ok(Took::Seat { id, previous });
        }
    }

    /// Step 5 for a seat whose last holder may still run: waits it out, then writes the
    /// row; on giving up the seat's lock is released.
    fn settle(
        &self,
        conn: &Conn,
        id: i32,
        pool: &Pool,
        taker: &Taker,
        previous: Option<Previous>,
        wait: &Waiting,
    ) -> Result<i32, AcquireError> {
        let Some(previous) = previous else { return Ok(id) };
        let whose = format!("pool {}'s seat", pool.name());
        if let Err(fault) = self.wait_out(&previous, &whose, wait) {
            let unlock = conn.sql(&format!("SELECT pg_catalog.pg_advisory_unlock({}, $1)", seat_ns()));
            let _ = conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "give the seat up", move |client| {
                client.query_typed(&unlock, &[(&id, Type::INT4)]).map(drop)
            });
            return Err(fault.into());
        }
        let sql = conn.sql(&format!(
            "UPDATE {{s}}.chan_run_seat SET fence = $2, channel = $3, host = $4, pid = $5, \
             backend = pg_catalog.pg_backend_pid(), seats = $6, since = pg_catalog.now(), released = NULL \
             WHERE id = $1 AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE {} AND l.objid::int8 = $1 \
             AND l.pid = pg_catalog.pg_backend_pid() AND l.granted)",
            lock_rows_of("chan_run_seat", "l")
        ));
        let (fence, channel, host) = (taker.fence, taker.channel.to_owned(), self.host.clone());
        let (pid, n) = (std::process::id() as i32, pool.seats as i32);
        conn.call(wait, Some(ANSWER_WITHIN), "record the seat", move |client| {
            let params: [(&(dyn postgres::types::ToSql + Sync), Type); 6] = [
                (&id, Type::INT4),
                (&fence, Type::INT8),
                (&channel, Type::TEXT),
                (&host, Type::TEXT),
                (&pid, Type::INT4),
                (&n, Type::INT4),
            ];
            client.query_typed(&sql, &params).map(drop)
        })?;
        Ok(id)
    }

    /// What the waiting line says: callers queued ahead.
    fn seat_note(&self, conn: &Conn, pool_id: i32, wait: &Waiting) -> Result<SeatNote, Fault> {
        let sql = conn.sql(&format!(
            "SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks l WHERE {} AND l.objid::int8 = $1",
            lock_rows_of("chan_run_pool", "l")
        ));
        conn.call(wait, Some(ANSWER_WITHIN), "read the pool", move |client| {
            let row = client.query_typed_one(&sql, &[(&pool_id, Type::INT4)])?;
            Ok(SeatNote { ahead: row.get::<_, i64>(0) as usize })
        })
    }

    /// Steps 3 and 4: queues for the gate on a connection of its own, then takes the
    /// first free seat as the head. `None`: the pool was removed meanwhile (start over).
    fn queue_for_seat(
        &self,
        conn: &Conn,
        looked: &Looked,
        pool: &Pool,
        taker: &Taker,
        wait: &Waiting,
    ) -> Result<Option<i32>, AcquireError> {
        let queue = self.connect(wait)?;
        let listen = format!("LISTEN \"{}\"", looked.listen.replace('"', ""));
        let lock = queue.sql(&format!(
            "SELECT pg_catalog.pg_backend_pid(), \
             CASE WHEN pg_catalog.pg_backend_pid() = $2 THEN pg_catalog.pg_advisory_lock({}, $1)::text END",
            gate_ns()
        ));
        let (id, backend) = (looked.id, queue.backend);
        queue.call(wait, Some(ANSWER_WITHIN), "listen for the pool's releases", move |client| {
            client.batch_execute(&listen)
        })?;
        let got: i32 = queue.call(wait, None, "wait for the pool's gate", move |client| {
            Ok(client.query_typed_one(&lock, &[(&id, Type::INT4), (&backend, Type::INT4)])?.get(0))
        })?;
        queue.check_backend(got)?;
        loop {
            match self.take(conn, looked.id, pool.seats, taker, false, wait)? {
                Took::Seat { id, previous } => {
                    // Closing the queue's connection hands the gate on.
                    drop(queue);
                    return self.settle(conn, id, pool, taker, previous, wait).map(Some);
                }
                Took::Gone => return Ok(None),
                Took::NoSeat => {}
            }
            let given_up = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&given_up);
            let woken = queue.call(wait, Some(RECHECK + ANSWER_WITHIN), "wait for a seat", move |client| {
                let until = Instant::now() + RECHECK;
                let mut notes = client.notifications();
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || flag.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    if notes.timeout_iter(left.min(SLICE)).next()?.is_some() {
                        // Several releases make one check.
                        while notes.iter().next()?.is_some() {}
                        return Ok(());
                    }
                }
            });
            if let Err(fault) = woken {
                given_up.store(true, Ordering::SeqCst);
                return Err(fault.into());
            }
        }
    }

    /// Step 6's statement (on the lease's connection, once the command has ended):
    /// clears this run's seat rows under its fence, unlocks the seats and
    /// notifies their pools' heads. A head that takes a seat before this commits finds
    /// the row naming a lease that has ended: nothing to wait out.
    pub(super) fn release_seats_sql(conn: &Conn) -> String {
        conn.sql(&format!(
            "WITH cleared AS (UPDATE {{s}}.chan_run_seat SET fence = NULL, channel = NULL, host = NULL, pid = NULL, \
               backend = NULL, released = pg_catalog.now() WHERE id = ANY($1) AND fence = $2 RETURNING id) \
             SELECT pg_catalog.pg_advisory_unlock({}, s.id), pg_catalog.pg_notify('chan_run_pool_' || \
               ('{{s_lit}}.chan_run_pool'::regclass::oid)::text || '_' || s.pool_id::text, ''), \
               (SELECT pg_catalog.count(*) FROM cleared) \
             FROM {{s}}.chan_run_seat s WHERE s.id = ANY($1)",
            seat_ns()
        ))
    }

    /// `Store::pools`: every pool (or the named ones), its holders and its queue.
    pub(super) fn pool_statuses(&self, only: &[Channel]) -> anyhow::Result<Vec<PoolStatus>> {
        let wait = Waiting::plain();
        let conn = self.connect(&wait)?;
        let names: Vec<String> = only.iter().map(|c| c.name().to_owned()).collect();
        let pools_sql = conn.sql(
            "SELECT p.id, p.pool, (SELECT s.seats FROM {s}.chan_run_seat s WHERE s.pool_id = p.id \
               AND s.seats IS NOT NULL ORDER BY s.since DESC NULLS LAST LIMIT 1) \
             FROM {s}.chan_run_pool p WHERE pg_catalog.cardinality($1::text[]) = 0 OR p.pool = ANY($1) ORDER BY p.pool",
        );
        let holders_sql = conn.sql(&format!(
            "SELECT s.pool_id, s.seat, s.seats, s.channel, s.host, s.pid, \
             pg_catalog.to_char(s.since AT TIME ZONE 'UTC', {UTC_MS}), s.backend = l.pid, a.application_name \
             FROM {{s}}.chan_run_seat s JOIN pg_catalog.pg_locks l ON {} AND l.objid::int8 = s.id AND l.granted \
             LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid ORDER BY s.pool_id, s.seat",
            lock_rows_of("chan_run_seat", "l")
        ));
        // A waiter's channel: the channel lock held by the same chan-run (its lease's
        // connection bears the same application name as its queue connection).
        let queue_sql = conn.sql(&format!(
            "SELECT l.objid::int8, l.pid, a.application_name, \
             pg_catalog.to_char(COALESCE(l.waitstart, a.backend_start) AT TIME ZONE 'UTC', {UTC_MS}), \
             (SELECT c.channel FROM pg_catalog.pg_locks cl JOIN pg_catalog.pg_stat_activity ca ON ca.pid = cl.pid \
               JOIN {{s}}.chan_run_channel c ON c.id = cl.objid::int8 \
               WHERE {channel_rows} AND cl.granted AND ca.application_name = a.application_name LIMIT 1), \
             EXISTS (SELECT 1 FROM pg_catalog.pg_locks cl WHERE {channel_rows} AND cl.pid = l.pid AND cl.granted) \
             FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid WHERE {gate_rows} \
             ORDER BY l.objid, l.granted DESC, l.waitstart NULLS FIRST",
            channel_rows = lock_rows_of("chan_run_channel", "cl"),
            gate_rows = lock_rows_of("chan_run_pool", "l"),
        ));
        let read = conn.call(&wait, Some(ANSWER_WITHIN), "read the pools", move |client| {
            let pools = match client.query_typed(&pools_sql, &[(&names, Type::TEXT_ARRAY)]) {
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
                other => other?,
            };
            Ok(Some((pools, client.query_typed(&holders_sql, &[])?, client.query_typed(&queue_sql, &[])?)))
        })?;
        let Some((pools, holders, queue)) = read else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for p in &pools {
            let id: i32 = p.get(0);
            let mut status = PoolStatus {
                pool: p.get(1),
                seats: p.get::<_, Option<i32>>(2).map(|n| n as u32),
                ..Default::default()
            };
            for h in holders.iter().filter(|h| h.get::<_, i32>(0) == id) {
                let seat = Some(h.get::<_, i32>(1) as u32);
                status.holders.push(match h.get::<_, Option<bool>>(7) {
                    Some(true) => SeatView {
                        host: h.get(4),
                        channel: h.get(3),
                        pid: h.get::<_, Option<i32>>(5).map(|p| p as u32),
                        since: h.get(6),
                        seat,
                        seats: h.get::<_, Option<i32>>(2).map(|n| n as u32),
                    },
                    // Taken, its row not yet written (the last holder's lease still runs).
                    _ => {
                        let (pid, host) = from_application_name(h.get::<_, Option<String>>(8).as_deref());
                        SeatView { host, pid, seat, ..Default::default() }
                    }
                });
            }
            for w in queue.iter().filter(|w| w.get::<_, i64>(0) == i64::from(id)) {
                // A gate held by a lease's own connection is a caller passing through
                // with a free seat, not a waiter.
                if w.get::<_, bool>(5) {
                    continue;
                }
                let (pid, host) = from_application_name(w.get::<_, Option<String>>(2).as_deref());
                status.queue.push(SeatView {
                    host,
                    pid,
                    since: w.get(3),
                    channel: w.get(4),
                    ..Default::default()
                });
            }
            out.push(status);
        }
        Ok(out)
    }

    /// `gc`'s pools: idle longer than `idle_for`, nobody holding a seat or queued, no
    /// unclean holder's lease running; removed while holding the gate.
    pub(super) fn gc_pools(
        &self,
        conn: &Conn,
        idle_for: Duration,
        dry_run: bool,
    ) -> anyhow::Result<Vec<GcItem>> {
        let sql = conn.sql(
            "SELECT p.id, p.pool, EXTRACT(EPOCH FROM pg_catalog.now() - GREATEST(p.created, pg_catalog.max(s.since), \
               pg_catalog.max(s.released)))::float8, \
             pg_catalog.bool_or(EXISTS (SELECT 1 FROM {s}.chan_run_lease l WHERE l.fence = s.fence \
               AND l.heartbeat + l.stops_within > pg_catalog.now())) \
             FROM {s}.chan_run_pool p LEFT JOIN {s}.chan_run_seat s ON s.pool_id = p.id GROUP BY p.id \
             HAVING GREATEST(p.created, pg_catalog.max(s.since), pg_catalog.max(s.released)) \
               < pg_catalog.now() - pg_catalog.make_interval(secs => $1) ORDER BY p.pool",
        );
        let (try_gate, busy, delete, unlock) = (
            conn.sql(&format!("SELECT pg_catalog.pg_try_advisory_lock({}, $1)", gate_ns())),
            conn.sql(&format!(
                "SELECT EXISTS (SELECT 1 FROM {{s}}.chan_run_seat s JOIN pg_catalog.pg_locks l ON {} \
                   AND l.objid::int8 = s.id AND l.granted WHERE s.pool_id = $1), \
                 (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks l WHERE {} AND l.objid::int8 = $1 AND NOT l.granted)",
                lock_rows_of("chan_run_seat", "l"),
                lock_rows_of("chan_run_pool", "l")
            )),
            conn.sql("DELETE FROM {s}.chan_run_pool WHERE id = $1"),
            conn.sql(&format!("SELECT pg_catalog.pg_advisory_unlock({}, $1)", gate_ns())),
        );
        let secs = idle_for.as_secs_f64().min(1e15);
        let items =
            conn.call(&Waiting::plain(), Some(ANSWER_WITHIN), "remove idle pools", move |client| {
                let rows = match client.query_typed(&sql, &[(&secs, Type::FLOAT8)]) {
                    Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(Vec::new()),
                    other => other?,
                };
                let mut items = Vec::new();
                for row in rows {
                    let id: i32 = row.get(0);
                    let idle = Duration::try_from_secs_f64(row.get::<_, f64>(2)).unwrap_or_default();
                    let mut item = GcItem { pool: true, channel: row.get(1), idle, kept: None };
                    let key = [(&id as &(dyn postgres::types::ToSql + Sync), Type::INT4)];
                    if row.get::<_, Option<bool>>(3) == Some(true) {
                        item.kept = Some("its last holder's lease may still run");
                    } else if !client.query_typed_one(&try_gate, &key)?.get::<_, bool>(0) {
                        item.kept = Some("callers waiting");
                    } else {
                        let found = client.query_typed_one(&busy, &key)?;
                        item.kept = match (found.get::<_, bool>(0), found.get::<_, i64>(1)) {
                            (true, _) => Some("seats held"),
                            (false, 0) if !dry_run => client.query_typed(&delete, &key).map(|_| None)?,
                            (false, 0) => None,
                            _ => Some("callers waiting"),
                        };
                        client.query_typed(&unlock, &key)?;
                    }
                    items.push(item);
                }
                Ok(items)
            })?;
        Ok(items)
    }
}
