//! The Tarantool metadata store: sequences, message metadata (and inline
//! payloads) and durable consumer positions. Every operation is one call of a
//! stored procedure from `lua/minitoolstream.lua`, so multi-step writes are
//! atomic on any Tarantool from 2.6 on. One pipelined connection serves the
//! whole process; `tarant` reconnects it with backoff after a drop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tarant::{Args, Client, ConnectOptions, ErrorCode};

use mts_config::Config;

mod group_commit;

pub use group_commit::InlineMessage;

/// The schema and stored procedures, applied idempotently by `apply_schema`.
pub const SCHEMA_LUA: &str = include_str!("../lua/minitoolstream.lua");
/// The `SCHEMA_VERSION` that `SCHEMA_LUA` installs.
pub const SCHEMA_VERSION: u64 = 9;

/// Tarantool's `ER_MEMORY_ISSUE`: the arena is full.
const MEMORY_ISSUE: ErrorCode = ErrorCode(2);
/// Raised by `mts_publish` for an object key that was given up on (Lua's
/// `ABANDONED`).
const ABANDONED: ErrorCode = ErrorCode(10001);
/// Raised by `mts_publish` (and answered by `mts_publish_batch`) when the
/// request arrived after its deadline (Lua's `LATE`).
const LATE: ErrorCode = ErrorCode(10002);
/// Answered by `mts_publish_batch` for an attempt already settled as not
/// stored (Lua's `FENCED`).
const FENCED: ErrorCode = ErrorCode(10003);

/// What can go wrong talking to Tarantool. Cheap to clone: a group commit
/// hands one call's failure to every message in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The connection is down or broke while the call was in flight.
    #[error("Tarantool is unreachable: {0}")]
    Unavailable(#[source] Arc<tarant::Error>),
    /// No reply within the deadline.
    #[error("Tarantool did not answer within {0:?}")]
    Timeout(Duration),
    /// Tarantool is out of memory for data.
    #[error("Tarantool is out of memory: {0}")]
    Full(#[source] Arc<tarant::Error>),
    /// Tarantool refused the call.
    #[error("Tarantool refused the request: {0}")]
    Rejected(#[source] Arc<tarant::Error>),
    /// Tarantool refused one message of a group commit; the others stand.
    #[error("Tarantool refused the message: {reason} (error {code})")]
    Refused {
        /// Tarantool's error code.
        code: u32,
        /// What it said.
        reason: String,
    },
    /// A reply that does not have the expected shape.
    #[error("unexpected reply from Tarantool: {0}")]
    Protocol(#[source] Arc<tarant::Error>),
    /// A write's answer was lost, and Tarantool could not be asked within
    /// `waited` whether it was applied: it may or may not have been.
    #[error(
        "the outcome is unknown: the answer was lost ({cause}) and Tarantool could not be asked within {waited:?} whether the write was applied"
    )]
    OutcomeUnknown {
        /// Why the answer was lost.
        cause: Box<Error>,
        /// How long settling was tried.
        waited: Duration,
    },
}

/// Refusals of Tarantool's that callers answer in their own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Tarantool is out of memory for data.
    Full,
    /// The publish reached Tarantool after its deadline; nothing was stored.
    Late,
    /// The publish named an object key that was given up on.
    Abandoned,
    /// The publish attempt was settled as not stored before it arrived.
    Fenced,
}

impl Error {
    /// Which of the refusals callers tell apart this is, if any.
    pub fn refusal(&self) -> Option<Refusal> {
        match self.server_code() {
            Some(MEMORY_ISSUE) => Some(Refusal::Full),
            Some(LATE) => Some(Refusal::Late),
            Some(ABANDONED) => Some(Refusal::Abandoned),
            Some(FENCED) => Some(Refusal::Fenced),
            _ => None,
        }
    }

    /// Whether a write may or may not have been applied: the call reached
    /// the wire but no verdict came back.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }

