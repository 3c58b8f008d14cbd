//! The terminal, when stdin is chan-run's controlling terminal. A chan-run in the
//! foreground hands it to the command's group (`tcsetpgrp`, in the child before `exec`)
//! and takes it back afterwards. Job control works as under a shell: when the command
//! stops (^Z), chan-run takes the terminal back and stops its own process group with the
//! same signal, so the shell sees a stopped job and gives its prompt back; when it is
//! continued (`fg` or `bg`), it hands the terminal on again only if it is in the
//! foreground (a `bg` job must not steal it from the shell), and continues the command.

use rustix::process::{Pid, Signal};
use std::time::{Duration, Instant};

pub(super) struct Terminal {
    /// stdin is chan-run's controlling terminal: the command's stops are job control.
    job_control: bool,
    /// The command's group was given the terminal and chan-run must take it back.
    handed: bool,
}

impl Terminal {
    /// Looks once, before the spawn; for a stdin that is no terminal, one `ioctl`.
    pub fn new() -> Terminal {
        let stdin = rustix::stdio::stdin();
        let foreground = match rustix::termios::isatty(stdin) {
            true => rustix::termios::tcgetpgrp(stdin).ok(),
            false => None,
        };
        match foreground {
            Some(fg) => Terminal { job_control: true, handed: fg == rustix::process::getpgrp() },
            None => Terminal { job_control: false, handed: false },
        }
    }

    pub fn job_control(&self) -> bool {
        self.job_control
    }

    /// Whether the command is to be handed the terminal (set up in the child).
    pub fn handed(&self) -> bool {
        self.handed
    }

    /// Takes the terminal back for chan-run's group, if the command's group has it.
    pub fn take_back(&mut self) {
        if std::mem::take(&mut self.handed) {
            let _blocked = crate::sys::SigttouBlocked::new();
            let _ = rustix::termios::tcsetpgrp(rustix::stdio::stdin(), rustix::process::getpgrp());
        }
    }

    /// The command's leader `command` was stopped by `signal`: stops chan-run's group the
    /// same way (SIGSTOP for anything but the terminal's stop signals), and once continued
    /// continues the command. Returns how long chan-run was stopped.
    pub fn suspend(&mut self, command: Pid, signal: i32) -> Duration {
        self.take_back();
        let signal = [Signal::TSTP, Signal::TTIN, Signal::TTOU]
            .into_iter()
            .find(|s| s.as_raw() == signal)
            .unwrap_or(Signal::STOP);
        let before = Instant::now();
        // The kernel stops this thread before the call returns (it picks the sending
        // thread to take a signal sent to its own process); in an orphaned process group,
        // where no shell could continue it, the terminal's stop signals are discarded.
        let _ = rustix::process::kill_current_process_group(signal);
        let stopped = before.elapsed();
        let stdin = rustix::stdio::stdin();
        if rustix::termios::tcgetpgrp(stdin).is_ok_and(|fg| fg == rustix::process::getpgrp()) {
            self.handed = rustix::termios::tcsetpgrp(stdin, command).is_ok();
        }
        super::signal_command(command, Signal::CONT);
        stopped
    }
}
