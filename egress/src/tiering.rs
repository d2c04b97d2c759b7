//! Moving messages to the cold tier, run by the one egress replica that
//! holds the `tiering` lease: each subject's oldest hot messages are packed
//! into a segment, uploaded, and only then swapped for one segment row. A
//! crash between the two leaves an object no row names (the orphan sweep's
//! to delete); a swap that finds its rows gone changes nothing, and its
//! object is deleted here. Runs back to back while work is due, so the hot
//! tier drains as fast as the object store takes segments.

use std::sync::Arc;
use std::time::Duration;

use mts_config::Config;
use mts_runtime::metrics::Metrics;
use mts_storage::object_store::ObjectStore;
use mts_storage::segment::{Sealed, Writer};
use mts_storage::store::{SegmentPlan, Store, TierCommit, TieringOptions};

use crate::Error;

/// Bytes of one block of a segment: what a reader of one message fetches.
const BLOCK_BYTES: usize = 64 * 1024;
/// Hot messages read per Tarantool call while packing a segment: small
/// calls, since a call holds Tarantool's transaction thread (and every
/// publish and delivery waiting on it) for as long as it runs.
const READ_MESSAGES: u32 = 256;
/// Payload bytes read per Tarantool call while packing a segment.
const READ_BYTES: u64 = 256 * 1024;
/// Subjects planned per pass.
const PLAN_SUBJECTS: u32 = 16;
/// Subjects sealed at once.
const SUBJECTS_AT_ONCE: usize = 2;
/// Segments one subject may write in one pass before the others' turn.
const SEGMENTS_PER_PASS: usize = 8;
/// How long the lease lasts without renewal: longer than one segment's work.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// The tiering worker of one egress process.
#[derive(Clone)]
pub struct Tiering {
    store: Store,
    object_store: ObjectStore,
    metrics: Arc<Metrics>,
    holder: String,
    options: TieringOptions,
    interval: Duration,
}

