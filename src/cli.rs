//! The command line, as clap derive structs. The doc comments are the `--help` text.

use clap::{Args, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Run one command per channel at a time: a per-channel lock with a fair queue,
/// a timeout that stops the whole process group, and the model's session id kept
/// per channel.
#[derive(Debug, Parser)]
#[command(name = "chan-run", version, propagate_version = true)]
pub struct Cli {
    /// Where locks, queues and state live [default: ~/.local/state/chan-run]
    #[arg(long, global = true, env = "CHAN_RUN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Keep locks, queues and state on a PostgreSQL server shared by several hosts
    /// (postgres://USER@HOST[:PORT]/DB); overrides --state-dir
    #[arg(long, global = true, env = "CHAN_RUN_STORE", hide_env_values = true, value_name = "URL")]
    pub store: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

// Deferred: a subcommand's arguments are built only when it is the one parsed (`run`
// pays for its own ~30 arguments, not every subcommand's); completions and the man page
// take `full_command`, in which they are built as without deferral.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Command {
    /// Run COMMAND holding CHANNEL's lock; waits its turn if the channel is busy.
    Run(RunArgs),
    /// Show every channel (or those named): running or idle, holder, queue, session, last run.
    Status(StatusArgs),
    /// Forget CHANNEL's session id, so its next run starts a fresh conversation.
    Reset(ResetArgs),
    /// Show CHANNEL's last runs, newest first.
    History(HistoryArgs),
    /// Remove the records, logs and lock files of channels idle for longer than DUR.
    Gc(GcArgs),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the man page (roff).
    Man,
}

// No doc comment on an `Args` struct: with the subcommands deferred, its `about` would
// replace the subcommand's own (the flattened `WaitArgs` and `CollectArgs` too).
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// The whole command tree as clap builds it without deferral: each subcommand's own
/// arguments before the global ones it inherits, so completion scripts and the man page
/// list them in that order.
pub fn full_command() -> clap::Command {
    use clap::CommandFactory;
    fn built<A: Args>(c: clap::Command) -> clap::Command {
        A::augment_args(c).defer(|c| c)
    }
    Cli::command()
        .mut_subcommand("run", built::<RunArgs>)
        .mut_subcommand("status", built::<StatusArgs>)
        .mut_subcommand("reset", built::<ResetArgs>)
        .mut_subcommand("history", built::<HistoryArgs>)
        .mut_subcommand("gc", built::<GcArgs>)
        .mut_subcommand("completions", built::<CompletionsArgs>)
        .mut_subcommand("man", |c| c.defer(|c| c))
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The channel
    #[arg(value_name = "CHANNEL", value_parser = utf8())]
    pub channel: String,

    /// How many runs to show
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 20)]
    pub count: usize,

    /// Print JSON Lines instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Remove channels whose last run ended more than DUR ago (and that nobody holds or waits for)
    #[arg(long, value_name = "DUR", value_parser = crate::duration::parse)]
    pub idle_for: Duration,

    /// Only list what would be removed
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only these channels
    #[arg(value_name = "CHANNEL", value_parser = utf8())]
    pub channels: Vec<String>,

    /// Print JSON (`{"version": 1, "channels": [...]}`) instead of a table
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,

    /// Print metrics in Prometheus' text exposition format (for node_exporter's textfile
    /// collector, or a scrape)
    #[arg(long)]
    pub prometheus: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The channel whose session id to forget
    #[arg(value_name = "CHANNEL", value_parser = utf8())]
    pub channel: String,

    #[command(flatten)]
    pub wait: WaitArgs,
}

// How long to wait for a busy channel, and what to exit with if it stays busy.
#[derive(Debug, Args, Clone)]
pub struct WaitArgs {
    /// If the channel is busy (held, or callers waiting), exit with the busy code at once
    #[arg(short = 'n', long, conflicts_with = "wait")]
    pub no_wait: bool,

    /// Give up waiting for a busy channel after DUR and exit with the busy code
    #[arg(short = 'w', long, value_name = "DUR", allow_negative_numbers = true, value_parser = crate::duration::parse)]
    pub wait: Option<Duration>,

    /// The busy code, as `flock -E`
    #[arg(short = 'E', long, value_name = "N", default_value_t = crate::exit_code::BUSY_DEFAULT)]
    pub conflict_exit_code: u8,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The channel: runs on one channel never overlap
    #[arg(short, long, env = "CHAN_RUN_CHANNEL", value_name = "NAME", value_parser = utf8())]
    pub channel: String,

    /// The command's time limit (300, 0.5, 90s, 5m, 1h30m); 0 = none
    #[arg(short, long, value_name = "DUR", default_value = "5m", allow_negative_numbers = true, value_parser = crate::duration::parse)]
    pub timeout: Duration,

