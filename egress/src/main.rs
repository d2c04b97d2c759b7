//! The egress binary: configuration, logging, serve until SIGTERM.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mts_runtime::server::main("egress", mts_egress::DEFAULT_PORT, mts_egress::run).await
}
