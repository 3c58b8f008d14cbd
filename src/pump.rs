//! Passing the command's stdout and stderr through, live. Until the first byte comes,
//! the main thread watches the pipes with everything else it waits for (a command that
//! prints nothing costs no thread); then one thread reads both of the command's pipes
//! as data comes and writes chan-run's own descriptors with blocking
//! writes (so a slow reader slows the command, as without chan-run; while one stream's
//! reader is stuck, the other stream waits too), keeping only a bounded tail of stdout
//! for the session id. When the command has exited, a pump passes on what is
//! already in the pipe (at most one pipe's capacity more) and stops at the first moment
//! the pipe is empty, even if a descendant still holds it open. Bytes already read are
//! always written out, however slow the reader. If chan-run's own output is closed (`| head`), the pump
//! closes the command's pipe, so the command sees EPIPE/SIGPIPE as it would have.
//! If no thread can be started (`ulimit -u`), the main thread copies instead, writing
//! only what its fds take without blocking, so nothing is lost and the timeout holds.

use crate::control::Waker;
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const BUF: usize = 256 * 1024;
/// What a pipe that `poll` calls writable takes in one `write` without blocking.
const PIPE_BUF: usize = 4096;
/// The pipe size asked for: fewer wake-ups per byte; the kernel may give less.
const PIPE_SIZE: usize = 1024 * 1024;

/// What chan-run keeps of the command's output, all capped: the last bytes of stdout
/// (and whether the whole stream fit), its first bytes (where a streamed format names
/// the session before anything can go wrong), and the last bytes of stderr (where a
/// model CLI says why it failed).
#[derive(Debug, Default)]
pub struct Tail {
    cap: usize,
    bytes: std::collections::VecDeque<u8>,
    total: u64,
    head: Vec<u8>,
    stderr: std::collections::VecDeque<u8>,
}

/// The first bytes of stdout kept (with a tail kept at all).
pub const HEAD_CAP: usize = 256 * 1024;
/// The last bytes of stderr kept (with a tail kept at all).
pub const STDERR_CAP: usize = 64 * 1024;

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail { cap, ..Default::default() }
    }

    /// Keeps what it should of `data`, read from the stream going to fd `dst` (1 or 2).
    fn push_from(&mut self, dst: i32, data: &[u8]) {
        if dst == 2 {
            return keep_last(&mut self.stderr, STDERR_CAP.min(self.cap), data);
        }
        self.total += data.len() as u64;
        let room = HEAD_CAP.min(self.cap).saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
        keep_last(&mut self.bytes, self.cap, data);
    }

    #[cfg(test)]
    fn push(&mut self, data: &[u8]) {
        self.push_from(1, data);
    }

    /// The kept bytes, and whether they are the whole stream.
    pub fn contents(&mut self) -> (&[u8], bool) {
        let whole = self.total == self.bytes.len() as u64;
        (self.bytes.make_contiguous(), whole)
    }

    /// The first bytes of stdout.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The last bytes of stderr.
    pub fn stderr(&mut self) -> &[u8] {
        self.stderr.make_contiguous()
    }
}

fn keep_last(kept: &mut std::collections::VecDeque<u8>, cap: usize, data: &[u8]) {
    if cap == 0 {
        return;
    }
    let data = &data[data.len().saturating_sub(cap)..];
    let excess = (kept.len() + data.len()).saturating_sub(cap);
    kept.drain(..excess);
    kept.extend(data);
}

pub struct Pump {
    handle: Option<JoinHandle<()>>,
    done: Arc<AtomicBool>,
    /// The tail of the first stream (the command's stdout).
    pub tail: Arc<Mutex<Tail>>,
}

/// One stream to pass on: the command's pipe, chan-run's own fd 1 or 2, how many bytes
/// of it to keep as a tail, and what was read from it but not yet written.
pub struct Stream {
    pub src: OwnedFd,
    pub dst: i32,
    pub tail_cap: usize,
    unwritten: Vec<u8>,
    /// After the command's exit (main thread's copy): how much more to pass on.
    budget: Option<usize>,
}

