//! Where locks, queues, state and holder introspection live, behind one interface:
//! `Store` hands out a `Lease` (the channel's lock, held) in queue order. The local
//! store (files under the state directory) is the default; a store is chosen once at
//! start-up and the commands never look behind the trait.

pub mod local;
pub mod postgres;

use crate::channel::Channel;
use crate::control::Control;
use crate::pool::Pool;
use crate::state::ChannelRecord;
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::time::{Duration, Instant, SystemTime};

/// How long a caller is willing to wait for a busy channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Forever,
    No,
    Until(Instant),
}

/// The store can no longer prove this run holds the channel (its connection or
/// heartbeat failed, or a later holder's fence superseded this one): nothing more is
/// written for the run.
#[derive(Debug, thiserror::Error)]
#[error("lock lost, state not written: {0}")]
pub struct LockLost(pub String);

/// The store could not be reached, or did not answer within its bounds (a server down,
/// restarting or out of connection slots): nothing ran, and a retry may well succeed.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct Unavailable(pub anyhow::Error);

/// Why the channel's record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The lease is no longer proven: another run may have overlapped this one.
    #[error(transparent)]
    LockLost(#[from] LockLost),
    /// A forwarded signal arrived while waiting to read or write it.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    /// The read or write failed (disk full, I/O error, the server refused, a lock held
    /// too long by another): the lock still held.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Why no lease was handed out.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The channel stayed busy (`--no-wait`, or the `--wait` deadline passed).
    #[error("the channel is busy")]
    Busy,
    /// A forwarded signal arrived while waiting; nothing ran.
    #[error("interrupted by signal {0} while waiting")]
    Interrupted(i32),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Shown once when a caller has to wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaitNote {
    pub holder_pid: Option<u32>,
    /// The holder's host, for a store shared by several hosts.
    pub holder_host: Option<String>,
    pub held_for: Option<Duration>,
    /// Callers queued ahead of this one (the holder not counted).
    pub ahead: usize,
}

/// Shown once when a run has to wait for a seat in a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeatNote {
    /// Callers queued for the pool ahead of this one.
    pub ahead: usize,
}

/// Who holds a channel, as recorded for `status` and for the next holder.
#[derive(Clone, Debug)]
pub struct Holder<'a> {
    pub pid: u32,
    pub started_at: SystemTime,
    pub command: &'a [OsString],
    /// Clock ticks since boot just before the command is forked.
    pub spawn_ticks: u64,
    /// When the run must be over (its return-time promise), if it has a time limit: a
    /// store's final write keeps to it.
    pub ends_by: Option<Instant>,
}

/// What `status` shows of one channel.
#[derive(Clone, Debug, Default)]
pub struct ChannelStatus {
    pub channel: String,
    /// Held, or mid-hand-off with callers queued.
    pub running: bool,
    pub holder: Option<HolderView>,
    /// Live queued callers in queue order (never the holder).
    pub queue: Vec<Waiter>,
    /// `--collect` callers among them, by queue index: "queued", or "taken" (into the
    /// batch being run). Empty where the store does not say.
    pub collect: Vec<Option<&'static str>>,
    pub record: Option<ChannelRecord>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HolderView {
    /// The host chan-run runs on, for a store shared by several hosts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub pid: Option<u32>,
    pub command_pid: Option<u32>,
    pub started_at: Option<String>,
    pub command: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Waiter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub pid: Option<u32>,
    pub since: Option<String>,
}

/// What `status` shows of one pool.
#[derive(Clone, Debug, Default)]
pub struct PoolStatus {
    pub pool: String,
    /// The seat count (N) named by the newest holder or waiter, if any is known.
    pub seats: Option<u32>,
    /// The live seat holders, by seat.
    pub holders: Vec<SeatView>,
    /// The live callers waiting for a seat, in queue order.
    pub queue: Vec<SeatView>,
}

/// A seat holder or a caller waiting for a seat.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SeatView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub channel: Option<String>,
    pub pid: Option<u32>,
    pub since: Option<String>,
    /// The seat held (1 to N); none for a waiter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seat: Option<u32>,
    /// The N this caller named.
    pub seats: Option<u32>,
}

