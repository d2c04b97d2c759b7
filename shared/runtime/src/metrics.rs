//! Prometheus metrics, declared in one place and served in the text format on
//! the admin port (`metrics_port`, `/metrics`): gRPC calls by method and
//! status code with their durations, and whether each dependency answers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Labels of a gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `/package.Service/Method`
    pub method: String,
    /// The gRPC status code name, e.g. `OK`, `INVALID_ARGUMENT`.
    pub code: &'static str,
}

/// Labels naming a gRPC method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`
    pub method: String,
}

/// Labels naming a dependency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    /// `tarantool` or `s3`.
    pub dependency: &'static str,
}

/// Labels naming a member of the Tarantool replica set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    /// Its address, as in `TARANTOOL_ADDRESS`.
    pub member: String,
}

/// The Tarantool replica set as a service sees it.
#[derive(Debug, Default)]
pub struct MemberGauges {
    /// `minitoolstream_tarantool_member_up`
    pub up: Family<MemberLabels, Gauge>,
    /// `minitoolstream_tarantool_member_leader`
    pub leader: Family<MemberLabels, Gauge>,
    /// `minitoolstream_tarantool_member_replication_lag_seconds`
    pub lag: Family<MemberLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `minitoolstream_tarantool_leader_changes_total`
    pub leader_changes: Counter,
    /// Leader changes already counted.
    counted: std::sync::atomic::AtomicU64,
    /// The members as last seen, for the admin port's `/members`.
    last: std::sync::Mutex<Vec<mts_storage::store::MemberState>>,
}