    fn classify(err: tarant::Error) -> Self {
        match &err {
            tarant::Error::Server(server) if server.code() == MEMORY_ISSUE => {
                Self::Full(Arc::new(err))
            }
            tarant::Error::Server(_) | tarant::Error::Auth { .. } => Self::Rejected(Arc::new(err)),
            tarant::Error::Decode(_) | tarant::Error::Protocol(_) | tarant::Error::Encode(_) => {
                Self::Protocol(Arc::new(err))
            }
            _ => Self::Unavailable(Arc::new(err)),
        }
    }

    /// The connection is gone.
    pub fn closed() -> Self {
        Self::Unavailable(Arc::new(tarant::Error::Closed))
    }

    /// A reply or request that does not have the expected shape.
    pub fn protocol(what: impl Into<String>) -> Self {
        Self::Protocol(Arc::new(tarant::Error::Protocol(what.into())))
    }

    /// Tarantool's code for an error it raised, if it raised one.
    fn server_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected(err) | Self::Full(err) => match &**err {
                tarant::Error::Server(server) => Some(server.code()),
                _ => None,
            },
            Self::Refused { code, .. } => Some(ErrorCode(*code)),
            _ => None,
        }
    }
}

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
    pub data: Option<serde_bytes::ByteBuf>,
    /// The object key when the payload lives in the object store.
    pub object_key: Option<String>,
    /// Payload size in bytes.
    pub size: u64,
    /// Hex SHA-256 of the payload (absent on messages stored before it was recorded).
    #[serde(default)]
    pub sha256: Option<String>,
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

/// Who a store is: drawn when its schema was first applied. Object keys carry
/// the id, so that the orphan sweep only deletes what this store wrote.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Identity {
    /// A UUID, unique to this store.
    pub store_id: String,
    /// When the store was created, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverPolicy {
    /// From the first message still stored.
    All,
    /// Only messages published after the consumer is created.
    New,
    /// From a given sequence.
    ByStartSequence,
    /// From the first message committed at or after a given time.
    ByStartTime,
}

impl DeliverPolicy {
    /// The name the stored procedures use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::New => "new",
            Self::ByStartSequence => "by_start_sequence",
            Self::ByStartTime => "by_start_time",
        }
    }

    /// The policy named `name` by the stored procedures.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::All,
            Self::New,
            Self::ByStartSequence,
            Self::ByStartTime,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }
}

/// Consumer settings to create or update with; `None` keeps the current
/// value, or takes the default on creation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// Lease length in milliseconds.
    pub ack_wait_ms: Option<u32>,
    /// Deliveries before dead-lettering; 0 = unlimited.
    pub max_deliver: Option<u32>,
    /// Most leased messages at once; 0 = unlimited.
    pub max_ack_pending: Option<u32>,
    /// Where a new consumer starts.
    pub deliver_policy: Option<DeliverPolicy>,
    /// With `ByStartSequence`.
    pub start_seq: Option<u64>,
    /// With `ByStartTime`, nanoseconds since the Unix epoch.
    pub start_time_ns: Option<u64>,
    /// Dead-letter subject; empty = none.
    pub dlq_subject: Option<String>,
}

impl ConsumerSettings {
    fn to_lua_map(&self) -> tarant::Value {
        use tarant::Value;
        let mut map: Vec<(Value, Value)> = Vec::new();
        let mut put = |key: &str, value: Value| map.push((Value::from(key), value));
        if let Some(v) = self.ack_wait_ms {
            put("ack_wait_ms", Value::from(v));
        }
        if let Some(v) = self.max_deliver {
            put("max_deliver", Value::from(v));
        }
        if let Some(v) = self.max_ack_pending {
            put("max_ack_pending", Value::from(v));
        }
        if let Some(v) = self.deliver_policy {
            put("deliver_policy", Value::from(v.as_str()));
        }
        if let Some(v) = self.start_seq {
            put("start_seq", Value::from(v));
        }
        if let Some(v) = self.start_time_ns {
            put("start_time_ns", Value::from(v));
        }
        if let Some(v) = &self.dlq_subject {
            put("dlq_subject", Value::from(v.as_str()));
        }
        Value::Map(map)
    }
}

