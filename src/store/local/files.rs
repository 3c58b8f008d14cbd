//! One channel's files, reached through the state directory's checked folders:
//! `locks/<stem>.lock` (the lock and holder record), `queue/<stem>/` (its FIFO queue)
//! and `history/<stem>.log` (its runs). Every verb of the local store goes through this
//! value, so a channel's files are named, opened and checked in one place.

use super::Folders;
use super::dir;
use super::history;
use super::queue::QueueDir;
use crate::channel::Channel;
use anyhow::anyhow;
use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, OFlags};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Clone)]
pub struct ChannelFiles {
    pub folders: Arc<Folders>,
    pub channel: Channel,
}

impl ChannelFiles {
    pub fn new(folders: &Arc<Folders>, channel: &Channel) -> ChannelFiles {
        ChannelFiles { folders: Arc::clone(folders), channel: channel.clone() }
    }

    pub fn stem(&self) -> &str {
        self.channel.stem()
    }

    fn lock_name(&self) -> String {
        format!("{}.lock", self.stem())
    }

    /// Opens (creating, 0600) the channel's lock file, read-write.
    pub fn open_lock(&self) -> anyhow::Result<File> {
        let locks = self.folders.locks()?;
        dir::file(locks, &self.lock_name(), OFlags::RDWR | OFlags::CREATE)
            .map_err(|e| anyhow!("{}", e.message(&Path::new("locks").join(self.lock_name()))))
    }

    /// The lock file if it exists, read-only, with its identity (for `status`: it creates
    /// nothing and takes nothing).
    pub fn existing_lock(&self) -> Option<(File, crate::procfs::FileId)> {
        let file = dir::file(self.folders.locks.as_ref()?, &self.lock_name(), OFlags::RDONLY).ok()?;
        let id = crate::procfs::file_id(&rustix::fs::fstat(&file).ok()?);
        Some((file, id))
    }

    /// After taking the lock: does `locks/<stem>.lock` still name the file we locked?
    pub fn still_names(&self, file: &File) -> bool {
        self.folders.locks.as_ref().is_some_and(|locks| dir::same_file(locks, self.lock_name(), file))
    }

    /// How long ago the lock file was last written (for channels with no record).
    pub fn lock_modified_ago(&self) -> Option<Duration> {
        let locks = self.folders.locks.as_ref()?;
        let st = rustix::fs::statat(locks, self.lock_name(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let modified = std::time::UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64);
        SystemTime::now().duration_since(modified).ok()
    }

    /// Removes the lock file while its lock is held (`gc`); every acquirer checks after
    /// locking that the path still names the file it locked, and starts over if not.
    pub fn remove_lock(&self, held: &File) {
        if let Some(locks) = &self.folders.locks
            && self.still_names(held)
        {
            let _ = rustix::fs::unlinkat(locks, self.lock_name(), AtFlags::empty());
        }
    }

    /// The channel's queue folder, created if missing.
    pub fn queue(&self) -> anyhow::Result<QueueDir> {
        let queues = self.folders.queues()?;
        match dir::folder(queues, self.stem(), true) {
            Ok(Some(fd)) => Ok(QueueDir::new(fd)),
            Ok(None) => Err(anyhow!("cannot make the queue folder queue/{}", self.stem())),
            Err(e) => Err(anyhow!("{}", e.message(&Path::new("queue").join(self.stem())))),
        }
    }

    /// The channel's queue folder if it exists (`status` and `gc` create nothing).
    pub fn existing_queue(&self) -> Option<QueueDir> {
        dir::folder(self.folders.queues.as_ref()?, self.stem(), false).ok().flatten().map(QueueDir::new)
    }

    /// Whether the queue folder is still `queue/<stem>` (clean-up removes an idle
    /// channel's folder while holding its registration lock; whoever then gets that lock
    /// on the removed folder must start over in a new one).
    pub fn queue_still_linked(&self, queue: &QueueDir) -> bool {
        self.folders.queues.as_ref().is_some_and(|queues| dir::same_file(queues, self.stem(), queue.fd()))
    }

    /// For clean-up, holding the registration lock with no live ticket: removes the
    /// dead tickets and the folder itself.
    pub fn remove_queue(&self, queue: &QueueDir) {
        queue.remove_tickets();
        if let Some(queues) = &self.folders.queues {
            let _ = rustix::fs::unlinkat(queues, self.stem(), AtFlags::REMOVEDIR);
        }
    }

    pub fn append_history(&self, entry: &crate::history::Entry) -> anyhow::Result<()> {
        history::append(self.folders.history()?, self.stem(), entry)
    }

    /// The newest `n` runs, newest first (none if there is no history folder yet).
    pub fn read_history(&self, n: usize) -> Vec<crate::history::Entry> {
        self.folders.history.as_ref().map(|h| history::read(h, self.stem(), n)).unwrap_or_default()
    }

    pub fn remove_history(&self) {
        if let Some(h) = &self.folders.history {
            history::remove(h, self.stem());
        }
    }
}

/// The channel names recorded in the lock files (line 1 of each).
pub fn names(locks: &OwnedFd) -> Vec<String> {
    let Ok(mut listing) = rustix::fs::Dir::read_from(locks) else { return Vec::new() };
    let mut names = Vec::new();
    while let Some(Ok(entry)) = listing.read() {
        let Some(name) = entry.file_name().to_str().ok().filter(|n| n.ends_with(".lock")) else { continue };
        let Ok(file) = dir::file(locks, name, OFlags::RDONLY) else { continue };
        if let Some(name) = super::lock::read(&file).ok().and_then(|c| c.name) {
            names.push(name);
        }
    }
    names
}
