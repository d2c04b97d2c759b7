//! `grpc.health.v1` status driven by the dependencies: SERVING only while
//! Tarantool and the object store answer, NOT_SERVING from the moment the
//! process starts draining. A full hot tier is a degraded state, not an
//! outage (reads go on, subjects that discard old messages publish on): it
//! has a health service name of its own, `hot-tier`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;

/// The health service name that is SERVING for as long as the process runs.
pub const LIVENESS: &str = "liveness";

/// The health service name that is NOT_SERVING while the hot tier is full
/// (publishes to subjects that discard new messages are refused).
pub const HOT_TIER: &str = "hot-tier";

/// The health status of one gRPC service (and of the server as a whole).
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
    draining: Arc<AtomicBool>,
    serving: Arc<AtomicBool>,
}

impl Health {
    /// A reporter for `service` (fully qualified) and the gRPC health service
    /// it feeds. Starts NOT_SERVING.
    pub async fn new(service: &'static str) -> (Self, HealthServer<HealthService>) {
        let reporter = HealthReporter::new();
        let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let health = Self {
            reporter,
            service,
            draining: Arc::default(),
            serving: Arc::default(),
        };
        health.report(false).await;
        // For liveness probes: the process answers, whatever its dependencies do.
        health
            .reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        health
            .reporter
            .set_service_status(HOT_TIER, ServingStatus::Unknown)
            .await;
        (health, server)
    }

    async fn report(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.serving.store(serving, Ordering::Release);
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }

    /// Whether the service is SERVING now, for the admin port's `/readyz`
    /// (HTTP probes work where gRPC probes cannot, e.g. behind TLS).
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Reports SERVING or NOT_SERVING, unless draining has begun.
    pub async fn set(&self, serving: bool) {
        let draining = self.draining.load(Ordering::Acquire);
        self.report(serving && !draining).await;
    }

    /// Turns NOT_SERVING for good: the process is shutting down.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.report(false).await;
    }

    /// Reports whether the hot tier is full; returns what it found (or
    /// `was_full` when Tarantool did not say).
    async fn check_hot_tier(&self, store: &Store, was_full: Option<bool>) -> Option<bool> {
        let hot = match store.hot_tier().await {
            Ok(hot) => hot,
            Err(err) => {
                tracing::debug!(%err, "hot tier not checked");
                return was_full;
            }
        };
        let full = hot.full;
        if was_full != Some(full) {
            if full {
                tracing::warn!(
                    service = self.service,
                    %hot,
                    "the hot tier is full: subjects that discard new messages refuse publishes \
                     until tiering moves messages to the object store"
                );
            } else if was_full.is_some() {
                tracing::info!(service = self.service, %hot, "the hot tier has room again");
            }
        }
        let status = if full {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        self.reporter.set_service_status(HOT_TIER, status).await;
        Some(full)
    }

    /// Probes both dependencies every `interval` and reports the result.
    /// Runs until dropped; the store re-applies its schema when Tarantool
    /// comes back empty-handed after a restart.
    pub async fn monitor(
        self,
        store: Store,
        object_store: ObjectStore,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        interval: Duration,
    ) {
        let mut was_serving = None;
        let mut was_full = None;
        loop {
            let (tarantool, s3) = tokio::join!(
                tokio::time::timeout(interval.max(Duration::from_secs(2)), store.check()),
                tokio::time::timeout(interval.max(Duration::from_secs(2)), object_store.check()),
            );
            let tarantool_up = matches!(tarantool, Ok(Ok(())));
            metrics.set_dependency_up("tarantool", tarantool_up);
            metrics.set_members(&store.members().await, store.leader_changes());
            metrics.set_dependency_up("s3", matches!(s3, Ok(Ok(()))));
            let problems: Vec<String> = [
                tarantool
                    .map_err(|_| "Tarantool health check timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .err(),
                s3.map_err(|_| "object store health check timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .err(),
            ]
            .into_iter()
            .flatten()
            .collect();
            let serving = problems.is_empty();
            if was_serving != Some(serving) {
                if serving {
                    tracing::info!(service = self.service, "dependencies reachable; SERVING");
                } else {
                    tracing::warn!(
                        service = self.service,
                        ?problems,
                        "dependency down; NOT_SERVING"
                    );
                }
                was_serving = Some(serving);
            }
            self.set(serving).await;
            if tarantool_up {
                was_full = self.check_hot_tier(&store, was_full).await;
            } else if was_full.take().is_some() {
                // Whether it is full cannot be known now.
                self.reporter
                    .set_service_status(HOT_TIER, ServingStatus::Unknown)
                    .await;
            }
            tokio::time::sleep(interval).await;
        }
    }
}
