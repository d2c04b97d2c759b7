//! Reading messages that live in the cold tier: Tarantool answers them as
//! references to a block of a segment object; this reads the block (and the
//! blocks after it, in one ranged GET, since readers mostly go forward),
//! keeps recently read blocks in a cache bounded in bytes, and fills the
//! messages in from their records. A reader nearing the end of what is
//! cached of a segment has the next range fetched in the background, so a
//! sequential replay rarely waits for the object store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use mts_runtime::metrics::{Metrics, SourceLabels};
use mts_storage::object_store::{self, ObjectStore};
use mts_storage::segment::{self, Block};
use mts_storage::store::{Leased, SegmentRef, StoredMessage};

use crate::Error;

/// Bytes one read of a segment fetches at least: the block asked for and
/// those after it, for the reads that follow.
const READ_AHEAD: u64 = 2 * 1024 * 1024;
/// Segments whose read-ahead position is remembered.
const FRONTIERS: usize = 4096;

type BlockId = (String, u64);

/// Recently read blocks, least recently used evicted first.
#[derive(Debug, Default)]
struct Cache {
    blocks: HashMap<BlockId, (Arc<Block>, u64)>,
    by_use: BTreeMap<u64, BlockId>,
    bytes: usize,
    clock: u64,
    /// Per segment, where what is cached (or being fetched) of it ends.
    frontier: HashMap<String, u64>,
    /// Segments with a background read under way.
    reading_ahead: HashSet<String>,
}

impl Cache {
    fn get(&mut self, id: &BlockId) -> Option<Arc<Block>> {
        self.clock += 1;
        let clock = self.clock;
        let (block, used) = self.blocks.get_mut(id)?;
        self.by_use.remove(used);
        *used = clock;
        self.by_use.insert(clock, id.clone());
        Some(block.clone())
    }

    fn put(&mut self, id: BlockId, block: Arc<Block>, max_bytes: usize) {
        if self.blocks.contains_key(&id) {
            return;
        }
        self.clock += 1;
        self.bytes += block.weight();
        self.by_use.insert(self.clock, id.clone());
        self.blocks.insert(id, (block, self.clock));
        while self.bytes > max_bytes {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((block, _)) = self.blocks.remove(&oldest) {
                self.bytes -= block.weight();
            }
        }
    }
}

/// The egress's reader of segments; shared by every request.
#[derive(Debug)]
pub struct Segments {
    object_store: ObjectStore,
    cache: Mutex<Cache>,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Segments {
    /// A reader caching up to `max_bytes` of blocks.
    pub fn new(object_store: ObjectStore, max_bytes: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            object_store,
            cache: Mutex::default(),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            metrics,
        }
    }

    /// Fills in every message of `batch` that is a reference into a
    /// segment; hot messages are left as they are.
    pub async fn resolve_all(self: &Arc<Self>, batch: &mut [Leased]) -> Result<(), Error> {
        // A batch's messages mostly share blocks: each block is looked up
        // once, not once per message.
        let mut last: Option<(SegmentRef, Arc<Block>)> = None;
        for leased in batch {
            let message = &mut leased.message;
            let Some(at) = message.segment.take() else {
                continue;
            };
            let block = match &last {
                Some((seen, block)) if *seen == at => Arc::clone(block),
                _ => {
                    let block = self.block(&message.subject, message.seq, &at).await?;
                    last = Some((at.clone(), Arc::clone(&block)));
                    block
                }
            };
            fill(message, &block, at)?;
        }
        Ok(())
    }

    /// Fills in `message` from its segment, if it is a reference into one.
    pub async fn resolve(self: &Arc<Self>, message: &mut StoredMessage) -> Result<(), Error> {
        let Some(at) = message.segment.take() else {
            return Ok(());
        };
        let block = self.block(&message.subject, message.seq, &at).await?;
        fill(message, &block, at)
    }

    /// Given `first`, a reference to the first message of the block that
    /// holds the first message committed at or after `time_ns` (or that
    /// it directly follows): the sequence just before that message.
    pub async fn start_after(
        self: &Arc<Self>,
        first: StoredMessage,
        time_ns: u64,
    ) -> Result<u64, Error> {
        let Some(at) = &first.segment else {
            return Ok(first.seq.saturating_sub(1));
        };
        let block = self.block(&first.subject, first.seq, at).await?;
        let last = block.records.last().map_or(first.seq, |r| r.seq);
        Ok(block
            .records
            .iter()
            .find(|r| r.ts_ns >= time_ns)
            .map_or(last, |r| r.seq - 1))
    }