impl MemberGauges {
    /// The members as last seen, as JSON: which one is the leader, and each
    /// one's state and replication lag.
    pub fn to_json(&self) -> serde_json::Value {
        let members = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let leader = members.iter().find(|m| m.up && m.leader);
        serde_json::json!({
            "leader": leader.map(|m| m.address.as_str()),
            "members": members.iter().map(|m| serde_json::json!({
                "address": m.address,
                "up": m.up,
                "leader": m.leader,
                "lsn": m.lsn,
                "replication_lag_seconds": m.lag_seconds,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The `method` label of calls to any path the server does not serve.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Paths served besides the contract's: health and reflection.
const SERVED_PATHS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Every metric one service process exports.
pub struct Metrics {
    registry: Registry,
    /// Paths whose calls are labelled with their own name.
    known_methods: std::collections::HashSet<String>,
    /// `minitoolstream_grpc_requests_total`
    pub requests: Family<CallLabels, Counter>,
    /// `minitoolstream_grpc_request_duration_seconds`
    pub durations: Family<MethodLabels, Histogram>,
    /// `minitoolstream_dependency_up`
    pub dependency_up: Family<DependencyLabels, Gauge>,
    /// `minitoolstream_dependency_call_duration_seconds`
    pub dependency_calls: Family<OperationLabels, Histogram>,
    /// `minitoolstream_dependency_errors_total`
    pub dependency_errors: Family<OperationLabels, Counter>,
    /// `minitoolstream_publish_bytes_total`
    pub publish_bytes: Family<StorageLabels, Counter>,
    /// `minitoolstream_publish_duration_seconds`
    pub publish_durations: Family<StorageLabels, Histogram>,
    /// `minitoolstream_group_commit_messages`
    pub group_commit_messages: Histogram,
    /// `minitoolstream_active_streams`
    pub active_streams: Family<StreamLabels, Gauge>,
    /// `minitoolstream_deliveries_total`
    pub deliveries: Counter,
    /// `minitoolstream_redeliveries_total`
    pub redeliveries: Counter,
    /// `minitoolstream_rejections_total`
    pub rejections: Counter,
    /// `minitoolstream_orphan_objects_deleted_total`
    pub orphans_deleted: Counter,
    /// `minitoolstream_consumer_pending_messages`
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    /// `minitoolstream_consumer_ack_pending_messages`
    pub consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    /// `minitoolstream_consumer_oldest_unacked_age_seconds`
    pub consumer_oldest_unacked: Family<ConsumerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Totals over every consumer, labelled or not.
    pub consumer_totals: ConsumerTotals,
    /// The Tarantool replica set's members.
    pub members: MemberGauges,
    /// `minitoolstream_consumers_expired_total`
    pub consumers_expired: Counter,
    /// The storage tiers, as the maintenance replica last read them.
    pub tiers: TierGauges,
    /// Segments written to the cold tier.
    pub segments_written: Counter,
    /// Failed attempts to move messages to the cold tier.
    pub tiering_errors: Counter,
    /// Reads of segment blocks: from the egress's cache or the object store.
    pub segment_block_reads: Family<SourceLabels, Counter>,
}

/// Totals over every durable consumer (exported by the maintenance replica).
#[derive(Debug, Default)]
pub struct ConsumerTotals {
    /// `minitoolstream_consumers`
    pub consumers: Gauge,
    /// `minitoolstream_consumers_pending_messages`
    pub pending: Gauge,
    /// `minitoolstream_consumers_ack_pending_messages`
    pub ack_pending: Gauge,
    /// `minitoolstream_consumers_unlabelled`
    pub unlabelled: Gauge,
}

/// Labels naming a durable consumer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The subject.
    pub subject: String,
    /// The durable name.
    pub durable: String,
}

/// Labels of a call to Tarantool or the object store.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `tarantool` or `s3`.
    pub dependency: &'static str,
    /// The stored procedure or S3 operation.
    pub operation: &'static str,
}

/// Where a published payload went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    /// `inline` or `offloaded`.
    pub storage: &'static str,
}

/// Kinds of long-lived stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `subscribe` or `consume`.
    pub kind: &'static str,
}

/// Where a segment block was read from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache` or `object_store`.
    pub source: &'static str,
}

/// Gauges of the two storage tiers.
#[derive(Debug, Default)]
pub struct TierGauges {
    /// Bytes of hot rows in Tarantool.
    pub hot_bytes: Gauge,
    /// Hot rows in Tarantool.
    pub hot_messages: Gauge,
    /// The hot tier's budget in bytes.
    pub budget_bytes: Gauge,
    /// The hot tier's budget in rows.
    pub budget_messages: Gauge,
    /// Tarantool's memtx arena in use.
    pub arena_used_bytes: Gauge,
    /// Tarantool's memtx quota.
    pub quota_bytes: Gauge,
    /// Age of the oldest message not yet in a segment.
    pub oldest_untiered_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Segments in the cold tier.
    pub segments: Gauge,
    /// Their bytes.
    pub segment_bytes: Gauge,
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Metrics {
    /// A registry with every metric declared.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("minitoolstream");
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls by method and final status code (streams: the code in their trailers; CANCELLED when the client left first)",
            requests.clone(),
        );
        let durations = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
        });
        registry.register(
            "grpc_request_duration_seconds",
            "Time to the response headers of a gRPC call",
            durations.clone(),
        );
        let dependency_up = Family::<DependencyLabels, Gauge>::default();
        registry.register(
            "dependency_up",
            "1 while the dependency answers health probes, else 0",
            dependency_up.clone(),
        );
        let dependency_calls =
            Family::<OperationLabels, Histogram>::new_with_constructor(latency_buckets);
        registry.register(
            "dependency_call_duration_seconds",
            "Time of each call to Tarantool or the object store",
            dependency_calls.clone(),
        );
        let dependency_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "dependency_errors",
            "Failed calls to Tarantool or the object store",
            dependency_errors.clone(),
        );
        let publish_bytes = Family::<StorageLabels, Counter>::default();
        registry.register(
            "publish_bytes",
            "Payload bytes of stored publishes, inline in Tarantool or offloaded to S3",
            publish_bytes.clone(),
        );
        let publish_durations =
            Family::<StorageLabels, Histogram>::new_with_constructor(latency_buckets);
        registry.register(
            "publish_duration_seconds",
            "Time to store a publish, from its request to the commit",
            publish_durations.clone(),
        );
        let group_commit_messages =
            Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register(
            "group_commit_messages",
            "Inline publishes stored by one group-commit call to Tarantool",
            group_commit_messages.clone(),
        );
        let active_streams = Family::<StreamLabels, Gauge>::default();
        registry.register(
            "active_streams",
            "Open Subscribe and Consume streams",
            active_streams.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Messages handed to consumers",
            deliveries.clone(),
        );
        let redeliveries = Counter::default();
        registry.register(
            "redeliveries",
            "Messages handed to consumers again after a lease ran out or a nack",
            redeliveries.clone(),
        );
        let rejections = Counter::default();
        registry.register(
            "rejections",
            "Messages consumers gave up by terminal rejection (dead-lettered or dropped)",
            rejections.clone(),
        );
        let orphans_deleted = Counter::default();
        registry.register(
            "orphan_objects_deleted",
            "Objects of this store that no message named, deleted by the orphan sweep",
            orphans_deleted.clone(),
        );
        let consumer_pending = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "consumer_pending_messages",
            "Messages published and never delivered to the consumer (exported by the maintenance replica)",
            consumer_pending.clone(),
        );
        let consumer_ack_pending = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "consumer_ack_pending_messages",
            "Messages delivered to the consumer and not acknowledged",
            consumer_ack_pending.clone(),
        );
        let consumer_oldest_unacked =
            Family::<ConsumerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "consumer_oldest_unacked_age_seconds",
            "Age of the consumer's oldest unacknowledged message",
            consumer_oldest_unacked.clone(),
        );
        let consumer_totals = ConsumerTotals::default();
        registry.register(
            "consumers",
            "Durable consumers",
            consumer_totals.consumers.clone(),
        );
        registry.register(
            "consumers_pending_messages",
            "Messages published and never delivered, summed over every consumer",
            consumer_totals.pending.clone(),
        );
        registry.register(
            "consumers_ack_pending_messages",
            "Messages delivered and not acknowledged, summed over every consumer",
            consumer_totals.ack_pending.clone(),
        );
        registry.register(
            "consumers_unlabelled",
            "Consumers counted in the totals but without lag gauges of their own (beyond consumer_lag_top)",
            consumer_totals.unlabelled.clone(),
        );
        let members = MemberGauges::default();
        registry.register(
            "tarantool_member_up",
            "1 while the replica set member answers, else 0",
            members.up.clone(),
        );
        registry.register(
            "tarantool_member_leader",
            "1 for the replica set member that takes writes",
            members.leader.clone(),
        );
        registry.register(
            "tarantool_member_replication_lag_seconds",
            "How far behind the leader the replica set member is",
            members.lag.clone(),
        );
        registry.register(
            "tarantool_leader_changes",
            "Times this service saw the replica set's leader change",
            members.leader_changes.clone(),
        );
        let consumers_expired = Counter::default();
        registry.register(
            "consumers_expired",
            "Consumers removed after going unused past their inactive_threshold_ms",
            consumers_expired.clone(),
        );
        let tiers = TierGauges::default();
        for (name, help, gauge) in [
            (
                "hot_tier_bytes",
                "Bytes of message rows in Tarantool's hot tier",
                &tiers.hot_bytes,
            ),
            (
                "hot_tier_messages",
                "Message rows in Tarantool's hot tier",
                &tiers.hot_messages,
            ),
            (
                "hot_tier_budget_bytes",
                "The hot tier's budget in bytes",
                &tiers.budget_bytes,
            ),
            (
                "hot_tier_budget_messages",
                "The hot tier's budget in rows",
                &tiers.budget_messages,
            ),
            (
                "tarantool_arena_used_bytes",
                "Tarantool's memtx arena in use",
                &tiers.arena_used_bytes,
            ),
            (
                "tarantool_quota_bytes",
                "Tarantool's memtx memory quota",
                &tiers.quota_bytes,
            ),
            (
                "cold_tier_segments",
                "Segment objects in the cold tier",
                &tiers.segments,
            ),
            (
                "cold_tier_bytes",
                "Bytes of segment objects in the cold tier",
                &tiers.segment_bytes,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "oldest_untiered_message_age_seconds",
            "Age of the oldest message still only in the hot tier",
            tiers.oldest_untiered_seconds.clone(),
        );
        let segments_written = Counter::default();
        registry.register(
            "segments_written",
            "Segments written to the cold tier",
            segments_written.clone(),
        );
        let tiering_errors = Counter::default();
        registry.register(
            "tiering_errors",
            "Failed attempts to move hot messages into a segment",
            tiering_errors.clone(),
        );
        let segment_block_reads = Family::<SourceLabels, Counter>::default();
        registry.register(
            "segment_block_reads",
            "Segment blocks read for delivery, from the egress's cache or the object store",
            segment_block_reads.clone(),
        );
        let known_methods = mts_proto::method_paths()
            .into_iter()
            .chain(SERVED_PATHS.iter().map(|p| (*p).to_owned()))
            .collect();
        Arc::new(Self {
            registry,
            known_methods,
            consumer_pending,
            consumer_ack_pending,
            consumer_oldest_unacked,
            consumer_totals,
            members,
            consumers_expired,
            requests,
            durations,
            dependency_up,
            dependency_calls,
            dependency_errors,
            publish_bytes,
            publish_durations,
            group_commit_messages,
            active_streams,
            deliveries,
            redeliveries,
            rejections,
            orphans_deleted,
            tiers,
            segments_written,
            tiering_errors,
            segment_block_reads,
        })
    }

    /// Sets the tier gauges from `stats`.
    pub fn set_storage_stats(&self, stats: &mts_storage::store::StorageStats) {
        let g = &self.tiers;
        let set = |gauge: &Gauge, value: u64| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        set(&g.hot_bytes, stats.hot.hot_bytes);
        set(&g.hot_messages, stats.hot.hot_messages);
        set(&g.budget_bytes, stats.hot.budget_bytes);
        set(&g.budget_messages, stats.hot.budget_messages);
        set(&g.arena_used_bytes, stats.arena_used);
        set(&g.quota_bytes, stats.quota_size);
        set(&g.segments, stats.segments);
        set(&g.segment_bytes, stats.segment_bytes);
        g.oldest_untiered_seconds
            .set(stats.oldest_untiered_age_ms as f64 / 1000.0);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The `method` label of a call to `path`: the path itself when the
    /// server serves it, else one value for all, so that made-up paths
    /// cannot grow the metrics without bound.
    pub fn method_label(&self, path: &str) -> String {
        if self.known_methods.contains(path) {
            path.to_owned()
        } else {
            UNKNOWN_METHOD.to_owned()
        }
    }

    /// Records a stored publish.
    pub fn published(&self, offloaded: bool, bytes: u64, seconds: f64) {
        let labels = StorageLabels {
            storage: if offloaded { "offloaded" } else { "inline" },
        };
        self.publish_bytes.get_or_create(&labels).inc_by(bytes);
        self.publish_durations
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// Counts an open stream until the guard is dropped.
    pub fn stream_opened(self: &Arc<Self>, kind: &'static str) -> StreamGuard {
        self.active_streams
            .get_or_create(&StreamLabels { kind })
            .inc();
        StreamGuard {
            metrics: Arc::clone(self),
            kind,
        }
    }

    /// Replaces the consumer lag gauges with those of every consumer in
    /// `lag`: the totals over all of them, and gauges of their own for the
    /// `top` with the most messages waiting (0 = all).
    pub fn set_consumer_lag(&self, mut lag: Vec<mts_storage::store::ConsumerLag>, top: usize) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let totals = &self.consumer_totals;
        totals.consumers.set(gauge(lag.len() as u64));
        totals
            .pending
            .set(gauge(lag.iter().map(|c| c.pending).sum()));
        totals
            .ack_pending
            .set(gauge(lag.iter().map(|c| c.ack_pending).sum()));
        if top > 0 && lag.len() > top {
            lag.select_nth_unstable_by_key(top - 1, |c| {
                std::cmp::Reverse(c.pending.saturating_add(c.ack_pending))
            });
            lag.truncate(top);
        }
        totals.unlabelled.set(gauge(
            (totals.consumers.get() as u64).saturating_sub(lag.len() as u64),
        ));
        self.consumer_pending.clear();
        self.consumer_ack_pending.clear();
        self.consumer_oldest_unacked.clear();
        for consumer in &lag {
            let labels = ConsumerLabels {
                subject: consumer.subject.clone(),
                durable: consumer.durable.clone(),
            };
            self.consumer_pending
                .get_or_create(&labels)
                .set(gauge(consumer.pending));
            self.consumer_ack_pending
                .get_or_create(&labels)
                .set(gauge(consumer.ack_pending));
            self.consumer_oldest_unacked
                .get_or_create(&labels)
                .set(consumer.oldest_unacked_age_ms as f64 / 1000.0);
        }
    }

    /// Records the replica set's members as last seen, and the leader
    /// changes seen so far (`changes`, a running total).
    pub fn set_members(&self, members: &[mts_storage::store::MemberState], changes: u64) {
        let gauges = &self.members;
        for member in members {
            let labels = MemberLabels {
                member: member.address.clone(),
            };
            gauges.up.get_or_create(&labels).set(i64::from(member.up));
            gauges
                .leader
                .get_or_create(&labels)
                .set(i64::from(member.leader));
            gauges.lag.get_or_create(&labels).set(member.lag_seconds);
        }
        let before = gauges
            .counted
            .swap(changes, std::sync::atomic::Ordering::Relaxed);
        gauges.leader_changes.inc_by(changes.saturating_sub(before));
        *gauges.last.lock().unwrap_or_else(|e| e.into_inner()) = members.to_vec();
    }

    /// Records whether `dependency` answered its last probe.
    pub fn set_dependency_up(&self, dependency: &'static str, up: bool) {
        self.dependency_up
            .get_or_create(&DependencyLabels { dependency })
            .set(i64::from(up));
    }
}

