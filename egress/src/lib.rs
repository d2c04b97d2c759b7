//! MiniToolStream egress: tells subscribers when new messages are committed,
//! hands out messages after a durable consumer's position and moves that
//! position when the consumer acknowledges.

#![forbid(unsafe_code)]

mod delivery;
mod error;
mod handlers;
mod maintenance;
mod notify;
mod rules;
mod segments;
mod service;
mod tiering;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use mts_config::Config;
use mts_proto::pb::egress_service_server::EgressServiceServer;
use mts_proto::service_names;
use mts_runtime::server;
use tokio::net::TcpListener;

pub use error::Error;
pub use handlers::Egress;

/// The gRPC port of the deployment guide.
pub const DEFAULT_PORT: u16 = 50052;

/// Connects to the dependencies and serves the egress RPCs on `listener`
/// until `shutdown` completes, then drains: open Subscribe streams end with
/// UNAVAILABLE so clients reconnect elsewhere.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), server::Error> {
    let mut setup = server::Setup::new(&config, service_names::EGRESS).await?;
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let watchers = Arc::new(notify::SubjectWatchers::new(
        setup.store.clone(),
        Duration::from_secs(config.egress.long_poll_seconds),
    ));
    let egress = Egress::new(
        setup.store.clone(),
        setup.object_store.clone(),
        watchers,
        draining,
        &config,
        setup.auth.clone(),
        setup.metrics.clone(),
    );
    let maintenance = tokio::spawn(
        maintenance::Maintenance::new(
            setup.store.clone(),
            setup.object_store.clone(),
            &config,
            setup.metrics.clone(),
        )
        .run(),
    );
    let tiering = config.tiering.tiering_enabled.then(|| {
        tokio::spawn(
            tiering::Tiering::new(
                setup.store.clone(),
                setup.object_store.clone(),
                &config,
                setup.metrics.clone(),
            )
            .run(),
        )
    });
    let router = setup
        .router()?
        .add_service(EgressServiceServer::new(egress));
    let served = setup
        .serve(router, listener, shutdown, move || {
            draining_tx.send_replace(true);
        })
        .await;
    maintenance.abort();
    if let Some(tiering) = tiering {
        tiering.abort();
    }
    served
}
