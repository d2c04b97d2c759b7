//! `mts-bench`: benchmark scenarios against running MiniToolStream services.
//! Each prints its configuration and figures as one JSON line; the services'
//! peak memory is read from /proc. scripts/bench.sh builds, starts and runs.

#![forbid(unsafe_code)]

mod large_payloads;
mod process;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "mts-bench")]
struct Args {
    #[arg(long, env = "MTS_INGRESS", default_value = "http://127.0.0.1:50051")]
    ingress: String,
    #[arg(long, env = "MTS_EGRESS", default_value = "http://127.0.0.1:50052")]
    egress: String,
    /// PID of the ingress process, for its memory figures.
    #[arg(long)]
    ingress_pid: Option<u32>,
    /// PID of the egress process.
    #[arg(long)]
    egress_pid: Option<u32>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Streams payloads in with PublishStream and back out with FetchPayload,
    /// verifying SHA-256, several at once.
    LargePayloads {
        /// Payload size in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Transfers running at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let services = process::Services::new(args.ingress_pid, args.egress_pid);
    let result = match args.scenario {
        Scenario::LargePayloads { mib, concurrency } => {
            large_payloads::run(&args.ingress, &args.egress, mib, concurrency, &services).await
        }
    };
    match result {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("mts-bench: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
