//! The Tarantool metadata store: sequences, message metadata (and inline
//! payloads) and durable consumer positions. Every operation is one call of a
//! stored procedure from `lua/minitoolstream.lua`, so multi-step writes are
//! atomic on any Tarantool from 2.6 on. One pipelined connection serves the
//! whole process; `tarant` reconnects it with backoff after a drop. This file
//! holds the connection, the schema, errors and identity; the operations are
//! split by concern: `publish`, `group_commit`, `consumers`, `subjects`,
//! `housekeeping` and `backup`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tarant::{Args, Client, ConnectOptions, ErrorCode};

use mts_config::Config;

mod backup;
mod consumers;
mod group_commit;
mod housekeeping;
mod publish;
mod subjects;
mod tiering;

pub use consumers::{
    AckOutcome, Batch, ConsumerLag, ConsumerSettings, ConsumerState, DeliverPolicy, Leased,
    NotHeld, Page, Rejected, Seek,
};
pub use group_commit::InlineMessage;
pub use publish::{
    NewMessage, ORDERING_KEY_HEADER, Payload, Published, SegmentRef, StoredMessage, Watch, Watched,
};
pub use subjects::{Discard, Limits, PurgeStep, SegmentCut, SubjectState};
pub use tiering::{HotBudget, HotTier, SegmentPlan, StorageStats, TierCommit, TieringOptions};

/// The schema and stored procedures, applied idempotently by `apply_schema`.
pub const SCHEMA_LUA: &str = include_str!("../lua/minitoolstream.lua");
/// The `SCHEMA_VERSION` that `SCHEMA_LUA` installs.
pub const SCHEMA_VERSION: u64 = 16;

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
/// Raised by `mts_publish` (and answered by `mts_publish_batch`) when the hot
/// tier is over its budget and the subject discards new messages (Lua's
/// `HOT_FULL`).
const HOT_FULL: ErrorCode = ErrorCode(10004);

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
    /// A write's answer was lost, and Tarantool could not tell within
    /// `waited` whether it was applied: it may or may not have been.
    #[error(
        "the outcome is unknown: the answer was lost ({cause}) and Tarantool could not tell within {waited:?} whether the write was applied"
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
    /// The hot tier is over its budget and the subject discards new messages.
    HotFull,
}

impl Error {
    /// Which of the refusals callers tell apart this is, if any.
    pub fn refusal(&self) -> Option<Refusal> {
        if self.out_of_memory() {
            return Some(Refusal::Full);
        }
        match self.server_code() {
            Some(MEMORY_ISSUE) => Some(Refusal::Full),
            Some(LATE) => Some(Refusal::Late),
            Some(ABANDONED) => Some(Refusal::Abandoned),
            Some(FENCED) => Some(Refusal::Fenced),
            Some(HOT_FULL) => Some(Refusal::HotFull),
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
    /// Whether Tarantool ran out of memory for data (its OutOfMemory errors
    /// may come without ER_MEMORY_ISSUE's code, but always with this text).
    fn out_of_memory(&self) -> bool {
        let text = match self {
            Self::Rejected(err) | Self::Full(err) => err.to_string(),
            Self::Refused { reason, .. } => reason.clone(),
            _ => return false,
        };
        text.contains("Failed to allocate")
    }

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

/// Who a store is: drawn when its schema was first applied. Object keys carry
/// the id, so that the orphan sweep only deletes what this store wrote.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Identity {
    /// A UUID, unique to this store.
    pub store_id: String,
    /// When the store was created, nanoseconds since the Unix epoch.
    pub created_ns: u64,
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
    /// The hot tier's budget as every publish sends it, built once.
    hot: Arc<tarant::Value>,
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
            hot: Arc::new(HotBudget::from_config(&config.tiering).to_lua_map()),
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
            // A newer schema keeps the names and meanings of this one (for
            // rolling upgrades): never put an older one back over it.
            Ok((version,)) if version >= SCHEMA_VERSION => Ok(()),
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
                    // A refusal will not change by asking again.
                    let refused = !err.outcome_unknown();
                    if refused {
                        tracing::warn!(%err, %cause, "Tarantool refused to settle a write whose answer was lost");
                    }
                    if refused || Instant::now() + pause >= deadline {
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
        for (name, code) in [
            ("ABANDONED", ABANDONED),
            ("LATE", LATE),
            ("FENCED", FENCED),
            ("HOT_FULL", HOT_FULL),
        ] {
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
