//! The one module with `unsafe`: the few process-level calls that std and rustix do
//! not wrap safely. Each block says why it is sound.

use rustix::fd::{OwnedFd, RawFd};
use rustix::process::Pid;
use std::ffi::{OsStr, OsString};
use std::io;

/// The process's entry point on glibc Linux, in place of std's `lang_start`. It does what
/// std's runtime set-up does for chan-run (descriptors 0-2 opened on `/dev/null` if
/// closed, SIGPIPE ignored, a panic leaving with 101, stdout flushed at the end) but for
/// the main thread's stack-overflow handler: finding the main thread's stack costs
/// glibc a parse of `/proc/self/maps` (~100k instructions, an eighth of a run), and the
/// handler an alternate signal stack, for a message on a stack overflow; without it
/// such an overflow still ends the process, by SIGSEGV. (std's argument list works
/// without its runtime on glibc, which hands it over through `.init_array`.)
#[cfg(all(not(test), target_os = "linux", target_env = "gnu"))]
// SAFETY: nothing else in the program defines `main` (`no_main` is set in main.rs).
#[unsafe(no_mangle)]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd { fd, events: 0, revents: 0 });
    // SAFETY: poll reads and writes the three valid pollfd entries, and only that.
    if unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) } >= 0 {
        for _closed in fds.iter().filter(|p| p.revents & libc::POLLNVAL != 0) {
            // SAFETY: opening a C string literal's path; the lowest free descriptor is
            // the closed one (those below it are open or just opened), as in std.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    // SAFETY: setting SIG_IGN installs no handler code, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let code = std::panic::catch_unwind(crate::chan_run).map_or(101, |code| code.code().into());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

/// The process's allocator: Doug Lea's malloc (the `dlmalloc` crate, which Rust's std
/// uses on WebAssembly) behind std's `Mutex`. The static build's libc, musl, has an
/// allocator made for small footprints that maps and unmaps memory for nearly every
/// size class: 55 of a run's 200 system calls, and the page faults of each fresh
/// mapping. dlmalloc takes memory in 64 KiB steps and reuses what is freed; std's
/// futex mutex costs two atomic operations where musl's `pthread_mutex` cost ~45k
/// instructions of a run. The same allocator serves every build, so what is measured
/// and tested is what runs.
pub struct Allocator(std::sync::Mutex<dlmalloc::Dlmalloc>);

impl Allocator {
    pub const fn new() -> Self {
        Allocator(std::sync::Mutex::new(dlmalloc::Dlmalloc::new()))
    }

    fn heap(&self) -> std::sync::MutexGuard<'_, dlmalloc::Dlmalloc> {
        // Nothing panics while holding the lock (dlmalloc does not), but a poisoned lock
        // would still guard a consistent heap.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// SAFETY: each method passes its arguments on to the dlmalloc method of the same
// contract (sizes and alignments as `GlobalAlloc` promises them, pointers that this
// allocator returned), one call at a time under the mutex, as `Dlmalloc` requires. The
// mutex never allocates (std's is a futex word), so the allocator does not re-enter
// itself, and dlmalloc takes its memory from `mmap`, never from the global allocator.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe { self.heap().malloc(layout.size(), layout.align()) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe { self.heap().calloc(layout.size(), layout.align()) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: see the impl.
        unsafe { self.heap().free(ptr, layout.size(), layout.align()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe { self.heap().realloc(ptr, layout.size(), layout.align(), new_size) }
    }
}

/// A `flock` that blocks in the calling thread and that a forwarded signal or a deadline
/// cuts short, without a helper thread (`Control::flock`). A helper thread's start, and
/// the hop from it back to the main thread when the lock is granted, cost a contended
/// run more than a tenth of its throughput (bench/throughput.sh).
///
/// The race every such wait has, a signal that comes after the waiter last looked but
/// before it enters the kernel, is closed by where the kick acts: on the descriptor,
/// not on a flag. The waiter blocks on a duplicate of its lock file's descriptor
/// (`ARMED`); the kick, run in the waiting thread, `dup2`s a private descriptor
/// (`SPARE`, the wake socket, which no other process can lock) over that number. Then
/// whatever the instant of the signal:
/// - before the waiter publishes `ARMED`: it finds `KICKED` set before it blocks;
/// - after it, but before `flock` enters the kernel: `flock` takes the spare, at once;
/// - during `flock`: the call fails with EINTR, or is restarted (SA_RESTART) on the
///   spare and returns at once;
/// - after the lock was granted, before the waiter withdraws `ARMED`: `KICKED` is set,
///   and the waiter unlocks its lock file again (unlocking what it may not hold is a
///   no-op) and reports the kick.
///
/// A signal may be delivered to any thread; the kick only acts in the waiting thread
/// (`MAIN`), so that its `dup2` can never meet the waiter's `close`. Other threads pass
/// the signal on to it as SIGALRM, the signal the deadline's timer (`setitimer`) sends.
pub mod kick {
    use rustix::fd::{AsRawFd, BorrowedFd, OwnedFd};
    use std::io;
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    /// The waiting thread (`pthread_self`), 0 before `install`.
    static MAIN: AtomicUsize = AtomicUsize::new(0);
    /// The descriptor the waiting `flock` uses, while it waits; else -1.
    static ARMED: AtomicI32 = AtomicI32::new(-1);
    static SPARE: AtomicI32 = AtomicI32::new(-1);
    static KICKED: AtomicBool = AtomicBool::new(false);

    /// Makes `signals` (and SIGALRM) kick a waiting `flock`, once per process, from the
    /// thread that will wait. `spare` must stay open for the process's life and be a
    /// file no other process locks. Each signal's other actions (signal-hook's flag and
    /// wake-up, registered before) run first.
    pub fn install(signals: &[i32], spare: BorrowedFd<'static>) -> io::Result<()> {
        SPARE.store(spare.as_raw_fd(), SeqCst);
        // SAFETY: pthread_self has no preconditions.
        MAIN.store(unsafe { libc::pthread_self() } as usize, SeqCst);
        for &sig in signals.iter().chain(&[libc::SIGALRM]) {
            // SAFETY: `on_signal` is async-signal-safe: atomics, pthread_self,
            // pthread_kill and dup2 only, on descriptors that stay valid (see the
            // module's doc); it allocates nothing and takes no lock.
            unsafe { signal_hook::low_level::register(sig, on_signal) }?;
        }
        Ok(())
    }

    fn on_signal() {
        let main = MAIN.load(SeqCst);
        // SAFETY: pthread_self has no preconditions.
        if unsafe { libc::pthread_self() } as usize != main {
            if ARMED.load(SeqCst) >= 0 {
                // SAFETY: `main` is the live main thread's id (it waits now); SIGALRM's
                // action is this function, so it only kicks.
                unsafe { libc::pthread_kill(main as libc::pthread_t, libc::SIGALRM) };
            }
            return;
        }
        KICKED.store(true, SeqCst);
        let armed = ARMED.load(SeqCst);
        if armed >= 0 {
            // SAFETY: this runs in the waiting thread, which owns `armed` and has not
            // closed it (it withdraws ARMED first); SPARE is open for the process's life.
            unsafe { libc::dup2(SPARE.load(SeqCst), armed) };
        }
    }

    /// Until a `flock` of `fd` is granted (`Ok(true)`), or a kick comes (`Ok(false)`;
    /// the lock is then not held), or `timeout` passes (a kick too). `stop` is the
    /// caller's own look at what a kick means (its signal flag, its deadline), taken
    /// after `KICKED` is reset: a signal before that look is seen by it, one after it
    /// kicks the wait; `Ok(false)` at once when it says stop.
    pub fn flock(
        fd: BorrowedFd<'_>,
        exclusive: bool,
        timeout: Option<Duration>,
        stop: impl Fn() -> bool,
    ) -> io::Result<bool> {
        use rustix::fs::FlockOperation::{LockExclusive, LockShared, Unlock};
        KICKED.store(false, SeqCst);
        if stop() {
            return Ok(false);
        }
        let copy: OwnedFd = rustix::io::fcntl_dupfd_cloexec(fd, 0)?;
        ARMED.store(copy.as_raw_fd(), SeqCst);
        if let Some(left) = timeout {
            set_timer(left.max(Duration::from_micros(1)));
        }
        let op = if exclusive { LockExclusive } else { LockShared };
        let result = loop {
            if KICKED.load(SeqCst) {
                break Ok(());
            }
            match rustix::fs::flock(&copy, op) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other,
            }
        };
        ARMED.store(-1, SeqCst);
        if timeout.is_some() {
            set_timer(Duration::ZERO);
        }
        result?;
        if KICKED.load(SeqCst) {
            let _ = rustix::fs::flock(fd, Unlock);
            return Ok(false);
        }
        Ok(true)
    }

    /// Arms (or, with zero, disarms) the one-shot real-time timer that sends SIGALRM.
    fn set_timer(after: Duration) {
        let tv = libc::timeval { tv_sec: after.as_secs() as _, tv_usec: after.subsec_micros() as _ };
        let value = libc::itimerval { it_interval: libc::timeval { tv_sec: 0, tv_usec: 0 }, it_value: tv };
        // SAFETY: `value` is a valid itimerval; the old value is not asked for.
        unsafe { libc::setitimer(libc::ITIMER_REAL, &value, std::ptr::null_mut()) };
    }
}

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

/// What the command's process does between its creation and `exec`.
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

/// The command to start: program (searched on PATH when it has no `/`), arguments,
/// the changes to chan-run's environment, and the steps before `exec`. Stdin is
/// inherited; stdout and stderr are pipes to chan-run.
pub struct Spawn<'a> {
    pub program: &'a OsStr,
    pub args: &'a [OsString],
    /// `Some`: set the variable; `None`: remove it.
    pub env: &'a [(&'static str, Option<OsString>)],
    /// The command's stdin (`--collect`'s pipe); `None`: chan-run's own, inherited.
    pub stdin: Option<rustix::fd::BorrowedFd<'a>>,
    pub setup: ChildSetup,
}

