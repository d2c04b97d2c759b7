//! The egress's state — the stores, the subjects' commit watchers, the drain
//! signal and the delivery limits — and, in the submodules, the handlers of
//! each RPC family, the only code that sees it.

mod acks;
mod admin;
pub(crate) mod consume;
mod fetch;
pub(crate) mod payload;
mod subscribe;

use std::sync::Arc;

use mts_runtime::auth::Authenticator;
use mts_runtime::metrics::Metrics;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::{Leased, Store};
use tokio::sync::watch;
use tonic::Status;

use crate::delivery;
use crate::notify::SubjectWatchers;
use crate::segments::Segments;

/// The egress service state; cheap to clone.
#[derive(Clone)]
pub struct Egress {
    store: Store,
    object_store: ObjectStore,
    watchers: Arc<SubjectWatchers>,
    draining: watch::Receiver<bool>,
    payload_limits: delivery::PayloadLimits,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    /// Room for Consume streams whose lease calls wait in Tarantool.
    hot_streams: Arc<tokio::sync::Semaphore>,
    /// Reads messages that live in segments of the cold tier.
    segments: Arc<Segments>,
}

impl Egress {
    /// A service reading through `store` and `object_store`, with the
    /// delivery limits and segment cache of `config`; open streams end when
    /// `draining` turns true.
    pub fn new(
        store: Store,
        object_store: ObjectStore,
        watchers: Arc<SubjectWatchers>,
        draining: watch::Receiver<bool>,
        config: &mts_config::Config,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            segments: Arc::new(Segments::new(
                object_store.clone(),
                store.clone(),
                config.tiering.segment_cache_bytes,
                metrics.clone(),
            )),
            store,
            object_store,
            watchers,
            draining,
            payload_limits: delivery::PayloadLimits {
                omit_above: config.egress.max_inline_delivery_bytes,
                inline_max: config.egress.max_delivered_payload_bytes,
            },
            auth,
            metrics,
            hot_streams: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.egress.max_hot_streams).unwrap_or(usize::MAX),
            )),
        }
    }

    /// A leased batch ready to send: messages that live in segments read
    /// from there, and those the store handed back for dead-lettering (a
    /// lease deadline of 0: due for it, but in a segment, which only the
    /// service reads) dead-lettered and left out.
    pub(crate) async fn ready(
        &self,
        durable: &str,
        mut batch: Vec<Leased>,
    ) -> Result<Vec<Leased>, crate::Error> {
        if batch.iter().all(|leased| leased.message.segment.is_none()) {
            return Ok(batch);
        }
        self.segments.resolve_all(&mut batch).await?;
        let mut ready = Vec::with_capacity(batch.len());
        for leased in batch {
            if leased.deadline_ns == 0 {
                self.store
                    .dead_letter(durable, &leased.message, leased.deliveries)
                    .await?;
            } else {
                ready.push(leased);
            }
        }
        Ok(ready)
    }

    /// Counts a batch handed out.
    pub(crate) fn count_deliveries(&self, batch: &[Leased]) {
        self.metrics.deliveries.inc_by(batch.len() as u64);
        let again = batch.iter().filter(|leased| leased.deliveries > 1).count();
        self.metrics.redeliveries.inc_by(again as u64);
    }
}

impl Egress {
    /// Who is calling, from the request's metadata.
    pub(crate) fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<mts_runtime::auth::Caller, crate::Error> {
        Ok(self.auth.authenticate(metadata)?)
    }
}

/// How often an open Consume or Subscribe stream records that its consumer
/// is in use: well under the shortest inactivity threshold
/// (`wire::MIN_INACTIVE_THRESHOLD_MS`), so a connected consumer is never
/// removed for being idle.
pub(crate) const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// The ticks on which an open stream records its consumer's use: every
/// TOUCH_EVERY from now on.
pub(crate) fn in_use_ticks() -> tokio::time::Interval {
    let start = tokio::time::Instant::now() + TOUCH_EVERY;
    let mut ticks = tokio::time::interval_at(start, TOUCH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Records, without waiting, that consumer `durable` of `subject` has an
/// open stream.
pub(crate) fn touch(store: &mts_storage::store::Store, subject: &str, durable: &str) {
    let store = store.clone();
    let consumer = [(subject.to_owned(), durable.to_owned())];
    tokio::spawn(async move {
        if let Err(err) = store.touch_consumers(&consumer).await {
            tracing::debug!(%err, "could not record that the consumer is in use");
        }
    });
}

/// How open streams end when the server drains.
pub(crate) fn draining_status() -> Status {
    Status::unavailable("egress is shutting down; reconnect to continue the subscription")
}
