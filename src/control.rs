//! The main thread's one place to wait. Signal handlers only set an atomic and write
//! a byte to a wake pipe; helper threads (a pool seat's waiter, the output pumps) write
//! the same pipe; SIGCHLD wakes it too. The main thread blocks in `poll` on that pipe
//! with the nearest deadline as its timeout, then looks at what changed: no polling
//! loops. The one exception is a channel's queue, whose waits block the main thread in
//! `flock` itself, cut short by the same signals and the deadline (`Control::flock`).

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fd::{AsFd, BorrowedFd};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

/// The signals chan-run passes to its command and answers with exit 128+N.
pub const FORWARDED: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

pub struct Control {
    /// chan-run ignores SIGXFSZ itself; its command must get the default back.
    pub sigxfsz_changed: bool,
    rx: UnixStream,
    tx: Arc<UnixStream>,
    signal: Arc<AtomicUsize>,
    lock_lost: Arc<AtomicBool>,
}

/// Lets the store's heartbeat thread tell the main thread the lock is lost: the
/// command must be stopped before the store can hand the channel on.
pub struct LockLostAlarm {
    flag: Arc<AtomicBool>,
    waker: Waker,
}

impl LockLostAlarm {
    pub fn raise(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// A cheap handle other threads use to wake the main thread: it shares chan-run's own
/// end of the wake socket, so making one costs no system call and cannot fail.
pub struct Waker(Arc<UnixStream>);

impl Waker {
    pub fn wake(&self) {
        // A full pipe already holds a wake-up; nothing is lost by dropping this one.
        let _ = (&*self.0).write(&[1]);
    }
}

/// Why `wait_for` returned without the work's answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Gave {
    #[error("the deadline passed")]
    Deadline,
    /// A forwarded signal arrived (taken: the caller answers it).
    #[error("interrupted by signal {0}")]
    Signal(i32),
    /// The helper thread could not start, or ended without an answer (it panicked).
    #[error("{0}")]
    Failed(String),
}

/// How a helper thread of `wait_for_progress` reports progress.
pub struct Progress<P> {
    tx: mpsc::Sender<P>,
    waker: Waker,
}

impl<P> Progress<P> {
    pub fn send(&self, p: P) {
        let _ = self.tx.send(p);
        self.waker.wake();
    }
}

/// Wakes the main thread when the helper thread ends, answered or not (a panic too).
struct WakeOnDrop(Waker);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.wake();
    }
}