impl Stream {
    pub fn new(src: OwnedFd, dst: i32, tail_cap: usize) -> Stream {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = rustix::pipe::fcntl_setpipe_size(&src, PIPE_SIZE);
        let _ = rustix::io::ioctl_fionbio(&src, true);
        Stream { src, dst, tail_cap, unwritten: Vec::new(), budget: None }
    }
}

/// The output streams until the first byte comes: no thread is started for a command
/// that prints nothing (a thread costs about as much as the rest of a quiet run). If no
/// thread can be started (`ulimit -u`), the main thread copies them itself.
pub struct Output {
    streams: Vec<Stream>,
    pump: Option<Pump>,
    /// The main thread copies `streams` (no thread could be started); the tail of stdout.
    inline: Option<Tail>,
    exited: Arc<AtomicBool>,
    notice: Arc<OwnedFd>,
}

impl Output {
    /// `exited` is set, and `notice` becomes readable (its writer closed), when the
    /// command has exited.
    pub fn new(streams: Vec<Stream>, exited: Arc<AtomicBool>, notice: Arc<OwnedFd>) -> Output {
        Output { streams, pump: None, inline: None, exited, notice }
    }

    /// What to wake up for while no thread copies the streams: a pipe readable, or, for
    /// bytes the main thread could not write yet, chan-run's own fd writable.
    pub fn pending(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        (self.streams.iter())
            .map(|s| match s.unwritten.is_empty() {
                true => (s.src.as_fd(), PollFlags::IN),
                false => (std_fd(s.dst), PollFlags::OUT),
            })
            .collect()
    }

    /// Looks at the pipes once (after a wake-up, or at the command's exit): drops those
    /// at end-of-file (and, after the exit, those empty), and at the first data hands
    /// every stream to a copying thread (or, if none can start, copies on this one).
    pub fn poke(&mut self, waker: impl FnOnce() -> Waker) {
        if self.pump.is_some() {
            return;
        }
        let ended = self.exited.load(Ordering::SeqCst);
        if let Some(tail) = &mut self.inline {
            return copy_some(&mut self.streams, tail, ended);
        }
        let mut data = false;
        self.streams.retain_mut(|stream| {
            let mut buf = Vec::with_capacity(16 * 1024);
            match rustix::io::read(&stream.src, rustix::buffer::spare_capacity(&mut buf)) {
                Ok(0) => false,
                Ok(_) => {
                    stream.unwritten = buf;
                    data = true;
                    true
                }
                Err(Errno::AGAIN | Errno::INTR) => !ended,
                Err(_) => false,
            }
        });
        if !data {
            return;
        }
        let streams = std::mem::take(&mut self.streams);
        match Pump::start(streams, Arc::clone(&self.exited), Arc::clone(&self.notice), waker()) {
            Ok(pump) => self.pump = Some(pump),
            Err((e, streams)) => {
                crate::ui::warn(format!(
                    "cannot start the output thread ({e}; see `ulimit -u`); copying on the main thread"
                ));
                let mut tail = Tail::new(streams.first().map_or(0, |s| s.tail_cap));
                streams.iter().filter(|s| s.tail_cap > 0).for_each(|s| tail.push_from(s.dst, &s.unwritten));
                self.streams = streams;
                copy_some(&mut self.streams, &mut tail, ended);
                self.inline = Some(tail);
            }
        }
    }

    /// Whether output is still being passed on (by the thread, or this one).
    pub fn busy(&self) -> bool {
        self.pump.as_ref().is_some_and(|p| !p.is_done())
            || (self.inline.is_some() && !self.streams.is_empty())
    }

    /// The kept tail of stdout; joins the thread if it has finished.
    pub fn finish(self) -> Tail {
        if let Some(tail) = self.inline {
            return tail;
        }
        let Some(pump) = self.pump else { return Tail::default() };
        let tail = pump.tail.lock().ok().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        pump.finish();
        tail
    }
}

/// How many reads one look of the main thread's copy makes at most, so a flood never
/// keeps it from the timeout and signals.
const INLINE_READS: usize = 16;

