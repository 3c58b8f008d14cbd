//! The one module with `unsafe`: the few process-level calls that std and rustix do
//! not wrap safely. Each block says why it is sound.

use rustix::fd::{BorrowedFd, RawFd};
use rustix::process::Pid;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Whether `sig` was ignored when chan-run started (as under `nohup`): such a signal
/// stays ignored, for chan-run and its command alike, as a shell would leave it.
pub fn signal_is_ignored(sig: i32) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null `act` only reads the current action into `old`, which is a valid,
    // zero-initialised sigaction; nothing is changed.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: sigaction succeeded (rc == 0), so it filled `old`; on failure it stays zeroed.
    rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_IGN
}

/// Ignores SIGXFSZ in chan-run if it has the default action, so a file-size limit hit
/// while recording gives `EFBIG` (a warning; the command's status is kept) rather than
/// killing chan-run with the lock's record half done. Returns whether it changed it;
/// the command then gets the default action back (`ChildSetup::default_sigxfsz`).
pub fn ignore_sigxfsz() -> bool {
    if signal_is_ignored(libc::SIGXFSZ) {
        return false;
    }
    // SAFETY: setting SIG_IGN installs no handler code; nothing else in chan-run uses SIGXFSZ.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) != libc::SIG_ERR }
}

/// Blocks SIGTTOU in the calling thread while alive, so a background process group may
/// take the terminal back with `tcsetpgrp` (the kernel would stop it otherwise).
pub struct SigttouBlocked {
    old: libc::sigset_t,
}

impl SigttouBlocked {
    pub fn new() -> SigttouBlocked {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        // SAFETY: both sets are valid, initialised memory; sigemptyset/sigaddset only
        // write to `set`; pthread_sigmask writes the previous mask to `old` and changes
        // this thread's mask only.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigaddset(set.as_mut_ptr(), libc::SIGTTOU);
            libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), old.as_mut_ptr());
            SigttouBlocked { old: old.assume_init() }
        }
    }
}

impl Drop for SigttouBlocked {
    fn drop(&mut self) {
        // SAFETY: `old` is the mask pthread_sigmask returned; restoring it is what we took.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// What the command's process does between `fork` and `exec`.
#[derive(Clone, Copy, Debug)]
pub struct ChildSetup {
    /// chan-run's pid: if the parent is already gone, the child exits before `exec`.
    pub parent: Pid,
    /// Where in the holder record to write the command's pid (= its process group),
    /// so the record names the group before the command can run a single instruction.
    pub pid_field: Option<(RawFd, u64, usize)>,
    /// Make the command's new process group the terminal's foreground group.
    pub take_terminal: bool,
    /// Give SIGXFSZ its default action back (chan-run ignores it for itself).
    pub default_sigxfsz: bool,
}

/// Installs `setup` to run in the child before `exec`, after std has put it in its
/// own process group and reset its signal mask and SIGPIPE.
pub fn set_child_setup(command: &mut Command, setup: ChildSetup) {
    let hook = move || -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        // PDEATHSIG is lost if the parent died before the prctl: check after setting it.
        if rustix::process::getppid() != Some(setup.parent) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let me = rustix::process::getpid();
        if let Some((fd, offset, width)) = setup.pid_field {
            let mut buf = [b' '; 20];
            let digits = write_decimal(&mut buf, me.as_raw_nonzero().get() as u32);
            if digits <= width {
                // SAFETY: `fd` is the lock file, open in the parent for the whole spawn
                // and inherited by this child until `exec` closes it (O_CLOEXEC).
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                rustix::io::pwrite(fd, &buf[..width], offset)?;
            }
        }
        if setup.default_sigxfsz {
            // SAFETY: sigaction (behind signal) is async-signal-safe; SIG_DFL runs no code.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_DFL) };
        }
        if setup.take_terminal {
            let _blocked = SigttouBlocked::new();
            // SAFETY: fd 0 is the terminal the parent checked; it stays open in the child.
            let tty = unsafe { BorrowedFd::borrow_raw(0) };
            rustix::termios::tcsetpgrp(tty, me)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child, where only async-signal-safe calls are
    // allowed: it makes raw system calls (prctl, getppid, getpid, pwrite, tcsetpgrp,
    // pthread_sigmask, sigaction) through rustix/libc, formats into a stack buffer, and neither
    // allocates nor takes a lock.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Writes `n` left-aligned into `buf` (already filled with spaces); returns its length.
fn write_decimal(buf: &mut [u8; 20], mut n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_is_left_aligned() {
        let mut buf = [b' '; 20];
        assert_eq!(write_decimal(&mut buf, 4194304), 7);
        assert_eq!(&buf[..9], b"4194304  ");
        let mut buf = [b' '; 20];
        assert_eq!(write_decimal(&mut buf, 0), 1);
        assert_eq!(&buf[..2], b"0 ");
    }
}
