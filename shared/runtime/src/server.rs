//! The gRPC server both services run: dependencies, health, reflection (v1
//! and v1alpha, so grpcurl 1.8 works), metrics and a tracing span per call, on
//! a listener bound here or handed in by a test, drained on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;

use std::sync::Arc;

use tower::layer::util::{Identity, Stack};

use crate::dependencies;
use crate::health::Health;
use crate::metrics::{Metrics, MetricsLayer};
use mts_config::Config;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;

/// Largest HTTP/2 frame a peer may send (the protocol's default is 16 KiB).
const MAX_FRAME_BYTES: u32 = 256 * 1024;

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
    /// The auth settings are unusable.
    #[error(transparent)]
    Auth(#[from] crate::auth::ConfigError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    /// `Setup::router` was called twice.
    #[error("the router was already built")]
    RouterTwice,
}

/// The router type every service serves: gRPC routes behind the metrics layer.
pub type ServiceRouter = Router<Stack<MetricsLayer, Identity>>;

/// What both services set up before adding their own gRPC service: the
/// dependencies, health, metrics and the admin listener.
pub struct Setup {
    /// The Tarantool store.
    pub store: Store,
    /// The S3 object store.
    pub object_store: ObjectStore,
    /// This process's metrics.
    pub metrics: Arc<Metrics>,
    /// Checks callers' tokens.
    pub auth: Arc<crate::auth::Authenticator>,
    tls: Option<Arc<crate::tls::Reloading>>,
    health: Health,
    health_server: Option<HealthServer<HealthService>>,
    admin: TcpListener,
    config: Config,
}

impl Setup {
    /// Connects to Tarantool and the object store (retrying until
    /// `startup_timeout_seconds`) and binds the admin port, for the gRPC
    /// service `name`.
    pub async fn new(config: &Config, name: &'static str) -> Result<Self, Error> {
        let auth = Arc::new(crate::auth::Authenticator::from_config(config)?);
        if !config.auth.jwt_jwks_url.is_empty()
            && let Err(err) = auth.refresh().await
        {
            // Not fatal: an identity provider starting with us is looked up
            // again when the first token names a key.
            tracing::warn!(%err, "verification keys not loaded yet");
        }
        let tls = crate::tls::Reloading::from_config(config)?;
        let metrics = Metrics::new();
        let (store, object_store) = dependencies::connect(config).await?;
        let observer: Arc<dyn mts_storage::Observer> = metrics.clone();
        let (store, object_store) = (
            store.with_observer(Arc::clone(&observer)),
            object_store.with_observer(observer),
        );
        let admin =
            TcpListener::bind(SocketAddr::new(host(config)?, config.server.metrics_port)).await?;
        let (health, health_server) = Health::new(name).await;
        Ok(Self {
            store,
            object_store,
            metrics,
            auth,
            tls,
            health,
            health_server: Some(health_server),
            admin,
            config: config.clone(),
        })
    }

