//! Group commit: inline publishes from every caller of a process go through
//! one queue, and whatever has gathered while the previous call was in
//! flight is stored by the next `mts_publish_batch` call, in one transaction
//! and one WAL write. Under load a call carries many messages; alone, a
//! message waits for nothing but its own call.
//!
//! Messages reach Tarantool in the order they were queued, so a publisher
//! that queues A before B gets A the lower sequence. Two calls may be in
//! flight, so that Tarantool stores one batch while the next is gathered and
//! sent; their order holds because each call is polled once, right after it
//! is made, which puts its request in the connection's send queue (a bounded
//! Tokio channel, whose senders are served first come, first served) before
//! the next call exists. Tarantool runs the requests of one connection in
//! the order they arrive, and a stored procedure that does not yield before
//! its commit assigns sequences in that order.
//!
//! A subject's messages in a call, when there are several and none carries
//! a message id, go in blocks, each of which Tarantool stores as one row
//! (see "Storage" in the README): one value to decode and one tuple to
//! write instead of one per message, which is most of Tarantool's work per
//! message. Blocks are encoded here, where it is cheap.
//!
//! A message whose caller has gone is still stored (or refused) like any
//! other; its answer is dropped.
//!
//! Each call is an attempt with an id of its own, which Tarantool keeps with
//! the call's verdicts in the same transaction. When the answer is lost (the
//! connection broke or the call timed out with the commit in flight), the
//! attempt is settled: Tarantool says what it stored, or fences the attempt
//! so that it never will; only when it cannot be asked in time is the
//! outcome reported as unknown. Answered attempts are forgotten by the next
//! call, so their verdicts do not pile up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::ser::SerializeTuple;
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::{mpsc, oneshot};

use super::{Error, Published, Store, deadline_after, millis};

/// Most messages in one call: each holds Tarantool's transaction thread for
/// a few microseconds, and other callers wait behind the whole call.
const MAX_MESSAGES: usize = 256;
/// Most payload bytes in one call.
const MAX_BYTES: usize = 4 << 20;
/// Calls in flight at once.
const MAX_CALLS: usize = 2;
/// Most messages in one block. Each extra message in a row saves less
/// than the one before; and rows are kept to a few sizes (a block holds a
/// power of two of messages), because memtx keeps a slab for each size of
/// tuple it holds, sized for 128 of them: rows of many sizes would strand
/// most of a small Tarantool's memory in nearly empty slabs.
const BLOCK_MESSAGES: usize = 8;
/// Most payload bytes in one block.
const BLOCK_BYTES: usize = 8 << 10;

/// An inline message to store; owns what it stores.
#[derive(Debug, Clone)]
pub struct InlineMessage {
    /// Its subject.
    pub subject: String,
    /// Its headers.
    pub headers: HashMap<String, String>,
    /// The payload.
    pub data: Bytes,
    /// Hex SHA-256 of the payload.
    pub sha256: String,
    /// Publisher's id for deduplication.
    pub message_id: Option<String>,
    /// How long a message id is remembered.
    pub dedup_window: Duration,
}

/// A message waiting for its call, and where its outcome goes.
struct Queued {
    message: InlineMessage,
    /// Wall clock, nanoseconds: when the publisher stops waiting. Tarantool
    /// refuses the message after it rather than store it behind the back of
    /// a publisher that was told it failed.
    deadline_ns: u64,
    outcome: oneshot::Sender<Result<Published, Error>>,
}

/// The message as `mts_publish_batch` takes it.
impl Serialize for Queued {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let m = &self.message;
        let window_ms = millis(m.dedup_window);
        let mut tuple = serializer.serialize_tuple(8)?;
        tuple.serialize_element(&m.subject)?;
        tuple.serialize_element(&m.headers)?;
        tuple.serialize_element(serde_bytes::Bytes::new(&m.data))?;
        tuple.serialize_element(&(m.data.len() as u64))?;
        tuple.serialize_element(&m.sha256)?;
        tuple.serialize_element(m.message_id.as_deref().unwrap_or(""))?;
        tuple.serialize_element(&window_ms)?;
        tuple.serialize_element(&self.deadline_ns)?;
        tuple.end()
    }
}

/// The messages of one call, as `mts_publish_batch` takes them: one at a
/// time, then in blocks.
#[derive(Default)]
struct Call {
    singles: Vec<Queued>,
    blocks: Vec<Block>,
}

/// A subject's run of messages without message ids, stored as one row.
struct Block {
    subject: String,
    /// The earliest deadline of its messages: Tarantool stores all or none.
    deadline_ns: u64,
    bytes: u64,
    /// `{headers, data, sha256}` per message, one MessagePack array.
    batch: Vec<u8>,
    messages: Vec<Queued>,
}

/// The block as `mts_publish_batch` takes it.
impl Serialize for Block {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(5)?;
        tuple.serialize_element(&self.subject)?;
        tuple.serialize_element(&(self.messages.len() as u64))?;
        tuple.serialize_element(&self.bytes)?;
        tuple.serialize_element(&self.deadline_ns)?;
        tuple.serialize_element(serde_bytes::Bytes::new(&self.batch))?;
        tuple.end()
    }
}

