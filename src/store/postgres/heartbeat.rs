//! Step 5, the heartbeat: while the command runs, a thread owns the connection and
//! proves every [`BEAT`] that this run still holds the channel; a failed beat raises
//! the lock-lost alarm, and the supervisor stops the command within [`LOST_GRACE`].
//!
//! Its first beat, sent as the command starts (off the path from grant to spawn),
//! writes the holder's command, start, command pid, fork ticks and process space (boot
//! id, pid namespace); then every [`BEAT`] it updates `heartbeat` where `fence` is still
//! this run's. A beat that fails (the connection broke, the fence moved on, the backend
//! changed) raises the lock-lost alarm: the command gets SIGTERM, and SIGKILL at most
//! [`LOST_GRACE`] later (the lease's `lost_grace`; the supervisor keeps to it). The
//! client socket's keepalives and `tcp_user_timeout` bound a beat on a dead network to
//! [`CLIENT_GIVES_UP_AFTER`], so the command is gone [`BEAT`] + that + the grace after
//! the last good beat: well before the server can drop the session and hand the lock on.
//! (A server that restarts drops every lock at once; there the fence is what protects:
//! the old holder's final write is refused and its `CHAN_RUN_FENCE` is older than the
//! new holder's.)

use super::conn::{CLIENT_GIVES_UP_AFTER, Conn, SERVER_DROPS_AFTER, pg_error};
use super::schema::held_here;
use crate::control::LockLostAlarm;
use postgres::types::Type;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the holder proves it still holds the lock.
pub const BEAT: Duration = Duration::from_secs(2);
/// The longest a command may outlive the lock-lost alarm (SIGTERM, then SIGKILL).
pub const LOST_GRACE: Duration = Duration::from_secs(3);

// The protocol's point: a cut-off holder stops its command before the server can drop
// its session and hand the lock on.
const _: () = assert!(
    BEAT.as_secs() + CLIENT_GIVES_UP_AFTER.as_secs() + LOST_GRACE.as_secs() < SERVER_DROPS_AFTER.as_secs()
);

pub enum Beat {
    /// The command's pid, and the clock ticks just after its fork.
    CommandPid(u32, u64),
}

/// The holder's columns `announce` leaves to the first beat.
pub struct HolderColumns {
    pub since: String,
    pub command: String,
    /// Clock ticks just before the command's fork.
    pub spawn_ticks: u64,
}

pub struct Heartbeat {
    pub tx: mpsc::Sender<Beat>,
    pub thread: JoinHandle<(Conn, Option<String>)>,
}

/// On its own thread: beats until the main thread wants the connection back (it drops
/// the sender), or a beat fails: then the alarm stops the command.
pub fn run(
    mut conn: Conn,
    id: i32,
    fence: i64,
    holder: HolderColumns,
    rx: mpsc::Receiver<Beat>,
    alarm: LockLostAlarm,
) -> (Conn, Option<String>) {
    let mut started = None;
    let mut holder = Some(holder);
    loop {
        match rx.recv_timeout(BEAT) {
            Ok(Beat::CommandPid(pid, ticks)) => started = Some((pid, ticks)),
            Err(RecvTimeoutError::Disconnected) => return (conn, None),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Err(why) = conn.beat(id, fence, started, holder.take()) {
            alarm.raise();
            return (conn, Some(why));
        }
    }
}

impl Conn {
    /// One heartbeat: the fence must still be this run's.
    fn beat(
        &mut self,
        id: i32,
        fence: i64,
        started: Option<(u32, u64)>,
        holder: Option<HolderColumns>,
    ) -> Result<(), String> {
        let (space, spawn_ticks) = match &holder {
            Some(h) => (process_space(), i64::try_from(h.spawn_ticks).ok()),
            None => (None, None),
        };
        let (since, command) = holder.map(|h| (h.since, h.command)).unzip();
        let command_pid = started.and_then(|(pid, _)| i32::try_from(pid).ok());
        let spawned_ticks = started.and_then(|(_, ticks)| i64::try_from(ticks).ok());
        // The fence says nobody was granted the channel since; `pg_locks` says this
        // session still holds it (nothing reset or unlocked it under us).
        let sql = format!(
            "UPDATE chan_run_channel SET heartbeat = now(), holder_command_pid = COALESCE($3, holder_command_pid), \
             holder_since = COALESCE($4::timestamptz, holder_since), \
             holder_command = COALESCE($5::jsonb, holder_command), holder_space = COALESCE($6, holder_space), \
             holder_spawn_ticks = COALESCE($7, holder_spawn_ticks), \
             holder_spawned_ticks = COALESCE($8, holder_spawned_ticks) \
             WHERE id = $1 AND fence = $2 RETURNING pg_backend_pid(), {}",
            held_here("$1")
        );
        let rows = self
            .client
            .query_typed(
                &sql,
                &[
                    (&id, Type::INT4),
                    (&fence, Type::INT8),
                    (&command_pid, Type::INT4),
                    (&since, Type::TEXT),
                    (&command, Type::TEXT),
                    (&space, Type::TEXT),
                    (&spawn_ticks, Type::INT8),
                    (&spawned_ticks, Type::INT8),
                ],
            )
            .map_err(|e| format!("the heartbeat failed: {}", pg_error(&e)))?;
        match rows.first() {
            None => Err(format!("the channel's fence moved past {fence}: another holder took it")),
            Some(row) if !row.get::<_, bool>(1) => {
                Err("this session no longer holds the channel's lock".into())
            }
            Some(row) => self.check_backend(row.get(0)).map_err(|e| format!("{e:#}")),
        }
    }
}

/// Where this process's pids mean something: the boot and the pid namespace. A
/// previous holder recorded with the same space died on this host, and its process
/// group can be looked for here.
pub fn process_space() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{} {}", boot.trim(), ns.display()))
}