/// A consumer's settings and state, read at one instant.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerState {
    /// The subject.
    pub subject: String,
    /// The durable name.
    pub durable: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Lease length.
    pub ack_wait_ms: u64,
    /// Deliveries before dead-lettering; 0 = unlimited.
    pub max_deliver: u64,
    /// Most leased messages at once; 0 = unlimited.
    pub max_ack_pending: u64,
    /// The deliver policy's name.
    pub deliver_policy: String,
    /// Start sequence given at creation (0 if none).
    pub start_seq: u64,
    /// Start time given at creation (0 if none).
    pub start_time_ns: u64,
    /// Dead-letter subject; empty = none.
    pub dlq_subject: String,
    /// Everything up to and including it is acknowledged.
    pub ack_floor: u64,
    /// Highest sequence ever delivered.
    pub last_delivered: u64,
    /// Published, never delivered.
    pub num_pending: u64,
    /// Delivered, not acknowledged.
    pub num_ack_pending: u64,
    /// Of those, delivered more than once.
    pub num_redelivered: u64,
    /// Age of the oldest unacknowledged message, in nanoseconds.
    pub oldest_unacked_age_ns: u64,
    /// The subject's last sequence.
    pub last_seq: u64,
}

/// How far behind a consumer is.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerLag {
    /// The subject.
    pub subject: String,
    /// The durable name.
    pub durable: String,
    /// Published, never delivered.
    pub pending: u64,
    /// Delivered, not acknowledged.
    pub ack_pending: u64,
    /// Age of the oldest unacknowledged message, in milliseconds.
    pub oldest_unacked_age_ms: u64,
}

/// A message handed out under a lease.
#[derive(Debug, Clone, Deserialize)]
pub struct Leased {
    /// The message.
    pub message: StoredMessage,
    /// Deliveries so far, this one included.
    pub deliveries: u32,
    /// When the lease runs out, nanoseconds since the Unix epoch.
    pub deadline_ns: u64,
}

/// What one `consume` call handed out.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Leased messages, redeliveries first, then in sequence order.
    pub messages: Vec<Leased>,
    /// Earliest lease deadline still ahead (0 if none): when redeliveries can
    /// next become due.
    pub next_deadline_ns: u64,
}

/// Retention limits; `None` = the service default, `Some(0)` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Limits {
    /// Longest a message is kept, in milliseconds.
    pub max_age_ms: Option<u64>,
    /// Most messages kept.
    pub max_messages: Option<u64>,
    /// Most payload bytes kept.
    pub max_bytes: Option<u64>,
}

impl Limits {
    fn to_lua_map(self) -> tarant::Value {
        use tarant::Value;
        let fields = [
            ("max_age_ms", self.max_age_ms),
            ("max_messages", self.max_messages),
            ("max_bytes", self.max_bytes),
        ];
        Value::Map(
            fields
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (Value::from(k), Value::from(v))))
                .collect(),
        )
    }
}

/// What is stored for a subject.
#[derive(Debug, Clone, Deserialize)]
pub struct SubjectState {
    /// The subject.
    pub subject: String,
    /// Oldest sequence still stored; 0 if none.
    pub first_seq: u64,
    /// Highest sequence ever assigned.
    pub last_seq: u64,
    /// Messages stored.
    pub count: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// The subject's own limits.
    #[serde(flatten)]
    pub limits: Limits,
}

/// An ack or nack naming sequences the consumer does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHeld(pub Vec<u64>);

/// The verdict on a cumulative ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The durable's position is now `position`.
    Acked {
        /// Everything up to and including this is acknowledged.
        position: u64,
    },
    /// The sequence is beyond the subject's last sequence.
    BeyondLast {
        /// The subject's last sequence.
        last: u64,
    },
}