impl Block {
    fn new(subject: String, messages: Vec<Queued>) -> Self {
        let mut batch = Vec::with_capacity(
            16 + messages
                .iter()
                .map(|q| q.message.data.len() + 96)
                .sum::<usize>(),
        );
        // Writing to a Vec cannot fail.
        let _ = rmp::encode::write_array_len(&mut batch, messages.len() as u32);
        for queued in &messages {
            let m = &queued.message;
            let _ = rmp::encode::write_array_len(&mut batch, 3);
            let _ = rmp::encode::write_map_len(&mut batch, m.headers.len() as u32);
            for (name, value) in &m.headers {
                let _ = rmp::encode::write_str(&mut batch, name);
                let _ = rmp::encode::write_str(&mut batch, value);
            }
            let _ = rmp::encode::write_bin(&mut batch, &m.data);
            let _ = rmp::encode::write_str(&mut batch, &m.sha256);
        }
        Self {
            subject,
            deadline_ns: messages.iter().map(|q| q.deadline_ns).min().unwrap_or(0),
            bytes: messages.iter().map(|q| q.message.data.len() as u64).sum(),
            batch,
            messages,
        }
    }
}

impl Call {
    /// Sorts `batch` into singles and blocks, each subject's messages in
    /// the order they were queued.
    fn new(batch: Vec<Queued>) -> Self {
        // Each subject's messages in queue order, subjects in the order they
        // first came; a subject's name is copied once, not per message.
        let mut subjects: Vec<(String, Vec<Queued>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for queued in batch {
            match index.get(queued.message.subject.as_str()) {
                Some(&at) => subjects[at].1.push(queued),
                None => {
                    index.insert(queued.message.subject.clone(), subjects.len());
                    subjects.push((queued.message.subject.clone(), vec![queued]));
                }
            }
        }
        let mut call = Call::default();
        for (subject, messages) in subjects {
            // Block rows hold neither message ids nor ordering keys, which
            // Tarantool records per message.
            let blockable = messages.len() > 1
                && messages.iter().all(|q| {
                    q.message.message_id.as_deref().unwrap_or("").is_empty()
                        && !q.message.headers.contains_key(super::ORDERING_KEY_HEADER)
                });
            if !blockable {
                call.singles.extend(messages);
                continue;
            }
            let mut messages = std::collections::VecDeque::from(messages);
            while !messages.is_empty() {
                let (mut fit, mut bytes) = (0usize, 0);
                for q in messages.iter().take(BLOCK_MESSAGES) {
                    bytes += q.message.data.len();
                    if fit > 0 && bytes > BLOCK_BYTES {
                        break;
                    }
                    fit += 1;
                }
                // A power of two of them: the rest go into the next block.
                let block = messages.drain(..1 << fit.ilog2()).collect();
                call.blocks.push(Block::new(subject.clone(), block));
            }
        }
        call
    }

    fn len(&self) -> usize {
        self.singles.len() + self.blocks.iter().map(|b| b.messages.len()).sum::<usize>()
    }

    /// Answers each message with its verdict: one per single, then one per
    /// block.
    fn answer(self, verdicts: Vec<Verdict>) {
        let expected = self.singles.len() + self.blocks.len();
        if verdicts.len() != expected {
            let err = Error::protocol(format!(
                "mts_publish_batch answered {} verdicts for {expected}",
                verdicts.len(),
            ));
            return self.answer_all(&err);
        }
        let mut verdicts = verdicts.into_iter();
        for (queued, verdict) in self.singles.into_iter().zip(verdicts.by_ref()) {
            let _gone = queued.outcome.send(verdict.into_result());
        }
        for (block, verdict) in self.blocks.into_iter().zip(verdicts) {
            match verdict.into_result() {
                Ok(first) => {
                    for (i, queued) in block.messages.into_iter().enumerate() {
                        let _gone = queued.outcome.send(Ok(Published {
                            seq: first.seq + i as u64,
                            duplicate: false,
                        }));
                    }
                }
                Err(err) => {
                    for queued in block.messages {
                        let _gone = queued.outcome.send(Err(err.clone()));
                    }
                }
            }
        }
    }

    fn answer_all(self, err: &Error) {
        tracing::debug!(%err, messages = self.len(), "group commit failed");
        let blocks = self.blocks.into_iter().flat_map(|b| b.messages);
        for queued in self.singles.into_iter().chain(blocks) {
            let _gone = queued.outcome.send(Err(err.clone()));
        }
    }
}

/// One message's verdict (or a block's: its first sequence): `{seq,
/// duplicate}`, or `{0, false, code, reason}` (without the reason when
/// settled after a lost answer).
#[derive(Debug, Deserialize)]
struct Verdict {
    seq: u64,
    duplicate: bool,
    #[serde(default)]
    code: Option<u32>,
    #[serde(default)]
    reason: Option<String>,
}

impl Verdict {
    fn into_result(self) -> Result<Published, Error> {
        match self.code {
            None => Ok(Published {
                seq: self.seq,
                duplicate: self.duplicate,
            }),
            // Settled attempts keep codes only.
            Some(code) => Err(Error::Refused {
                code,
                reason: self.reason.unwrap_or_else(|| {
                    "refused before its answer was lost (the reason is not kept)".into()
                }),
            }),
        }
    }
}

/// The sending end of a process's group-commit queue.
#[derive(Clone)]
pub(super) struct Queue {
    sender: mpsc::UnboundedSender<Queued>,
}

impl Queue {
    /// Starts the task that drains the queue through `store`, which must not
    /// hold a queue itself: the task ends when the last `Queue` is dropped.
    pub(super) fn start(store: Store) -> Self {
        debug_assert!(store.group.is_none());
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(drain(store, receiver));
        Self { sender }
    }

