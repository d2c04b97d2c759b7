//! The Tarantool metadata store: sequences, message metadata (and inline
//! payloads) and durable consumer positions. Every operation is one call of a
//! stored procedure from `lua/minitoolstream.lua`, so multi-step writes are
//! atomic on any Tarantool from 2.6 on. One pipelined connection serves the
//! whole process; `tarant` reconnects it with backoff after a drop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use tarant::{Args, Client, ConnectOptions, ErrorCode};

use crate::config::Config;

/// The schema and stored procedures, applied idempotently by `apply_schema`.
pub const SCHEMA_LUA: &str = include_str!("../lua/minitoolstream.lua");
/// The `SCHEMA_VERSION` that `SCHEMA_LUA` installs.
pub const SCHEMA_VERSION: u64 = 1;

/// Tarantool's `ER_MEMORY_ISSUE`: the arena is full.
const MEMORY_ISSUE: ErrorCode = ErrorCode(2);
/// Raised by `mts_publish` for an object key that was given up on.
const ABANDONED: ErrorCode = ErrorCode(10001);
/// Raised by `mts_publish` when the request arrived after its deadline.
const LATE: ErrorCode = ErrorCode(10002);

/// What can go wrong talking to Tarantool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection is down or broke while the call was in flight.
    #[error("Tarantool is unreachable: {0}")]
    Unavailable(#[source] tarant::Error),
    /// No reply within the deadline.
    #[error("Tarantool did not answer within {0:?}")]
    Timeout(Duration),
    /// Tarantool is out of memory for data.
    #[error("Tarantool is out of memory: {0}")]
    Full(#[source] tarant::Error),
    /// Tarantool refused the call.
    #[error("Tarantool refused the request: {0}")]
    Rejected(#[source] tarant::Error),
    /// A reply that does not have the expected shape.
    #[error("unexpected reply from Tarantool: {0}")]
    Protocol(#[source] tarant::Error),
}

impl Error {
    /// Whether a write may or may not have been applied: the call reached
    /// the wire but no verdict came back.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }

    fn classify(err: tarant::Error) -> Self {
        match &err {
            tarant::Error::Server(server) if server.code() == MEMORY_ISSUE => Self::Full(err),
            tarant::Error::Server(_) | tarant::Error::Auth { .. } => Self::Rejected(err),
            tarant::Error::Decode(_) | tarant::Error::Protocol(_) | tarant::Error::Encode(_) => {
                Self::Protocol(err)
            }
            _ => Self::Unavailable(err),
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
}

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
}

impl Store {
    /// Connects once and makes sure the schema is in place.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        let mut options = ConnectOptions::new(config.tarantool_address.clone())
            .connect_timeout(config.tarantool_timeout());
        if config.tarantool_user != "guest" {
            options = options
                .user(config.tarantool_user.clone())
                .password(config.tarantool_password.clone());
        }
        let client = Client::with_options(options)
            .await
            .map_err(Error::classify)?;
        let store = Self {
            client,
            timeout: config.tarantool_timeout(),
            schema_lock: Arc::default(),
        };
        store.ensure_schema().await?;
        Ok(store)
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
        name: &str,
        args: impl Args,
        limit: Duration,
    ) -> Result<R, Error> {
        match self.deadline(limit, self.client.call(name, &args)).await {
            Err(Error::Rejected(tarant::Error::Server(e)))
                if e.code() == ErrorCode::NO_SUCH_PROC =>
            {
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

    /// Checks that Tarantool answers and the schema is in place.
    pub async fn check(&self) -> Result<(), Error> {
        let (_version,): (u64,) = self.call("mts_schema_version", (), self.timeout).await?;
        Ok(())
    }

    /// Stores a message and returns its sequence. Exactly one of `data` and
    /// `object_key` is set.
    pub async fn publish(
        &self,
        subject: &str,
        headers: &HashMap<String, String>,
        data: Option<&[u8]>,
        object_key: Option<&str>,
        size: u64,
    ) -> Result<u64, Error> {
        let data = data.map(serde_bytes::Bytes::new);
        let deadline_ns = std::time::SystemTime::now()
            .checked_add(self.timeout)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let (seq,): (u64,) = self
            .call(
                "mts_publish",
                (subject, headers, data, object_key, size, deadline_ns),
                self.timeout,
            )
            .await?;
        Ok(seq)
    }

    /// After a publish of `object_key` ended with an unknown outcome: the
    /// sequence if it was committed; otherwise `None`, and a late commit of
    /// that key is refused from now on, so the object may be deleted.
    pub async fn settle_object(&self, object_key: &str) -> Result<Option<u64>, Error> {
        let (seq,): (u64,) = self
            .call("mts_settle_object", (object_key,), self.timeout)
            .await?;
        Ok((seq > 0).then_some(seq))
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

    /// Up to `limit` messages after the durable's ack position.
    pub async fn fetch(
        &self,
        subject: &str,
        durable: &str,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, Error> {
        let (_ack, messages): (u64, Vec<StoredMessage>) = self
            .call("mts_fetch", (subject, durable, limit), self.timeout)
            .await?;
        Ok(messages)
    }

    /// Moves the durable's position forward to `seq` (never back).
    pub async fn ack(&self, subject: &str, durable: &str, seq: u64) -> Result<AckOutcome, Error> {
        let (status, position, last): (String, u64, u64) = self
            .call("mts_ack", (subject, durable, seq), self.timeout)
            .await?;
        Ok(if status == "ok" {
            AckOutcome::Acked { position }
        } else {
            AckOutcome::BeyondLast { last }
        })
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match &err {
            Error::Unavailable(_) | Error::Timeout(_) => tonic::Status::unavailable(format!(
                "metadata store unavailable, retry later: {err}"
            )),
            Error::Full(_) => tonic::Status::resource_exhausted(format!(
                "metadata store is full; free space or raise memtx_memory: {err}"
            )),
            Error::Rejected(tarant::Error::Server(server)) if server.code() == LATE => {
                tonic::Status::unavailable(format!(
                    "metadata store was too slow, retry later: {err}"
                ))
            }
            Error::Rejected(tarant::Error::Server(server)) if server.code() == ABANDONED => {
                tonic::Status::aborted(format!(
                    "publish was abandoned after a timeout; publish again: {err}"
                ))
            }
            Error::Rejected(_) | Error::Protocol(_) => {
                tonic::Status::internal(format!("metadata store error: {err}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_and_lua_agree_on_the_schema_version() {
        assert!(
            SCHEMA_LUA.contains(&format!("local SCHEMA_VERSION = {SCHEMA_VERSION}\n")),
            "bump SCHEMA_VERSION in store.rs together with the Lua file"
        );
    }
}