impl Control {
    /// Installs the handlers, once per process: the value lives as long as the process
    /// (signal handlers are the process's), so every layer may keep a reference to it.
    /// Signals ignored at start (e.g. under `nohup`) stay ignored.
    pub fn install() -> io::Result<&'static Control> {
        Ok(Box::leak(Box::new(Control::new()?)))
    }

    fn new() -> io::Result<Control> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        let signal = Arc::new(AtomicUsize::new(0));
        let mut forwarded = Vec::with_capacity(FORWARDED.len());
        for sig in FORWARDED {
            if crate::sys::signal_is_ignored(sig) {
                continue;
            }
            // Registered first, so the flag is set before the wake byte is written.
            signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
            signal_hook::low_level::pipe::register(sig, tx.try_clone()?)?;
            forwarded.push(sig);
        }
        signal_hook::low_level::pipe::register(SIGCHLD, tx.try_clone()?)?;
        let sigxfsz_changed = crate::sys::ignore_sigxfsz();
        let tx = Arc::new(tx);
        // The kick's spare descriptor: the wake socket's sending end, which lives as
        // long as the process (the Control is leaked) and which nobody else can lock.
        let spare: &'static UnixStream = Box::leak(Box::new(Arc::clone(&tx)));
        crate::sys::kick::install(&forwarded, spare.as_fd())?;
        Ok(Control { sigxfsz_changed, rx, tx, signal, lock_lost: Arc::new(AtomicBool::new(false)) })
    }

    /// A handle that wakes the main thread from another thread.
    pub fn wake_handle(&self) -> Waker {
        Waker(Arc::clone(&self.tx))
    }

    pub fn lock_lost_alarm(&self) -> LockLostAlarm {
        LockLostAlarm { flag: Arc::clone(&self.lock_lost), waker: self.wake_handle() }
    }

    /// Whether the store raised the lock-lost alarm (it stays raised).
    pub fn lock_lost(&self) -> bool {
        self.lock_lost.load(Ordering::SeqCst)
    }

    /// Blocks until something wakes the main thread or `deadline` passes.
    pub fn wait(&self, deadline: Option<Instant>) -> io::Result<()> {
        self.wait_also(deadline, &[])
    }

    /// As `wait`, and also wakes when one of `also` is ready for its events (readable,
    /// writable), or hung up.
    pub fn wait_also(
        &self,
        deadline: Option<Instant>,
        also: &[(BorrowedFd<'_>, PollFlags)],
    ) -> io::Result<()> {
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ }
        });
        let mut fds: Vec<PollFd> = std::iter::once(PollFd::new(&self.rx, PollFlags::IN))
            .chain(also.iter().map(|(fd, events)| PollFd::new(fd, *events)))
            .collect();
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut sink = [0u8; 64];
        while matches!((&self.rx).read(&mut sink), Ok(n) if n > 0) {}
        Ok(())
    }

    /// Runs `work` on a helper thread (which may block in the kernel, in `flock` say,
    /// where a signal cannot reach it) and waits for its answer, the `deadline` or a
    /// forwarded signal, whichever comes first. An answer that comes after the caller gave
    /// up is dropped (a lock it holds is released with it); a helper left blocked stays
    /// so until the process exits.
    pub fn wait_for<T: Send + 'static>(
        &self,
        deadline: Option<Instant>,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Gave> {
        self.wait_for_progress(deadline, &mut |()| {}, move |_| work())
    }

    /// As `wait_for`; `work` may also report progress through its `Progress`, which
    /// the waiting thread hands to `on_progress` as it comes.
    pub fn wait_for_progress<T: Send + 'static, P: Send + 'static>(
        &self,
        deadline: Option<Instant>,
        on_progress: &mut dyn FnMut(P),
        work: impl FnOnce(&Progress<P>) -> T + Send + 'static,
    ) -> Result<T, Gave> {
        let (tx, rx) = mpsc::channel();
        let (progress_tx, progress_rx) = mpsc::channel();
        let progress = Progress { tx: progress_tx, waker: self.wake_handle() };
        let wake = WakeOnDrop(self.wake_handle());
        std::thread::Builder::new()
            .spawn(move || {
                // Locals drop in reverse order, on return and on a panic alike: the answer's
                // sender first (sent, or disconnected), then the wake-up, which so always
                // finds what it announces.
                let wake = wake;
                let tx = tx;
                let _ = tx.send(work(&progress));
                drop((tx, progress, wake));
                // Answered: the thread stays, parked, until the process exits, rather than
                // ending now. Ending unmaps its stack, which interrupts every other CPU
                // the process runs on to flush its TLB, in the middle of a hand-off (seen
                // with perf as ~4 % of a contended run's time).
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| Gave::Failed(format!("cannot start a thread to wait ({e})")))?;
        loop {
            while let Ok(p) = progress_rx.try_recv() {
                on_progress(p);
            }
            match rx.try_recv() {
                Ok(answer) => return Ok(answer),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(Gave::Failed("the waiting thread ended without an answer".into()));
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if let Some(sig) = self.take_signal() {
                return Err(Gave::Signal(sig));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Gave::Deadline);
            }
            self.wait(deadline).map_err(|e| Gave::Failed(format!("cannot wait: {e}")))?;
        }
    }

    /// Blocks the calling thread, which must be the one that installed the Control, in
    /// `flock` on `fd` (shared or exclusive) until the lock is granted, a forwarded signal
    /// arrives or `deadline` passes; no helper thread (see `sys::kick`).
    pub fn flock(&self, fd: BorrowedFd<'_>, exclusive: bool, deadline: Option<Instant>) -> Result<(), Gave> {
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let stop = || self.signal.load(Ordering::SeqCst) != 0 || left.is_some_and(|l| l.is_zero());
            match crate::sys::kick::flock(fd, exclusive, left, stop) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(Gave::Failed(format!("cannot lock: {e}"))),
            }
            if let Some(sig) = self.take_signal() {
                return Err(Gave::Signal(sig));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Gave::Deadline);
            }
        }
    }

    /// The forwarded signal received since the last call, if any.
    pub fn take_signal(&self) -> Option<i32> {
        match self.signal.swap(0, Ordering::SeqCst) {
            0 => None,
            sig => Some(sig as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waiting_for_a_helper_ends_with_its_answer_its_death_or_the_deadline() {
        let control = Control::install().unwrap();
        assert_eq!(control.wait_for(None, || 7), Ok(7));
        // A helper that panics must not leave the caller waiting forever.
        let died = control.wait_for(None, || -> u8 { panic!("the helper failed") });
        assert!(matches!(died, Err(Gave::Failed(ref m)) if m.contains("without an answer")), "{died:?}");
        let start = Instant::now();
        let late = control.wait_for(Some(start + Duration::from_millis(50)), || {
            std::thread::sleep(Duration::from_secs(5));
        });
        assert_eq!(late, Err(Gave::Deadline));
        assert!(start.elapsed() < Duration::from_secs(4));

        // (In the same test: a Control's waiting thread is the one that installed it.)
        // A lock held elsewhere: the wait in this thread ends at the deadline, ...
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let holder = std::fs::File::create(&path).unwrap();
        holder.lock().unwrap();
        let waiter = std::fs::File::open(&path).unwrap();
        let start = Instant::now();
        assert_eq!(
            control.flock(waiter.as_fd(), true, Some(start + Duration::from_millis(100))),
            Err(Gave::Deadline)
        );
        assert!(start.elapsed() >= Duration::from_millis(100) && start.elapsed() < Duration::from_secs(4));
        // ... or when a forwarded signal comes, to whichever thread it is delivered ...
        let kicker = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM).unwrap();
        });
        assert_eq!(control.flock(waiter.as_fd(), false, None), Err(Gave::Signal(SIGTERM)));
        kicker.join().unwrap();
        drop(holder);
        let other = std::fs::File::open(&path).unwrap();
        assert!(other.try_lock().is_ok(), "a cut-short wait holds nothing");
        other.unlock().unwrap();
        // ... and is granted when the lock is free.
        assert_eq!(
            control.flock(waiter.as_fd(), true, Some(Instant::now() + Duration::from_secs(10))),
            Ok(())
        );
        assert!(other.try_lock().is_err(), "the lock is held");
    }
}
