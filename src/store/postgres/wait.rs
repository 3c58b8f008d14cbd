//! How a caller waits for the connection's thread: for the answer, at most a bound of
//! the statement's own, never past the caller's deadline (`--wait`, `-n`'s budget), and
//! never deaf to a forwarded signal. The one place in this store that blocks.

use crate::control::{Control, Waker};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// Who waits, and until when: the caller's deadline (`--wait`, `-n`) and, where signals
/// are forwarded, the `Control` that sees them.
pub struct Waiting<'a> {
    until: Option<Instant>,
    control: Option<&'a Control>,
    pub(super) waker: Option<Arc<Waker>>,
}

impl<'a> Waiting<'a> {
    /// A caller that forwards signals (run, reset): they end the wait.
    pub fn watched(control: &'a Control, until: Option<Instant>) -> Waiting<'a> {
        Waiting { until, control: Some(control), waker: Some(Arc::new(control.wake_handle())) }
    }

    /// A caller with the default signal dispositions (a signal ends the process) and
    /// no deadline of its own: status, history, gc, the heartbeat.
    pub fn plain() -> Waiting<'static> {
        Waiting { until: None, control: None, waker: None }
    }

    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Waits for `rx`'s message, at most `within` (and never past the caller's
    /// deadline); a signal ends it at once.
    pub fn wait_for<T>(&self, rx: &Receiver<T>, within: Option<Duration>) -> Result<T, Gave> {
        let own = within.and_then(|w| Instant::now().checked_add(w));
        loop {
            match rx.try_recv() {
                Ok(answer) => return Ok(answer),
                Err(TryRecvError::Disconnected) => return Err(Gave::Gone),
                Err(TryRecvError::Empty) => {}
            }
            if let Some(sig) = self.control.and_then(Control::take_signal) {
                return Err(Gave::Signal(sig));
            }
            let now = Instant::now();
            match (self.until, own) {
                (Some(until), own) if now >= until && own.is_none_or(|o| until <= o) => {
                    return Err(Gave::Busy);
                }
                (_, Some(own)) if now >= own => return Err(Gave::Late),
                _ => {}
            }
            let deadline = [self.until, own].into_iter().flatten().min();
            match self.control {
                Some(control) => control.wait(deadline).map_err(|_| Gave::Gone)?,
                None => match deadline {
                    Some(d) => match rx.recv_timeout(d.saturating_duration_since(now)) {
                        Ok(answer) => return Ok(answer),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return Err(Gave::Gone),
                    },
                    None => return rx.recv().map_err(|_| Gave::Gone),
                },
            }
        }
    }

    /// Blocks until `deadline`, the caller's own, or a signal; `also` wakes it early.
    pub fn sleep(&self, deadline: Instant, also: &[rustix::fd::BorrowedFd<'_>]) -> Result<(), Gave> {
        loop {
            if let Some(sig) = self.control.and_then(Control::take_signal) {
                return Err(Gave::Signal(sig));
            }
            let now = Instant::now();
            if self.until.is_some_and(|u| now >= u && u < deadline) {
                return Err(Gave::Busy);
            }
            if now >= deadline {
                return Ok(());
            }
            let until = self.until.map_or(deadline, |u| u.min(deadline));
            match self.control {
                Some(control) => {
                    let polled: Vec<_> = also.iter().map(|fd| (*fd, rustix::event::PollFlags::IN)).collect();
                    control.wait_also(Some(until), &polled).map_err(|_| Gave::Gone)?;
                    if !also.is_empty() && woken(also) {
                        return Ok(());
                    }
                }
                None => std::thread::sleep(until.saturating_duration_since(now)),
            }
        }
    }
}

/// Whether one of `fds` is readable now.
fn woken(fds: &[rustix::fd::BorrowedFd<'_>]) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut polled: Vec<PollFd> = fds.iter().map(|fd| PollFd::new(fd, PollFlags::IN)).collect();
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    poll(&mut polled, Some(&zero)).is_ok_and(|n| n > 0)
}

/// Why a wait ended without its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gave {
    Busy,
    Signal(i32),
    /// The statement's own bound passed.
    Late,
    /// The connection's thread is gone.
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_plain_wait_ends_at_its_bound_or_with_the_answer() {
        let (tx, rx) = mpsc::sync_channel::<u8>(1);
        let started = Instant::now();
        assert_eq!(Waiting::plain().wait_for(&rx, Some(Duration::from_millis(50))), Err(Gave::Late));
        assert!(started.elapsed() >= Duration::from_millis(50));
        tx.send(7).unwrap();
        assert_eq!(Waiting::plain().wait_for(&rx, Some(Duration::from_secs(5))), Ok(7));
        drop(tx);
        assert_eq!(Waiting::plain().wait_for(&rx, None), Err(Gave::Gone));
    }
}
