//! The ingress's state and how a publish is stored: checks, inline
//! messages by group commit, large payloads uploaded before their metadata
//! commit (so a sequence is only ever handed out for a message whose bytes
//! are safe), and the settling of a commit whose outcome is unknown. The
//! streaming RPCs' paths (`many`, `stream`) are submodules: the state is
//! theirs and this module's alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mts_config::Config;
use mts_proto::pb::{PublishRequest, PublishResponse};
use mts_runtime::auth::Authenticator;
use mts_runtime::metrics::Metrics;
use mts_runtime::validate;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::{
    self, InlineMessage, NewMessage, ORDERING_KEY_HEADER, Payload, Published, Store,
};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::Error;

pub(crate) mod many;
pub(crate) mod stream;

/// Longest message id, in bytes.
const MAX_MESSAGE_ID_BYTES: usize = 256;
/// Longest ordering key.
const MAX_ORDERING_KEY_BYTES: usize = 256;

/// The ingress service state; cheap to clone.
#[derive(Clone)]
pub struct Ingress {
    store: Store,
    object_store: ObjectStore,
    inline_threshold: u64,
    max_payload: u64,
    part_size: usize,
    /// Largest announced size streamed into one PutObject.
    single_put_max: u64,
    /// How long the object store may take to answer a request.
    object_store_timeout: std::time::Duration,
    dedup_window: Duration,
    uploads: Arc<crate::upload_slots::UploadSlots>,
    /// A PublishStream client silent this long is cut off.
    stream_idle: Duration,
    auth: Arc<Authenticator>,
    metrics: Option<Arc<Metrics>>,
    /// The publish rate limit, when one is set: the layer in front takes a
    /// token per call, a PublishMany stream one per message.
    limiter: Option<Arc<crate::rate_limit::Limiter>>,
}

/// A checked message, by where its payload goes.
pub(crate) enum Checked {
    /// Stored in Tarantool with the metadata.
    Inline(InlineMessage),
    /// Uploaded to the object store first.
    Offloaded(Offloaded),
}

/// A message whose payload goes to the object store.
pub(crate) struct Offloaded {
    envelope: Envelope,
    data: bytes::Bytes,
    sha256: String,
}

/// What a publish stores besides the payload.
pub(crate) struct Envelope {
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub message_id: Option<String>,
}

impl Envelope {
    /// Checks subject, headers, message id and ordering key; the key goes
    /// into the headers, where delivery finds it.
    pub fn checked(
        subject: String,
        mut headers: HashMap<String, String>,
        message_id: String,
        ordering_key: String,
    ) -> Result<Self, Error> {
        validate::subject(&subject)?;
        validate::headers(&headers)?;
        if ordering_key.len() > MAX_ORDERING_KEY_BYTES {
            return Err(validate::Error::new(
                "ordering_key",
                format!(
                    "is {} bytes long; the limit is {MAX_ORDERING_KEY_BYTES}",
                    ordering_key.len()
                ),
            )
            .into());
        }
        if !ordering_key.is_empty() {
            headers.insert(ORDERING_KEY_HEADER.to_owned(), ordering_key);
        }
        if message_id.len() > MAX_MESSAGE_ID_BYTES {
            return Err(validate::Error::new(
                "message_id",
                format!(
                    "is {} bytes long; the limit is {MAX_MESSAGE_ID_BYTES}",
                    message_id.len()
                ),
            )
            .into());
        }
        Ok(Self {
            subject,
            headers,
            message_id: (!message_id.is_empty()).then_some(message_id),
        })
    }
}

/// Hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl Ingress {
    /// A service storing through `store` and `object_store` with the limits of `config`.
    pub fn new(
        store: Store,
        object_store: ObjectStore,
        auth: Arc<Authenticator>,
        config: &Config,
    ) -> Self {
        let slots = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            store,
            object_store,
            inline_threshold: config.ingress.inline_threshold_bytes,
            max_payload: config.ingress.max_payload_bytes,
            part_size: usize::try_from(config.ingress.multipart_part_bytes).unwrap_or(usize::MAX),
            single_put_max: config.ingress.single_put_max_bytes,
            object_store_timeout: config.object_store.timeout(),
            dedup_window: Duration::from_millis(config.ingress.dedup_window_ms),
            uploads: crate::upload_slots::UploadSlots::new(
                slots(config.ingress.max_concurrent_uploads),
                slots(config.ingress.max_uploads_per_client),
            ),
            stream_idle: Duration::from_millis(config.ingress.stream_idle_timeout_ms),
            auth,
            metrics: None,
            limiter: None,
        }
    }

    /// Records stored publishes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts each message of a PublishMany stream against `limiter`.
    pub fn with_rate_limit(mut self, limiter: Arc<crate::rate_limit::Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Who is calling: verified once by the rate-limit layer when it runs
    /// (it leaves the caller in the request's extensions), else here.
    pub(crate) fn caller<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<mts_runtime::auth::Caller, Error> {
        match request.extensions().get::<mts_runtime::auth::Caller>() {
            Some(caller) => Ok(caller.clone()),
            None => Ok(self.auth.authenticate(request.metadata())?),
        }
    }

    /// Counts a stored publish (a duplicate stored nothing).
    pub(crate) fn count(&self, reply: &PublishResponse, started: std::time::Instant) {
        record(self.metrics.as_deref(), reply, started);
    }

    /// Checks a message and decides where its payload goes.
    pub(crate) fn check(&self, request: PublishRequest) -> Result<Checked, Error> {
        let envelope = Envelope::checked(
            request.subject,
            request.headers,
            request.message_id,
            request.ordering_key,
        )?;
        validate::payload_size(
            request.data.len(),
            usize::try_from(self.max_payload).unwrap_or(usize::MAX),
        )?;
        let sha256 = sha256_hex(&request.data);
        if request.data.len() as u64 <= self.inline_threshold {
            return Ok(Checked::Inline(self.inline_message(
                envelope,
                request.data,
                sha256,
            )));
        }
        Ok(Checked::Offloaded(Offloaded {
            envelope,
            data: request.data,
            sha256,
        }))
    }

    /// The message to store inline, with this service's dedup window.
    pub(crate) fn inline_message(
        &self,
        envelope: Envelope,
        data: bytes::Bytes,
        sha256: String,
    ) -> InlineMessage {
        InlineMessage {
            subject: envelope.subject,
            headers: envelope.headers,
            data,
            sha256,
            message_id: envelope.message_id,
            dedup_window: self.dedup_window,
        }
    }

    /// Stores an inline message by group commit. It is queued before this
    /// returns and stored even if the future is dropped.
    pub(crate) fn publish_inline(
        &self,
        message: InlineMessage,
    ) -> impl Future<Output = Result<PublishResponse, Error>> + Send + use<> {
        let size = message.data.len() as u64;
        let sha256 = message.sha256.clone();
        let outcome = self.store.publish_inline(message);
        async move {
            let published = outcome.await.map_err(Error::Commit)?;
            Ok(reply(published, String::new(), size, sha256))
        }
    }

    /// Uploads the payload, then commits the metadata, in a task of its own
    /// (see `detached`).
    pub(crate) async fn publish_offloaded(
        &self,
        message: Offloaded,
    ) -> Result<PublishResponse, Error> {
        let ingress = self.clone();
        // Boxed: the S3 client's futures are large; the task should not
        // copy them around.
        detached(Box::pin(
            async move { ingress.upload_and_commit(message).await },
        ))
        .await
    }

    async fn upload_and_commit(&self, message: Offloaded) -> Result<PublishResponse, Error> {
        let Offloaded {
            envelope,
            data,
            sha256,
        } = message;
        let size = data.len() as u64;
        if let Some(seq) = self.already_published(&envelope).await? {
            let published = Published {
                seq,
                duplicate: true,
            };
            return Ok(reply(published, String::new(), size, sha256));
        }
        let key = self.object_key(&envelope);
        self.object_store
            .put(&key, data)
            .await
            .map_err(Error::Upload)?;
        self.commit_object(&envelope, key, size, sha256).await
    }

    /// A fresh key for the payload of `envelope`, under this store's prefix.
    pub(crate) fn object_key(&self, envelope: &Envelope) -> String {
        self.object_store
            .new_key(&self.store.identity().store_id, &envelope.subject)
    }

    /// The sequence of an earlier publish with the same message id, checked
    /// before uploading anything.
    pub(crate) async fn already_published(
        &self,
        envelope: &Envelope,
    ) -> Result<Option<u64>, Error> {
        match &envelope.message_id {
            Some(id) => self
                .store
                .seen_message_id(&envelope.subject, id)
                .await
                .map_err(Error::Commit),
            None => Ok(None),
        }
    }

    /// Commits the message whose payload was uploaded under `key`; answers
    /// with the object's name, or none for a duplicate (whose upload goes).
    pub(crate) async fn commit_object(
        &self,
        envelope: &Envelope,
        key: String,
        size: u64,
        sha256: String,
    ) -> Result<PublishResponse, Error> {
        let published = self
            .commit_object_metadata(envelope, key.clone(), size, &sha256)
            .await?;
        let object_name = if published.duplicate {
            String::new()
        } else {
            key
        };
        Ok(reply(published, object_name, size, sha256))
    }

    /// Commits a message whose payload was uploaded under `key`. On a refusal
    /// the object is deleted; when the outcome is unknown Tarantool is asked
    /// first, and it fences the key against a late commit.
    async fn commit_object_metadata(
        &self,
        envelope: &Envelope,
        key: String,
        size: u64,
        sha256: &str,
    ) -> Result<Published, Error> {
        match self
            .store
            .publish_message(NewMessage {
                subject: &envelope.subject,
                headers: &envelope.headers,
                payload: Payload::Object(&key),
                size,
                sha256: Some(sha256),
                message_id: envelope.message_id.as_deref(),
                dedup_window: self.dedup_window,
            })
            .await
        {
            Ok(published) => {
                if published.duplicate {
                    self.discard(&key).await;
                }
                Ok(published)
            }
            Err(err) if err.outcome_unknown() => self.settle(key, err).await,
            Err(err) => {
                self.discard(&key).await;
                Err(Error::Commit(err))
            }
        }
    }

    async fn settle(&self, key: String, cause: store::Error) -> Result<Published, Error> {
        match self.store.settle_object(&key, cause.clone()).await {
            Ok(Some(seq)) => Ok(Published {
                seq,
                duplicate: false,
            }),
            Ok(None) => {
                self.discard(&key).await;
                Err(Error::Commit(cause))
            }
            Err(unknown) => {
                tracing::warn!(object = %key, err = %unknown, "publish outcome unknown; object left for the orphan sweep");
                Err(Error::Commit(unknown))
            }
        }
    }

    /// Best effort: an object whose metadata will never be committed.
    pub(crate) async fn discard(&self, key: &str) {
        if let Err(err) = self.object_store.delete(key).await {
            tracing::warn!(object = %key, %err, "could not delete an uncommitted object");
        }
    }
}

/// Runs a publish in its own task. A client that goes away makes the server
/// drop the call's future; a publish cut off between upload and commit
/// would leave an object behind, so it finishes (or cleans up) regardless.
pub(crate) async fn detached(
    publish: impl Future<Output = Result<PublishResponse, Error>> + Send + 'static,
) -> Result<PublishResponse, Error> {
    tokio::spawn(publish.in_current_span())
        .await
        .unwrap_or_else(|panic| Err(Error::Panicked(panic.to_string())))
}

/// Counts a stored publish in `metrics` (a duplicate stored nothing).
pub(crate) fn record(
    metrics: Option<&Metrics>,
    reply: &PublishResponse,
    started: std::time::Instant,
) {
    if let (Some(metrics), false) = (metrics, reply.duplicate) {
        metrics.published(
            !reply.object_name.is_empty(),
            reply.size,
            started.elapsed().as_secs_f64(),
        );
    }
}

pub(crate) fn reply(
    published: Published,
    object_name: String,
    size: u64,
    sha256: String,
) -> PublishResponse {
    PublishResponse {
        sequence: published.seq,
        object_name,
        status_code: 0,
        error_message: String::new(),
        duplicate: published.duplicate,
        size,
        sha256,
    }
}
