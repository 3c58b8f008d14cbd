//! Step 5, the heartbeat: from the moment its lease row is written until the run is
//! recorded, a thread proves every [`BEAT`] that this run still holds the channel, and
//! keeps the run's promise to whoever holds the channel next: its command is gone
//! [`STOPS_WITHIN`] after its last beat the server recorded, whatever happens.
//!
//! Each beat updates the lease row's `heartbeat` where its `fence` is still this run's
//! and `pg_locks` shows this backend holding the lock; the first one after the command
//! starts also writes the holder's command, start, command pid, fork ticks and process
//! space (boot id, pid namespace). A beat that fails (the connection broke, the fence
//! moved on, the lock is gone) or is not answered within [`ALARM_AFTER`] of the last
//! good beat's sending raises the lock-lost alarm: the supervisor sends the command
//! SIGTERM, and SIGKILL at most [`LOST_GRACE`] later (the lease's `lost_grace`). So the
//! command is gone [`ALARM_AFTER`] + [`LOST_GRACE`] after the last good beat was sent, a
//! second before [`STOPS_WITHIN`] after the server recorded it: the bound written in the
//! lease row, which the next holder waits out (lease.rs) when this run ends uncleanly,
//! whatever freed the lock (its backend terminated, a crash, a restart). Every beat is a
//! durable commit (`synchronous_commit = on`), so a restart cannot roll a heartbeat back.
//! And a silent holder keeps its session (and lock) [`SERVER_DROPS_AFTER`] at least.

use super::conn::{CLIENT_GIVES_UP_AFTER, Conn, Fault, pg_error};
use super::schema::held_here;
use super::session::SERVER_DROPS_AFTER;
use super::wait::Waiting;
use crate::control::LockLostAlarm;
use postgres::types::Type;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the holder proves it still holds the lock.
pub const BEAT: Duration = Duration::from_secs(2);
/// No beat confirmed for this long after the last good one was sent: the alarm.
pub const ALARM_AFTER: Duration = Duration::from_secs(BEAT.as_secs() + CLIENT_GIVES_UP_AFTER.as_secs());
/// The longest a command may outlive the lock-lost alarm (SIGTERM, then SIGKILL).
pub const LOST_GRACE: Duration = Duration::from_secs(3);
/// The holder's promise, recorded in its lease row: its command is gone this long after
/// its last recorded beat (a second's margin for the SIGKILL to land).
pub const STOPS_WITHIN: Duration = Duration::from_secs(ALARM_AFTER.as_secs() + LOST_GRACE.as_secs() + 1);

// A cut-off holder stops its command before the server can drop its session and hand
// the lock on, so across a network cut the next holder never waits for the lease.
const _: () = assert!(STOPS_WITHIN.as_secs() < SERVER_DROPS_AFTER.as_secs());

pub enum Beat {
    /// The holder's columns, written by the next beat.
    Holder(HolderColumns),
    /// The command's pid, and the clock ticks just after its fork: beat now.
    CommandPid(u32, u64),
}

/// The holder's columns `announce` leaves to the first beat.
pub struct HolderColumns {
    pub since: String,
    pub command: String,
    /// Clock ticks just before the command's fork.
    pub spawn_ticks: u64,
}

/// The heartbeat thread's handle.
pub struct Heartbeat {
    tx: Option<mpsc::Sender<Beat>>,
    /// Why the lease is known lost, once a beat failed.
    lost: Arc<Mutex<Option<String>>>,
    stopping: Arc<AtomicBool>,
}

impl Heartbeat {
    /// Starts beating for the lease written at `proven_at` (its statement's sending).
    pub fn start(conn: Conn, id: i32, fence: i64, proven_at: Instant, alarm: LockLostAlarm) -> Heartbeat {
        let (tx, rx) = mpsc::channel();
        let lost = Arc::new(Mutex::new(None));
        let stopping = Arc::new(AtomicBool::new(false));
        let beating = Beating { conn, id, fence, lost: Arc::clone(&lost), stopping: Arc::clone(&stopping) };
        std::thread::spawn(move || beating.run(proven_at, rx, alarm));
        Heartbeat { tx: Some(tx), lost, stopping }
    }

    pub fn send(&self, beat: Beat) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(beat);
        }
    }

    /// Stops beating (a beat under way still ends); why the lease was lost, if it was.
    pub fn stop(&mut self) -> Option<String> {
        self.stopping.store(true, Ordering::SeqCst);
        self.tx = None;
        self.lost.lock().ok().and_then(|l| l.clone())
    }
}

