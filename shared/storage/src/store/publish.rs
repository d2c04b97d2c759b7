//! Publishing: storing messages (one by one, or by group commit), what
//! became of a publish whose answer was lost, and reading stored messages
//! back by sequence.

use super::*;

/// The header that carries a message's ordering key: the ingress sets it
/// from the publish's `ordering_key`, and delivery by key reads it.
pub const ORDERING_KEY_HEADER: &str = "mts-ordering-key";

/// One stored message as Tarantool returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredMessage {
    /// Subject it was published to.
    pub subject: String,
    /// Its sequence within the subject.
    pub seq: u64,
    /// Commit time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Publisher's headers.
    pub headers: HashMap<String, String>,
    /// The payload when stored inline.
    pub data: Option<bytes::Bytes>,
    /// The object key when the payload lives in the object store.
    pub object_key: Option<String>,
    /// Payload size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the payload (absent on messages stored before it was recorded).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Set when the message lives in a segment of the cold tier: then only
    /// `subject` and `seq` are filled in, and the rest is read from there.
    #[serde(default)]
    pub segment: Option<SegmentRef>,
}

/// Where in the cold tier a message is: the block of a segment object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct SegmentRef {
    /// The segment object's key.
    pub object_key: String,
    /// Offset of the message's block in it.
    pub offset: u64,
    /// Length of that block.
    pub length: u64,
    /// Size of the whole object; 0 when not told.
    #[serde(default)]
    pub object_size: u64,
}

/// Where a new message's payload is.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Stored inline in Tarantool.
    Inline(&'a [u8]),
    /// Already uploaded under this object key.
    Object(&'a str),
}

/// A message to store.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// Its subject.
    pub subject: &'a str,
    /// Its headers.
    pub headers: &'a HashMap<String, String>,
    /// Its payload.
    pub payload: Payload<'a>,
    /// Payload size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the payload.
    pub sha256: Option<&'a str>,
    /// Publisher's id for deduplication.
    pub message_id: Option<&'a str>,
    /// How long a message id is remembered.
    pub dedup_window: Duration,
}

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message's sequence (the first one's, for a duplicate).
    pub seq: u64,
    /// True when the message id was seen within the window and nothing was stored.
    pub duplicate: bool,
}

impl Store {
    /// Stores a message without digest or message id and returns its
    /// sequence. Exactly one of `data` and `object_key` is set.
    pub async fn publish(
        &self,
        subject: &str,
        headers: &HashMap<String, String>,
        data: Option<&[u8]>,
        object_key: Option<&str>,
        size: u64,
    ) -> Result<u64, Error> {
        let payload = match (data, object_key) {
            (_, Some(key)) => Payload::Object(key),
            (data, None) => Payload::Inline(data.unwrap_or_default()),
        };
        let published = self
            .publish_message(NewMessage {
                subject,
                headers,
                payload,
                size,
                sha256: None,
                message_id: None,
                dedup_window: Duration::ZERO,
            })
            .await?;
        Ok(published.seq)
    }

    /// Stores a message, or finds the earlier one with the same message id.
    pub async fn publish_message(&self, message: NewMessage<'_>) -> Result<Published, Error> {
        let (data, object_key) = match message.payload {
            Payload::Inline(data) => (Some(serde_bytes::Bytes::new(data)), None),
            Payload::Object(key) => (None, Some(key)),
        };
        let deadline_ns = deadline_after(self.timeout);
        let window_ms = millis(message.dedup_window);
        let (seq, duplicate): (u64, bool) = self
            .call(
                "mts_publish",
                (
                    message.subject,
                    message.headers,
                    data,
                    object_key,
                    message.size,
                    deadline_ns,
                    message.sha256,
                    self.publish_options(message.message_id, window_ms),
                ),
                self.timeout,
            )
            .await?;
        Ok(Published { seq, duplicate })
    }

    /// Stores an inline message by group commit (see `group_commit`), or
    /// finds the earlier one with the same message id. The message is queued
    /// before this returns, so messages queued one after another get
    /// sequences in that order; it is stored even if the future is dropped.
    pub fn publish_inline(
        &self,
        message: InlineMessage,
    ) -> impl Future<Output = Result<Published, Error>> + Send + use<> {
        let queued = self
            .group
            .as_ref()
            .map(|queue| queue.push(message, self.timeout));
        async move {
            match queued {
                Some(outcome) => outcome.await,
                None => Err(Error::closed()),
            }
        }
    }