/// A handle on the metadata store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    timeout: Duration,
    schema_lock: Arc<tokio::sync::Mutex<()>>,
    observer: Option<Arc<dyn crate::Observer>>,
    /// Where `publish_inline` queues (see `group_commit`); `None` only in
    /// the store the queue's own task calls through.
    group: Option<group_commit::Queue>,
    /// This store's identity as last read (refreshed by every `check`).
    identity: Arc<Mutex<Identity>>,
}

impl Store {
    /// Connects once and makes sure the schema is in place.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        // `tarant` doubles its reconnect delay without jitter; drawing the
        // bounds per process keeps replicas that lost Tarantool together
        // from reconnecting in lockstep.
        let reconnect = tarant::Reconnect::Backoff {
            min: crate::backoff::jittered(Duration::from_millis(100)),
            max: crate::backoff::jittered(Duration::from_secs(2)),
        };
        let mut options = ConnectOptions::new(config.tarantool.address.clone())
            .connect_timeout(config.tarantool.timeout())
            .reconnect(reconnect);
        if config.tarantool.user != "guest" {
            options = options
                .user(config.tarantool.user.clone())
                .password(config.tarantool.password.clone());
        }
        let client = Client::with_options(options)
            .await
            .map_err(Error::classify)?;
        let mut store = Self {
            client,
            timeout: config.tarantool.timeout(),
            schema_lock: Arc::default(),
            observer: None,
            group: None,
            identity: Arc::new(Mutex::new(Identity {
                store_id: String::new(),
                created_ns: 0,
            })),
        };
        store.ensure_schema().await?;
        let identity = store.read_identity().await?;
        store.identity = Arc::new(Mutex::new(identity));
        Ok(store.with_group_commit())
    }

    /// (Re)starts the group-commit queue with this store's settings.
    fn with_group_commit(mut self) -> Self {
        let worker = Self {
            group: None,
            ..self.clone()
        };
        self.group = Some(group_commit::Queue::start(worker));
        self
    }

    /// Applies the schema unless Tarantool already runs this version, as it
    /// does when its own init script loaded the file: then the service user
    /// needs only the `minitoolstream` role, not the right to `eval`.
    async fn ensure_schema(&self) -> Result<(), Error> {
        let installed: Result<(u64,), Error> = self
            .deadline(self.timeout, self.client.call("mts_schema_version", ()))
            .await;
        match installed {
            Ok((version,)) if version == SCHEMA_VERSION => Ok(()),
            Ok(_) | Err(Error::Rejected(_)) => self.apply_schema().await.map(drop),
            Err(other) => Err(other),
        }
    }

    /// Tells `observer` of every call's latency and outcome.
    pub fn with_observer(mut self, observer: Arc<dyn crate::Observer>) -> Self {
        self.observer = Some(observer);
        self.with_group_commit()
    }

    /// Applies `SCHEMA_LUA`; returns the schema version.
    pub async fn apply_schema(&self) -> Result<u64, Error> {
        let _one_at_a_time = self.schema_lock.lock().await;
        let (version,): (u64,) = self
            .deadline(self.timeout, self.client.eval(SCHEMA_LUA, ()))
            .await?;
        tracing::info!(version, "tarantool schema applied");
        Ok(version)
    }

    async fn deadline<R>(
        &self,
        limit: Duration,
        call: impl Future<Output = tarant::Result<R>>,
    ) -> Result<R, Error> {
        match tokio::time::timeout(limit, call).await {
            Ok(reply) => reply.map_err(Error::classify),
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    /// Calls a stored procedure. When Tarantool has restarted, its global Lua
    /// functions are gone: re-apply the schema and call once more.
    async fn call<R: DeserializeOwned>(
        &self,
        name: &'static str,
        args: impl Args,
        limit: Duration,
    ) -> Result<R, Error> {
        let started = std::time::Instant::now();
        let result = self.call_healing(name, args, limit).await;
        if let Some(observer) = &self.observer {
            // A long-poll's wait is not latency.
            if name != "mts_wait" {
                observer.call(
                    "tarantool",
                    name,
                    started.elapsed().as_secs_f64(),
                    result.is_ok(),
                );
            }
        }
        result
    }

    async fn call_healing<R: DeserializeOwned>(
        &self,
        name: &'static str,
        args: impl Args,
        limit: Duration,
    ) -> Result<R, Error> {
        match self.deadline(limit, self.client.call(name, &args)).await {
            Err(e) if e.server_code() == Some(ErrorCode::NO_SUCH_PROC) => {
                tracing::warn!(
                    procedure = name,
                    "stored procedure missing; re-applying schema"
                );
                self.apply_schema().await?;
                self.deadline(limit, self.client.call(name, &args)).await
            }
            other => other,
        }
    }

    /// Checks that Tarantool answers and the schema is in place, and
    /// refreshes the identity (Tarantool may have been replaced).
    pub async fn check(&self) -> Result<(), Error> {
        let identity = self.read_identity().await?;
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = identity;
        Ok(())
    }

    /// The store's identity, read from Tarantool now.
    pub async fn read_identity(&self) -> Result<Identity, Error> {
        let (store_id, created_ns): (String, u64) =
            self.call("mts_identity", (), self.timeout).await?;
        Ok(Identity {
            store_id,
            created_ns,
        })
    }

    /// The store's identity as last read (at connect, then by `check`).
    pub fn identity(&self) -> Identity {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks `settle` (given the time left) until Tarantool answers, for at
    /// most this store's timeout: after a call whose answer was lost, the
    /// connection may take a moment to come back. `cause` is why the answer
    /// was lost; when no answer comes, the outcome is unknown.
    async fn settling<T, Fut>(
        &self,
        cause: Error,
        mut settle: impl FnMut(Duration) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match settle(left).await {
                Ok(settled) => return Ok(settled),
                Err(err) => {
                    tracing::debug!(%err, %cause, "settling a write whose answer was lost");
                    if Instant::now() + pause >= deadline {
                        return Err(Error::OutcomeUnknown {
                            cause: Box::new(cause),
                            waited: self.timeout,
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

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
                    message.message_id.map(|id| (id, window_ms)),
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

    /// Registers a subscription: creates the durable on first use (starting
    /// at `start_seq - 1` when given) and returns the point after which the
    /// subscriber has not been notified, and the last sequence.
    pub async fn subscribe(
        &self,
        subject: &str,
        durable: &str,
        start_seq: u64,
    ) -> Result<(u64, u64), Error> {
        self.call("mts_subscribe", (subject, durable, start_seq), self.timeout)
            .await
    }

    /// Leases up to `limit` messages to the consumer (creating it with
    /// defaults on first use): due redeliveries first, then new messages.
    pub async fn consume(&self, subject: &str, durable: &str, limit: u32) -> Result<Batch, Error> {
        let (messages, next_deadline_ns): (Vec<Leased>, u64) = self
            .call("mts_consume", (subject, durable, limit), self.timeout)
            .await?;
        Ok(Batch {
            messages,
            next_deadline_ns,
        })
    }

    /// Acknowledges exactly `acks` (all must be held, or nothing happens)
    /// and then leases up to `limit` messages, in one transaction: a consume
    /// stream's acks ride along with its next lease. With nothing to lease,
    /// waits up to `wait` for a commit (or a redelivery falling due) and
    /// looks again.
    pub async fn ack_and_consume(
        &self,
        subject: &str,
        durable: &str,
        acks: &[u64],
        limit: u32,
        wait: Duration,
    ) -> Result<Result<Batch, NotHeld>, Error> {
        let wait_ms = millis(wait);
        let (status, messages, next_deadline_ns, missing): (String, Vec<Leased>, u64, Vec<u64>) =
            self.call(
                "mts_ack_consume",
                (subject, durable, acks, limit, wait_ms),
                self.timeout + wait,
            )
            .await?;
        Ok(if status == "ok" {
            Ok(Batch {
                messages,
                next_deadline_ns,
            })
        } else {
            Err(NotHeld(missing))
        })
    }

    /// Acknowledges exactly `seqs`; all must be held, or none is acked.
    /// Returns the new ack floor.
    pub async fn ack_each(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
    ) -> Result<Result<u64, NotHeld>, Error> {
        let (status, detail): (String, tarant::Value) = self
            .call("mts_ack_each", (subject, durable, seqs), self.timeout)
            .await?;
        Ok(if status == "ok" {
            Ok(detail.as_u64().unwrap_or_default())
        } else {
            Err(NotHeld(sequences(&detail)))
        })
    }

    /// Makes `seqs` deliverable again after `delay_ms`; all must be held.
    pub async fn nack(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
        delay_ms: u32,
    ) -> Result<Result<(), NotHeld>, Error> {
        let (status, missing): (String, tarant::Value) = self
            .call("mts_nack", (subject, durable, seqs, delay_ms), self.timeout)
            .await?;
        Ok(if status == "ok" {
            Ok(())
        } else {
            Err(NotHeld(sequences(&missing)))
        })
    }

    /// Gives leases back at once (best effort, for a stream that ended).
    pub async fn release(&self, subject: &str, durable: &str, seqs: &[u64]) -> Result<(), Error> {
        let _: (bool,) = self
            .call("mts_release", (subject, durable, seqs), self.timeout)
            .await?;
        Ok(())
    }

    /// The original cumulative ack: everything up to `seq`, never back.
    pub async fn ack(&self, subject: &str, durable: &str, seq: u64) -> Result<AckOutcome, Error> {
        let (status, value): (String, u64) = self
            .call("mts_ack", (subject, durable, seq), self.timeout)
            .await?;
        Ok(if status == "ok" {
            AckOutcome::Acked { position: value }
        } else {
            AckOutcome::BeyondLast { last: value }
        })
    }

    /// Creates the consumer or updates its settings; true when created.
    pub async fn put_consumer(
        &self,
        subject: &str,
        durable: &str,
        settings: &ConsumerSettings,
    ) -> Result<bool, Error> {
        let (outcome,): (String,) = self
            .call(
                "mts_consumer_put",
                (subject, durable, settings.to_lua_map()),
                self.timeout,
            )
            .await?;
        Ok(outcome == "created")
    }

    /// The consumer's settings and state, if it exists.
    pub async fn consumer_info(
        &self,
        subject: &str,
        durable: &str,
    ) -> Result<Option<ConsumerState>, Error> {
        let (state,): (Option<ConsumerState>,) = self
            .call("mts_consumer_info", (subject, durable), self.timeout)
            .await?;
        Ok(state)
    }

    /// Lag of up to `limit` consumers.
    pub async fn consumers_lag(&self, limit: u32) -> Result<Vec<ConsumerLag>, Error> {
        let (lag,): (Vec<ConsumerLag>,) = self
            .call("mts_consumers_lag", (limit,), self.timeout)
            .await?;
        Ok(lag)
    }

    /// Deletes the consumer and its leases; true if it existed.
    pub async fn delete_consumer(&self, subject: &str, durable: &str) -> Result<bool, Error> {
        let (existed,): (bool,) = self
            .call("mts_consumer_delete", (subject, durable), self.timeout)
            .await?;
        Ok(existed)
    }

    /// Sets a subject's own retention limits (`None` fields stay as they are).
    pub async fn set_limits(&self, subject: &str, limits: Limits) -> Result<(), Error> {
        let _: (bool,) = self
            .call(
                "mts_subject_limits",
                (subject, limits.to_lua_map()),
                self.timeout,
            )
            .await?;
        Ok(())
    }

    /// What is stored for a subject.
    pub async fn subject_state(&self, subject: &str) -> Result<SubjectState, Error> {
        let (state,): (SubjectState,) = self
            .call("mts_subject_info", (subject,), self.timeout)
            .await?;
        Ok(state)
    }

    /// One bounded step of retention from `cursor` with default `limits`:
    /// returns where to resume ("" when every subject was visited) and how
    /// many messages were removed.
    pub async fn retention_step(
        &self,
        cursor: &str,
        limits: Limits,
        budget: u32,
        budget_ms: u32,
    ) -> Result<(String, u64), Error> {
        self.call(
            "mts_retention_step",
            (cursor, limits.to_lua_map(), budget, budget_ms),
            self.timeout,
        )
        .await
    }

    /// Up to `limit` object keys whose metadata is gone.
    pub async fn released_objects(&self, limit: u32) -> Result<Vec<String>, Error> {
        let (keys,): (Vec<String>,) = self.call("mts_gc_take", (limit,), self.timeout).await?;
        Ok(keys)
    }

    /// Forgets released object keys once their objects are deleted.
    pub async fn forget_objects(&self, keys: &[String]) -> Result<(), Error> {
        let _: (bool,) = self.call("mts_gc_done", (keys,), self.timeout).await?;
        Ok(())
    }

    /// Takes or renews lease `name` for `holder`; whether `holder` holds it.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, Error> {
        let ttl_ms = millis(ttl);
        let (held,): (bool,) = self
            .call("mts_lease", (name, holder, ttl_ms), self.timeout)
            .await?;
        Ok(held)
    }

    /// Holds object deletions for `hold`, takes a checkpoint and pins its
    /// files until `backup_stop`: their names and sizes. Waits up to
    /// `limit` for the checkpoint.
    pub async fn backup_start(
        &self,
        hold: Duration,
        limit: Duration,
    ) -> Result<Vec<(String, u64)>, Error> {
        let hold_ms = millis(hold);
        let (files,): (Vec<(String, u64)>,) =
            self.call("mts_backup_start", (hold_ms,), limit).await?;
        Ok(files)
    }

    /// Extends the hold on object deletions to `hold` from now.
    pub async fn backup_renew(&self, hold: Duration) -> Result<(), Error> {
        let hold_ms = millis(hold);
        let (_,): (bool,) = self
            .call("mts_backup_renew", (hold_ms,), self.timeout)
            .await?;
        Ok(())
    }

    /// Up to `length` bytes of pinned checkpoint file `name` from `offset`.
    pub async fn backup_read(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, Error> {
        use base64::Engine;
        let (encoded,): (String,) = self
            .call("mts_backup_read", (name, offset, length), self.timeout)
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| Error::protocol(format!("backup chunk: {e}")))
    }

    /// Up to `limit` object keys (with sizes, 0 when unknown) after `after`,
    /// from stored messages (`source` "messages") or the deletion queue ("gc").
    pub async fn backup_keys(
        &self,
        source: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, Error> {
        let (keys,): (Vec<(String, u64)>,) = self
            .call("mts_backup_keys", (source, after, limit), self.timeout)
            .await?;
        Ok(keys)
    }

    /// Unpins the checkpoint and lifts the hold on deletions.
    pub async fn backup_stop(&self) -> Result<(), Error> {
        let (_,): (bool,) = self.call("mts_backup_stop", (), self.timeout).await?;
        Ok(())
    }
}

/// Wall clock `timeout` from now, in nanoseconds since the Unix epoch: the
/// deadline a publish carries to Tarantool, which refuses it after that.
fn deadline_after(timeout: Duration) -> u64 {
    std::time::SystemTime::now()
        .checked_add(timeout)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `duration` in whole milliseconds, as the stored procedures take it.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The sequences in a Lua array (empty tables arrive as maps).
fn sequences(value: &tarant::Value) -> Vec<u64> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(tarant::Value::as_u64).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_and_lua_name_the_error_codes_alike() {
        for (name, code) in [("ABANDONED", ABANDONED), ("LATE", LATE), ("FENCED", FENCED)] {
            assert!(
                SCHEMA_LUA.contains(&format!("local {name} = {}\n", code.0)),
                "{name} is {} in store.rs and must be the same in the Lua file",
                code.0
            );
        }
    }

    #[test]
    fn rust_and_lua_agree_on_the_schema_version() {
        assert!(
            SCHEMA_LUA.contains(&format!("local SCHEMA_VERSION = {SCHEMA_VERSION}\n")),
            "bump SCHEMA_VERSION in store.rs together with the Lua file"
        );
    }
}
