//! chan-run: run one command per channel at a time. `main` parses, dispatches, and
//! turns the outcome into an exit code, printing an error once.

// On glibc Linux the process starts at `sys::main`, std's runtime set-up without the
// main thread's stack-overflow handler (one eighth of a run's instructions; see there).
#![cfg_attr(all(not(test), target_os = "linux", target_env = "gnu"), no_main)]

mod channel;
mod cli;
mod cmd;
mod control;
mod duration;
mod exit_code;
mod history;
mod orphans;
mod pool;
mod procfs;
mod profile;
mod pump;
mod session;
mod spend;
mod state;
mod store;
mod supervise;
mod sys;
mod ui;

#[global_allocator]
static ALLOCATOR: sys::Allocator = sys::Allocator::new();

use clap::{CommandFactory, FromArgMatches};
use exit_code::ExitCode;

#[cfg(not(all(not(test), target_os = "linux", target_env = "gnu")))]
fn main() -> std::process::ExitCode {
    chan_run().into()
}

fn chan_run() -> ExitCode {
    // `Cli::try_parse`, but the parser's tables are left to the process's exit rather
    // than freed one by one (hundreds of `free` calls, ~27k instructions of every run).
    let mut command = <cli::Cli as CommandFactory>::command();
    let parsed = match command.try_get_matches_from_mut(std::env::args_os()) {
        Ok(mut matches) => <cli::Cli as FromArgMatches>::from_arg_matches_mut(&mut matches)
            .map_err(|e| e.format(&mut command)),
        Err(e) => Err(e),
    };
    std::mem::forget(command);
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            ui::say(format_args!("{e:#}"));
            match e.downcast_ref::<store::Unavailable>() {
                Some(_) => ExitCode::Unavailable,
                None => ExitCode::Failed,
            }
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    use cli::Command;
    let dir = store::Location { store: cli.store.as_deref(), state_dir: cli.state_dir.as_deref() };
    match cli.command {
        // These two create nothing: with no state directory yet there is nothing to show.
        Command::Status(args) => cmd::status::status(store::open_existing(dir)?.as_deref(), args),
        Command::History(args) => cmd::history::history(store::open_existing(dir)?.as_deref(), args),
        Command::Completions(cli::CompletionsArgs { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli::full_command(), "chan-run", &mut script);
            ui::write_out(&String::from_utf8_lossy(&script))?;
            Ok(ExitCode::OK)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cli::full_command()).render(&mut page)?;
            ui::write_out(&String::from_utf8_lossy(&page))?;
            Ok(ExitCode::OK)
        }
        Command::Run(args) => {
            let control = control::Control::install()?;
            cmd::run::run(store::open(dir)?.as_ref(), args, control)
        }
        Command::Reset(args) => {
            let control = control::Control::install()?;
            cmd::reset::reset(store::open(dir)?.as_ref(), args, control)
        }
        Command::Gc(args) => {
            let control = control::Control::install()?; // SIGXFSZ ignored while rewriting
            cmd::gc::gc(store::open(dir)?.as_ref(), args, control)
        }
    }
}

/// clap's errors, as one line and exit 125; `--help` and `--version` print and exit 0.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::OK;
    }
    // clap's message up to its usage block, folded onto one line.
    let text = e.render().to_string();
    let message: Vec<&str> =
        text.lines().map(str::trim).take_while(|l| !l.is_empty() && !l.starts_with("Usage:")).collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    ui::say(format_args!("{message}; see 'chan-run --help'"));
    ExitCode::Failed
}
