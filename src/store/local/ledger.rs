//! A pool's ledger on the local store: `pools/<stem>/ledger`, one JSON line holding
//! what the pool's runs spent (`cost_usd_total`, `cost_today: {"day", "usd"}`, as
//! spend.rs keeps a channel's) and its cool-down (`cool_down`, see cmd/cooldown.rs).
//! Changed in a read-modify-write under the file's own `flock` (held for microseconds,
//! never across a wait); read under a shared one. Beside it, `probe`: the run trying
//! the API first after a cool-down holds it locked (exclusive, not waiting) until its
//! outcome is in the ledger; the pool's other runs wait for it with a shared lock. `gc`
//! removes both with the pool.

use super::Folders;
use super::dir;
use crate::control::{Control, Gave};
use crate::pool::Pool;
use crate::store::AcquireError;
use anyhow::{Context, anyhow};
use rustix::fd::OwnedFd;
use rustix::fs::{FlockOperation, OFlags};
use rustix::io::Errno;
use serde_json::{Map, Value};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const LEDGER: &str = "ledger";
pub const PROBE: &str = "probe";

/// The longest ledger read; a real one is a few hundred bytes.
const MAX_BYTES: usize = 64 * 1024;

fn pool_folder(folders: &Folders, pool: &Pool) -> anyhow::Result<OwnedFd> {
    let shown = Path::new("pools").join(pool.name.stem());
    let pools = folders.pools(true)?.ok_or_else(|| anyhow!("cannot make the pools folder"))?;
    match dir::folder(pools, pool.name.stem(), true) {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) => Err(anyhow!("cannot make the pool folder {}", shown.display())),
        Err(e) => Err(anyhow!("{}", e.message(&shown))),
    }
}

fn lock(file: &File, op: FlockOperation) -> rustix::io::Result<()> {
    loop {
        match rustix::fs::flock(file, op) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

fn read_fields(file: &File) -> Map<String, Value> {
    let mut buf = vec![0u8; MAX_BYTES];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    serde_json::from_slice(buf[..n].trim_ascii_end()).unwrap_or_default()
}

/// Changes the pool's ledger under its lock; returns it as written.
pub fn update(
    folders: &Folders,
    pool: &Pool,
    change: &mut dyn FnMut(&mut Map<String, Value>),
) -> anyhow::Result<Map<String, Value>> {
    let shown = Path::new("pools").join(pool.name.stem()).join(LEDGER);
    let folder = pool_folder(folders, pool)?;
    let file = dir::file(&folder, LEDGER, OFlags::RDWR | OFlags::CREATE)
        .map_err(|e| anyhow!("{}", e.message(&shown)))?;
    lock(&file, FlockOperation::LockExclusive).with_context(|| format!("cannot lock {}", shown.display()))?;
    let before = read_fields(&file);
    let mut fields = before.clone();
    change(&mut fields);
    fields.entry("pool").or_insert_with(|| pool.name().into());
    if fields != before {
        let text = format!("{}\n", Value::Object(fields.clone()));
        file.write_all_at(text.as_bytes(), 0)
            .and_then(|()| file.set_len(text.len() as u64))
            .with_context(|| format!("cannot write {}", shown.display()))?;
    }
    Ok(fields)
}

/// The ledger in an existing pool folder, for `status` (nothing is created).
pub fn observe(folder: &OwnedFd) -> Map<String, Value> {
    let Ok(file) = dir::file(folder, LEDGER, OFlags::RDONLY) else { return Map::new() };
    if lock(&file, FlockOperation::LockShared).is_err() {
        return Map::new();
    }
    read_fields(&file)
}

fn open_probe(folders: &Folders, pool: &Pool) -> anyhow::Result<File> {
    let shown = Path::new("pools").join(pool.name.stem()).join(PROBE);
    let folder = pool_folder(folders, pool)?;
    dir::file(&folder, PROBE, OFlags::RDONLY | OFlags::CREATE).map_err(|e| anyhow!("{}", e.message(&shown)))
}

/// The pool's probe lock, if no other run holds it.
pub fn take_probe(folders: &Folders, pool: &Pool) -> anyhow::Result<Option<File>> {
    let file = open_probe(folders, pool)?;
    match lock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e).context("cannot lock the pool's probe"),
    }
}

/// Blocks (on a helper thread) until the probe lock is free: the probe's outcome is in
/// the ledger.
pub fn wait_probe(
    folders: &Folders,
    pool: &Pool,
    deadline: Option<std::time::Instant>,
    control: &'static Control,
) -> Result<(), AcquireError> {
    let file = open_probe(folders, pool)?;
    match control.wait_for(deadline, move || lock(&file, FlockOperation::LockShared)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow!("cannot wait for the pool's probe: {e}").into()),
        Err(Gave::Deadline) => Err(AcquireError::Busy),
        Err(Gave::Signal(sig)) => Err(AcquireError::Interrupted(sig)),
        Err(Gave::Failed(why)) => Err(anyhow!("cannot wait for the pool's probe: {why}").into()),
    }
}
