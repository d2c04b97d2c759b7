//! The S3 object store for payloads above the inline threshold. Any
//! S3-compatible server works (MinIO in production, Garage in tests): path-style
//! addressing, static credentials or the AWS credential chain, the bucket
//! created when missing.

use std::time::Duration;

use aws_credential_types::provider::{
    ProvideCredentials, SharedCredentialsProvider,
    future::ProvideCredentials as ProvideCredentialsFuture,
};
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, StalledStreamProtectionConfig, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use mts_config::Config;

/// How long connecting to the object store may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What can go wrong talking to the object store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be reached or did not answer in time.
    #[error("object store is unreachable: {0}")]
    Unavailable(String),
    /// The object does not exist.
    #[error("object {0} does not exist")]
    NotFound(String),
    /// The store answered with an error (credentials, permissions, bucket).
    #[error("object store refused the request: {0}")]
    Rejected(String),
}

impl Error {
    fn from_sdk<E, R>(err: SdkError<E, R>, not_found: impl FnOnce(&E) -> Option<String>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match err {
            SdkError::ServiceError(service) => {
                let inner = service.err();
                if let Some(key) = not_found(inner) {
                    return Self::NotFound(key);
                }
                Self::Rejected(format!(
                    "{}: {}",
                    inner.code().unwrap_or("error"),
                    inner.message().unwrap_or("no message")
                ))
            }
            other => Self::Unavailable(describe(&other)),
        }
    }
}

/// The error and its causes on one line, since the SDK's top-level message
/// alone ("dispatch failure") does not say what happened.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The body of a streamed PutObject: chunks sent through a
/// [`StreamedBodySender`], of a size known up front.
pub struct StreamedBody {
    chunks: tokio::sync::mpsc::Receiver<Result<Bytes, BodyAborted>>,
    remaining: u64,
}

/// Feeds a [`StreamedBody`].
pub struct StreamedBodySender {
    chunks: tokio::sync::mpsc::Sender<Result<Bytes, BodyAborted>>,
}

/// Why a streamed body ended before its size: the upload is given up.
#[derive(Debug, thiserror::Error)]
#[error("the upload was given up before its last byte")]
pub struct BodyAborted;

/// The upload the body went to has ended (it failed, or was given up).
#[derive(Debug, thiserror::Error)]
#[error("the upload has ended")]
pub struct UploadEnded;

impl StreamedBody {
    /// A body of `size` bytes and its sender. Holds at most a few chunks.
    pub fn channel(size: u64) -> (StreamedBodySender, StreamedBody) {
        let (chunks, receiver) = tokio::sync::mpsc::channel(2);
        (
            StreamedBodySender { chunks },
            StreamedBody {
                chunks: receiver,
                remaining: size,
            },
        )
    }
}

impl StreamedBodySender {
    /// Sends the next chunk, waiting while the upload is behind.
    pub async fn send(&self, chunk: Bytes) -> Result<(), UploadEnded> {
        self.chunks.send(Ok(chunk)).await.map_err(|_| UploadEnded)
    }

    /// Gives the upload up: the request fails and nothing is stored.
    pub async fn abort(&self) {
        let _ = self.chunks.send(Err(BodyAborted)).await;
    }
}

