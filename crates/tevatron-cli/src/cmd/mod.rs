//! One module per command; each turns its flags into library options and calls the library.

mod convert;
mod encode;
mod eval;
mod search;
mod train;

use anyhow::Result;

use crate::args::{Cli, Command};

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(&a),
        Command::Encode(a) => encode::run(&a),
        Command::Search(a) => search::run(&a),
        Command::Eval(a) => eval::run(&a),
        Command::Convert(a) => convert::run(&a),
    }
}