/// A pool's ledger, as `status` shows it: what its runs spent (`cost_usd_total`,
/// `cost_today: {"day", "usd"}`) and its cool-down (`cool_down`), as spend.rs and
/// cmd/cooldown.rs keep them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolLedger {
    pub pool: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// One channel (or pool) `gc` looked at.
#[derive(Clone, Debug)]
pub struct GcItem {
    /// A pool's files rather than a channel's.
    pub pool: bool,
    pub channel: String,
    /// How long since its last run ended.
    pub idle: Duration,
    /// Removed (or, with `--dry-run`, would be); else why it was kept.
    pub kept: Option<&'static str>,
}

/// What `gc` did: the channels it looked at, and lines about the store itself (such
/// as a file made smaller).
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub items: Vec<GcItem>,
    pub notes: Vec<String>,
}

pub trait Store {
    /// Where this store keeps its locks, the same for every process that reaches the
    /// same store by whatever path (no spaces): a nested run compares it.
    fn id(&self) -> String;

    /// Where this store is, as the command may be told it (`CHAN_RUN_STORE`): without a
    /// password or other secret. `None`: the store is not named by `CHAN_RUN_STORE`.
    fn url_without_password(&self) -> Option<String> {
        None
    }

    /// Removes the records, logs, queue folders and lock files of channels whose last
    /// run ended more than `idle_for` ago and that nobody holds or waits for; and the
    /// files of pools nobody has held a seat in for that long, nor holds or waits for.
    fn gc(&self, idle_for: Duration, dry_run: bool, control: &'static Control) -> anyhow::Result<GcReport>;

    /// Every known channel (or the ones named), without taking or joining anything:
    /// never blocks behind a run, never makes a concurrent run fail.
    fn status(&self, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)>;

    /// Every known pool (or the ones named): seats held and callers waiting, read the
    /// way `status` reads channels (nothing taken or joined).
    fn pools(&self, only: &[Channel]) -> anyhow::Result<Vec<PoolStatus>>;

    /// The ledgers of every pool (or those named) that has one, read without waiting
    /// behind a run.
    fn pool_ledgers(&self, only: &[Channel]) -> anyhow::Result<Vec<PoolLedger>>;

    /// The channel's newest `n` runs, newest first.
    fn history(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<crate::history::Entry>>;

    /// Joins the channel's queue and returns once this caller holds the channel, the
    /// wait is given up, or a forwarded signal arrives (seen through `control`). Before
    /// returning a lease it has killed what is left of a previous holder's command.
    fn acquire(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<Box<dyn Lease>, AcquireError>;

    /// `--collect`: as `acquire`, leaving `entry` in the queue while this caller waits,
    /// so that the run of an earlier caller can take its message; then either the lease
    /// (this caller runs the batch) or the outcome of the batch that took it.
    fn acquire_collect(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&WaitNote),
        entry: &CollectEntry,
    ) -> Result<Turn, AcquireError>;
}

/// A `--collect` caller's entry in the queue: its message, and the fingerprint of its
/// command and options (callers with equal fingerprints are answered by one run).
#[derive(Clone, Debug)]
pub struct CollectEntry {
    pub fingerprint: String,
    pub message: std::sync::Arc<[u8]>,
}

/// How a `--collect` caller's wait ended.
pub enum Turn {
    /// Its turn came: it runs the batch.
    Run(Box<dyn Lease>),
    /// An earlier caller's run took its message and wrote the batch's outcome.
    Answered(Verdict),
    /// A forwarded signal ended the wait after its message had been taken into the batch
    /// being run (which answers it).
    TakenThenInterrupted(i32),
}

/// A batch's outcome, as its runner wrote it for the callers it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The runner's exit code.
    pub code: u8,
    pub runner_pid: u32,
    /// Messages the run answered, the runner's own included.
    pub messages: u32,
}

/// A held channel. Dropping it releases the lock but leaves the holder record, as a
/// crash would: the next holder then checks for leftovers. `release` is the clean end.
pub trait Lease {
    /// Records the holder before the command is started.
    fn announce(&mut self, holder: &Holder) -> anyhow::Result<()>;
    /// Where the command's process writes its own pid into the holder record before
    /// `exec`, if the store can take such a write: (fd, offset, width).
    fn pid_field(&self) -> Option<(RawFd, u64, usize)>;
    /// Takes a seat in `pool` for this run: first come first served by arrival at the
    /// pool, waiting as `wait` says (a forwarded signal ends the wait through
    /// `control`). The seat is held until the lease is released or dropped. A run
    /// naming several pools takes them in name order.
    fn take_seat(
        &mut self,
        pool: &Pool,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&SeatNote),
    ) -> Result<(), AcquireError>;
    /// The command has ended: frees the run's seats at once (the channel stays held
    /// while the run is recorded), so a pool's next waiter need not wait for that.
    fn free_seats(&mut self);
    /// Changes `pool`'s ledger (see `PoolLedger`) in a serialized read-modify-write and
    /// returns it as written; an empty change reads it.
    fn update_pool_ledger(
        &mut self,
        pool: &Pool,
        change: &mut dyn FnMut(&mut serde_json::Map<String, serde_json::Value>),
    ) -> anyhow::Result<serde_json::Map<String, serde_json::Value>>;
    /// Adds a finished run's cost to `pool`'s ledger, for today (UTC) and in all.
    fn charge_pool(&mut self, pool: &Pool, cost: f64) -> anyhow::Result<()> {
        let now = SystemTime::now();
        self.update_pool_ledger(pool, &mut |ledger| crate::spend::add_cost(ledger, Some(cost), now)).map(drop)
    }
    /// Becomes `pool`'s probe after a cool-down (the one run that tries the API first)
    /// unless another run is; held until the seats are freed. `Ok(false)`: another
    /// run probes.
    fn take_pool_probe(&mut self, pool: &Pool) -> anyhow::Result<bool>;
    /// Waits until `pool`'s probe has ended (its outcome is in the ledger then), the
    /// deadline passes (`Busy`) or a forwarded signal comes.
    fn wait_pool_probe(
        &mut self,
        pool: &Pool,
        deadline: Option<Instant>,
        control: &'static Control,
    ) -> Result<(), AcquireError>;
    /// The command was forked and exec'd: `ticks` bounds its start time from above.
    fn command_started(&mut self, pid: u32, ticks: u64);
    /// The channel's stored record (a damaged state file is moved aside, with a warning).
    fn record(&mut self) -> Result<ChannelRecord, RecordError>;
    /// Changes the channel's record in the serialized read-modify-write.
    fn update(&mut self, change: &mut dyn FnMut(&mut ChannelRecord)) -> Result<(), RecordError>;
    /// The fencing token of this lease, if the store hands them out: it strictly grows
    /// from one holder to the next, so what the command writes elsewhere can be tagged
    /// with it and a stale holder's writes refused (`CHAN_RUN_FENCE`).
    fn fence(&self) -> Option<i64> {
        None
    }
    /// If this lease can be lost while the command runs (the store then raises the
    /// control's lock-lost alarm), the longest the command may outlive that alarm: the
    /// store's protocol counts on the command being gone by then.
    fn lost_grace(&self) -> Option<Duration> {
        None
    }
    /// Records a finished run: `change` as in `update`, then the history entry `entry`
    /// makes from the changed record (while the lock is held; in one write where the
    /// store can). Returns the record's result and the history's (a failure of one
    /// write that carried both is reported once, as the record's).
    fn record_run(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: &mut dyn FnMut(&ChannelRecord) -> crate::history::Entry,
    ) -> (Result<(), RecordError>, anyhow::Result<()>);
    /// The clean end: the command is gone; clears the holder record and unlocks.
    fn release(self: Box<Self>) -> anyhow::Result<()>;
    /// The run before this lease, if its chan-run died holding the channel (SIGKILL,
    /// OOM: its holder record was left behind), as that record named it.
    fn died(&mut self) -> Option<DeadRun>;
    /// `--collect`: holding the channel, waits until no new caller has queued for `quiet`
    /// (or `max` messages are waiting, or a caller that cannot be collected queued), as
    /// a forwarded signal allows (`AcquireError::Interrupted`).
    fn collect_window(
        &mut self,
        quiet: Duration,
        max: u32,
        control: &'static Control,
    ) -> Result<(), AcquireError>;
    /// `--collect`: takes the messages of the `--collect` callers queued right behind with
    /// the same fingerprint, in arrival order, stopping at the first that differs, so that
    /// the batch holds at most `max` messages with this run's own; returns them.
    fn take_batch(&mut self, max: u32) -> anyhow::Result<Vec<std::sync::Arc<[u8]>>>;
    /// `--collect`: the batch's outcome (this run's exit code), told before `record_run`,
    /// so that a store that can writes it in one transaction with the run's record (then
    /// `settle_batch` has nothing left to do).
    fn stage_batch(&mut self, code: u8) {
        let _ = code;
    }
    /// `--collect`: writes the batch's outcome (this run's exit code) for the callers it
    /// took, before the channel is released.
    fn settle_batch(&mut self, code: u8) -> anyhow::Result<()>;
    /// Adds `entry`, a run that is not this lease's own, to the channel's history.
    fn append_history(&mut self, entry: &crate::history::Entry) -> anyhow::Result<()>;
}

