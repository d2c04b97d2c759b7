//! MiniToolStream ingress: accepts messages from publishers, stores small
//! payloads inline in Tarantool and large ones in the object store, and
//! returns each message's per-subject sequence.

#![forbid(unsafe_code)]

mod error;
mod publish;
mod rate_limit;
mod service;
mod trace;
mod upload_slots;

use std::sync::Arc;

use mts_config::Config;
use mts_proto::pb::ingress_service_server::IngressServiceServer;
use mts_proto::service_names;
use mts_runtime::server;
use tokio::net::TcpListener;

pub use error::Error;
pub use publish::Ingress;

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
) -> Result<(), server::Error> {
    let mut setup = server::Setup::new(&config, service_names::INGRESS).await?;
    let mut ingress = Ingress::new(
        setup.store.clone(),
        setup.object_store.clone(),
        setup.auth.clone(),
        &config,
    )
    .with_metrics(setup.metrics.clone());
    let limiter = (config.ingress.publish_rate_per_second > 0).then(|| {
        let burst = match config.ingress.publish_burst {
            0 => config.ingress.publish_rate_per_second,
            burst => burst,
        };
        Arc::new(rate_limit::Limiter::new(
            config.ingress.publish_rate_per_second,
            burst,
        ))
    });
    if let Some(limiter) = &limiter {
        ingress = ingress.with_rate_limit(limiter.clone());
    }
    let max_message = usize::try_from(config.ingress.max_payload_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(ENVELOPE_BYTES);
    let service = IngressServiceServer::new(ingress).max_decoding_message_size(max_message);
    let router = match limiter {
        Some(limiter) => setup.router()?.add_service(rate_limit::RateLimited::new(
            service,
            limiter,
            setup.auth.clone(),
        )),
        None => setup.router()?.add_service(service),
    };
    setup.serve(router, listener, shutdown, || {}).await
}