struct Beating {
    conn: Conn,
    id: i32,
    fence: i64,
    lost: Arc<Mutex<Option<String>>>,
    stopping: Arc<AtomicBool>,
}

impl Beating {
    /// On its own thread: beats until stopped, or until a beat fails: then the alarm.
    fn run(self, proven_at: Instant, rx: mpsc::Receiver<Beat>, alarm: LockLostAlarm) {
        let (mut last_ok, mut holder, mut started) = (proven_at, None, None);
        loop {
            let next = last_ok + BEAT;
            match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Beat::Holder(columns)) => {
                    holder = Some(columns);
                    continue;
                }
                Ok(Beat::CommandPid(pid, ticks)) => started = Some((pid, ticks)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let sent = Instant::now();
            let within = (last_ok + ALARM_AFTER).saturating_duration_since(sent);
            match self.beat(started, holder.take(), within) {
                Ok(()) => last_ok = sent,
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(why) => {
                    if let Ok(mut lost) = self.lost.lock() {
                        *lost = Some(why);
                    }
                    alarm.raise();
                    return;
                }
            }
        }
    }

    /// One heartbeat: the fence must still be this run's and the lock this backend's.
    fn beat(
        &self,
        started: Option<(u32, u64)>,
        holder: Option<HolderColumns>,
        within: Duration,
    ) -> Result<(), String> {
        let (space, spawn_ticks) = match &holder {
            Some(h) => (process_space(), i64::try_from(h.spawn_ticks).ok()),
            None => (None, None),
        };
        let (since, command) = holder.map(|h| (h.since, h.command)).unzip();
        let command_pid = started.and_then(|(pid, _)| i32::try_from(pid).ok());
        let spawned_ticks = started.and_then(|(_, ticks)| i64::try_from(ticks).ok());
        let sql = self.conn.sql(&format!(
            "UPDATE {{s}}.chan_run_lease SET heartbeat = pg_catalog.now(), command_pid = COALESCE($3, command_pid), \
             since = COALESCE($4::timestamptz, since), command = COALESCE($5::jsonb, command), \
             space = COALESCE($6, space), spawn_ticks = COALESCE($7, spawn_ticks), \
             spawned_ticks = COALESCE($8, spawned_ticks) \
             WHERE channel_id = $1 AND fence = $2 RETURNING pg_catalog.pg_backend_pid(), {}",
            held_here("$1")
        ));
        let (id, fence) = (self.id, self.fence);
        let answer = self.conn.call(&Waiting::plain(), Some(within), "beat", move |client| {
            let params: [(&(dyn postgres::types::ToSql + Sync), Type); 8] = [
                (&id, Type::INT4),
                (&fence, Type::INT8),
                (&command_pid, Type::INT4),
                (&since, Type::TEXT),
                (&command, Type::TEXT),
                (&space, Type::TEXT),
                (&spawn_ticks, Type::INT8),
                (&spawned_ticks, Type::INT8),
            ];
            Ok(match client.query_typed(&sql, &params) {
                Ok(rows) => Ok(rows.first().map(|r| (r.get::<_, i32>(0), r.get::<_, bool>(1)))),
                Err(e) => Err(ended(&e)),
            })
        });
        match answer {
            Ok(Ok(Some((backend, true)))) => self.conn.check_backend(backend).map_err(|e| format!("{e:#}")),
            Ok(Ok(Some((_, false)))) => Err("this session no longer holds the channel's lock".into()),
            Ok(Ok(None)) => Err(format!("the channel's fence moved past {fence}: another holder took it")),
            Ok(Err(why)) => Err(why),
            Err(Fault::Unavailable(_)) => {
                Err(format!("the server confirmed no heartbeat for {}", crate::duration::short(ALARM_AFTER)))
            }
            Err(other) => Err(format!("the heartbeat failed: {:#}", anyhow::Error::from(other))),
        }
    }
}

/// What a failed beat says happened.
fn ended(e: &postgres::Error) -> String {
    match e.code().map(|c| c.code()) {
        Some("57P01") => format!(
            "the server ended this session ({}): pg_terminate_backend, or the server shutting down",
            pg_error(e)
        ),
        Some("57P02" | "57P03") => format!("the server crashed or restarted ({})", pg_error(e)),
        _ => format!("the heartbeat failed: {}", pg_error(e)),
    }
}

/// Where this process's pids mean something: the boot and the pid namespace. A
/// previous holder recorded with the same space ran on this host, and its process
/// group can be looked for here.
pub fn process_space() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{} {}", boot.trim(), ns.display()))
}
