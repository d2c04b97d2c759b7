//! Start-up connection to Tarantool and the object store. Both may come up
//! after the service (compose, a fresh cluster), so start-up retries with
//! backoff until `startup_timeout_seconds`, then fails with the last cause.

use std::time::{Duration, Instant};

use mts_config::Config;
use mts_storage::object_store::{self, ObjectStore};
use mts_storage::store::{self, Store};

/// A dependency that stayed unreachable for the whole start-up window.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tarantool could not be used.
    #[error(
        "cannot use Tarantool at {address} (check TARANTOOL_ADDRESS, TARANTOOL_USER, TARANTOOL_PASSWORD): {source}"
    )]
    Tarantool {
        /// Where we tried.
        address: String,
        /// The last failure.
        source: store::Error,
    },
    /// The object store could not be used.
    #[error(
        "cannot use the object store at {endpoint}, bucket {bucket} (check MINIO_ENDPOINT, {credentials}, MINIO_BUCKET_NAME): {source}"
    )]
    ObjectStore {
        /// Where we tried.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// Where the credentials came from, to check.
        credentials: &'static str,
        /// The last failure.
        source: object_store::Error,
    },
}

/// Connects to Tarantool (applying the schema) and makes sure the bucket exists.
pub async fn connect(config: &Config) -> Result<(Store, ObjectStore), Error> {
    let deadline = Instant::now() + Duration::from_secs(config.lifecycle.startup_timeout_seconds);
    let store = retry(deadline, "tarantool", || Store::connect(config))
        .await
        .map_err(|source| Error::Tarantool {
            address: config.tarantool.address.clone(),
            source,
        })?;
    let chain = config.object_store.access_key_id.is_empty();
    if chain {
        tracing::info!(
            "no static S3 keys (MINIO_ACCESS_KEY_ID): credentials come from the AWS chain (environment, web identity, container, instance)"
        );
    }
    let object_store = ObjectStore::new(config);
    retry(deadline, "object store", || object_store.ensure_bucket())
        .await
        .map_err(|source| Error::ObjectStore {
            endpoint: config.object_store.url(),
            bucket: config.object_store.bucket_name.clone(),
            credentials: if chain {
                "MINIO_ACCESS_KEY_ID and MINIO_SECRET_ACCESS_KEY are empty, so the AWS credential chain was asked: AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, container or instance credentials"
            } else {
                "MINIO_ACCESS_KEY_ID, MINIO_SECRET_ACCESS_KEY"
            },
            source,
        })?;
    Ok((store, object_store))
}

async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    deadline: Instant,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() + backoff < deadline => {
                tracing::warn!(dependency = what, %err, retry_in = ?backoff, "dependency not ready");
                tokio::time::sleep(mts_storage::backoff::jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err),
        }
    }
}
