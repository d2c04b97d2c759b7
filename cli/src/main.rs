//! `mts`: publish and receive messages and files through MiniToolStream,
//! and administer its consumers and subjects, with exit codes a script can
//! rely on (see `mts --help`).

#![forbid(unsafe_code)]

mod args;
mod auth;
mod commands;
mod connect;
mod failure;
mod output;
mod progress;
mod receive;
mod time;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Warnings, and the client's word when a stream reopens, on stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MTS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,mts_client=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let args = args::Args::parse();
    match commands::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("mts: {failure}");
            failure.exit_code()
        }
    }
}
