//! A held channel of the local store: its locked lock file, the holder record in it,
//! and the channel's record in `active.json`, read and written by this holder only.

use super::files::ChannelFiles;
use super::lock::{self, Fields};
use super::state::Hint;
use crate::control::Control;
use crate::state::ChannelRecord;
use crate::store::{DeadRun, Holder, Lease, RecordError};
use anyhow::Context;
use std::fs::File;
use std::os::fd::RawFd;

pub struct LocalLease {
    files: ChannelFiles,
    /// The lock file, locked.
    file: File,
    /// `None` if the header could not be written: then nothing more is written there.
    header_len: Option<u64>,
    fields: Option<Fields>,
    /// Where the channel's record is in `active.json`, and what the lock file says.
    hint: Option<u64>,
    hint_written: Option<u64>,
    control: &'static Control,
    /// Seats held in pools, freed with the lease.
    seats: Vec<super::pool::SeatHold>,
    /// Pools whose probe this run is (ledger.rs), freed with the seats.
    probes: Vec<File>,
    /// The previous holder's record, left behind by a chan-run that died.
    died: Option<lock::HolderRecord>,
    /// `--collect`: this run's batch.
    pub collect: Option<super::collect::Batch>,
}

impl LocalLease {
    /// The locked file becomes a lease once its name is checked and what a previous
    /// holder left is gone.
    pub fn take(files: ChannelFiles, file: File, control: &'static Control) -> anyhow::Result<LocalLease> {
        let contents = lock::read(&file).context("cannot read the lock file")?;
        // Without its header (a full disk) the lock still excludes; the run goes on
        // without a holder record, as a bot should still answer.
        let header_len = lock::claim_name(&file, files.channel.name(), &contents)?;
        if let Some(left) = contents.record.as_ref().and_then(|r| r.leftover()) {
            crate::orphans::kill(&left);
        }
        if let (true, Some(len)) = (contents.has_tail, header_len) {
            file.set_len(len).context("cannot clear the previous holder record")?;
        }
        Ok(LocalLease {
            files,
            file,
            header_len,
            fields: None,
            hint: contents.hint,
            hint_written: contents.hint,
            control,
            seats: Vec::new(),
            probes: Vec::new(),
            died: contents.record,
            collect: None,
        })
    }
}

impl Lease for LocalLease {
    fn announce(&mut self, holder: &Holder) -> anyhow::Result<()> {
        if let Some(header_len) = self.header_len {
            self.fields = Some(lock::announce(&self.file, header_len, self.files.channel.name(), holder)?);
        }
        Ok(())
    }

    fn pid_field(&self) -> Option<(RawFd, u64, usize)> {
        self.fields.map(|f| lock::pid_field(&self.file, f))
    }

    fn take_seat(
        &mut self,
        pool: &crate::pool::Pool,
        wait: crate::store::Wait,
        control: &'static Control,
        on_wait: &mut dyn FnMut(&crate::store::SeatNote),
    ) -> Result<(), crate::store::AcquireError> {
        let seat = super::pool::take(&self.files.folders, pool, &self.files.channel, wait, control, on_wait)?;
        self.seats.push(seat);
        Ok(())
    }

    fn free_seats(&mut self) {
        self.probes.clear();
        self.seats.clear();
    }

    fn update_pool_ledger(
        &mut self,
        pool: &crate::pool::Pool,
        change: &mut dyn FnMut(&mut serde_json::Map<String, serde_json::Value>),
    ) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        super::ledger::update(&self.files.folders, pool, change)
    }

    fn take_pool_probe(&mut self, pool: &crate::pool::Pool) -> anyhow::Result<bool> {
        let probe = super::ledger::take_probe(&self.files.folders, pool)?;
        let taken = probe.is_some();
        self.probes.extend(probe);
        Ok(taken)
    }

    fn wait_pool_probe(
        &mut self,
        pool: &crate::pool::Pool,
        deadline: Option<std::time::Instant>,
        control: &'static Control,
    ) -> Result<(), crate::store::AcquireError> {
        super::ledger::wait_probe(&self.files.folders, pool, deadline, control)
    }

    fn command_started(&mut self, pid: u32, ticks: u64) {
        if let Some(fields) = self.fields {
            lock::write_spawned(&self.file, fields, pid, ticks);
        }
    }

    fn record(&mut self) -> Result<ChannelRecord, RecordError> {
        let folders = std::sync::Arc::clone(&self.files.folders);
        let (record, hint) =
            folders.active(self.control).read_channel(self.files.channel.name(), self.hint)?;
        self.hint = hint.or(self.hint);
        Ok(record)
    }

    fn update(&mut self, change: &mut dyn FnMut(&mut ChannelRecord)) -> Result<(), RecordError> {
        let folders = std::sync::Arc::clone(&self.files.folders);
        let name = self.files.channel.name().to_owned();
        folders.active(self.control).update_channel(&name, self, change)
    }

    fn record_run(
        &mut self,
        change: &mut dyn FnMut(&mut ChannelRecord),
        entry: &mut dyn FnMut(&ChannelRecord) -> crate::history::Entry,
    ) -> (Result<(), RecordError>, anyhow::Result<()>) {
        // The history gets the run even when active.json could not take it.
        let mut after = ChannelRecord::default();
        let recorded = self.update(&mut |r| {
            change(r);
            after = r.clone();
        });
        (recorded, self.files.append_history(&entry(&after)))
    }

    fn died(&mut self) -> Option<DeadRun> {
        self.died.take().map(|r| DeadRun {
            pid: r.pid,
            started_at: r.started_at,
            command_pid: r.command_pid,
            command: r.command,
        })
    }

    fn append_history(&mut self, entry: &crate::history::Entry) -> anyhow::Result<()> {
        self.files.append_history(entry)
    }

    fn collect_window(
        &mut self,
        quiet: std::time::Duration,
        max: u32,
        control: &'static Control,
    ) -> Result<(), crate::store::AcquireError> {
        match &self.collect {
            Some(batch) => super::collect::window(&self.files, batch, quiet, max, control),
            None => Ok(()),
        }
    }

    fn take_batch(&mut self, max: u32) -> anyhow::Result<Vec<std::sync::Arc<[u8]>>> {
        match &mut self.collect {
            Some(batch) => super::collect::take(&self.files, batch, max),
            None => Ok(Vec::new()),
        }
    }

    fn settle_batch(&mut self, code: u8) -> anyhow::Result<()> {
        match &self.collect {
            Some(batch) => super::collect::settle(&self.files, batch, code),
            None => Ok(()),
        }
    }

    fn release(mut self: Box<Self>) -> anyhow::Result<()> {
        // The run is over: the pools' next waiters go first.
        self.probes.clear();
        self.seats.clear();
        let Some(header_len) = self.header_len else { return Ok(()) };
        if self.hint != self.hint_written {
            let _ = lock::write_hint(&self.file, header_len, self.hint);
        }
        self.file.set_len(header_len).context("cannot clear the holder record")?;
        Ok(())
    }
}

/// The hint lives in the lock file's `at` line: written at release, or at once when a
/// move makes the old one dangerous to keep.
impl Hint for LocalLease {
    fn get(&self) -> Option<u64> {
        self.hint
    }

    fn set(&mut self, at: Option<u64>, durable: bool) -> std::io::Result<()> {
        self.hint = at;
        if let (true, Some(header_len)) = (durable, self.header_len) {
            lock::write_hint(&self.file, header_len, at)?;
            self.file.sync_data()?;
            self.hint_written = at;
        }
        Ok(())
    }
}
