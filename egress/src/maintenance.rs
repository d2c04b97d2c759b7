//! Housekeeping run by the one egress replica that holds the `maintenance`
//! lease in Tarantool: retention in bounded steps, deletion of objects whose
//! metadata retention removed, removal of consumers unused past their
//! inactivity threshold, consumer lag gauges, and the sweep of objects that never got
//! metadata (uploads whose commit failed or never came). The sweep only ever
//! looks under this store's own key prefix (`minio_key_prefix` and the
//! store's id), at objects written since the store was created: a shared
//! bucket's other objects, and a previous store's after Tarantool came back
//! empty, are never touched.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mts_config::Config;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::{Limits, Store};

use crate::Error;

/// Messages one retention step may delete.
const STEP_BUDGET: u32 = 500;
/// Milliseconds of Tarantool's time one retention step may use.
const STEP_BUDGET_MS: u32 = 5;
/// Consumers read per call when gathering lag.
const LAG_PAGE: u32 = 1000;
/// Consumers removed per call for inactivity.
const EXPIRE_BATCH: u32 = 100;
/// Objects handled per Tarantool call.
const OBJECT_BATCH: usize = 100;

/// The maintenance worker of one egress process.
pub struct Maintenance {
    metrics: std::sync::Arc<mts_runtime::metrics::Metrics>,
    store: Store,
    object_store: ObjectStore,
    holder: String,
    defaults: Limits,
    interval: Duration,
    orphan_grace: Duration,
    sweep_interval: Option<Duration>,
    /// Consumers whose lag gauges carry their own labels; 0 = all.
    lag_top: usize,
}

impl Maintenance {
    /// A worker with the retention defaults and intervals of `config`.
    pub fn new(
        store: Store,
        object_store: ObjectStore,
        config: &Config,
        metrics: std::sync::Arc<mts_runtime::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            store,
            object_store,
            holder: format!("egress-{}", uuid::Uuid::now_v7()),
            // 0 means unlimited, in the config as in Tarantool.
            defaults: Limits {
                max_age_ms: Some(config.egress.retention_max_age_seconds.saturating_mul(1000)),
                max_messages: Some(config.egress.retention_max_messages),
                max_bytes: Some(config.egress.retention_max_bytes),
                discard: None,
            },
            interval: Duration::from_millis(config.egress.maintenance_interval_ms),
            orphan_grace: Duration::from_secs(config.egress.orphan_grace_seconds),
            sweep_interval: (config.egress.orphan_sweep_interval_seconds > 0)
                .then(|| Duration::from_secs(config.egress.orphan_sweep_interval_seconds)),
            lag_top: usize::try_from(config.egress.consumer_lag_top).unwrap_or(usize::MAX),
        }
    }

    /// Runs until dropped.
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        loop {
            ticker.tick().await;
            match self
                .store
                .lease("maintenance", &self.holder, self.interval * 3)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    tracing::debug!(%err, "maintenance lease unavailable");
                    continue;
                }
            }
            match self.enforce_retention().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "retention removed messages"),
                Err(err) => tracing::warn!(%err, "retention step failed"),
            }
            if let Err(err) = self.delete_released().await {
                tracing::warn!(%err, "deleting released objects failed");
            }
            if let Err(err) = self.expire_consumers().await {
                tracing::warn!(%err, "removing unused consumers failed");
            }
            match self.consumer_lag().await {
                Ok(lag) => self.metrics.set_consumer_lag(lag, self.lag_top),
                Err(err) => tracing::debug!(%err, "reading consumer lag failed"),
            }
            match self.store.storage_stats().await {
                Ok(stats) => self.metrics.set_storage_stats(&stats),
                Err(err) => tracing::debug!(%err, "reading storage stats failed"),
            }
            if let Some(every) = self.sweep_interval
                && last_sweep.is_none_or(|at| at.elapsed() >= every)
            {
                match self.sweep_orphans().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "orphan sweep deleted objects"),
                    Err(err) => tracing::warn!(%err, "orphan sweep failed"),
                }
                last_sweep = Some(Instant::now());
            }
        }
    }

    /// The lag of every consumer, a page at a time.
    async fn consumer_lag(&self) -> Result<Vec<mts_storage::store::ConsumerLag>, Error> {
        let mut all: Vec<mts_storage::store::ConsumerLag> = Vec::new();
        loop {
            let after = all.last().map(|c| (c.subject.as_str(), c.durable.as_str()));
            let page = self.store.consumers_lag(after, LAG_PAGE).await?;
            let full = page.len() >= LAG_PAGE as usize;
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Removes consumers unused for longer than their inactivity threshold.
    async fn expire_consumers(&self) -> Result<(), Error> {
        loop {
            let gone = self.store.expire_consumers(EXPIRE_BATCH).await?;
            for (subject, durable) in &gone {
                tracing::info!(%subject, %durable, "consumer removed: unused past its inactive_threshold_ms");
            }
            self.metrics.consumers_expired.inc_by(gone.len() as u64);
            if gone.len() < EXPIRE_BATCH as usize {
                return Ok(());
            }
        }
    }

    /// Visits every subject once, in bounded steps.
    async fn enforce_retention(&self) -> Result<u64, Error> {
        let mut cursor = String::new();
        let mut removed = 0;
        loop {
            let (next, deleted) = self
                .store
                .retention_step(&cursor, self.defaults, STEP_BUDGET, STEP_BUDGET_MS)
                .await?;
            removed += deleted;
            if next.is_empty() {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// Deletes the objects retention released, then forgets them.
    async fn delete_released(&self) -> Result<(), Error> {
        loop {
            let keys = self.store.released_objects(OBJECT_BATCH as u32).await?;
            if keys.is_empty() {
                return Ok(());
            }
            for key in &keys {
                self.object_store
                    .delete(key)
                    .await
                    .map_err(Error::ObjectStore)?;
            }
            self.store.forget_objects(&keys).await?;
        }
    }

    /// Deletes this store's objects older than the grace period that no
    /// message names.
    async fn sweep_orphans(&self) -> Result<usize, Error> {
        // Read now, not at start-up: Tarantool may have been replaced by an
        // empty instance, which is a new store that owns none of the objects.
        let identity = self.store.read_identity().await?;
        let created = UNIX_EPOCH + Duration::from_nanos(identity.created_ns);
        let cutoff = SystemTime::now()
            .checked_sub(self.orphan_grace)
            .unwrap_or(UNIX_EPOCH);
        let prefix = self.object_store.store_prefix(&identity.store_id);
        let candidates = self
            .object_store
            .keys_modified_within(&prefix, (created, cutoff))
            .await
            .map_err(Error::ObjectStore)?;
        let mut removed = 0;
        for chunk in candidates.chunks(OBJECT_BATCH) {
            for key in self.store.settle_objects(chunk).await? {
                self.object_store
                    .delete(&key)
                    .await
                    .map_err(Error::ObjectStore)?;
                tracing::info!(object = %key, "orphan sweep deleted an object no message names");
                self.metrics.orphans_deleted.inc();
                removed += 1;
            }
        }
        Ok(removed)
    }
}
