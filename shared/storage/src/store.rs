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

pub use backup::Checkpoint;
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
pub const SCHEMA_VERSION: u64 = 17;

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
/// Tarantool's `ER_LOADING`: the member is still starting.
const LOADING: ErrorCode = ErrorCode(116);
/// Tarantool's `ER_SYNC_MASTER_MISMATCH`: a write reached a member that is
/// not (or not yet) the one the replica set follows.
const SYNC_MASTER_MISMATCH: ErrorCode = ErrorCode(215);
/// Tarantool's `ER_SYNC_QUORUM_TIMEOUT` and `ER_SYNC_ROLLBACK`: a
/// synchronous write was rolled back, not confirmed by a quorum in time.
const SYNC_QUORUM_TIMEOUT: ErrorCode = ErrorCode(216);
const SYNC_ROLLBACK: ErrorCode = ErrorCode(217);

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
    /// A replica set's quorum did not confirm the write in time: it was
    /// rolled back.
    QuorumLost,
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
            Some(SYNC_QUORUM_TIMEOUT | SYNC_ROLLBACK) => Some(Refusal::QuorumLost),
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
            // A member that does not take writes (now): nothing was written,
            // and another member does, or will after a failover.
            tarant::Error::Server(server)
                if matches!(
                    server.code(),
                    ErrorCode::READONLY | LOADING | SYNC_MASTER_MISMATCH
                ) =>
            {
                Self::Unavailable(Arc::new(err))
            }
            tarant::Error::Server(_) | tarant::Error::Auth { .. } => Self::Rejected(Arc::new(err)),
            tarant::Error::Decode(_) | tarant::Error::Protocol(_) | tarant::Error::Encode(_) => {
                Self::Protocol(Arc::new(err))
            }
            _ => Self::Unavailable(Arc::new(err)),
        }
    }

    /// Tarantool cannot take the call now, for the reason `why`.
    fn unavailable(why: impl Into<String>) -> Self {
        let io = std::io::Error::new(std::io::ErrorKind::NotConnected, why.into());
        Self::Unavailable(Arc::new(tarant::Error::Io(io)))
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

    /// Whether a member refused a write for not taking writes.
    fn read_only(&self) -> bool {
        match self {
            Self::Unavailable(err) => matches!(
                &**err,
                tarant::Error::Server(server)
                    if matches!(server.code(), ErrorCode::READONLY | SYNC_MASTER_MISMATCH)
            ),
            _ => false,
        }
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
    members: Arc<Members>,
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
    /// Connects and makes sure the schema is in place. With the addresses
    /// of a replica set's members (comma-separated), writes go to the member
    /// that takes them, found now and again whenever it changes.
    pub async fn connect(config: &Config) -> Result<Self, Error> {
        let members = Arc::new(Members::connect(config).await?);
        if members.is_replica_set() {
            Members::watch_leader(Arc::downgrade(&members));
        }
        let mut store = Self {
            members,
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

    /// The connection to the member that takes writes.
    fn client(&self) -> Client {
        self.members.leader()
    }

    /// The replica set as this store sees it: each member's address and
    /// role (a single Tarantool is a set of one).
    pub async fn members(&self) -> Vec<MemberState> {
        self.members.states(self.timeout).await
    }

    /// How many times this store saw the leader change.
    pub fn leader_changes(&self) -> u64 {
        self.members
            .changes
            .load(std::sync::atomic::Ordering::Relaxed)
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
            .deadline(self.timeout, self.client().call("mts_schema_version", ()))
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
        self.apply_schema_on(&self.client()).await
    }

    /// Applies the schema through `client` (a follower defines the
    /// procedures only).
    async fn apply_schema_on(&self, client: &Client) -> Result<u64, Error> {
        let _one_at_a_time = self.schema_lock.lock().await;
        let (version,): (u64,) = self
            .deadline(self.timeout, client.eval(SCHEMA_LUA, ()))
            .await?;
        tracing::info!(version, "tarantool schema applied");
        Ok(version)
    }

    /// Calls a stored procedure on member `member` (a follower, say), with
    /// its procedures defined there first when it lacks them: the schema
    /// applied by a service reaches the leader only.
    async fn call_on<R: DeserializeOwned>(
        &self,
        member: usize,
        name: &'static str,
        args: impl Args,
        limit: Duration,
    ) -> Result<R, Error> {
        let client = self.members.client_of(member).await?;
        match self.deadline(limit, client.call(name, &args)).await {
            Err(e) if e.server_code() == Some(ErrorCode::NO_SUCH_PROC) => {
                tracing::warn!(
                    procedure = name,
                    member = self.members.address(member),
                    "stored procedure missing; applying the schema"
                );
                self.apply_schema_on(client).await?;
                self.deadline(limit, client.call(name, &args)).await
            }
            other => other,
        }
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

    /// Calls the leader; on a replica set, a call under way when the leader
    /// changes stops waiting for the old one (its outcome is unknown).
    async fn call_leader<R: DeserializeOwned>(
        &self,
        name: &'static str,
        args: &impl Args,
        limit: Duration,
    ) -> Result<R, Error> {
        if !self.members.is_replica_set() {
            return self.deadline(limit, self.client().call(name, args)).await;
        }
        let mut changed = self.members.changed.subscribe();
        let client = self.client();
        tokio::select! {
            reply = self.deadline(limit, client.call(name, args)) => reply,
            _ = changed.changed() => Err(Error::unavailable(
                "the leader changed while the call was under way",
            )),
        }
    }

    async fn call_healing<R: DeserializeOwned>(
        &self,
        name: &'static str,
        args: impl Args,
        limit: Duration,
    ) -> Result<R, Error> {
        match self.call_leader(name, &args, limit).await {
            Err(e) if e.server_code() == Some(ErrorCode::NO_SUCH_PROC) => {
                tracing::warn!(
                    procedure = name,
                    "stored procedure missing; re-applying schema"
                );
                self.apply_schema().await?;
                self.call_leader(name, &args, limit).await
            }
            Err(e) if self.members.is_replica_set() && e.read_only() => {
                // Nothing was written: find the member that takes writes
                // now and ask it.
                self.members.find_leader(self.timeout).await?;
                self.call_leader(name, &args, limit).await
            }
            Err(e) if self.members.is_replica_set() && e.outcome_unknown() => {
                // The member may be gone: look for the one taking writes
                // meanwhile, for the calls (and settling) that follow.
                self.members.find_leader_later(self.timeout);
                Err(e)
            }
            other => other,
        }
    }

    /// Checks that Tarantool answers and the schema is in place, and
    /// refreshes the identity (Tarantool may have been replaced).
    pub async fn check(&self) -> Result<(), Error> {
        if self.members.is_replica_set() {
            self.members.confirm_leader(self.timeout).await?;
        }
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

/// One member of the Tarantool deployment: its address and, once reached,
/// its connection.
struct Member {
    address: String,
    client: tokio::sync::OnceCell<Client>,
}

/// The Tarantool members a store talks to: one, or a replica set's, of
/// which one takes writes (the leader) and the others follow it.
struct Members {
    members: Vec<Member>,
    /// The connection options for a member's address.
    options: Box<dyn Fn(&str) -> ConnectOptions + Send + Sync>,
    /// Index of the member taking writes, as last found.
    leader: std::sync::atomic::AtomicUsize,
    /// Told each time the leader changes: calls under way on the old one
    /// stop waiting for it.
    changed: tokio::sync::watch::Sender<usize>,
    /// How many times the leader changed.
    changes: std::sync::atomic::AtomicU64,
    /// One search for the leader at a time.
    finding: tokio::sync::Mutex<()>,
}

/// How often a store checks that its leader still takes writes.
const LEADER_CHECK: Duration = Duration::from_millis(500);

/// Longest a member has to say what it is: one that is down must not hold
/// up finding the others.
const ROLE_WAIT: Duration = Duration::from_secs(1);

/// How long a search for the leader waits for the other members once one
/// that takes writes has answered (two that do: a failover under way).
const LATE_ROLE: Duration = Duration::from_millis(200);

/// A member as `mts_role` describes it.
#[derive(Debug, Clone, Deserialize)]
struct Role {
    ro: bool,
    lsn: u64,
    /// Seconds behind, per peer it replicates from.
    #[serde(default)]
    lags: HashMap<String, f64>,
}

impl Role {
    /// How far behind it is: the largest lag over what it replicates from.
    fn lag(&self) -> f64 {
        self.lags.values().copied().fold(0.0, f64::max)
    }
}

/// One member of a replica set, as a store sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberState {
    /// Its address.
    pub address: String,
    /// Whether it answered.
    pub up: bool,
    /// Whether it takes writes.
    pub leader: bool,
    /// How far its log has gone (the sum of its vclock).
    pub lsn: u64,
    /// How far behind what it replicates it is, in seconds (the largest lag
    /// over its upstreams; 0 for the leader).
    pub lag_seconds: f64,
}

impl Members {
    async fn connect(config: &Config) -> Result<Self, Error> {
        // `tarant` doubles its reconnect delay without jitter; drawing the
        // bounds per process keeps replicas that lost Tarantool together
        // from reconnecting in lockstep.
        let reconnect = tarant::Reconnect::Backoff {
            min: crate::backoff::jittered(Duration::from_millis(100)),
            max: crate::backoff::jittered(Duration::from_secs(2)),
        };
        let (timeout, tarantool) = (config.tarantool.timeout(), config.tarantool.clone());
        let options = move |address: &str| {
            let options = ConnectOptions::new(address.to_owned())
                .connect_timeout(timeout)
                .reconnect(reconnect);
            if tarantool.user == "guest" {
                options
            } else {
                options
                    .user(tarantool.user.clone())
                    .password(tarantool.password.clone())
            }
        };
        let members: Vec<Member> = config
            .tarantool
            .address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|address| Member {
                address: address.to_owned(),
                client: tokio::sync::OnceCell::new(),
            })
            .collect();
        if members.is_empty() {
            return Err(Error::protocol("tarantool_address names no member"));
        }
        let members = Self {
            members,
            options: Box::new(options),
            leader: std::sync::atomic::AtomicUsize::new(0),
            changed: tokio::sync::watch::Sender::new(0),
            changes: std::sync::atomic::AtomicU64::new(0),
            finding: tokio::sync::Mutex::new(()),
        };
        if members.is_replica_set() {
            members.find_leader(config.tarantool.timeout()).await?;
        } else {
            members.client_of(0).await?;
        }
        Ok(members)
    }

    fn is_replica_set(&self) -> bool {
        self.members.len() > 1
    }

    /// The connection to member `i`, made on first use.
    async fn client_of(&self, i: usize) -> Result<&Client, Error> {
        let member = &self.members[i];
        member
            .client
            .get_or_try_init(|| async {
                Client::with_options((self.options)(&member.address))
                    .await
                    .map_err(Error::classify)
            })
            .await
    }

    /// The leader's connection (as last found; its first member's before).
    fn leader(&self) -> Client {
        let i = self.leader.load(std::sync::atomic::Ordering::Acquire);
        match self.members[i].client.get() {
            Some(client) => client.clone(),
            // Reached in `connect` before any call.
            None => self
                .members
                .iter()
                .find_map(|m| m.client.get())
                .cloned()
                .unwrap_or_else(|| {
                    unreachable!("connect reaches a member before the store is used")
                }),
        }
    }

    /// Each member's role, asked side by side within `limit` (at most
    /// `ROLE_WAIT`).
    async fn roles(&self, limit: Duration) -> Vec<Option<Role>> {
        let asks = (0..self.members.len()).map(|i| self.role_of(i, limit));
        futures::future::join_all(asks).await
    }

    /// Member `i`'s role, if it answers within `limit` (at most
    /// `ROLE_WAIT`).
    async fn role_of(&self, i: usize, limit: Duration) -> Option<Role> {
        let ask = async {
            let client = self.client_of(i).await?;
            let (role,): (Role,) = client.call("mts_role", ()).await.map_err(Error::classify)?;
            Ok::<_, Error>(role)
        };
        match tokio::time::timeout(limit.min(ROLE_WAIT), ask).await {
            Ok(Ok(role)) => Some(role),
            Ok(Err(err)) => {
                tracing::debug!(member = %self.members[i].address, %err, "member did not answer");
                None
            }
            Err(_) => None,
        }
    }

    /// Each member's role, asked side by side within `limit` (at most
    /// `ROLE_WAIT`), waiting at most `LATE_ROLE` for the others once one that
    /// takes writes has answered: a member that is down (its calls wait for
    /// a reconnection) must not hold up a failover.
    async fn roles_for_leader(&self, limit: Duration) -> Vec<Option<Role>> {
        use futures::StreamExt;
        let mut asks: futures::stream::FuturesUnordered<_> = (0..self.members.len())
            .map(|i| async move { (i, self.role_of(i, limit).await) })
            .collect();
        let mut roles = vec![None; self.members.len()];
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let next = match grace.as_mut() {
                Some(sleep) => tokio::select! {
                    next = asks.next() => next,
                    () = sleep => None,
                },
                None => asks.next().await,
            };
            let Some((i, role)) = next else {
                return roles;
            };
            if grace.is_none() && role.as_ref().is_some_and(|r| !r.ro) {
                grace = Some(Box::pin(tokio::time::sleep(LATE_ROLE)));
            }
            roles[i] = role;
        }
    }

    /// Finds the member that takes writes. Two that do (a failover under
    /// way): the one further along, which the quorum follows.
    async fn find_leader(&self, limit: Duration) -> Result<(), Error> {
        let _one = self.finding.lock().await;
        let roles = self.roles_for_leader(limit).await;
        let leader = roles
            .iter()
            .enumerate()
            .filter_map(|(i, role)| role.as_ref().filter(|r| !r.ro).map(|r| (i, r.lsn)))
            .max_by_key(|(_, lsn)| *lsn)
            .map(|(i, _)| i);
        let Some(leader) = leader else {
            let up = roles.iter().filter(|r| r.is_some()).count();
            return Err(Error::unavailable(format!(
                "no member takes writes ({up} of {} answered, all read-only); a failover may be under way",
                self.members.len()
            )));
        };
        let before = self
            .leader
            .swap(leader, std::sync::atomic::Ordering::AcqRel);
        if before != leader {
            self.changed.send_replace(leader);
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                leader = %self.members[leader].address,
                before = %self.members[before].address,
                "Tarantool leader changed"
            );
        }
        Ok(())
    }

    /// Looks for the leader every LEADER_CHECK while the store lives, asking
    /// every member, so that a failover is followed within about a second
    /// even with no call failing (waiting first on a leader that died would
    /// add ROLE_WAIT).
    fn watch_leader(members: std::sync::Weak<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEADER_CHECK).await;
                let Some(members) = members.upgrade() else {
                    return;
                };
                if let Err(err) = members.find_leader(ROLE_WAIT).await {
                    tracing::debug!(%err, "no Tarantool leader found yet");
                }
            }
        });
    }

    /// Starts a search for the leader in the background, unless one runs.
    fn find_leader_later(self: &Arc<Self>, limit: Duration) {
        if self.finding.try_lock().is_err() {
            return;
        }
        let members = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(err) = members.find_leader(limit).await {
                tracing::warn!(%err, "finding the Tarantool leader failed");
            }
        });
    }

    /// Checks that the leader as last found still takes writes; looks for
    /// it again when not.
    async fn confirm_leader(&self, limit: Duration) -> Result<(), Error> {
        let i = self.leader.load(std::sync::atomic::Ordering::Acquire);
        match self.role_of(i, limit).await {
            Some(role) if !role.ro => Ok(()),
            _ => self.find_leader(limit).await,
        }
    }

    /// Member `i`'s address.
    fn address(&self, i: usize) -> &str {
        &self.members[i].address
    }

    /// The member to take a backup's checkpoint on: the follower least
    /// behind once it has all the leader has now (waiting up to `limit`), or
    /// the leader when no follower answers (or there is none) or none
    /// catches up.
    async fn backup_source(&self, limit: Duration) -> usize {
        let leader = self.leader.load(std::sync::atomic::Ordering::Acquire);
        let roles = self.roles(limit).await;
        let Some(at) = roles[leader].as_ref().map(|role| role.lsn) else {
            return leader;
        };
        let Some(follower) = Self::least_behind(&roles) else {
            return leader;
        };
        let deadline = Instant::now() + limit;
        loop {
            match self.role_of(follower, limit).await {
                Some(role) if role.lsn >= at => return follower,
                Some(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return leader,
            }
        }
    }

    /// Of the members that answered, the follower least behind.
    fn least_behind(roles: &[Option<Role>]) -> Option<usize> {
        roles
            .iter()
            .enumerate()
            .filter_map(|(i, role)| role.as_ref().filter(|r| r.ro).map(|r| (i, r)))
            .min_by(|(_, a), (_, b)| a.lag().total_cmp(&b.lag()))
            .map(|(i, _)| i)
    }

    /// Every member's state (a single Tarantool's too: a set of one).
    async fn states(&self, limit: Duration) -> Vec<MemberState> {
        let roles = self.roles(limit).await;
        self.members
            .iter()
            .zip(roles)
            .map(|(member, role)| MemberState {
                address: member.address.clone(),
                up: role.is_some(),
                leader: role.as_ref().is_some_and(|r| !r.ro),
                lsn: role.as_ref().map_or(0, |r| r.lsn),
                lag_seconds: role.map_or(0.0, |r| if r.ro { r.lag() } else { 0.0 }),
            })
            .collect()
    }
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
