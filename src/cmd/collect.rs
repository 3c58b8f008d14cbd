//! `run --collect`: a burst of queued messages answered by one run. Reads the caller's
//! message, queues it with the fingerprint of the command and options, and either runs
//! the batch (this caller's turn came) or exits with the outcome of the batch that took
//! it. The store keeps the protocol (`store/local/collect.rs`); README "Collect" says
//! what a bot does with each exit code.

use crate::channel::Channel;
use crate::cli::RunArgs;
use crate::control::Control;
use crate::exit_code::ExitCode;
use crate::store::{CollectEntry, Lease, Store, Turn, Wait};
use sha2::Digest;
use std::io::{IsTerminal, Read};
use std::sync::Arc;
use std::time::Duration;

/// The largest message a caller may send.
pub const MESSAGE_CAP: usize = 1 << 20;
/// The longest `--collect-window`.
pub const WINDOW_MAX: Duration = Duration::from_secs(10);
const DEFAULT_SEPARATOR: &[u8] = b"\n\n";

/// A `--collect` caller's message and what its batch needs.
pub struct Collect {
    entry: CollectEntry,
    separator: Vec<u8>,
    window: Option<Duration>,
    max: u32,
    collected_code: u8,
}

/// What the run feeds its command: the messages joined, and how many there are.
pub struct Batch {
    pub stdin: Arc<[u8]>,
    pub messages: u64,
}

/// Checks the flags and reads the message (`--message`, else stdin); `None` without
/// `--collect`. Any error is a usage error: nothing has been queued or run.
pub fn prepare(args: &RunArgs) -> anyhow::Result<Option<Collect>> {
    let c = &args.collect;
    if !c.collect {
        return Ok(None);
    }
    if args.wait.wait.is_some() {
        anyhow::bail!(
            "--collect cannot be combined with --wait: a message taken into a batch cannot be withdrawn once its deadline passes; wait without a limit, or use --no-wait"
        );
    }
    if let Some(window) = c.collect_window
        && window > WINDOW_MAX
    {
        anyhow::bail!("--collect-window is at most 10s; pass a shorter DUR (e.g. --collect-window 2s)");
    }
    let message = match &c.message {
        Some(text) => std::os::unix::ffi::OsStrExt::as_bytes(text.as_os_str()).to_vec(),
        None => read_stdin()?,
    };
    if message.len() > MESSAGE_CAP {
        anyhow::bail!(
            "the message is {} bytes; --collect takes at most 1 MiB (1048576 bytes) per message: shorten it",
            message.len()
        );
    }
    let separator = c.collect_separator.as_deref().map_or_else(|| DEFAULT_SEPARATOR.to_vec(), unescape);
    Ok(Some(Collect {
        entry: CollectEntry { fingerprint: fingerprint(args, &separator), message: Arc::from(message) },
        separator,
        window: c.collect_window.filter(|w| !w.is_zero()),
        max: c.collect_max,
        collected_code: c.collected_exit_code,
    }))
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        anyhow::bail!("--collect needs the message: pass --message TEXT, or pipe it on stdin");
    }
    let mut message = Vec::new();
    stdin
        .lock()
        .take(MESSAGE_CAP as u64 + 1)
        .read_to_end(&mut message)
        .map_err(|e| anyhow::anyhow!("cannot read the message on stdin ({e}); pass --message TEXT"))?;
    Ok(message)
}

/// `\n`, `\t` and `\\` in `--collect-separator`; any other backslash stays as it is.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => out.push('\n'),
            ('\\', Some('t')) => out.push('\t'),
            ('\\', Some('\\')) => out.push('\\'),
            _ => {
                out.push(c);
                continue;
            }
        }
        chars.next();
    }
    out.into_bytes()
}