/// A run whose chan-run died holding the channel, as its holder record named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadRun {
    pub pid: u32,
    /// RFC 3339, as the run's `last_run.started_at` would have said.
    pub started_at: String,
    pub command_pid: Option<u32>,
    pub command: Vec<String>,
}

/// Where `--store` / `--state-dir` point.
#[derive(Clone, Copy, Debug)]
pub struct Location<'a> {
    pub store: Option<&'a str>,
    pub state_dir: Option<&'a std::path::Path>,
}

/// The store for this invocation: PostgreSQL for a `postgres://` `--store`, else the
/// local state directory (`--state-dir`, else the platform's per-user state directory).
pub fn open(at: Location) -> anyhow::Result<Box<dyn Store>> {
    match open_as(at, true)? {
        Some(store) => Ok(store),
        None => anyhow::bail!("the state directory could not be made"),
    }
}

/// The store if it exists; `None` if there is none yet (nothing is created).
pub fn open_existing(at: Location) -> anyhow::Result<Option<Box<dyn Store>>> {
    open_as(at, false)
}

fn open_as(at: Location, create: bool) -> anyhow::Result<Option<Box<dyn Store>>> {
    if let Some(url) = at.store.filter(|u| !u.is_empty()) {
        return Ok(Some(Box::new(postgres::PgStore::open(url)?)));
    }
    let dir = match at.state_dir {
        Some(dir) => dir.to_owned(),
        None => default_state_dir()?,
    };
    Ok(local::LocalStore::open(&dir, create)?.map(|s| Box::new(s) as Box<dyn Store>))
}

