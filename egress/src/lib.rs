//! MiniToolStream egress: tells subscribers when new messages are committed,
//! hands out messages after a durable consumer's position and moves that
//! position when the consumer acknowledges.

#![forbid(unsafe_code)]

mod error;
mod notify;
mod service;

use std::sync::Arc;
use std::time::Duration;

use mts_proto::pb::egress_service_server::EgressServiceServer;
use mts_proto::service_names;
use mts_shared::config::Config;
use mts_shared::health::Health;
use mts_shared::{dependencies, server};
use tokio::net::TcpListener;

pub use error::Error;
pub use service::Egress;

/// The gRPC port of the deployment guide.
pub const DEFAULT_PORT: u16 = 50052;

/// Connects to the dependencies and serves the egress RPCs on `listener`
/// until `shutdown` completes, then drains: open Subscribe streams end with
/// UNAVAILABLE so clients reconnect elsewhere.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (store, blobs) = dependencies::connect(&config)
        .await
        .map_err(server::Error::from)?;
    let (health, health_server) = Health::new(service_names::EGRESS).await;
    let monitor = tokio::spawn(health.clone().monitor(
        store.clone(),
        blobs.clone(),
        Duration::from_millis(config.health_check_interval_ms),
    ));
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let watchers = Arc::new(notify::SubjectWatchers::new(
        store.clone(),
        Duration::from_secs(config.long_poll_seconds),
    ));
    let egress = Egress::new(store, blobs, watchers, draining);
    let router = server::router(health_server)?.add_service(EgressServiceServer::new(egress));
    tracing::info!(addr = %listener.local_addr().map_err(server::Error::from)?, "egress listening");
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let result = server::run(router, listener, health, grace, shutdown, move || {
        draining_tx.send_replace(true);
    })
    .await;
    monitor.abort();
    result.map_err(Error::from)
}