    /// Queues `message` now (so that messages queued one after another are
    /// stored in that order) and returns its outcome to await.
    pub(super) fn push(
        &self,
        message: InlineMessage,
        timeout: Duration,
    ) -> impl Future<Output = Result<Published, Error>> + Send + use<> {
        let deadline_ns = deadline_after(timeout);
        let (outcome, verdict) = oneshot::channel();
        let queued = self.sender.send(Queued {
            message,
            deadline_ns,
            outcome,
        });
        async move {
            queued.map_err(|_| Error::closed())?;
            verdict.await.unwrap_or_else(|_| Err(Error::closed()))
        }
    }
}

/// Attempts whose answers arrived, for the next call to forget.
#[derive(Clone, Default)]
struct Answered(Arc<Mutex<Vec<String>>>);

impl Answered {
    fn add(&self, attempts: impl IntoIterator<Item = String>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(attempts);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

async fn drain(store: Store, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let answered = Answered::default();
    let mut calls = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = calls.next(), if !calls.is_empty() => {}
            first = queue.recv(), if calls.len() < MAX_CALLS => {
                let Some(first) = first else { break };
                let batch = gather(first, &mut queue);
                let mut call = Box::pin(commit(store.clone(), batch, answered.clone()));
                // Puts the request in the send queue before the next call is made.
                if futures::poll!(call.as_mut()).is_pending() {
                    calls.push(call);
                }
            }
        }
    }
    while calls.next().await.is_some() {}
}

/// `first` and whatever else is queued, up to the limits of one call.
fn gather(first: Queued, queue: &mut mpsc::UnboundedReceiver<Queued>) -> Vec<Queued> {
    let mut bytes = first.message.data.len();
    let mut batch = vec![first];
    while batch.len() < MAX_MESSAGES && bytes < MAX_BYTES {
        let Ok(next) = queue.try_recv() else { break };
        bytes += next.message.data.len();
        batch.push(next);
    }
    batch
}

/// Stores `batch` in one call and answers each message; a lost answer is
/// settled in a task of its own, so that the queue goes on meanwhile.
async fn commit(store: Store, batch: Vec<Queued>, answered: Answered) {
    if let Some(observer) = &store.observer {
        observer.group_commit(batch.len());
    }
    let batch = Call::new(batch);
    let attempt = uuid::Uuid::now_v7().simple().to_string();
    let forget = answered.take();
    let reply: Result<(Vec<Verdict>,), Error> = store
        .call(
            "mts_publish_batch",
            (
                &batch.singles,
                &attempt,
                &forget,
                &*store.hot,
                &batch.blocks,
            ),
            store.timeout,
        )
        .await;
    match reply {
        Ok((verdicts,)) => {
            answered.add([attempt]);
            batch.answer(verdicts);
        }
        // A reply that did not decode came from a call that ran: as unknown.
        Err(err) if err.outcome_unknown() || matches!(err, Error::Protocol(_)) => {
            // Forgetting them may not have happened; doing it twice is harmless.
            answered.add(forget);
            tokio::spawn(settle(store, attempt, batch, err, answered));
        }
        Err(err) => {
            // A refused call wrote nothing: they are still to forget.
            answered.add(forget);
            batch.answer_all(&err);
        }
    }
}

/// Learns what became of an attempt whose answer was lost, and answers.
async fn settle(store: Store, attempt: String, batch: Call, cause: Error, answered: Answered) {
    let settled = store
        .settling(cause.clone(), |left| {
            let (store, attempt) = (&store, &attempt);
            async move {
                let (outcome, verdicts): (String, Vec<Verdict>) =
                    store.call("mts_settle_attempt", (attempt,), left).await?;
                Ok((outcome == "committed").then_some(verdicts))
            }
        })
        .await;
    match settled {
        Ok(Some(verdicts)) => {
            tracing::info!(%attempt, %cause, messages = batch.len(), "lost answer settled: stored");
            answered.add([attempt]);
            batch.answer(verdicts);
        }
        // Fenced: it never will be stored, so the failure stands as it was.
        Ok(None) => {
            tracing::info!(%attempt, %cause, messages = batch.len(), "lost answer settled: not stored");
            batch.answer_all(&cause);
        }
        Err(unknown) => {
            tracing::warn!(%attempt, err = %unknown, messages = batch.len(), "publish outcome unknown");
            batch.answer_all(&unknown);
        }
    }
}
