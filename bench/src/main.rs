//! `mts-bench`: benchmark scenarios against running MiniToolStream services,
//! NATS JetStream as the peer, and raw Tarantool and S3 as the physical
//! references. Each run prints its configuration and figures as one JSON
//! line: throughput, latency percentiles from an HDR histogram, errors, and
//! the peak RSS and CPU seconds of the server processes (from /proc).
//! scripts/bench.sh builds, starts everything and runs them all.

#![forbid(unsafe_code)]

mod capacity;
mod delivery;
mod drain;
mod fanout;
mod large_payloads;
mod process;
mod publish;
mod report;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "mts-bench")]
struct Args {
    #[arg(long, env = "MTS_INGRESS", default_value = "http://127.0.0.1:50051")]
    ingress: String,
    #[arg(long, env = "MTS_EGRESS", default_value = "http://127.0.0.1:50052")]
    egress: String,
    /// The NATS server with JetStream, for the peer runs.
    #[arg(long, env = "MTS_BENCH_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// A server process to measure, as name=PID; repeatable.
    #[arg(long = "pid", value_parser = name_pid)]
    pids: Vec<(String, u32)>,
    #[command(subcommand)]
    scenario: Scenario,
}

fn name_pid(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text.split_once('=').ok_or("expected name=PID")?;
    Ok((
        name.to_owned(),
        pid.parse().map_err(|e| format!("PID: {e}"))?,
    ))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum System {
    /// MiniToolStream.
    Ours,
    /// MiniToolStream, publishing over PublishMany streams.
    OursMany,
    /// NATS JetStream, file storage, one replica.
    Jetstream,
    /// The publish stored procedure called straight, pipelined.
    Tarantool,
    /// S3 PutObject straight to the same server.
    S3,
    /// NATS JetStream's Object Store (file storage, one replica): the peer
    /// for large payloads.
    NatsObjectStore,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Ours => "minitoolstream",
            Self::OursMany => "minitoolstream-publishmany",
            Self::Jetstream => "jetstream",
            Self::Tarantool => "tarantool-raw",
            Self::S3 => "s3-raw",
            Self::NatsObjectStore => "nats-object-store",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// 1: closed-loop publishes, each awaiting its acknowledgement.
    Publish {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// 2: publish-to-delivery latency at a fixed rate, one push subscriber.
    Delivery {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// 3: large publishes (PublishStream) against raw S3 PutObject.
    LargePublish {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long, default_value_t = 16)]
        mib: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// 4: many Subscribe streams on one subject on one egress.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        #[arg(long, default_value_t = 50)]
        messages: u64,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
    /// 5: streams payloads in with PublishStream and back out with
    /// FetchPayload, verifying SHA-256, several at once (or the same through
    /// NATS's Object Store, or straight to S3).
    LargePayloads {
        #[arg(long, value_enum, default_value = "ours")]
        system: System,
        /// Payload size in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Transfers running at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// 7: far more messages than Tarantool's memory holds, then one
    /// consumer replaying all of them from sequence 1, payloads verified.
    Capacity {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 5_000_000)]
        messages: u64,
    },
    /// 6: competing consumers draining a backlog with acks.
    Drain {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        #[arg(long, default_value_t = 4)]
        consumers: usize,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
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

async fn run(args: Args) -> Result<String, String> {
    // The load generator itself too: on a shared machine its CPU is not the
    // servers'.
    let mut pids = args.pids.clone();
    pids.push(("client".to_owned(), std::process::id()));
    let services = process::Services::new(pids);
    // A subject of its own per run, so runs never see each other's messages.
    let subject = |name: &str| format!("bench.{name}.{}", std::process::id());
    let unsupported = |system: System| {
        Err(format!(
            "{} does not take part in this scenario",
            system.name()
        ))
    };
    services.reset_peaks();
    let before = services.usage();
    let (scenario, system, config, size, outcome) = match args.scenario {
        Scenario::LargePayloads {
            system,
            mib,
            concurrency,
        } => {
            let peer = match system {
                System::Ours => large_payloads::Peer::ours(&args.ingress, &args.egress).await?,
                System::NatsObjectStore => {
                    large_payloads::Peer::nats_object_store(&args.nats).await?
                }
                System::S3 => large_payloads::Peer::S3(
                    mts_storage::object_store::ObjectStore::new(&settings()?),
                ),
                _ => return unsupported(system),
            };
            return large_payloads::run(peer, system.name(), mib, concurrency, &services).await;
        }
        Scenario::Capacity { size, messages } => {
            let subject = subject("capacity");
            return capacity::run(
                &args.ingress,
                &args.egress,
                &subject,
                size,
                messages,
                &services,
            )
            .await;
        }
        Scenario::Publish {
            system,
            size,
            concurrency,
            seconds,
        } => {
            let duration = Duration::from_secs(seconds);
            let subject = subject("publish");
            let outcome = match system {
                System::Ours => {
                    publish::ours(&args.ingress, &subject, size, concurrency, duration).await?
                }
                System::OursMany => {
                    publish::ours_many(&args.ingress, &subject, size, concurrency, duration).await?
                }
                System::Jetstream => {
                    publish::jetstream(&args.nats, &subject, size, concurrency, duration).await?
                }
                System::Tarantool => {
                    let store = mts_storage::store::Store::connect(&settings()?)
                        .await
                        .map_err(|e| format!("Tarantool: {e}"))?;
                    publish::tarantool(store, &subject, size, concurrency, duration).await
                }
                System::S3 | System::NatsObjectStore => return unsupported(system),
            };
            (
                "1-publish",
                system,
                json!({"size": size, "concurrency": concurrency, "seconds": seconds}),
                size,
                outcome,
            )
        }
        Scenario::Delivery {
            system,
            size,
            rate,
            seconds,
        } => {
            let duration = Duration::from_secs(seconds);
            let subject = subject("delivery");
            let ours = |publish| {
                delivery::ours(
                    &args.ingress,
                    &args.egress,
                    &subject,
                    size,
                    rate,
                    duration,
                    publish,
                )
            };
            let outcome = match system {
                System::Ours => ours(delivery::Publish::Unary).await?,
                System::OursMany => ours(delivery::Publish::Many).await?,
                System::Jetstream => {
                    delivery::jetstream(&args.nats, &subject, size, rate, duration).await?
                }
                _ => return unsupported(system),
            };
            (
                "2-delivery",
                system,
                json!({"size": size, "rate": rate, "seconds": seconds}),
                size,
                outcome,
            )
        }
        Scenario::LargePublish {
            system,
            mib,
            concurrency,
            seconds,
        } => {
            let duration = Duration::from_secs(seconds);
            let size = mib << 20;
            let subject = subject("large");
            let outcome = match system {
                System::Ours => {
                    publish::ours_streamed(&args.ingress, &subject, size, concurrency, duration)
                        .await?
                }
                System::S3 => {
                    let object_store = mts_storage::object_store::ObjectStore::new(&settings()?);
                    publish::s3(object_store, &subject, size, concurrency, duration).await
                }
                System::NatsObjectStore => {
                    publish::nats_object_store(&args.nats, size, concurrency, duration).await?
                }
                _ => return unsupported(system),
            };
            (
                "3-large-publish",
                system,
                json!({"mib": mib, "concurrency": concurrency, "seconds": seconds}),
                size,
                outcome,
            )
        }
        Scenario::Fanout {
            streams,
            messages,
            interval_ms,
        } => {
            let outcome = fanout::ours(
                &args.ingress,
                &args.egress,
                &subject("fanout"),
                streams,
                messages,
                Duration::from_millis(interval_ms),
            )
            .await?;
            (
                "4-fanout",
                System::Ours,
                json!({"streams": streams, "messages": messages, "interval_ms": interval_ms}),
                64,
                outcome,
            )
        }
        Scenario::Drain {
            system,
            size,
            messages,
            consumers,
        } => {
            let subject = subject("drain");
            let outcome = match system {
                System::Ours => {
                    drain::ours(
                        &args.ingress,
                        &args.egress,
                        &subject,
                        size,
                        messages,
                        consumers,
                    )
                    .await?
                }
                System::Jetstream => {
                    drain::jetstream(&args.nats, &subject, size, messages, consumers).await?
                }
                _ => return unsupported(system),
            };
            (
                "6-drain",
                system,
                json!({"size": size, "messages": messages, "consumers": consumers}),
                size,
                outcome,
            )
        }
    };
    let run = report::Run {
        scenario,
        system: system.name(),
        config,
        messages: outcome.messages,
        errors: outcome.errors,
        bytes_per_message: size as u64,
        elapsed: outcome.elapsed,
        latencies: &outcome.latencies,
    };
    Ok(run.to_json(&services, &before).to_string())
}

/// Tarantool and S3 settings for the raw references: the services' own
/// variables (TARANTOOL_ADDRESS, MINIO_*).
fn settings() -> Result<mts_config::Config, String> {
    mts_config::Config::load(0, None, std::env::vars()).map_err(|e| e.to_string())
}