/// A started command: its pid (= its process group) and the read ends of its stdout
/// and stderr. The caller reaps it.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Starts the command in a process group of its own. An error is either the command's
/// (it could not be found or executed: the errno `execvp` would give) or chan-run's
/// own (out of descriptors, processes, memory).
pub fn spawn(spawn: &Spawn) -> io::Result<Spawned> {
    #[cfg(target_os = "linux")]
    return vfork::spawn(spawn);
    #[cfg(not(target_os = "linux"))]
    return forked::spawn(spawn);
}

/// The signals whose disposition chan-run may have set to a handler (see
/// `vfork::reset_signals`), and SIGPIPE, which std sets to SIG_IGN.
#[cfg(target_os = "linux")]
const CAUGHT: &[libc::c_int] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGCHLD,
    libc::SIGALRM,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGPIPE,
];

/// Linux: a `vfork`-style child, as glibc's `posix_spawn` makes one, but with the steps
/// `posix_spawn` cannot express (parent-death signal, `tcsetpgrp`, the pid written into
/// the holder record before `exec`).
///
/// Soundness. `clone(CLONE_VM | CLONE_VFORK)` makes a process that shares chan-run's
/// memory and runs on a stack of its own (`STACK` bytes allocated here), while the
/// calling thread is suspended until the child has called `execve` successfully or
/// exited; chan-run's other threads run on, but touch nothing the child uses (all of it
/// is owned by this function's frame and not shared). So:
/// - Everything the child needs is built here first: argv, envp, every candidate path
///   of the PATH search, the `/bin/sh` argv for a script without `#!`. The child only
///   reads them, and writes nothing but its own stack and `ChildArgs::errno`, which the
///   parent reads after `clone` returns (the kernel's vfork completion orders the two).
/// - The child makes only async-signal-safe calls (system calls through libc or
///   rustix), never allocates, never takes a lock. Nothing in it can panic (its one
///   slice is bounded by a check beside it); were it to, a panic cannot unwind out of an
///   `extern "C"` function: the process aborts. libc's wrappers store
///   a failure in `errno`, which lives in the suspended parent thread's TLS (the child
///   shares it): nothing reads it there before the parent's next call sets it again.
/// - Signals: the parent blocks every signal before `clone`, so the child starts with
///   all blocked and no handler of chan-run's can run in it (on chan-run's memory, with
///   chan-run's state). The child has its own copy of the dispositions (no
///   CLONE_SIGHAND): it resets every caught signal (those of `CAUGHT`, the only ones
///   chan-run catches) to SIG_DFL, SIGPIPE too (std ignores
///   it in chan-run; a command must see it) and SIGXFSZ if chan-run ignored it itself,
///   and only then unblocks, just before `execve`. Ignored signals stay ignored.
///   glibc's internal signals (32, 33) cannot be blocked or reset through its wrappers;
///   they are only ever sent to chan-run's own threads by thread id, never to this new
///   process. The parent restores its mask once `clone` returns.
/// - A terminal ^Z that reaches the child's group in the instant between its unblock
///   and `execve` stops it before `exec`, with the parent still suspended; the user's
///   ^C (or any fatal signal) then ends it, and chan-run reports that like any command
///   killed by a signal. (A forked child had the same instant; only the parent's job
///   control was awake to see it.)
#[cfg(target_os = "linux")]
mod vfork {
    use super::{ChildSetup, Spawn, Spawned, write_decimal};
    use rustix::fd::{AsRawFd, BorrowedFd};
    use std::ffi::{CStr, CString, OsStr, OsString};
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicI32, Ordering};

    /// The child's stack: its deepest call is a libc wrapper over one system call
    /// (`sigaction` puts ~300 bytes on it); 64 KiB leaves a wide margin.
    const STACK: usize = 64 * 1024;

    /// What the child reads (built before `clone`) and the one word it writes.
    struct ChildArgs {
        argv: *const *const libc::c_char,
        envp: *const *const libc::c_char,
        candidates: *const *const libc::c_char,
        candidate_count: usize,
        /// `["/bin/sh", <the candidate>, argv[1..], NULL]`: the child fills slot 1.
        script_argv: *mut *const libc::c_char,
        /// The command's stdin, or -1 to keep chan-run's.
        stdin: libc::c_int,
        stdout: libc::c_int,
        stderr: libc::c_int,
        setup: ChildSetup,
        /// 0, or the errno of the step that failed (the child then exits with 127).
        errno: AtomicI32,
    }

    pub fn spawn(spawn: &Spawn) -> io::Result<Spawned> {
        let argv_owned: Vec<CString> = std::iter::once(spawn.program)
            .chain(spawn.args.iter().map(OsString::as_os_str))
            .map(c_string)
            .collect::<io::Result<_>>()?;
        let env = environment(spawn.env)?;
        let candidates_owned = candidates(spawn.program, env.path.as_deref())?;
        let argv = null_terminated(&argv_owned);
        let candidates: Vec<*const libc::c_char> = candidates_owned.iter().map(|c| c.as_ptr()).collect();
        let mut script_argv: Vec<*const libc::c_char> =
            [SH.as_ptr(), std::ptr::null()].into_iter().chain(argv[1..].iter().copied()).collect();

        let (stdout_rx, stdout_tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (stderr_rx, stderr_tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let args = ChildArgs {
            argv: argv.as_ptr(),
            envp: env.envp.as_ptr(),
            candidates: candidates.as_ptr(),
            candidate_count: candidates.len(),
            script_argv: script_argv.as_mut_ptr(),
            stdin: spawn.stdin.map_or(-1, |fd| fd.as_raw_fd()),
            stdout: stdout_tx.as_raw_fd(),
            stderr: stderr_tx.as_raw_fd(),
            setup: spawn.setup,
            errno: AtomicI32::new(0),
        };
        let mut stack: Vec<u8> = Vec::with_capacity(STACK);

        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        // SAFETY: see the module doc. `stack` is STACK bytes nobody else uses until it
        // is dropped after the child is done with it (it has exec'd or exited when
        // `clone` returns: CLONE_VFORK); clone's wrapper aligns the top it is given.
        // `args` and everything its pointers reach live in this frame until then. The
        // signal sets are valid memory; pthread_sigmask changes this thread's mask only
        // and is restored right after.
        let pid = unsafe {
            libc::sigfillset(all.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
            let top = stack.as_mut_ptr().add(STACK).cast::<libc::c_void>();
            let pid = libc::clone(
                child,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::from_ref(&args).cast_mut().cast::<libc::c_void>(),
            );
            let clone_errno = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_errno);
            }
            pid
        };
        drop(stack);
        drop((stdout_tx, stderr_tx));
        let pid = rustix::process::Pid::from_raw(pid).expect("clone returns a positive pid");
        match args.errno.load(Ordering::Acquire) {
            0 => Ok(Spawned { pid, stdout: stdout_rx, stderr: stderr_rx }),
            errno => {
                // It exited without running a single instruction of the command.
                while let Err(rustix::io::Errno::INTR) =
                    rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                {
                }
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }

    const SH: &CStr = c"/bin/sh";

    fn c_string(s: &OsStr) -> io::Result<CString> {
        CString::new(s.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte found in provided data"))
    }

    fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
        strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
    }

    unsafe extern "C" {
        /// The process's environment: a NULL-terminated array of `KEY=VALUE` strings.
        static environ: *const *const libc::c_char;
    }

    /// The command's environment: chan-run's with `changes` applied. The strings kept
    /// are libc's own (not copied: chan-run never changes its environment, so they
    /// stay valid and unchanged; `std::env::set_var` is `unsafe` for this very reason
    /// and used nowhere), those set are owned here.
    struct Environment {
        _set: Vec<CString>,
        /// NULL-terminated, for `execve`.
        envp: Vec<*const libc::c_char>,
        /// The command's PATH (the search for its program uses it, as `execvp` would).
        path: Option<Vec<u8>>,
    }

    fn environment(changes: &[(&'static str, Option<OsString>)]) -> io::Result<Environment> {
        let mut path = None;
        let mut envp = Vec::with_capacity(64);
        // SAFETY: `environ` is libc's, valid and unchanged while chan-run runs (see
        // `Environment`): a NULL-terminated array (or NULL) of NUL-terminated strings.
        unsafe {
            let mut entry = environ;
            while !entry.is_null() && !(*entry).is_null() {
                let bytes = CStr::from_ptr(*entry).to_bytes();
                // As std reads it: the key ends at the first `=` after its first byte.
                let key = bytes.iter().skip(1).position(|&b| b == b'=').map_or(bytes, |i| &bytes[..i + 1]);
                if !changes.iter().any(|(k, _)| k.as_bytes() == key) {
                    if key == b"PATH" && path.is_none() {
                        path = bytes.get(5..).map(<[u8]>::to_vec);
                    }
                    envp.push(*entry);
                }
                entry = entry.add(1);
            }
        }
        let mut set = Vec::with_capacity(changes.len());
        for (key, value) in changes {
            if let Some(value) = value {
                if *key == "PATH" {
                    path = Some(value.as_bytes().to_vec());
                }
                let mut entry = Vec::with_capacity(key.len() + value.len() + 1);
                entry.extend_from_slice(key.as_bytes());
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                set.push(c_string(OsStr::from_bytes(&entry))?);
            } else if *key == "PATH" {
                path = None;
            }
        }
        envp.extend(set.iter().map(|s| s.as_ptr()));
        envp.push(std::ptr::null());
        Ok(Environment { _set: set, envp, path })
    }

    /// The paths `execvp` would try for `program`, in its order: itself if it names a
    /// path, else each PATH entry joined with it (an empty entry: the current
    /// directory), PATH defaulting to glibc's `/bin:/usr/bin`.
    fn candidates(program: &OsStr, path: Option<&[u8]>) -> io::Result<Vec<CString>> {
        let program = program.as_bytes();
        if program.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        if program.contains(&b'/') {
            return Ok(vec![c_string(OsStr::from_bytes(program))?]);
        }
        let path = path.unwrap_or(b"/bin:/usr/bin");
        path.split(|&b| b == b':')
            .map(|dir| {
                let mut full = Vec::with_capacity(dir.len() + 1 + program.len());
                if !dir.is_empty() {
                    full.extend_from_slice(dir);
                    full.push(b'/');
                }
                full.extend_from_slice(program);
                c_string(OsStr::from_bytes(&full))
            })
            .collect()
    }

    /// The child: the steps of `ChildSetup`, then `execve`. On failure it stores the
    /// errno for the parent and exits; it never returns into Rust code of the parent's.
    extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the parent's `ChildArgs`, alive and unchanged while the
        // parent is suspended in `clone`.
        let args = unsafe { &*arg.cast::<ChildArgs>() };
        let errno = match prepare(args) {
            Ok(()) => exec(args),
            Err(e) => e.raw_os_error(),
        };
        args.errno.store(if errno == 0 { libc::EINVAL } else { errno }, Ordering::Release);
        // SAFETY: _exit ends this process at once, running nothing of chan-run's.
        unsafe { libc::_exit(127) }
    }

    /// Everything before `execve`, signals still all blocked (see the module doc).
    fn prepare(args: &ChildArgs) -> Result<(), rustix::io::Errno> {
        reset_signals();
        let stdin = (args.stdin >= 0).then_some((args.stdin, 0));
        for (fd, target) in stdin.into_iter().chain([(args.stdout, 1), (args.stderr, 2)]) {
            // SAFETY: dup2 and fcntl are system calls on descriptors the parent keeps
            // open until the child is done; the pipes are never fds 0-2 (chan-run opens
            // /dev/null on any of those closed at start-up), so no dup2 closes another
            // pipe's end.
            let rc = unsafe { libc::dup2(fd, target) };
            if rc < 0 {
                return Err(rustix::io::Errno::from_raw_os_error(last_errno()));
            }
        }
        rustix::process::setpgid(None, None)?;
        let setup = &args.setup;
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        // PDEATHSIG is lost if the parent died before the prctl: check after setting it.
        if rustix::process::getppid() != Some(setup.parent) {
            return Err(rustix::io::Errno::SRCH);
        }
        let me = rustix::process::getpid();
        if let Some((fd, offset, width)) = setup.pid_field {
            let mut buf = [b' '; 20];
            let digits = write_decimal(&mut buf, me.as_raw_nonzero().get() as u32);
            if digits <= width && width <= buf.len() {
                // SAFETY: `fd` is the lock file, open in the parent for the whole spawn
                // and reachable in this child until `exec` closes it (O_CLOEXEC).
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                rustix::io::pwrite(fd, &buf[..width], offset)?;
            }
        }
        if setup.default_sigxfsz {
            set_default(libc::SIGXFSZ);
        }
        if setup.take_terminal {
            // SIGTTOU is blocked (all are), so a background group may take the terminal.
            // SAFETY: fd 0 is the terminal the parent checked; it stays open in the child.
            let tty = unsafe { BorrowedFd::borrow_raw(0) };
            rustix::termios::tcsetpgrp(tty, me)?;
        }
        let mut none = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        // SAFETY: `none` is valid memory; sigprocmask changes this process's mask only.
        // From here on only SIG_DFL and SIG_IGN dispositions are left to act.
        unsafe {
            libc::sigemptyset(none.as_mut_ptr());
            libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
        }
        Ok(())
    }

    /// Sets every caught signal to SIG_DFL, and SIGPIPE, which std ignores in chan-run.
    /// (SIGXFSZ, which chan-run ignores, is reset after the pid write, as before.)
    ///
    /// Only the signals of `super::CAUGHT` are looked at, not all 64 (two system calls
    /// each: ~70 fewer per run). That is every signal that can have a handler here:
    /// chan-run started with none (`execve` resets caught signals to SIG_DFL; only
    /// SIG_IGN is inherited), and the only code in the process that installs one is
    /// `control.rs` (SIGINT, SIGTERM, SIGHUP through signal-hook, SIGCHLD, SIGALRM) and std's
    /// runtime (SIGSEGV, SIGBUS: its stack-overflow handler, on the entry point other
    /// than `sys::main`). No dependency installs handlers of its own: signal-hook acts
    /// only for the signals it is given, no `ctrlc`, tokio (under the PostgreSQL client)
    /// is built without its `signal` feature, and libc/glibc install none for a
    /// single-threaded-or-not program. A test checks `control::FORWARDED` and SIGCHLD
    /// are in the list. A handler missed here could only matter in the instant between
    /// the unblock and `execve`; `execve` would reset it anyway.
    fn reset_signals() {
        for &sig in super::CAUGHT {
            let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
            // SAFETY: a null `act` only reads the disposition into valid memory; the
            // wrapper refuses glibc's internal signals with EINVAL (left as they are).
            let rc = unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) };
            // SAFETY: on success sigaction filled `old`.
            let handler = if rc == 0 { unsafe { old.assume_init() }.sa_sigaction } else { continue };
            if sig == libc::SIGPIPE || (handler != libc::SIG_DFL && handler != libc::SIG_IGN) {
                set_default(sig);
            }
        }
    }

    fn set_default(sig: libc::c_int) {
        let mut act = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask and no flags; setting
        // it installs no code. It changes this process's copy of the dispositions only.
        unsafe {
            (*act.as_mut_ptr()).sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, act.as_ptr(), std::ptr::null_mut());
        }
    }

    /// Tries each candidate as glibc's `execvp` does (a file without `#!` that the
    /// kernel refuses with ENOEXEC runs under `/bin/sh`); returns the errno to report
    /// if none could be executed.
    fn exec(args: &ChildArgs) -> i32 {
        let mut got_eacces = false;
        let mut errno = libc::ENOENT;
        for i in 0..args.candidate_count {
            // SAFETY: `candidates` has `candidate_count` valid C strings; argv, envp and
            // script_argv are NULL-terminated arrays of valid C strings, all owned by the
            // suspended parent. Slot 1 of script_argv is the child's to fill (the parent
            // never reads it). execve returns only on failure.
            unsafe {
                let path = *args.candidates.add(i);
                libc::execve(path, args.argv, args.envp);
                errno = last_errno();
                if errno == libc::ENOEXEC {
                    *args.script_argv.add(1) = path;
                    libc::execve(SH.as_ptr(), args.script_argv.cast_const(), args.envp);
                    errno = last_errno();
                }
            }
            match errno {
                libc::EACCES => got_eacces = true,
                libc::ENOENT | libc::ESTALE | libc::ENOTDIR | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return errno,
            }
        }
        if got_eacces { libc::EACCES } else { errno }
    }

    fn last_errno() -> i32 {
        // SAFETY: __errno_location returns this thread's errno slot (the parent's, here,
        // set by the libc call just made).
        unsafe { *libc::__errno_location() }
    }
}