    /// After the timeout's SIGTERM, send SIGKILL this much later
    #[arg(short, long, value_name = "DUR", default_value = "10s", allow_negative_numbers = true, value_parser = crate::duration::parse)]
    pub kill_after: Duration,

    #[command(flatten)]
    pub wait: WaitArgs,

    /// Also hold a seat in pool NAME, shared by every channel naming it: at most N runs
    /// hold its seats at once (repeatable; taken after the channel, in name order)
    #[arg(long = "pool", env = "CHAN_RUN_POOL", value_name = "NAME:N", value_parser = crate::pool::parse)]
    pub pools: Vec<crate::pool::Pool>,

    /// When the channel has a stored session id, append `FLAG ID` to the command (e.g. --session-arg=--resume)
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub session_arg: Option<OsString>,

    /// JSON pointer of the session id in the command's JSON output [default: /session_id, or the profile's]
    #[arg(long, value_name = "PTR", value_parser = crate::session::parse_pointer)]
    pub session_key: Option<String>,

    /// Neither pass (no flag, no CHAN_RUN_SESSION_ID) nor record a session id
    #[arg(long, conflicts_with = "session_arg")]
    pub no_session: bool,

    /// After N failures in a row, drop the stored session id
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub fresh_after: Option<u64>,

    /// No notes of chan-run's own on stderr (errors still print)
    #[arg(short, long)]
    pub quiet: bool,

    /// The model CLI's ways: how its session is passed and found, how its failures read
    #[arg(long, env = "CHAN_RUN_PROFILE", value_name = "NAME")]
    pub profile: Option<crate::profile::Profile>,

    /// When the model no longer knows the stored session: run again at once without it,
    /// or fail [default: fresh with --profile]
    #[arg(long, value_name = "WHAT", requires = "profile")]
    pub on_stale_session: Option<crate::profile::OnStale>,

    #[command(flatten)]
    pub collect: Box<CollectArgs>,

    /// Refuse to start (exit 77) once the channel's runs have cost USD this UTC day, as
    /// the model CLI reports its cost
    #[arg(long, value_name = "USD", value_parser = crate::spend::parse_usd)]
    pub budget: Option<f64>,

    /// As --budget, for the runs of every channel of the pools this run names
    #[arg(long, value_name = "USD", value_parser = crate::spend::parse_usd, requires = "pools")]
    pub pool_budget: Option<f64>,

    /// Run again, up to N times, when the profile reads an overloaded, rate-limited or
    /// 5xx API, after a back-off; the channel stays held
    #[arg(long, value_name = "N", requires = "profile", conflicts_with = "no_session", value_parser = clap::value_parser!(u32).range(0..=20))]
    pub retry: Option<u32>,

    /// The command and its arguments
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

// `--collect`: a burst of queued messages as one run (README "Collect").
#[derive(Debug, Args, Clone)]
pub struct CollectArgs {
    /// Send the message (--message, else stdin, at most 1 MiB) on the command's stdin, and
    /// answer the --collect callers queued right behind with the same command in the same run
    #[arg(long)]
    pub collect: bool,

    /// The message (instead of reading it from stdin)
    #[arg(long, value_name = "TEXT", requires = "collect", allow_hyphen_values = true)]
    pub message: Option<OsString>,

    /// When this caller's turn comes, wait until no new message has come for DUR (at most 10s)
    #[arg(long, value_name = "DUR", requires = "collect", allow_negative_numbers = true, value_parser = crate::duration::parse)]
    pub collect_window: Option<Duration>,

    /// Answer at most N messages in one run (this caller's included)
    #[arg(long, value_name = "N", requires = "collect", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub collect_max: u32,

    /// What joins the messages on the command's stdin (\n, \t and \\ understood) [default: a blank line]
    #[arg(long, value_name = "STR", requires = "collect", allow_hyphen_values = true)]
    pub collect_separator: Option<String>,

    /// The code of a caller whose message was answered by the run of an earlier one
    #[arg(long, value_name = "N", requires = "collect", default_value_t = crate::exit_code::COLLECTED_DEFAULT)]
    pub collected_exit_code: u8,
}

/// A channel name must be UTF-8; clap's own message for that does not name the flag.
fn utf8() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser as _;
    clap::builder::OsStringValueParser::new().try_map(|name: std::ffi::OsString| {
        name.into_string().map_err(|_| "the channel name is not valid UTF-8; channel names are UTF-8 text")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        full_command().debug_assert();
    }

    #[test]
    fn command_keeps_its_own_flags() {
        let cli = Cli::try_parse_from(["chan-run", "run", "-c", "x", "--", "ls", "-t", "--help"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("not a run") };
        assert_eq!(run.command, ["ls", "-t", "--help"]);
        assert_eq!(run.timeout, Duration::from_secs(300));
    }
}