impl http_body::Body for StreamedBody {
    type Data = Bytes;
    type Error = BodyAborted;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyAborted>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        match std::task::ready!(self.chunks.poll_recv(cx)) {
            Some(Ok(chunk)) => {
                let len = chunk.len() as u64;
                if len > self.remaining {
                    return std::task::Poll::Ready(Some(Err(BodyAborted)));
                }
                self.remaining -= len;
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            // A sender that went away early gave the upload up too.
            Some(Err(aborted)) => std::task::Poll::Ready(Some(Err(aborted))),
            None => std::task::Poll::Ready(Some(Err(BodyAborted))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// The standard AWS credential chain — environment, profile, web identity
/// (IRSA: `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`), container and
/// instance credentials — built on first use, since building it is async
/// and the store is made in sync code. The S3 client caches what it gives
/// and asks again before it expires.
#[derive(Debug)]
struct CredentialChain {
    region: Region,
    chain:
        tokio::sync::OnceCell<aws_config::default_provider::credentials::DefaultCredentialsChain>,
}

impl CredentialChain {
    fn new(region: Region) -> Self {
        Self {
            region,
            chain: tokio::sync::OnceCell::new(),
        }
    }
}

impl ProvideCredentials for CredentialChain {
    fn provide_credentials<'a>(&'a self) -> ProvideCredentialsFuture<'a>
    where
        Self: 'a,
    {
        ProvideCredentialsFuture::new(async move {
            let chain = self
                .chain
                .get_or_init(|| async {
                    aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .region(self.region.clone())
                        .build()
                        .await
                })
                .await;
            chain.provide_credentials().await
        })
    }
}

/// A handle on the payload bucket; cheap to clone.
#[derive(Clone, Debug)]
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Every key this service writes starts with it (`minio_key_prefix`).
    key_prefix: String,
    /// How long one call may take (`minio_timeout_ms`).
    timeout: Duration,
    observer: Option<std::sync::Arc<dyn crate::Observer>>,
}

impl ObjectStore {
    /// A client for the configured endpoint; makes no request.
    pub fn new(config: &Config) -> Self {
        let region = Region::new(config.object_store.region.clone());
        let credentials = if config.object_store.access_key_id.is_empty() {
            SharedCredentialsProvider::new(CredentialChain::new(region.clone()))
        } else {
            SharedCredentialsProvider::new(Credentials::new(
                config.object_store.access_key_id.clone(),
                config.object_store.secret_access_key.clone(),
                None,
                None,
                "minitoolstream-config",
            ))
        };
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_timeout(config.object_store.timeout())
            .build();
        let s3_config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region)
            .endpoint_url(config.object_store.url())
            .credentials_provider(credentials)
            .force_path_style(true)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(s3_config),
            bucket: config.object_store.bucket_name.clone(),
            key_prefix: config.object_store.key_prefix.clone(),
            timeout: config.object_store.timeout(),
            observer: None,
        }
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Where every object of store `store_id` lives: `{prefix}{store_id}/`.
    pub fn store_prefix(&self, store_id: &str) -> String {
        format!("{}{store_id}/", self.key_prefix)
    }

    /// Where the objects of `subject` in store `store_id` live.
    pub fn subject_prefix(&self, store_id: &str, subject: &str) -> String {
        format!("{}{subject}/", self.store_prefix(store_id))
    }

    /// A fresh key for a payload of `subject` in store `store_id`.
    pub fn new_key(&self, store_id: &str, subject: &str) -> String {
        format!(
            "{}{}",
            self.subject_prefix(store_id, subject),
            uuid::Uuid::now_v7()
        )
    }

    /// A fresh key for a segment of `subject` starting at `first_seq`.
    pub fn segment_key(&self, store_id: &str, subject: &str, first_seq: u64) -> String {
        format!(
            "{}segments/{first_seq:020}-{}",
            self.subject_prefix(store_id, subject),
            uuid::Uuid::now_v7().simple()
        )
    }

    /// Tells `observer` of every call's latency and outcome.
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn crate::Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Times `call` as S3 `operation`.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let started = std::time::Instant::now();
        let result = call.await;
        if let Some(observer) = &self.observer {
            let failed = matches!(result, Err(Error::Unavailable(_) | Error::Rejected(_)));
            observer.call("s3", operation, started.elapsed().as_secs_f64(), !failed);
        }
        result
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket unless it exists.
    pub async fn ensure_bucket(&self) -> Result<(), Error> {
        match self.check().await {
            Ok(()) => return Ok(()),
            Err(Error::NotFound(_)) => {}
            Err(other) => return Err(other),
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "bucket created");
                Ok(())
            }
            Err(err) => match Error::from_sdk(err, |_| None) {
                // Another replica created it first.
                Error::Rejected(msg) if msg.starts_with("BucketAlreadyOwnedByYou") => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Checks that the store answers and the bucket exists.
    pub async fn check(&self) -> Result<(), Error> {
        let bucket = self.bucket.clone();
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error::from_sdk(e, |e| e.is_not_found().then_some(bucket)))
    }

    /// Stores `data` under `key`. Payloads are not signed — that would be
    /// one more SHA-256 pass over every byte; the CRC32 checksum the client
    /// sends, which the server checks, and the service's own SHA-256 cover
    /// their integrity.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), Error> {
        self.timed("PutObject", self.put_untimed(key, data)).await
    }