/// Elsewhere: std's `Command`, which forks when given a `pre_exec` hook (the hook chan-run
/// had on Linux too; no parent-death signal outside Linux and Android).
#[cfg(not(target_os = "linux"))]
mod forked {
    use super::{ChildSetup, Spawn, Spawned, write_decimal};
    use rustix::fd::BorrowedFd;
    use std::io;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    pub fn spawn(spawn: &Spawn) -> io::Result<Spawned> {
        let mut command = Command::new(spawn.program);
        command.args(spawn.args);
        for (key, value) in spawn.env {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        let stdin = match spawn.stdin {
            Some(fd) => Stdio::from(fd.try_clone_to_owned()?),
            None => Stdio::inherit(),
        };
        command.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.process_group(0);
        set_child_setup(&mut command, spawn.setup);
        let mut child = command.spawn()?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
        let stdout = child.stdout.take().expect("stdout is piped").into();
        let stderr = child.stderr.take().expect("stderr is piped").into();
        // Dropping a `Child` neither waits for nor kills it: the caller reaps `pid`.
        Ok(Spawned { pid, stdout, stderr })
    }

    /// Installs `setup` to run in the child before `exec`, after std has put it in its
    /// own process group and reset its signal mask and SIGPIPE.
    fn set_child_setup(command: &mut Command, setup: ChildSetup) {
        let hook = move || -> io::Result<()> {
            #[cfg(target_os = "android")]
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
                    // SAFETY: `fd` is the lock file, open in the parent for the whole
                    // spawn and inherited by this child until `exec` closes it (O_CLOEXEC).
                    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                    rustix::io::pwrite(fd, &buf[..width], offset)?;
                }
            }
            if setup.default_sigxfsz {
                // SAFETY: sigaction (behind signal) is async-signal-safe; SIG_DFL runs no code.
                unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_DFL) };
            }
            if setup.take_terminal {
                let _blocked = super::SigttouBlocked::new();
                // SAFETY: fd 0 is the terminal the parent checked; it stays open in the child.
                let tty = unsafe { BorrowedFd::borrow_raw(0) };
                rustix::termios::tcsetpgrp(tty, me)?;
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child, where only async-signal-safe calls
        // are allowed: it makes raw system calls (getppid, getpid, pwrite, tcsetpgrp,
        // pthread_sigmask, sigaction) through rustix/libc, formats into a stack buffer,
        // and neither allocates nor takes a lock.
        unsafe {
            command.pre_exec(hook);
        }
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
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn the_allocator_keeps_alignment_contents_and_zeroes() {
        use std::alloc::{GlobalAlloc, Layout};
        let heap = Allocator::new();
        for align in [1, 8, 16, 64, 4096, 1 << 16] {
            for size in [1, 24, 4096, 300_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is used within its size and freed once
                // with the layout it was allocated with (realloc'd blocks with the new size).
                unsafe {
                    let p = heap.alloc_zeroed(layout);
                    assert!(!p.is_null() && (p as usize).is_multiple_of(align), "{size} {align}");
                    assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                    p.write_bytes(0xA5, size);
                    let q = heap.realloc(p, layout, size * 3);
                    assert!(!q.is_null() && (q as usize).is_multiple_of(align), "{size} {align}");
                    assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 0xA5));
                    heap.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                }
            }
        }
        // Threads at once: each block keeps what its thread wrote.
        let heap = std::sync::Arc::new(heap);
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let heap = std::sync::Arc::clone(&heap);
                std::thread::spawn(move || {
                    let layout = Layout::from_size_align(1000, 8).unwrap();
                    for _ in 0..2000 {
                        // SAFETY: as above.
                        unsafe {
                            let p = heap.alloc(layout);
                            p.write_bytes(t, 1000);
                            assert!(std::slice::from_raw_parts(p, 1000).iter().all(|&b| b == t));
                            heap.dealloc(p, layout);
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    fn setup() -> ChildSetup {
        ChildSetup {
            parent: rustix::process::getpid(),
            pid_field: None,
            take_terminal: false,
            default_sigxfsz: false,
        }
    }

    /// Runs `program args` through `spawn`: its exit status and its stdout.
    fn run(
        program: &str,
        args: &[&str],
        env: &[(&'static str, Option<OsString>)],
    ) -> io::Result<(i32, String)> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let spawned =
            spawn(&Spawn { program: OsStr::new(program), args: &args, env, stdin: None, setup: setup() })?;
        let mut out = String::new();
        std::fs::File::from(spawned.stdout).read_to_string(&mut out).unwrap();
        let (_, status) = rustix::process::waitpid(Some(spawned.pid), rustix::process::WaitOptions::empty())
            .unwrap()
            .unwrap();
        let status = std::process::ExitStatus::from_raw(status.as_raw());
        Ok((status.code().unwrap_or(-1), out))
    }

    #[test]
    fn a_command_that_cannot_be_executed_reports_execvp_s_errno() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "echo hi\n").unwrap();
        let errno = |program: &str, env: &[(&'static str, Option<OsString>)]| {
            run(program, &[], env).map(|_| ()).unwrap_err().raw_os_error()
        };
        assert_eq!(errno("/nonexistent/command", &[]), Some(libc::ENOENT));
        assert_eq!(errno("", &[]), Some(libc::ENOENT));
        assert_eq!(errno(dir.path().to_str().unwrap(), &[]), Some(libc::EACCES));
        assert_eq!(errno(plain.to_str().unwrap(), &[]), Some(libc::EACCES), "not executable");
        // On PATH: a match that cannot be executed is remembered while the search goes on.
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(errno("plain", &[("PATH", Some(path.clone().into()))]), Some(libc::EACCES));
        assert_eq!(errno("no-such-command-chan-run", &[("PATH", Some(path.into()))]), Some(libc::ENOENT));
    }

    #[test]
    fn a_command_is_searched_on_the_path_it_will_see_and_a_script_without_a_shebang_runs_under_sh() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("greet");
        std::fs::write(&script, "echo \"hello $1 $CHAN_RUN_TEST_VAR\"\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let path = format!("/nonexistent::{}", dir.path().display());
        let env = [("PATH", Some(path.into())), ("CHAN_RUN_TEST_VAR", Some("set".into()))];
        assert_eq!(run("greet", &["you"], &env).unwrap(), (3, "hello you set\n".to_owned()));
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            run("sh", &["-c", "echo \"$PATH\""], &[]).unwrap(),
            (0, format!("{path}\n")),
            "kept as it was"
        );
        let removed = [("HOME", None)];
        assert_eq!(
            run("/bin/sh", &["-c", "echo ${HOME-unset}"], &removed).unwrap(),
            (0, "unset\n".to_owned())
        );
    }

    #[test]
    #[cfg(target_os = "linux")] // /proc/self/status
    fn the_command_gets_default_signals_an_empty_mask_and_its_own_group() {
        // This test process catches SIGUSR2 (not in CAUGHT: `execve` resets it) and
        // ignores SIGPIPE (std) and SIGUSR1: the command must see SIGUSR2 and SIGPIPE at
        // their defaults, SIGUSR1 still ignored (as under `nohup`), nothing blocked, and
        // lead a new process group.
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(libc::SIGUSR2, flag).unwrap();
        // SAFETY: SIG_IGN installs no code; no other test uses SIGUSR1.
        unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
        let script = "grep -E '^Sig(Blk|Cgt|Ign)' /proc/self/status; ps -o pid=,pgid= -p $$";
        let (code, out) = run("/bin/sh", &["-c", script], &[]).unwrap();
        assert_eq!(code, 0, "{out}");
        let field = |name: &str| {
            let line = out.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(field("SigBlk:"), 0, "{out}");
        let bit = |sig: i32| 1u64 << (sig - 1);
        assert_eq!(field("SigIgn:") & (bit(libc::SIGPIPE) | bit(libc::SIGUSR2)), 0, "{out}");
        assert_ne!(field("SigIgn:") & bit(libc::SIGUSR1), 0, "an ignored signal stays ignored: {out}");
        let ids: Vec<&str> = out.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(ids[0], ids[1], "the command leads its own group: {out}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn every_signal_chan_run_catches_is_reset_in_the_child() {
        for sig in crate::control::FORWARDED.into_iter().chain([libc::SIGCHLD, libc::SIGALRM, libc::SIGPIPE])
        {
            assert!(CAUGHT.contains(&sig), "signal {sig} is caught but not in sys::CAUGHT");
        }
    }

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
