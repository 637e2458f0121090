//! The `seinode-tls` binary: parse the command line and run it.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = seinode_tls::cli::Cli::parse();
    seinode_tls::cli::run(cli)
}