/// The command as holder records keep it: lossy UTF-8, each argument and the whole
/// capped (a prompt can be long).
pub fn capped(command: &[OsString]) -> Vec<String> {
    const MAX_COMMAND_BYTES: usize = 4096;
    const MAX_ARG_BYTES: usize = 512;
    let mut out = Vec::new();
    let mut total = 0;
    for arg in command {
        let mut arg = arg.to_string_lossy().into_owned();
        if arg.len() > MAX_ARG_BYTES {
            let mut cut = MAX_ARG_BYTES;
            while !arg.is_char_boundary(cut) {
                cut -= 1;
            }
            arg.truncate(cut);
            arg.push('…');
        }
        total += arg.len();
        if total > MAX_COMMAND_BYTES {
            out.push("…".to_owned());
            break;
        }
        out.push(arg);
    }
    out
}

fn default_state_dir() -> anyhow::Result<std::path::PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "chan-run")
        .ok_or_else(|| anyhow::anyhow!("cannot find your home directory; pass --state-dir DIR"))?;
    Ok(dirs.state_dir().unwrap_or_else(|| dirs.data_local_dir()).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_commands_are_capped() {
        let long = OsString::from("x".repeat(10_000));
        let many: Vec<OsString> = (0..100).map(|_| long.clone()).collect();
        let capped = capped(&many);
        assert!(capped.iter().map(String::len).sum::<usize>() <= 4096 + 8);
        assert_eq!(capped.last().unwrap(), "…");
    }
}
