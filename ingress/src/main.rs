//! The ingress binary: configuration, logging, serve until SIGTERM.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    mts_runtime::server::main("ingress", mts_ingress::DEFAULT_PORT, mts_ingress::run).await
}
