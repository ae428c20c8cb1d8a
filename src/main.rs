//! `zipar-studio`: with no subcommand opens the app; otherwise the headless commands.

use std::process::ExitCode;

use clap::Parser;
use zipar_studio::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    match cli::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
