//! The default store: files under the state directory, locked with `flock`.
//!
//!     <state-dir>/active.json         every channel's record (state/)
//!     <state-dir>/locks/<stem>.lock   the channel lock and holder record (lock.rs)
//!     <state-dir>/queue/<stem>/       the channel's FIFO queue of tickets (queue.rs), and
//!                                     `--collect`'s messages and verdict (collect.rs)
//!     <state-dir>/history/<stem>.log  the channel's runs (history.rs)
//!     <state-dir>/pools/<stem>/       a pool's seats and queue (pool.rs), made on first use,
//!                                     and its ledger (ledger.rs)
//!
//! The state directory is opened once and checked on its descriptor (dir.rs); its
//! folders and files are reached relative to it, each checked the same way, and one
//! value owns a channel's files (files.rs). The verbs live in acquire.rs, status.rs and
//! gc.rs; a held channel is a `LocalLease` (lease.rs). Every descriptor is close-on-exec:
//! the command never inherits a lock, so a descendant that outlives a run cannot wedge
//! its channel.

mod acquire;
mod collect;
mod dir;
mod files;
mod gc;
mod history;
mod lease;
mod ledger;
mod lock;
mod pool;
mod queue;
mod state;
mod status;

use crate::channel::Channel;
use crate::control::Control;
use crate::store::{AcquireError, ChannelStatus, GcReport, Lease, Store, Wait, WaitNote};
use anyhow::anyhow;
use dir::StateDir;
use files::ChannelFiles;
use rustix::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct LocalStore {
    folders: Arc<Folders>,
}

/// The state directory and its folders, each opened and checked once. A folder is
/// `None` only in a store opened to read (`status`, `history`), where nothing is made.
pub struct Folders {
    pub state: StateDir,
    pub locks: Option<OwnedFd>,
    pub queues: Option<OwnedFd>,
    pub history: Option<OwnedFd>,
    /// Opened on first use: a run naming no pool never looks for it.
    pools: std::sync::OnceLock<OwnedFd>,
    /// The kind of network filesystem the state directory is on, if it is on one.
    pub network: Option<&'static str>,
}

impl Folders {
    pub fn locks(&self) -> anyhow::Result<&OwnedFd> {
        self.locks.as_ref().ok_or_else(|| anyhow!("{} has no locks folder", self.state.path.display()))
    }

    pub fn queues(&self) -> anyhow::Result<&OwnedFd> {
        self.queues.as_ref().ok_or_else(|| anyhow!("{} has no queue folder", self.state.path.display()))
    }

    pub fn history(&self) -> anyhow::Result<&OwnedFd> {
        self.history.as_ref().ok_or_else(|| anyhow!("{} has no history folder", self.state.path.display()))
    }

    /// The `pools` folder (created, when `create`); `None` if there is none yet.
    pub fn pools(&self, create: bool) -> anyhow::Result<Option<&OwnedFd>> {
        if let Some(fd) = self.pools.get() {
            return Ok(Some(fd));
        }
        Ok(self.state.folder("pools", create)?.map(|fd| self.pools.get_or_init(|| fd)))
    }

    /// `active.json`, for a writer whose waits `control` can end.
    pub fn active(&self, control: &'static Control) -> state::ActiveFile<'_> {
        state::ActiveFile::new(&self.state, Some(control))
    }

    /// `active.json`, for a reader that never waits.
    pub fn active_reader(&self) -> state::ActiveFile<'_> {
        state::ActiveFile::new(&self.state, None)
    }
}

impl LocalStore {
    /// Opens the state directory at `root`, creating it and its folders as needed
    /// (`create`); `None` if it does not exist and `create` is false.
    pub fn open(root: &Path, create: bool) -> anyhow::Result<Option<LocalStore>> {
        let Some(state) = StateDir::open(root, create)? else { return Ok(None) };
        let network = network_filesystem(&state.fd);
        if let Some(kind) = network {
            crate::ui::warn(network_warning(root, kind));
        }
        let folders = Folders {
            locks: state.folder("locks", create)?,
            queues: state.folder("queue", create)?,
            history: state.folder("history", create)?,
            pools: std::sync::OnceLock::new(),
            state,
            network,
        };
        Ok(Some(LocalStore { folders: Arc::new(folders) }))
    }

    fn files(&self, channel: &Channel) -> ChannelFiles {
        ChannelFiles::new(&self.folders, channel)
    }
}

impl Store for LocalStore {
    fn id(&self) -> String {
        let (dev, ino) = self.folders.state.dev_ino;
        format!("local:{dev}:{ino}")
    }

    fn gc(&self, idle_for: Duration, dry_run: bool, control: &'static Control) -> anyhow::Result<GcReport> {
        gc::gc(&self.folders, idle_for, dry_run, control)
    }

    fn status(&self, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)> {
        status::status(&self.folders, only)
    }

    fn pools(&self, only: &[Channel]) -> anyhow::Result<Vec<crate::store::PoolStatus>> {
        pool::status(&self.folders, only)
    }

    fn pool_ledgers(&self, only: &[Channel]) -> anyhow::Result<Vec<crate::store::PoolLedger>> {
        pool::ledgers(&self.folders, only)
    }

    fn history(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<crate::history::Entry>> {
        Ok(self.files(channel).read_history(n))
    }

    fn acquire(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&WaitNote),
    ) -> Result<Box<dyn Lease>, AcquireError> {
        let files = self.files(channel);
        let file = acquire::acquire(&files, wait, control, on_wait)?;
        Ok(Box::new(lease::LocalLease::take(files, file, control)?))
    }

    fn acquire_collect(
        &self,
        channel: &Channel,
        wait: Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&WaitNote),
        entry: &crate::store::CollectEntry,
    ) -> Result<crate::store::Turn, AcquireError> {
        collect::acquire(&self.files(channel), wait, control, on_wait, entry)
    }
}

fn network_warning(root: &Path, kind: &str) -> String {
    format!(
        "the state directory {} is on {kind}, where flock may be emulated or silently ineffective: runs on one channel may overlap across hosts; use a local directory",
        root.display()
    )
}

/// The network filesystem `dir` is on, by the filesystem's magic number (Linux).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn network_filesystem(dir: &OwnedFd) -> Option<&'static str> {
    network_kind(rustix::fs::fstatfs(dir).ok()?.f_type as u64)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn network_filesystem(_dir: &OwnedFd) -> Option<&'static str> {
    None
}

/// The network filesystems among `statfs` magic numbers (linux/magic.h).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn network_kind(magic: u64) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "NFS",
        0x517b | 0xff53_4d42 | 0xfe53_4d42 => "SMB/CIFS",
        0x0102_1997 => "9P",
        0x00c3_6400 => "CephFS",
        0x5346_414f => "AFS",
        0x7375_7245 => "Coda",
        0x0bd0_0bd0 => "Lustre",
        0x0116_1970 => "GFS2",
        0x7461_636f => "OCFS2",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_named_and_local_ones_are_not() {
        assert_eq!(network_kind(0x6969), Some("NFS"));
        assert_eq!(network_kind(0xff53_4d42), Some("SMB/CIFS"));
        assert_eq!(network_kind(0x00c3_6400), Some("CephFS"));
        for local in [
            0xef53,      /* ext4 */
            0x0102_1994, /* tmpfs */
            0x5846_5342, /* xfs */
            0x9123_683e, /* btrfs */
        ] {
            assert_eq!(network_kind(local), None);
        }
    }
}