    /// Health, reflection (v1 and v1alpha, so grpcurl 1.8 works) and the
    /// metrics layer; the caller adds its service.
    pub fn router(&mut self) -> Result<ServiceRouter, Error> {
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(mts_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // So grpcurl can print the google.rpc.BadRequest of a refused call.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let health = self.health_server.take().ok_or(Error::RouterTwice)?;
        // TLS, when configured, is done where connections are accepted
        // (`crate::tls`), so that renewed certificates apply without a restart.
        let mut builder = Server::builder();
        if self.config.server.max_connection_age_seconds > 0 {
            builder = builder
                .max_connection_age(jittered(Duration::from_secs(
                    self.config.server.max_connection_age_seconds,
                )))
                .max_connection_age_grace(Duration::from_secs(
                    self.config.server.max_connection_age_grace_seconds,
                ));
        }
        // Nagle's algorithm is turned off where connections are accepted
        // (`incoming`): the builder's own setting never reaches them.
        Ok(builder
            // Large payloads arrive in 1 MiB chunks: larger frames mean far
            // fewer frames and reads per byte. (Windows stay at hyper's 1 MiB:
            // adaptive ones let each upload buffer tens of MiB more.)
            .max_frame_size(MAX_FRAME_BYTES)
            // Keeps idle subscriber streams alive through proxies and finds dead peers.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .trace_fn(|request| {
                let span = tracing::info_span!("grpc", rpc = %request.uri().path());
                crate::telemetry::set_remote_parent(&span, request.headers());
                span
            })
            .layer(MetricsLayer(Arc::clone(&self.metrics)))
            .add_service(health)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?))
    }

    /// Serves `router` on `listener` until `shutdown` completes, then drains:
    /// health turns NOT_SERVING, `on_drain` tells long-lived streams to end,
    /// the listener stops accepting and in-flight calls get up to
    /// `shutdown_grace_seconds` to finish.
    pub async fn serve(
        self,
        router: ServiceRouter,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_drain: impl FnOnce() + Send + 'static,
    ) -> Result<(), Error> {
        tracing::info!(
            grpc = %listener.local_addr()?,
            metrics = %self.admin.local_addr()?,
            "listening"
        );
        let monitor = tokio::spawn(self.health.clone().monitor(
            self.store.clone(),
            self.object_store.clone(),
            Arc::clone(&self.metrics),
            Duration::from_millis(self.config.lifecycle.health_check_interval_ms),
        ));
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let health = self.health.clone();
        let admin = tokio::spawn(crate::metrics::serve(
            self.admin,
            Arc::clone(&self.metrics),
            move || health.is_serving(),
            async {
                let _ = admin_stopped.await;
            },
        ));
        let grace = Duration::from_secs(self.config.lifecycle.shutdown_grace_seconds);
        let keys = tokio::spawn(Arc::clone(&self.auth).keep_fresh());
        let reload = self.tls.clone().map(|tls| {
            let every = Duration::from_millis(self.config.tls.reload_interval_ms);
            tokio::spawn(tls.watch(every))
        });
        let result = run(
            router,
            listener,
            self.tls,
            self.health,
            grace,
            shutdown,
            on_drain,
        )
        .await;
        if let Some(reload) = reload {
            reload.abort();
        }
        keys.abort();
        monitor.abort();
        let _ = admin_stop.send(());
        let _ = admin.await;
        result
    }
}

/// `age` moved by up to ±10 %, so that replicas started together do not
/// close their connections together.
fn jittered(age: Duration) -> Duration {
    let factor = rand::random_range(0.9..=1.1);
    age.mul_f64(factor)
}

fn host(config: &Config) -> Result<std::net::IpAddr, Error> {
    config.server.host.parse().map_err(|e| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server_host {:?}: {e}", config.server.host),
        ))
    })
}

/// Binds the configured host and port.
pub async fn bind(config: &Config) -> std::io::Result<TcpListener> {
    let host: std::net::IpAddr = config.server.host.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server_host: {e}"),
        )
    })?;
    TcpListener::bind(SocketAddr::new(host, config.server.port)).await
}

/// The connections `listener` accepts, with Nagle's algorithm off. The
/// builder's tcp_nodelay only reaches sockets tonic binds itself; without it
/// here, small replies wait out Nagle and delayed ACKs (40 ms on Linux).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `router` on `listener` (through `tls` when set) until `shutdown`
/// completes and in-flight calls have finished.
async fn serve(
    router: ServiceRouter,
    listener: TcpListener,
    tls: Option<Arc<crate::tls::Reloading>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(crate::tls::incoming(listener, tls), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
        }
    }
}

async fn run(
    router: ServiceRouter,
    listener: TcpListener,
    tls: Option<Arc<crate::tls::Reloading>>,
    health: Health,
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
    let serving = serve(router, listener, tls, signal);
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
    let config = match mts_config::from_process(default_port) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(2);
        }
    };
    let telemetry = crate::telemetry::init(&config, name);
    let listener = match bind(&config).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(%err, port = config.server.port, "cannot bind the gRPC port");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(config, listener, crate::shutdown::signal()).await {
        Ok(()) => {
            tracing::info!("{name} stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(%err, "{name} stopped");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let stream = accepted.next().await.unwrap().unwrap();
        assert!(stream.nodelay().unwrap());
    }
}
