//! chan-run: run one command per channel at a time. `main` parses, dispatches, and
//! turns the outcome into an exit code, printing an error once.

mod channel;
mod cli;
mod cmd;
mod control;
mod duration;
mod exit_code;
mod orphans;
mod procfs;
mod pump;
mod store;
mod supervise;
mod sys;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("chan-run: {e:#}");
            ExitCode::from(exit_code::CHAN_RUN_FAILED)
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<u8> {
    let control = control::Control::install()?;
    let store = store::open(cli.state_dir.as_deref())?;
    match cli.command {
        cli::Command::Run(args) => cmd::run::run(store.as_ref(), args, &control),
    }
}

/// clap's errors, as one line and exit 125; `--help` and `--version` print and exit 0.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    // clap's message up to its usage block, folded onto one line.
    let text = e.render().to_string();
    let message: Vec<&str> =
        text.lines().map(str::trim).take_while(|l| !l.is_empty() && !l.starts_with("Usage:")).collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    eprintln!("chan-run: {message}; see 'chan-run --help'");
    ExitCode::from(exit_code::CHAN_RUN_FAILED)
}
