//! The S3 blob store for payloads above the inline threshold. Any
//! S3-compatible server works (MinIO in production, Garage in tests): path-style
//! addressing, static credentials, the bucket created when missing.

use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use crate::config::Config;

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

/// A handle on the payload bucket; cheap to clone.
#[derive(Clone, Debug)]
pub struct BlobStore {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl BlobStore {
    /// A client for the configured endpoint; makes no request.
    pub fn new(config: &Config) -> Self {
        let credentials = Credentials::new(
            config.minio_access_key_id.clone(),
            config.minio_secret_access_key.clone(),
            None,
            None,
            "minitoolstream-config",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_timeout(config.minio_timeout())
            .build();
        let s3_config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.minio_region.clone()))
            .endpoint_url(config.minio_url())
            .credentials_provider(credentials)
            .force_path_style(true)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(s3_config),
            bucket: config.minio_bucket_name.clone(),
        }
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

    /// Stores `data` under `key`.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| Error::from_sdk(e, |_| None))
    }

    /// Reads the whole object under `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, Error> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| Error::from_sdk(e, |e| e.is_no_such_key().then(|| key.to_string())))?;
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| Error::Unavailable(describe(&e)))?;
        Ok(body.into_bytes())
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

    /// Keys of the objects last modified before `cutoff`, page by page.
    pub async fn keys_older_than(
        &self,
        cutoff: std::time::SystemTime,
    ) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| Error::from_sdk(e, |_| None))?;
            for object in page.contents() {
                let old = object
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .is_some_and(|t| t < cutoff);
                if let (true, Some(key)) = (old, object.key()) {
                    keys.push(key.to_owned());
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Ok(keys),
            }
        }
    }

    /// Deletes the object under `key`; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
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

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match &err {
            Error::Unavailable(_) | Error::Rejected(_) => {
                tonic::Status::unavailable(format!("object store unavailable, retry later: {err}"))
            }
            Error::NotFound(_) => tonic::Status::not_found(err.to_string()),
        }
    }
}