impl Tiering {
    /// A worker with the segment sizes of `config`.
    pub fn new(
        store: Store,
        object_store: ObjectStore,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            object_store,
            metrics,
            holder: format!("egress-{}", uuid::Uuid::now_v7()),
            options: TieringOptions {
                segment_bytes: config.tiering.segment_max_bytes,
                segment_messages: config.tiering.segment_max_messages,
                seal_age: Duration::from_millis(config.tiering.segment_seal_age_ms),
            },
            interval: Duration::from_millis(config.egress.maintenance_interval_ms),
        }
    }

    /// Runs until dropped.
    pub async fn run(self) {
        loop {
            match self.store.lease("tiering", &self.holder, LEASE_TTL).await {
                Ok(true) => {}
                Ok(false) => {
                    tokio::time::sleep(self.interval).await;
                    continue;
                }
                Err(err) => {
                    tracing::debug!(%err, "tiering lease unavailable");
                    tokio::time::sleep(self.interval).await;
                    continue;
                }
            }
            match self.pass().await {
                Ok(0) => tokio::time::sleep(self.interval).await,
                Ok(written) => tracing::debug!(written, "segments written"),
                Err(err) => {
                    self.metrics.tiering_errors.inc();
                    tracing::warn!(%err, "moving messages to the cold tier failed; retrying");
                    tokio::time::sleep(self.interval).await;
                }
            }
        }
    }

    /// Seals what is due of each subject that is due, a few subjects at a
    /// time; returns how many segments were written.
    pub async fn pass(&self) -> Result<usize, Error> {
        use futures::StreamExt;
        let plans = self.store.tier_plan(self.options, PLAN_SUBJECTS).await?;
        // Owned futures: borrowing ones make the task's future not Send.
        let mut sealed = futures::stream::iter(plans)
            .map(|plan| {
                let this = self.clone();
                async move { this.seal(&plan).await }
            })
            .buffer_unordered(SUBJECTS_AT_ONCE);
        let (mut written, mut failed) = (0, None);
        while let Some(result) = sealed.next().await {
            match result {
                Ok(n) => written += n,
                Err(err) => failed = Some(err),
            }
        }
        match failed {
            Some(err) if written == 0 => Err(err),
            Some(err) => {
                self.metrics.tiering_errors.inc();
                tracing::warn!(%err, "moving one subject's messages to the cold tier failed; retrying");
                Ok(written)
            }
            None => Ok(written),
        }
    }

    /// Moves the subject's oldest hot messages into segments: up to
    /// `SEGMENTS_PER_PASS` of them while full ones keep coming (a backlog),
    /// as a pipeline: while one segment uploads, the next is packed and the
    /// one before it is swapped in. Each is swapped in only after the one
    /// before it. Returns how many were written.
    async fn seal(&self, plan: &SegmentPlan) -> Result<usize, Error> {
        let subject = plan.subject.as_str();
        let Some(mut current) = self.pack(subject, plan.first_seq.saturating_sub(1)).await? else {
            return Ok(0);
        };
        let mut written = 0;
        // Uploaded, waiting for its swap.
        let mut uploaded: Option<(String, Sealed)> = None;
        loop {
            let (sealed, full) = current;
            let key = self.object_store.segment_key(
                &self.store.identity().store_id,
                subject,
                sealed.first_seq,
            );
            let more = full && written + usize::from(uploaded.is_some()) + 1 < SEGMENTS_PER_PASS;
            let (put, next, swapped) = tokio::join!(
                self.object_store.put(&key, sealed.body.clone()),
                async {
                    if more {
                        self.pack(subject, sealed.last_seq).await
                    } else {
                        Ok(None)
                    }
                },
                async {
                    match &uploaded {
                        Some((key, sealed)) => self.swap(subject, key, sealed).await.map(Some),
                        None => Ok(None),
                    }
                },
            );
            match swapped {
                Ok(Some(true)) => written += 1,
                Ok(None) => {}
                // The run was gone, or the swap failed: this segment, which
                // follows it, cannot be swapped in either.
                Ok(Some(false)) | Err(_) => {
                    if put.is_ok() {
                        self.discard(&key).await;
                    }
                    return swapped.map(|_| written);
                }
            }
            put.map_err(Error::ObjectStore)?;
            uploaded = Some((key, sealed));
            match next? {
                Some(next) => current = next,
                None => break,
            }
        }
        if let Some((key, sealed)) = &uploaded
            && self.swap(subject, key, sealed).await?
        {
            written += 1;
        }
        Ok(written)
    }

    /// Packs the hot messages of `subject` after `after` into a segment;
    /// with whether it is full (more may be due). `None` when there are none.
    async fn pack(&self, subject: &str, mut after: u64) -> Result<Option<(Sealed, bool)>, Error> {
        let mut writer = Writer::new(BLOCK_BYTES);
        let full = |w: &Writer| {
            w.count() >= self.options.segment_messages
                || w.len() as u64 >= self.options.segment_bytes
        };
        'read: while !full(&writer) {
            let room = self.options.segment_messages - writer.count();
            let rows = self
                .store
                .tier_read(
                    subject,
                    after,
                    u32::try_from(room).unwrap_or(u32::MAX).min(READ_MESSAGES),
                    READ_BYTES,
                )
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                // A segment holds a gap-free run, and ends where a row ends.
                match row.first() {
                    Some(first) if writer.is_empty() || first.seq == after + 1 => {}
                    _ => break 'read,
                }
                for message in row {
                    writer.push(message);
                    after = message.seq;
                }
                if full(&writer) {
                    break 'read;
                }
            }
        }
        if writer.is_empty() {
            return Ok(None);
        }
        let is_full = full(&writer);
        Ok(Some((writer.finish(), is_full)))
    }

    /// Swaps the hot rows for the uploaded segment under `key`; true when
    /// the segment now holds them (otherwise its object is deleted, unless
    /// the outcome is unknown: then the orphan sweep decides).
    async fn swap(&self, subject: &str, key: &str, sealed: &Sealed) -> Result<bool, Error> {
        match self.store.tier_commit(subject, key, sealed).await {
            Ok(TierCommit::Committed) => {
                self.metrics.segments_written.inc();
                tracing::debug!(
                    subject,
                    first = sealed.first_seq,
                    last = sealed.last_seq,
                    bytes = sealed.body.len(),
                    "segment written"
                );
                Ok(true)
            }
            Ok(outcome) => {
                tracing::info!(subject, ?outcome, object = %key, "segment not needed; deleting it");
                self.discard(key).await;
                Ok(false)
            }
            Err(err) if err.outcome_unknown() => Err(err.into()),
            Err(err) => {
                self.discard(key).await;
                Err(err.into())
            }
        }
    }

    async fn discard(&self, key: &str) {
        if let Err(err) = self.object_store.delete(key).await {
            tracing::warn!(%err, object = %key, "deleting an unused segment failed; the orphan sweep will");
        }
    }
}
