//! `mts-backup`: back up and restore MiniToolStream (see `mts-backup --help`).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = mts_backup::Args::parse();
    match mts_backup::run(args).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("mts-backup: {err}");
            err.exit_code()
        }
    }
}
