//! The gRPC server both services run: health, reflection (v1 and v1alpha, so
//! grpcurl 1.8 works) and a tracing span per call, on a listener bound here or
//! handed in by a test.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;

use crate::config::Config;
use crate::dependencies;

/// Why a service could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A dependency stayed unreachable during start-up.
    #[error(transparent)]
    Dependencies(#[from] dependencies::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything but the service itself: health and reflection.
pub fn router(health: HealthServer<HealthService>) -> Result<Router, Error> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(mts_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can print the google.rpc.BadRequest of a refused call.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(Server::builder()
        .tcp_nodelay(true)
        // Keeps idle subscriber streams alive through proxies and finds dead peers.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .trace_fn(|request| tracing::info_span!("grpc", rpc = %request.uri().path()))
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?))
}

/// Binds the configured host and port.
pub async fn bind(config: &Config) -> std::io::Result<TcpListener> {
    let host: std::net::IpAddr = config.server_host.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server_host: {e}"),
        )
    })?;
    TcpListener::bind(SocketAddr::new(host, config.server_port)).await
}

/// Serves `router` on `listener` until `shutdown` completes and in-flight
/// calls have finished.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// Runs a service until `shutdown` completes, then drains: health turns
/// NOT_SERVING, `on_drain` tells long-lived streams to end, the listener
/// stops accepting and in-flight calls get up to `grace` to finish.
pub async fn run(
    router: Router,
    listener: TcpListener,
    health: crate::health::Health,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_drain: impl FnOnce() + Send + 'static,
) -> Result<(), Error> {
    let (drain_started, draining) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("draining");
        health.drain().await;
        on_drain();
        let _ = drain_started.send(());
    };
    let serving = serve(router, listener, signal);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => Ok(result?),
        () = async {
            if draining.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(?grace, "grace period over; exiting with calls still in flight");
            Ok(())
        }
    }
}

/// The whole life of a service binary: configuration (defaults, `--config
/// FILE`, environment), logging, binding, `run` until SIGTERM, exit code.
pub async fn main<Fut, E>(
    name: &str,
    default_port: u16,
    run: impl FnOnce(Config, TcpListener, crate::shutdown::Signal) -> Fut,
) -> std::process::ExitCode
where
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use std::process::ExitCode;
    let config = match crate::config::from_process(default_port) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init(&config);
    let listener = match bind(&config).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(%err, port = config.server_port, "cannot bind the gRPC port");
            return ExitCode::FAILURE;
        }
    };
    match run(config, listener, crate::shutdown::signal()).await {
        Ok(()) => {
            tracing::info!("{name} stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(%err, "{name} stopped");
            ExitCode::FAILURE
        }
    }
}
