//! Reading messages that live in the cold tier: Tarantool answers them as
//! references to a block of a segment object; this reads the block (and the
//! blocks after it, in one ranged GET, since readers mostly go forward),
//! keeps recently read blocks in a cache bounded in bytes, and fills the
//! messages in from their records. A reader nearing the end of what is
//! cached of a segment has the next range fetched in the background, so a
//! sequential replay rarely waits for the object store; a reader that asks
//! for a block such a read is fetching waits for it instead of reading the
//! same bytes again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use mts_runtime::metrics::{Metrics, SourceLabels};
use mts_storage::object_store::{self, ObjectStore};
use mts_storage::segment::{self, Block};
use mts_storage::store::{Leased, SegmentRef, Store, StoredMessage};
use tokio::sync::watch;

use crate::Error;

/// Bytes one read of a segment fetches at most (and at least, given the
/// object's size): the block asked for and those after it, for the reads
/// that follow. Less with a small cache: an eighth of it.
const READ_AHEAD: u64 = 8 * 1024 * 1024;
/// The most bytes one GET of a read asks for; a longer read is several,
/// side by side.
const READ_PART: u64 = 2 * 1024 * 1024;
/// Segments whose read-ahead position is remembered.
const FRONTIERS: usize = 4096;

type BlockId = (String, u64);

/// How far a segment has been read, for reading ahead.
#[derive(Debug, Default)]
struct Track {
    /// Where what is cached (or being fetched) of the segment ends.
    frontier: u64,
    /// The object ends at `frontier`: nothing more to read ahead in it.
    ended: bool,
    /// The segment after it has been asked for (and read ahead, if any).
    next_asked: bool,
    /// The object's size, when told (0 when not).
    size: u64,
    /// Reads under way, each of the bytes from its first offset to its
    /// second; its receiver turns true (or closes) when it is done.
    reading: Vec<(u64, u64, watch::Receiver<bool>)>,
}

/// Recently read blocks, least recently used evicted first.
#[derive(Debug, Default)]
struct Cache {
    blocks: HashMap<BlockId, (Arc<Block>, u64)>,
    by_use: BTreeMap<u64, BlockId>,
    bytes: usize,
    clock: u64,
    /// Per segment, how far it has been read.
    tracks: HashMap<String, Track>,
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

    /// The read of segment `key` under way that will bring the block at
    /// `offset`, if there is one.
    fn reading(&self, key: &str, offset: u64) -> Option<watch::Receiver<bool>> {
        let track = self.tracks.get(key)?;
        let (_, _, done) = track
            .reading
            .iter()
            .find(|(start, end, _)| *start <= offset && offset < *end)?;
        Some(done.clone())
    }

    /// Marks a read of `length` bytes of segment `key` (of `size` bytes, 0
    /// when not told) from `offset` as under way.
    fn begin(&mut self, key: &str, offset: u64, length: u64, size: u64) -> Marked {
        let track = self.track(key);
        if size > 0 {
            track.size = size;
        }
        if track.frontier < offset {
            // A new track (the next segment's, read ahead): it starts here.
            track.frontier = offset;
            track.ended = false;
        }
        let (done, receiver) = watch::channel(false);
        track.reading.push((offset, offset + length, receiver));
        Marked {
            offset,
            length,
            size: track.size,
            done,
        }
    }

    /// The track of segment `key`, forgetting every other when there are
    /// too many (a bound on memory; a forgotten segment just reads ahead
    /// anew).
    fn track(&mut self, key: &str) -> &mut Track {
        if !self.tracks.contains_key(key) && self.tracks.len() >= FRONTIERS {
            self.tracks.retain(|_, track| !track.reading.is_empty());
        }
        self.tracks.entry(key.to_owned()).or_default()
    }
}

/// Bytes a read of a segment of known size asks for with a cache of
/// `cache_bytes`: an eighth of it, within a GET's worth and `READ_AHEAD`.
fn read_bytes(cache_bytes: u64) -> u64 {
    (cache_bytes / 8).clamp(READ_PART, READ_AHEAD)
}

/// A read marked as under way (`Cache::begin`), to be made by `finish`.
struct Marked {
    offset: u64,
    length: u64,
    /// The object's size, as far as the segment's track knows (0: not).
    size: u64,
    /// Tells whoever waits for the read that it is done.
    done: watch::Sender<bool>,
}

/// What a reader of a block does.
enum Step {
    /// Takes it from the cache.
    Cached(Arc<Block>),
    /// Waits for the read under way that brings it.
    Wait(watch::Receiver<bool>),
    /// Reads it (and what follows), having marked the read under way.
    Read(Marked),
}