/// The main thread's copy: reads what the pipes hold and writes it out only as far as
/// chan-run's own fds take it without blocking (a pipe that `poll` calls writable takes
/// `PIPE_BUF` bytes at once), so a reader that stops reading can never keep chan-run from
/// the timeout. After the exit, as the thread does: at most one pipe's capacity more,
/// and done at the first empty read.
fn copy_some(streams: &mut Vec<Stream>, tail: &mut Tail, ended: bool) {
    streams.retain_mut(|stream| {
        if ended && stream.budget.is_none() {
            stream.budget = Some(pipe_size(&stream.src));
        }
        for _ in 0..INLINE_READS {
            while !stream.unwritten.is_empty() {
                match write_ready(std_fd(stream.dst), &stream.unwritten) {
                    Ok(0) => return true,
                    Ok(n) => drop(stream.unwritten.drain(..n)),
                    // The reader is gone: dropping `src` closes the pipe (EPIPE for the command).
                    Err(_) => return false,
                }
            }
            if stream.budget == Some(0) {
                return false;
            }
            let mut buf = Vec::with_capacity(16 * 1024);
            match rustix::io::read(&stream.src, rustix::buffer::spare_capacity(&mut buf)) {
                Ok(0) => return false,
                Ok(n) => {
                    if stream.tail_cap > 0 {
                        tail.push_from(stream.dst, &buf);
                    }
                    stream.budget = stream.budget.map(|left| left.saturating_sub(n));
                    stream.unwritten = buf;
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return stream.budget.is_none(),
                Err(_) => return false,
            }
        }
        true
    });
}

/// Writes a first part of `data` if `dst` takes it now: `Ok(0)` when it would block.
fn write_ready(dst: BorrowedFd<'_>, data: &[u8]) -> rustix::io::Result<usize> {
    let mut fds = [PollFd::new(&dst, PollFlags::OUT)];
    match poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })) {
        Ok(0) | Err(Errno::INTR) => Ok(0),
        Ok(_) => match rustix::io::write(dst, &data[..data.len().min(PIPE_BUF)]) {
            Err(Errno::INTR | Errno::AGAIN) => Ok(0),
            written => written,
        },
        Err(e) => Err(e),
    }
}