/// Keeps an open stream counted in `active_streams`.
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    kind: &'static str,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics
            .active_streams
            .get_or_create(&StreamLabels { kind: self.kind })
            .dec();
    }
}

/// Serves `/metrics`, `/livez` (200 while the process runs), `/readyz`
/// (200 while `ready` says so, else 503) and `/members` (the Tarantool
/// members as JSON: the leader, each one's state and replication lag) on
/// `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let members = Arc::clone(&metrics);
    let app = axum::Router::new()
        .route(
            "/members",
            axum::routing::get(move || {
                let body = members.members.to_json().to_string() + "\n";
                async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/livez", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let serving = ready();
                async move {
                    if serving {
                        (http::StatusCode::OK, "SERVING\n")
                    } else {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "CANCELLED",
        b"2" => "UNKNOWN",
        b"3" => "INVALID_ARGUMENT",
        b"4" => "DEADLINE_EXCEEDED",
        b"5" => "NOT_FOUND",
        b"6" => "ALREADY_EXISTS",
        b"7" => "PERMISSION_DENIED",
        b"8" => "RESOURCE_EXHAUSTED",
        b"9" => "FAILED_PRECONDITION",
        b"10" => "ABORTED",
        b"11" => "OUT_OF_RANGE",
        b"12" => "UNIMPLEMENTED",
        b"13" => "INTERNAL",
        b"14" => "UNAVAILABLE",
        b"15" => "DATA_LOSS",
        b"16" => "UNAUTHENTICATED",
        _ => "INVALID_CODE",
    }
}

/// A tower layer that counts and times every gRPC call.
#[derive(Clone)]
pub struct MetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

/// The service `MetricsLayer` wraps around the gRPC routes.
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method_label(request.uri().path());
        let metrics = Arc::clone(&self.metrics);
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            metrics
                .durations
                .get_or_create(&MethodLabels {
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            let mut outcome = Outcome {
                metrics,
                method,
                started,
                code: None,
            };
            match response {
                Ok(reply) => {
                    // A status in the headers is a trailers-only (usually
                    // error) reply; otherwise the status comes in the trailers.
                    let early = reply.headers().get("grpc-status");
                    outcome.code = early.map(|code| code_name(code.as_bytes()));
                    Ok(reply.map(|inner| CountedBody {
                        inner,
                        outcome: Some(outcome),
                    }))
                }
                Err(err) => {
                    // Failed before the handler ran: a transport failure.
                    outcome.code = Some("UNAVAILABLE");
                    Err(err)
                }
            }
        })
    }
}

/// Counts and logs a call once, when its reply body is done with.
struct Outcome {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
    /// The final status; none yet means the client left before it was sent.
    code: Option<&'static str>,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let code = self.code.unwrap_or("CANCELLED");
        tracing::debug!(
            rpc = %self.method,
            code,
            elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        self.metrics
            .requests
            .get_or_create(&CallLabels {
                method: std::mem::take(&mut self.method),
                code,
            })
            .inc();
    }
}

pin_project_lite::pin_project! {
    /// A reply body that records the call's final status from its trailers.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        outcome: Option<Outcome>,
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let final_code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| {
                trailers
                    .get("grpc-status")
                    .map_or("UNKNOWN", |code| code_name(code.as_bytes()))
            }),
            Poll::Ready(Some(Err(_))) => Some("INTERNAL"),
            _ => None,
        };
        if let (Some(code), Some(outcome)) = (final_code, this.outcome.as_mut()) {
            outcome.code = Some(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The stores report every call here.
impl mts_storage::Observer for Metrics {
    fn call(&self, dependency: &'static str, operation: &'static str, seconds: f64, ok: bool) {
        let labels = OperationLabels {
            dependency,
            operation,
        };
        self.dependency_calls
            .get_or_create(&labels)
            .observe(seconds);
        if !ok {
            self.dependency_errors.get_or_create(&labels).inc();
        }
    }

    fn group_commit(&self, messages: usize) {
        self.group_commit_messages.observe(messages as f64);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_names() {
        let metrics = Metrics::new();
        metrics
            .requests
            .get_or_create(&CallLabels {
                method: "/minitoolstream.IngressService/Publish".into(),
                code: "OK",
            })
            .inc();
        metrics
            .durations
            .get_or_create(&MethodLabels {
                method: "/minitoolstream.IngressService/Publish".into(),
            })
            .observe(0.003);
        metrics.set_dependency_up("tarantool", true);
        let text = metrics.render();
        assert!(
            text.contains(r#"minitoolstream_grpc_requests_total{method="/minitoolstream.IngressService/Publish",code="OK"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"minitoolstream_dependency_up{dependency="tarantool"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE minitoolstream_grpc_request_duration_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn only_served_methods_have_their_own_label() {
        let metrics = Metrics::new();
        assert_eq!(
            metrics.method_label("/minitoolstream.EgressService/Fetch"),
            "/minitoolstream.EgressService/Fetch"
        );
        assert_eq!(
            metrics.method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for made_up in ["/minitoolstream.EgressService/Nope", "/x/y", "/", ""] {
            assert_eq!(metrics.method_label(made_up), UNKNOWN_METHOD, "{made_up}");
        }
    }

    #[test]
    fn status_codes_have_their_names() {
        assert_eq!(code_name(b"3"), "INVALID_ARGUMENT");
        assert_eq!(code_name(b"14"), "UNAVAILABLE");
        assert_eq!(code_name(b"99"), "INVALID_CODE");
    }
}