    /// Untimed body of the call above.
    async fn put_untimed(&self, key: &str, data: Bytes) -> Result<(), Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(data))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error::from_sdk(e, |_| None))
    }

    /// Stores under `key` the `size` bytes that `body` yields as they come,
    /// in one PutObject: nothing is buffered here, and the object appears
    /// only if the body ends with exactly `size` bytes (an aborted or short
    /// body fails the request and the server keeps nothing). The body cannot
    /// be replayed, so a failure is not retried. The call lasts as long as its
    /// sender takes: no operation deadline applies, only the connect timeout.
    pub async fn put_streamed(
        &self,
        key: &str,
        body: StreamedBody,
        size: u64,
    ) -> Result<(), Error> {
        self.timed("PutObject", self.put_streamed_untimed(key, body, size))
            .await
    }

    /// Untimed body of the call above.
    async fn put_streamed_untimed(
        &self,
        key: &str,
        body: StreamedBody,
        size: u64,
    ) -> Result<(), Error> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build();
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(i64::try_from(size).unwrap_or(i64::MAX))
            .body(ByteStream::from_body_1_x(body))
            .customize()
            .config_override(
                aws_sdk_s3::Config::builder()
                    .timeout_config(timeouts)
                    .retry_config(RetryConfig::disabled())
                    // The body comes at the publisher's pace, which is not the
                    // store's health: a publisher may pause. The ingress's own
                    // idle limits bound both a silent publisher and a store
                    // that stops reading.
                    .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
                    .request_checksum_calculation(
                        aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                    ),
            )
            .disable_payload_signing()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error::from_sdk(e, |_| None))
    }

    /// Reads the whole object under `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, Error> {
        self.timed("GetObject", self.get_untimed(key, None)).await
    }

    /// Untimed body of the calls above and below: the whole object, or
    /// `range` (an HTTP Range value) of it.
    async fn get_untimed(&self, key: &str, range: Option<String>) -> Result<Bytes, Error> {
        let ranged = range.is_some();
        let object = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(range)
            .send()
            .await
        {
            Ok(object) => object,
            // A range that starts past the object's end holds no bytes.
            Err(SdkError::ServiceError(e))
                if ranged && e.err().meta().code() == Some("InvalidRange") =>
            {
                return Ok(Bytes::new());
            }
            Err(e) => {
                return Err(Error::from_sdk(e, |e| {
                    e.is_no_such_key().then(|| key.to_string())
                }));
            }
        };
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| Error::Unavailable(describe(&e)))?;
        Ok(body.into_bytes())
    }

    /// Up to `length` bytes of the object under `key` from `offset` (fewer
    /// when the object ends first, none when it ends before `offset`).
    pub async fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, Error> {
        let last = offset + length.max(1) - 1;
        let range = format!("bytes={offset}-{last}");
        self.timed("GetObjectRange", self.get_untimed(key, Some(range)))
            .await
    }

    /// Size and ETag of the object under `key`, if it exists. A multipart
    /// object's ETag ends in `-<number of parts>`.
    pub async fn describe(&self, key: &str) -> Result<Option<(u64, String)>, Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some((
                head.content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or_default(),
                head.e_tag()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_owned(),
            ))),
            Err(err) => match Error::from_sdk(err, |e| e.is_not_found().then(String::new)) {
                Error::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Whether an object exists under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(err) => match Error::from_sdk(err, |e| e.is_not_found().then(String::new)) {
                Error::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Keys of the objects whose key starts with `prefix` (at most 1,000).
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let listing = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await
            .map_err(|e| Error::from_sdk(e, |_| None))?;
        Ok(listing
            .contents()
            .iter()
            .filter_map(|object| object.key().map(str::to_owned))
            .collect())
    }

    /// Keys under `prefix` of the objects last modified in `window` (from,
    /// to), page by page.
    pub async fn keys_modified_within(
        &self,
        prefix: &str,
        window: (std::time::SystemTime, std::time::SystemTime),
    ) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| Error::from_sdk(e, |_| None))?;
            for object in page.contents() {
                let within = object
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .is_some_and(|t| window.0 <= t && t < window.1);
                if let (true, Some(key)) = (within, object.key()) {
                    keys.push(key.to_owned());
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Ok(keys),
            }
        }
    }

    /// Starts a multipart upload to `key`.
    pub async fn start_upload(&self, key: &str) -> Result<Upload, Error> {
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| Error::from_sdk(e, |_| None))?;
        let upload_id = started
            .upload_id()
            .ok_or_else(|| Error::Rejected("CreateMultipartUpload returned no upload id".into()))?
            .to_owned();
        Ok(Upload {
            store: self.clone(),
            key: key.to_owned(),
            upload_id,
            parts: Vec::new(),
            finished: false,
        })
    }

    /// The object under `key` from byte `offset` on, as a stream of chunks
    /// pulled from the server as the caller reads them. The caller bounds its
    /// waits for the next chunk (by `timeout`): nothing here does.
    pub async fn read_from(&self, key: &str, offset: u64) -> Result<ByteStream, Error> {
        self.timed("GetObjectRange", self.read_from_untimed(key, offset))
            .await
    }

    /// Untimed body of the call above.
    async fn read_from_untimed(&self, key: &str, offset: u64) -> Result<ByteStream, Error> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={offset}-"))
            .customize()
            // The body is read at the consumer's pace, which is not the
            // store's health; the reader bounds each wait on the store itself
            // (`timeout`).
            .config_override(
                aws_sdk_s3::Config::builder()
                    .stalled_stream_protection(StalledStreamProtectionConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| Error::from_sdk(e, |e| e.is_no_such_key().then(|| key.to_string())))?;
        Ok(object.body)
    }

    /// Keys of multipart uploads started and neither completed nor aborted.
    pub async fn unfinished_uploads(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let listing = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await
            .map_err(|e| Error::from_sdk(e, |_| None))?;
        Ok(listing
            .uploads()
            .iter()
            .filter_map(|upload| upload.key().map(str::to_owned))
            .collect())
    }

    /// Deletes the object under `key`; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.timed("DeleteObject", self.delete_untimed(key)).await
    }

    /// Untimed body of the call above.
    async fn delete_untimed(&self, key: &str) -> Result<(), Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error::from_sdk(e, |_| None))
    }
}

