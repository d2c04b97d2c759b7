//! MiniToolStream ingress: accepts messages from publishers, stores small
//! payloads inline in Tarantool and large ones in the object store, and
//! returns each message's per-subject sequence.

#![forbid(unsafe_code)]

mod error;
mod service;

use mts_proto::pb::ingress_service_server::IngressServiceServer;
use mts_proto::service_names;
use mts_shared::config::Config;
use mts_shared::health::Health;
use mts_shared::{dependencies, server};
use tokio::net::TcpListener;

pub use error::Error;
pub use service::Ingress;

/// The gRPC port of the deployment guide.
pub const DEFAULT_PORT: u16 = 50051;

/// Room for headers and framing above the largest payload.
const ENVELOPE_BYTES: usize = 64 * 1024;

/// Connects to the dependencies and serves Publish on `listener` until
/// `shutdown` completes, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (store, blobs) = dependencies::connect(&config)
        .await
        .map_err(server::Error::from)?;
    let (health, health_server) = Health::new(service_names::INGRESS).await;
    let monitor = tokio::spawn(health.clone().monitor(
        store.clone(),
        blobs.clone(),
        std::time::Duration::from_millis(config.health_check_interval_ms),
    ));
    let ingress = Ingress::new(store, blobs, &config);
    let max_message = usize::try_from(config.max_payload_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(ENVELOPE_BYTES);
    let router = server::router(health_server)?
        .add_service(IngressServiceServer::new(ingress).max_decoding_message_size(max_message));
    tracing::info!(addr = %listener.local_addr().map_err(server::Error::from)?, "ingress listening");
    let grace = std::time::Duration::from_secs(config.shutdown_grace_seconds);
    let result = server::run(router, listener, health, grace, shutdown, || {}).await;
    monitor.abort();
    result.map_err(Error::from)
}