/// The egress's reader of segments; shared by every request.
pub struct Segments {
    object_store: ObjectStore,
    /// Asked which segment follows one, for reading ahead across them.
    store: Store,
    cache: Mutex<Cache>,
    max_bytes: usize,
    /// Bytes a read of a segment of known size asks for (`READ_AHEAD`, or
    /// less with a small cache), so that read-ahead for a few readers at
    /// once does not evict itself before it is read.
    read_bytes: u64,
    metrics: Arc<Metrics>,
}

impl Segments {
    /// A reader caching up to `max_bytes` of blocks.
    pub fn new(
        object_store: ObjectStore,
        store: Store,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            object_store,
            store,
            cache: Mutex::default(),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            read_bytes: read_bytes(max_bytes),
            metrics,
        }
    }

    /// How many bytes a read of a segment of `size` bytes (0 when not told)
    /// asks for: with the size known, a long range in parts side by side;
    /// else one GET's worth, none of it past the object's end but the last.
    fn read_length(&self, size: u64) -> u64 {
        if size > 0 { self.read_bytes } else { READ_PART }
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

    /// Payload bytes of the messages `first..=through` of `subject`, which
    /// `blocks` (a reference to each block's first message) hold.
    pub async fn bytes_between(
        self: &Arc<Self>,
        subject: &str,
        first: u64,
        through: u64,
        blocks: &[(u64, SegmentRef)],
    ) -> Result<u64, Error> {
        let mut bytes = 0;
        for (seq, at) in blocks {
            let block = self.block(subject, *seq, at).await?;
            bytes += block
                .records
                .iter()
                .filter(|r| (first..=through).contains(&r.seq))
                .map(|r| r.size)
                .sum::<u64>();
        }
        Ok(bytes)
    }

    async fn block(
        self: &Arc<Self>,
        subject: &str,
        seq: u64,
        at: &SegmentRef,
    ) -> Result<Arc<Block>, Error> {
        let id = (at.object_key.clone(), at.offset);
        let length = at.length.max(self.read_length(at.object_size));
        let step = {
            let mut cache = self.lock();
            match cache.get(&id) {
                Some(block) => Step::Cached(block),
                None => match cache.reading(&at.object_key, at.offset) {
                    Some(reading) => Step::Wait(reading),
                    None => {
                        Step::Read(cache.begin(&at.object_key, at.offset, length, at.object_size))
                    }
                },
            }
        };
        // Before waiting for anything: what to read next is read meanwhile.
        self.read_ahead(&at.object_key, at.offset + at.length);
        let marked = match step {
            Step::Cached(block) => {
                self.count_read("cache");
                return Ok(block);
            }
            Step::Wait(mut reading) => {
                // Its bytes are on their way: wait for them, not a GET of
                // its own. A failed read leaves it to a GET below.
                let _ = reading.wait_for(|done| *done).await;
                let mut cache = self.lock();
                if let Some(block) = cache.get(&id) {
                    drop(cache);
                    self.count_read("cache");
                    return Ok(block);
                }
                cache.begin(&at.object_key, at.offset, length, at.object_size)
            }
            Step::Read(marked) => marked,
        };
        self.count_read("object_store");
        let blocks = self
            .finish(&at.object_key, marked, true)
            .await
            .map_err(|err| match err {
                Error::ObjectStore(object_store::Error::NotFound(_)) => Error::MissingPayload {
                    subject: subject.to_owned(),
                    sequence: seq,
                    key: at.object_key.clone(),
                },
                err => err,
            })?;
        blocks
            .into_iter()
            .find(|b| b.offset == at.offset)
            .ok_or_else(|| Error::CorruptSegment {
                key: at.object_key.clone(),
                detail: format!(
                    "no whole block at offset {} (length {})",
                    at.offset, at.length
                ),
            })
    }

    /// Makes the read of segment `key` that `Cache::begin` marked as under
    /// way, caches the blocks it brings and tells whoever waits for them.
    /// `anew`: a reader asked for them (they were not cached), so the
    /// segment's track starts anew there: what it passed may have been
    /// evicted since.
    async fn finish(
        &self,
        key: &str,
        marked: Marked,
        anew: bool,
    ) -> Result<Vec<Arc<Block>>, Error> {
        let Marked {
            offset,
            length,
            size,
            done,
        } = marked;
        let read = self.fetch(key, offset, length, size).await;
        {
            let mut cache = self.lock();
            let track = cache.track(key);
            track.reading.retain(|(start, _, _)| *start != offset);
            match &read {
                Ok((blocks, ended)) if !blocks.is_empty() => {
                    let end = blocks.last().map_or(offset, |b| b.offset + b.length);
                    if anew || end >= track.frontier {
                        track.frontier = end;
                        track.ended = *ended;
                    }
                }
                // Past the end (the object ended on the last block read),
                // or a failure: no more reading ahead in it.
                _ => track.ended = true,
            }
            if let Ok((blocks, _)) = &read {
                for block in blocks {
                    cache.put(
                        (key.to_owned(), block.offset),
                        Arc::clone(block),
                        self.max_bytes,
                    );
                }
            }
        }
        let _ = done.send(true);
        read.map(|(blocks, _)| blocks)
    }

    /// The whole blocks in `length` bytes of segment `key` (of `size`
    /// bytes, 0 when not told) from `offset`, and whether the object ends
    /// after them. A long range is read as parts side by side: the store
    /// serves one GET at a fraction of what it serves several.
    async fn fetch(
        &self,
        key: &str,
        offset: u64,
        length: u64,
        size: u64,
    ) -> Result<(Vec<Arc<Block>>, bool), Error> {
        let length = match size {
            0 => length,
            size => length.min(size.saturating_sub(offset)),
        };
        let parts = (0..length).step_by(READ_PART as usize).map(|start| {
            self.object_store
                .get_range(key, offset + start, READ_PART.min(length - start))
        });
        let parts = futures::future::try_join_all(parts)
            .await
            .map_err(Error::ObjectStore)?;
        let read = parts.iter().map(|part| part.len() as u64).sum::<u64>();
        let bytes = match parts.len() {
            1 => parts.into_iter().next().unwrap_or_default(),
            _ => {
                let mut whole = bytes::BytesMut::with_capacity(read as usize);
                for part in &parts {
                    whole.extend_from_slice(part);
                }
                whole.freeze()
            }
        };
        let ended = read < length || (size > 0 && offset + read >= size);
        let blocks =
            segment::decode_blocks(bytes, offset).map_err(|err| Error::CorruptSegment {
                key: key.to_owned(),
                detail: err.to_string(),
            })?;
        Ok((blocks.into_iter().map(Arc::new).collect(), ended))
    }

    /// With a reader at `position` in segment `key` less than two reads
    /// from the end of what is cached of it, reads the next range in the
    /// background (one read at a time per segment; a failure just stops
    /// it, and the reader's own GET takes over); once the segment is cached
    /// to its end, the first range of the segment after it.
    fn read_ahead(self: &Arc<Self>, key: &str, position: u64) {
        let ahead = {
            let mut cache = self.lock();
            let Some(track) = cache.tracks.get_mut(key) else {
                return;
            };
            // Where what is cached or being read of it will end.
            let reach = track
                .reading
                .iter()
                .map(|(_, end, _)| *end)
                .fold(track.frontier, u64::max);
            // Two reads ahead: the next is under way while the reader works
            // through the one before.
            if reach < position || reach - position >= 2 * self.read_bytes {
                return;
            }
            if track.ended || (track.size > 0 && reach >= track.size) {
                // All of it is cached or on its way: the next segment's turn.
                if track.next_asked {
                    return;
                }
                track.next_asked = true;
                None
            } else if track.reading.is_empty() {
                // Marked before the task starts, so that a reader asking for
                // these bytes meanwhile waits for them.
                let start = track.frontier;
                let length = self.read_length(track.size);
                Some(cache.begin(key, start, length, 0))
            } else {
                return;
            }
        };
        let (segments, key) = (Arc::clone(self), key.to_owned());
        tokio::spawn(async move {
            let (key, marked) = match ahead {
                Some(marked) => (key, marked),
                None => match segments.store.segment_next(&key).await {
                    Ok(Some(next)) => {
                        let mut cache = segments.lock();
                        // Unless a reader got there first.
                        if cache.tracks.contains_key(&next.object_key) {
                            return;
                        }
                        let length = segments.read_length(next.object_size);
                        let marked =
                            cache.begin(&next.object_key, next.offset, length, next.object_size);
                        (next.object_key, marked)
                    }
                    Ok(None) => return,
                    Err(err) => {
                        tracing::debug!(%err, "no reading ahead into the next segment");
                        return;
                    }
                },
            };
            let _ = segments.finish(&key, marked, false).await;
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
    fn reads_ahead_stay_a_fraction_of_the_cache() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(read_bytes(64 * MIB), 8 * MIB, "the default cache");
        assert_eq!(read_bytes(1024 * MIB), READ_AHEAD);
        assert_eq!(read_bytes(24 * MIB), 3 * MIB);
        assert_eq!(read_bytes(MIB), READ_PART, "at least one GET's worth");
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
