//! The ingress binary: load config, start logging, serve until SIGTERM.

use std::process::ExitCode;

use mts_shared::{config, server, shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::from_process(mts_ingress::DEFAULT_PORT) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("ingress: {err}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config);
    let listener = match server::bind(&config).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(%err, port = config.server_port, "cannot bind the gRPC port");
            return ExitCode::FAILURE;
        }
    };
    match mts_ingress::run(config, listener, shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "ingress stopped");
            ExitCode::FAILURE
        }
    }
}