impl Pump {
    /// Copies each stream's pipe to its destination on one new thread (one for both);
    /// if the thread cannot start, gives the streams back.
    fn start(
        streams: Vec<Stream>,
        exited: Arc<AtomicBool>,
        notice: Arc<OwnedFd>,
        waker: Waker,
    ) -> Result<Pump, (std::io::Error, Vec<Stream>)> {
        let done = Arc::new(AtomicBool::new(false));
        let tail = Arc::new(Mutex::new(Tail::new(streams.first().map_or(0, |s| s.tail_cap))));
        let (done2, tail2) = (Arc::clone(&done), Arc::clone(&tail));
        // Handed over through a slot, so that they come back if the thread never starts.
        let slot = Arc::new(Mutex::new(Some(streams)));
        let taken = Arc::clone(&slot);
        let handle = std::thread::Builder::new().spawn(move || {
            let streams = taken.lock().ok().and_then(|mut s| s.take()).unwrap_or_default();
            copy(streams, &tail2, &exited, &notice);
            done2.store(true, Ordering::SeqCst);
            waker.wake();
        });
        match handle {
            Ok(handle) => Ok(Pump { handle: Some(handle), done, tail }),
            Err(e) => Err((e, slot.lock().ok().and_then(|mut s| s.take()).unwrap_or_default())),
        }
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Joins the thread if it has finished; a stuck one is left behind (the process is
    /// about to exit, which ends it).
    fn finish(mut self) {
        if let Some(h) = self.handle.take().filter(|_| self.is_done()) {
            let _ = h.join();
        }
    }
}

/// A stream being copied.
struct Open {
    src: OwnedFd,
    dst: BorrowedFd<'static>,
    /// Keeps a part of what passes, as the output of this fd (1 or 2).
    keeps: Option<i32>,
    /// After the exit notice: how much more to pass on (what the pipe could hold then).
    budget: Option<usize>,
}

/// Round-robin over the open streams: read what each has, write it out (blocking: a
/// slow reader slows the command, as it would without chan-run), and sleep in `poll`
/// only when none has anything.
fn copy(streams: Vec<Stream>, tail: &Mutex<Tail>, exited: &AtomicBool, notice: &OwnedFd) {
    let mut open = Vec::new();
    for s in streams {
        let stream =
            Open { src: s.src, dst: std_fd(s.dst), keeps: (s.tail_cap > 0).then_some(s.dst), budget: None };
        // What was read before this thread started goes first.
        if let Some(fd) = stream.keeps
            && let Ok(mut t) = tail.lock()
        {
            t.push_from(fd, &s.unwritten);
        }
        if write_all(stream.dst, &s.unwritten).is_ok() {
            open.push(stream);
        }
    }
    // Read into spare capacity: nothing is zeroed, and a quiet stream touches no pages.
    let mut buf: Vec<u8> = Vec::with_capacity(BUF);
    while !open.is_empty() {
        let ended = exited.load(Ordering::SeqCst);
        let mut idle = true;
        open.retain_mut(|stream| {
            if ended && stream.budget.is_none() {
                stream.budget = Some(pipe_size(&stream.src));
            }
            buf.clear();
            match rustix::io::read(&stream.src, rustix::buffer::spare_capacity(&mut buf)) {
                Ok(0) => false,
                Ok(n) => {
                    idle = false;
                    if let Some(fd) = stream.keeps
                        && let Ok(mut t) = tail.lock()
                    {
                        t.push_from(fd, &buf[..n]);
                    }
                    // The reader is gone: dropping `src` closes the pipe (EPIPE for the command).
                    if write_all(stream.dst, &buf[..n]).is_err() {
                        return false;
                    }
                    match stream.budget.as_mut() {
                        Some(left) => {
                            *left = left.saturating_sub(n);
                            *left > 0
                        }
                        None => true,
                    }
                }
                Err(Errno::INTR) => true,
                // Empty: once the command has exited, this stream is done.
                Err(Errno::AGAIN) => stream.budget.is_none(),
                Err(_) => false,
            }
        });
        if idle && !open.is_empty() {
            let mut fds: Vec<PollFd> = open.iter().map(|s| PollFd::new(&s.src, PollFlags::IN)).collect();
            fds.push(PollFd::new(notice, PollFlags::IN));
            match poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(_) => return,
            }
        }
    }
}

/// What the command's pipe can hold: the most it can have written before it exited.
fn pipe_size(pipe: &OwnedFd) -> usize {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return rustix::pipe::fcntl_getpipe_size(pipe).unwrap_or(PIPE_SIZE);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    return {
        let _ = pipe;
        PIPE_SIZE
    };
}

fn write_all(dst: BorrowedFd<'_>, mut data: &[u8]) -> rustix::io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(dst, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn std_fd(fd: i32) -> BorrowedFd<'static> {
    match fd {
        1 => rustix::stdio::stdout(),
        _ => rustix::stdio::stderr(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        assert_eq!(t.contents(), (&b"abc"[..], true));
        t.push(b"defg");
        assert_eq!(t.contents(), (&b"cdefg"[..], false));
        t.push(b"0123456789");
        assert_eq!(t.contents(), (&b"56789"[..], false));
        assert_eq!(t.head(), b"abcde", "the head is capped as the tail is");
    }

    #[test]
    fn head_and_stderr_are_capped() {
        let mut t = Tail::new(usize::MAX);
        t.push(&vec![b'a'; HEAD_CAP + 10]);
        t.push_from(2, &vec![b'e'; STDERR_CAP]);
        t.push_from(2, b"last");
        assert_eq!(t.head().len(), HEAD_CAP);
        assert_eq!(t.stderr().len(), STDERR_CAP);
        assert!(t.stderr().ends_with(b"elast"));
    }
}
