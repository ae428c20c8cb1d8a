//! `zipar-studio`: the command line; with no subcommand, usage until the app exists.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use zipar_studio::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    match cli::run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