/// A multipart upload in progress: parts are sent one at a time, so memory
/// holds at most one part. Complete or abort it: parts of an upload that is
/// dropped stay in the bucket until it is aborted.
pub struct Upload {
    store: ObjectStore,
    key: String,
    upload_id: String,
    parts: Vec<aws_sdk_s3::types::CompletedPart>,
    finished: bool,
}

impl Drop for Upload {
    /// An upload dropped half-way (a panic, a cancelled task) is aborted in
    /// the background rather than left as stray parts.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (key, abort) = (self.key.clone(), self.abort_request());
        runtime.spawn(async move {
            if let Err(err) = abort.await {
                tracing::warn!(object = %key, %err, "could not abort an abandoned upload");
            }
        });
    }
}

impl Upload {
    /// The object key being written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Sends the next part.
    pub async fn put_part(&mut self, data: Bytes) -> Result<(), Error> {
        let store = self.store.clone();
        store.timed("UploadPart", self.put_part_untimed(data)).await
    }

    async fn put_part_untimed(&mut self, data: Bytes) -> Result<(), Error> {
        let number = i32::try_from(self.parts.len() + 1)
            .map_err(|_| Error::Rejected("too many parts".into()))?;
        let uploaded = self
            .store
            .client
            .upload_part()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .body(ByteStream::from(data))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| Error::from_sdk(e, |_| None))?;
        self.parts.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(number)
                .set_e_tag(uploaded.e_tag().map(str::to_owned))
                .build(),
        );
        Ok(())
    }

    /// Makes the object visible. If this fails, the upload is aborted when
    /// dropped.
    pub async fn complete(mut self) -> Result<(), Error> {
        let parts = aws_sdk_s3::types::CompletedMultipartUpload::builder()
            .set_parts(Some(std::mem::take(&mut self.parts)))
            .build();
        let done = self
            .store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(parts)
            .send()
            .await
            .map(drop)
            .map_err(|e| Error::from_sdk(e, |_| None));
        self.finished = done.is_ok();
        done
    }

    /// Discards every part sent.
    pub async fn abort(mut self) -> Result<(), Error> {
        let done = self.abort_request().await;
        self.finished = done.is_ok();
        done
    }

    /// The AbortMultipartUpload call, owning what it needs, so that `Drop`
    /// can spawn it too.
    fn abort_request(&self) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let request = self
            .store
            .client
            .abort_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id);
        async move {
            request
                .send()
                .await
                .map(drop)
                .map_err(|e| Error::from_sdk(e, |_| None))
        }
    }
}