    async fn block(
        self: &Arc<Self>,
        subject: &str,
        seq: u64,
        at: &SegmentRef,
    ) -> Result<Arc<Block>, Error> {
        let id = (at.object_key.clone(), at.offset);
        let cached = self.lock().get(&id);
        let block = match cached {
            Some(block) => {
                self.count_read("cache");
                block
            }
            None => {
                self.count_read("object_store");
                let blocks = self
                    .fetch(&at.object_key, at.offset, at.length.max(READ_AHEAD))
                    .await
                    .map_err(|err| match err {
                        Error::ObjectStore(object_store::Error::NotFound(_)) => {
                            Error::MissingPayload {
                                subject: subject.to_owned(),
                                sequence: seq,
                                key: at.object_key.clone(),
                            }
                        }
                        err => err,
                    })?;
                let wanted = blocks.iter().find(|b| b.offset == at.offset).cloned();
                self.keep(&at.object_key, blocks);
                wanted.ok_or_else(|| Error::CorruptSegment {
                    key: at.object_key.clone(),
                    detail: format!(
                        "no whole block at offset {} (length {})",
                        at.offset, at.length
                    ),
                })?
            }
        };
        self.read_ahead(&at.object_key, at.offset + at.length);
        Ok(block)
    }

    /// The whole blocks in `length` bytes of segment `key` from `offset`.
    async fn fetch(&self, key: &str, offset: u64, length: u64) -> Result<Vec<Arc<Block>>, Error> {
        let bytes = self
            .object_store
            .get_range(key, offset, length)
            .await
            .map_err(Error::ObjectStore)?;
        let blocks =
            segment::decode_blocks(bytes, offset).map_err(|err| Error::CorruptSegment {
                key: key.to_owned(),
                detail: err.to_string(),
            })?;
        Ok(blocks.into_iter().map(Arc::new).collect())
    }

    /// Caches `blocks` of segment `key` and moves its frontier past them.
    fn keep(&self, key: &str, blocks: Vec<Arc<Block>>) {
        let mut cache = self.lock();
        if let Some(last) = blocks.last() {
            let end = last.offset + last.length;
            if cache.frontier.len() >= FRONTIERS {
                cache.frontier.clear();
            }
            let frontier = cache.frontier.entry(key.to_owned()).or_default();
            *frontier = (*frontier).max(end);
        }
        for block in blocks {
            cache.put((key.to_owned(), block.offset), block, self.max_bytes);
        }
    }

    /// With a reader at `position` in segment `key` less than a read-ahead
    /// from the end of what is cached of it, fetches the next range in the
    /// background (one at a time per segment; failures, such as reading
    /// past the object's end, just stop it).
    fn read_ahead(self: &Arc<Self>, key: &str, position: u64) {
        let start = {
            let mut cache = self.lock();
            let Some(&frontier) = cache.frontier.get(key) else {
                return;
            };
            if frontier < position
                || frontier - position >= READ_AHEAD
                || !cache.reading_ahead.insert(key.to_owned())
            {
                return;
            }
            frontier
        };
        let (segments, key) = (Arc::clone(self), key.to_owned());
        tokio::spawn(async move {
            match segments.fetch(&key, start, READ_AHEAD).await {
                Ok(blocks) if !blocks.is_empty() => segments.keep(&key, blocks),
                // The end of the segment, or a failure: no more reading ahead.
                _ => {
                    segments.lock().frontier.remove(&key);
                }
            }
            segments.lock().reading_ahead.remove(&key);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a consistent cache.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count_read(&self, source: &'static str) {
        self.metrics
            .segment_block_reads
            .get_or_create(&SourceLabels { source })
            .inc();
    }
}

/// Replaces the reference `message` with its record in `block`.
fn fill(message: &mut StoredMessage, block: &Block, at: SegmentRef) -> Result<(), Error> {
    let Some(record) = block.get(message.seq) else {
        return Err(Error::CorruptSegment {
            key: at.object_key,
            detail: format!(
                "the block at offset {} does not hold message {} of {}",
                at.offset, message.seq, message.subject
            ),
        });
    };
    *message = record
        .clone()
        .into_message(std::mem::take(&mut message.subject));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: u64, length: u64) -> Arc<Block> {
        Arc::new(Block {
            offset,
            length,
            records: Vec::new(),
        })
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_blocks_beyond_its_bytes() {
        let mut cache = Cache::default();
        let id = |n: u64| ("k".to_owned(), n);
        cache.put(id(0), block(0, 100), 250);
        cache.put(id(1), block(1, 100), 250);
        assert!(cache.get(&id(0)).is_some());
        cache.put(id(2), block(2, 100), 250);
        assert!(cache.get(&id(1)).is_none(), "the least recently used went");
        assert!(cache.get(&id(0)).is_some());
        assert!(cache.get(&id(2)).is_some());
        assert!(cache.bytes <= 250);
    }
}
