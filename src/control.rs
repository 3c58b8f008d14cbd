//! The main thread's one place to wait. Signal handlers only set an atomic and write
//! a byte to a wake pipe; helper threads (the lock waiter, the output pumps) write the
//! same pipe; SIGCHLD wakes it too. The main thread blocks in `poll` on that pipe with
//! the nearest deadline as its timeout, then looks at what changed: no polling loops.

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fd::BorrowedFd;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

impl Control {
    /// Installs the handlers. Signals ignored at start (e.g. under `nohup`) stay ignored.
    pub fn install() -> io::Result<Control> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        let signal = Arc::new(AtomicUsize::new(0));
        for sig in FORWARDED {
            if crate::sys::signal_is_ignored(sig) {
                continue;
            }
            // Registered first, so the flag is set before the wake byte is written.
            signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
            signal_hook::low_level::pipe::register(sig, tx.try_clone()?)?;
        }
        signal_hook::low_level::pipe::register(SIGCHLD, tx.try_clone()?)?;
        let sigxfsz_changed = crate::sys::ignore_sigxfsz();
        let tx = Arc::new(tx);
        Ok(Control { sigxfsz_changed, rx, tx, signal, lock_lost: Arc::new(AtomicBool::new(false)) })
    }

    /// A handle that wakes the main thread from another thread.
    pub fn wake_handle(&self) -> Waker {
        Waker(Arc::clone(&self.tx))
    }

    /// As [`Control::wake_handle`], which cannot fail; the `Result` is the stores' (they
    /// were written when a waker duplicated a descriptor).
    pub fn waker(&self) -> io::Result<Waker> {
        Ok(self.wake_handle())
    }

    pub fn lock_lost_alarm(&self) -> io::Result<LockLostAlarm> {
        Ok(LockLostAlarm { flag: Arc::clone(&self.lock_lost), waker: self.wake_handle() })
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

    /// The forwarded signal received since the last call, if any.
    pub fn take_signal(&self) -> Option<i32> {
        match self.signal.swap(0, Ordering::SeqCst) {
            0 => None,
            sig => Some(sig as i32),
        }
    }
}
