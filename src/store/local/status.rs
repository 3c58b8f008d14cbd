//! `status` for the local store: every known channel (or those named), running or idle,
//! from the kernel's lock table and the holder records, with each channel's record. It
//! takes and joins nothing and creates nothing, so it never waits behind a run or makes
//! one fail. Where there is no lock table, a holder record whose pid is alive counts as
//! held.

use super::Folders;
use super::files::{self, ChannelFiles};
use super::lock;
use super::state::Loaded;
use crate::channel::Channel;
use crate::procfs::FileId;
use crate::store::{ChannelStatus, HolderView};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

pub fn status(folders: &Arc<Folders>, only: &[Channel]) -> anyhow::Result<(Vec<ChannelStatus>, Vec<String>)> {
    let mut warnings: Vec<String> =
        folders.network.map(|kind| super::network_warning(&folders.state.path, kind)).into_iter().collect();
    let state = match folders.active_reader().load()? {
        Loaded::State(s) => s,
        Loaded::Damaged(why) => {
            warnings.push(format!("{} is damaged ({why})", folders.state.path.join("active.json").display()));
            Default::default()
        }
    };
    let held = crate::procfs::held_flocks();
    let channels: Vec<Channel> = if only.is_empty() {
        let mut names: BTreeSet<String> = state.channels.keys().cloned().collect();
        if let Some(locks) = &folders.locks {
            names.extend(files::names(locks));
        }
        names.iter().filter_map(|n| Channel::new(n).ok()).collect()
    } else {
        only.to_vec()
    };
    let statuses = channels
        .iter()
        .map(|channel| {
            let mut status = observe(&ChannelFiles::new(folders, channel), held.as_ref());
            status.record = state.channels.get(channel.name()).cloned();
            status
        })
        .collect();
    Ok((statuses, warnings))
}

/// The channel's lock and queue as the kernel's lock table shows them.
pub fn observe(files: &ChannelFiles, held: Option<&HashMap<FileId, u32>>) -> ChannelStatus {
    let mut status = ChannelStatus { channel: files.channel.name().to_owned(), ..Default::default() };
    let Some((file, id)) = files.existing_lock() else { return status };
    let record = lock::read(&file).ok().and_then(|c| c.record);
    let holder_pid = match held {
        Some(table) => table.get(&id).copied(),
        None => record.as_ref().map(|r| r.pid).filter(|&p| crate::procfs::is_alive(p)),
    };
    if holder_pid.is_some() {
        status.running = true;
        status.holder = Some(match record {
            Some(r) => HolderView {
                host: None,
                pid: Some(r.pid),
                command_pid: r.command_pid,
                started_at: Some(r.started_at),
                command: r.command,
            },
            None => HolderView { pid: holder_pid.filter(|&p| p != 0), ..Default::default() },
        });
    }
    if let Some(queue) = files.existing_queue() {
        let (waiters, notes): (Vec<_>, Vec<_>) = queue
            .waiters_with_notes(held)
            .into_iter()
            .filter(|(w, _)| w.pid.is_none() || w.pid != holder_pid)
            .unzip();
        status.collect = super::collect::marks(&queue, &notes);
        status.queue = waiters;
    }
    status.running |= !status.queue.is_empty();
    status
}