/// Callers are collected together only if the batch runs as each of them would have
/// run: same command, working directory and options (not `-q`, `-n`, the message, nor
/// the runner's own collect settings).
fn fingerprint(args: &RunArgs, separator: &[u8]) -> String {
    let cwd = std::env::current_dir().ok();
    let what = format!(
        "{:?}",
        (
            &args.command,
            cwd,
            args.timeout,
            args.kill_after,
            args.pools.iter().map(|p| format!("{}:{}", p.name(), p.seats)).collect::<Vec<_>>(),
            &args.session_arg,
            &args.session_key,
            args.no_session,
            args.fresh_after,
            args.profile.map(|p| format!("{p:?}")),
            args.on_stale_session.map(|o| format!("{o:?}")),
            separator,
        )
    );
    let digest = sha2::Sha256::digest(what.as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Queues for `channel` as `run` does; with `collect`, leaves the message in the queue
/// and returns the code of a caller answered by an earlier run's batch, or the lease once
/// `--collect-window` is over.
pub fn acquire(
    store: &dyn Store,
    channel: &Channel,
    args: &RunArgs,
    wait: Wait,
    control: &'static Control,
    collect: Option<&Collect>,
) -> anyhow::Result<Result<Box<dyn Lease>, ExitCode>> {
    let Some(collect) = collect else {
        return super::acquire(store, channel, &args.wait, wait, args.quiet, control);
    };
    let mut on_wait = |note: &crate::store::WaitNote| {
        if !args.quiet && std::io::stderr().is_terminal() {
            crate::ui::say(super::waiting_line(channel, note));
        }
    };
    let turn = match store.acquire_collect(channel, wait, control, &mut on_wait, &collect.entry) {
        Ok(turn) => turn,
        Err(e) => return super::busy_or_interrupted(Err(e), &args.wait),
    };
    match turn {
        Turn::Run(mut lease) => {
            // Before any pool seat is taken: a seat is for the command, not the debounce.
            if let Some(window) = collect.window {
                let waited = lease.collect_window(window, collect.max, control);
                if let Err(e) = waited {
                    if let Err(why) = lease.release() {
                        crate::ui::warn(format!("{why:#}"));
                    }
                    return super::busy_or_interrupted(Err(e), &args.wait);
                }
            }
            Ok(Ok(lease))
        }
        Turn::Answered(verdict) => {
            let code = match verdict.code {
                0 => ExitCode::Collected(collect.collected_code),
                code => ExitCode::Command(code),
            };
            if !args.quiet {
                let how = match verdict.code {
                    0 => "answered".to_owned(),
                    code => format!("not answered: it ended with {code}"),
                };
                crate::ui::say(format_args!(
                    "channel {channel}: this message was {how} by the run of pid {} ({} messages, one run)",
                    verdict.runner_pid, verdict.messages
                ));
            }
            Ok(Err(code))
        }
        Turn::TakenThenInterrupted(sig) => {
            if !args.quiet {
                crate::ui::say(format_args!(
                    "channel {channel}: interrupted by signal {sig}, but this message had already been taken into the batch being run: that run answers it"
                ));
            }
            Ok(Err(ExitCode::Signal(sig)))
        }
    }
}

/// Holding the channel (and its seats), right before the command: takes the batch.
pub fn gather(lease: &mut dyn Lease, collect: Option<&Collect>) -> anyhow::Result<Option<Batch>> {
    let Some(collect) = collect else { return Ok(None) };
    let taken = lease.take_batch(collect.max)?;
    let mut stdin = collect.entry.message.to_vec();
    for message in &taken {
        stdin.extend_from_slice(&collect.separator);
        stdin.extend_from_slice(message);
    }
    Ok(Some(Batch { stdin: Arc::from(stdin), messages: taken.len() as u64 + 1 }))
}

/// Writes the batch's outcome for the callers it took (before the channel is released).
pub fn settle(lease: &mut dyn Lease, batch: Option<&Batch>, code: ExitCode) {
    if batch.is_some_and(|b| b.messages > 1)
        && let Err(e) = lease.settle_batch(code.code())
    {
        crate::ui::warn(format!(
            "the batch's outcome was not written ({e:#}): the callers it took will run their messages again"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separator_escapes() {
        assert_eq!(unescape("\\n---\\n"), b"\n---\n");
        assert_eq!(unescape("a\\tb\\\\n\\x"), b"a\tb\\n\\x");
    }
}