    /// The sequence `message_id` was stored under within its window, if any.
    pub async fn seen_message_id(
        &self,
        subject: &str,
        message_id: &str,
    ) -> Result<Option<u64>, Error> {
        let (seq,): (u64,) = self
            .call("mts_dedup_lookup", (subject, message_id), self.timeout)
            .await?;
        Ok((seq > 0).then_some(seq))
    }

    /// One stored message, if it exists.
    pub async fn message(&self, subject: &str, seq: u64) -> Result<Option<StoredMessage>, Error> {
        let (message,): (Option<StoredMessage>,) = self
            .call("mts_message", (subject, seq), self.timeout)
            .await?;
        Ok(message)
    }

    /// After a publish of `object_key` failed with `cause` (an unknown
    /// outcome): the sequence if it was committed; otherwise `None`, and a
    /// late commit of that key is refused from now on, so the object may be
    /// deleted. Keeps asking while Tarantool is unreachable, up to the
    /// store's timeout; then the outcome is unknown.
    pub async fn settle_object(
        &self,
        object_key: &str,
        cause: Error,
    ) -> Result<Option<u64>, Error> {
        self.settling(cause, |left| async move {
            let (seq,): (u64,) = self.call("mts_settle_object", (object_key,), left).await?;
            Ok((seq > 0).then_some(seq))
        })
        .await
    }

    /// Of `keys`, those no message names; each is fenced against a late
    /// commit, so its object may be deleted.
    pub async fn settle_objects(&self, keys: &[String]) -> Result<Vec<String>, Error> {
        let (orphans,): (Vec<String>,) = self
            .call("mts_settle_objects", (keys,), self.timeout)
            .await?;
        Ok(orphans)
    }

    /// The subject's last sequence; 0 if nothing was ever published to it.
    pub async fn last_seq(&self, subject: &str) -> Result<u64, Error> {
        let (last,): (u64,) = self.call("mts_last_seq", (subject,), self.timeout).await?;
        Ok(last)
    }

    /// Waits in Tarantool until the subject's last sequence exceeds `after`,
    /// at most `wait`; returns the last sequence.
    pub async fn wait_beyond(
        &self,
        subject: &str,
        after: u64,
        wait: Duration,
    ) -> Result<u64, Error> {
        let (last,): (u64,) = self
            .call(
                "mts_wait",
                (subject, after, wait.as_secs_f64()),
                wait + self.timeout,
            )
            .await?;
        Ok(last)
    }

    /// A watcher's wait: returns when the subject's last sequence passes
    /// `seen.last`, messages of a consumer of the subject became
    /// deliverable again (a nack, a release, a seek, room freed at
    /// max_ack_pending, or a lease or nack delay that ran out), or after
    /// `wait`. The first wait (no epoch known yet) returns at once.
    pub async fn watch(
        &self,
        subject: &str,
        seen: Watch,
        wait: Duration,
    ) -> Result<Watched, Error> {
        use tarant::Value;
        let mut map = vec![(Value::from("since_ns"), Value::from(seen.since_ns))];
        if let Some(epoch) = seen.epoch {
            map.push((Value::from("epoch"), Value::from(epoch)));
        }
        let (last, epoch, lapsed, since_ns): (u64, u64, bool, u64) = self
            .call(
                "mts_wait",
                (subject, seen.last, wait.as_secs_f64(), Value::Map(map)),
                wait + self.timeout,
            )
            .await?;
        Ok(Watched {
            now: Watch {
                last: last.max(seen.last),
                epoch: Some(epoch),
                since_ns,
            },
            released: lapsed || seen.epoch.is_some_and(|known| known != epoch),
        })
    }
}

/// What a watcher of a subject has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    /// The subject's last sequence.
    pub last: u64,
    /// The subject's release epoch; none before the first wait.
    pub epoch: Option<u64>,
    /// Lease ends up to this time (ns since the Unix epoch) are accounted for.
    pub since_ns: u64,
}

/// What one watcher's wait found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// Where the watcher stands now.
    pub now: Watch,
    /// Messages became deliverable again to a consumer of the subject.
    pub released: bool,
}
