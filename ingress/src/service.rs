//! The Publish RPC. Large payloads are uploaded before the metadata commit,
//! so a sequence is only ever handed out for a message whose bytes are safe.

use std::time::Duration;

use mts_proto::pb::ingress_service_server::IngressService;
use mts_proto::pb::{PublishRequest, PublishResponse};
use mts_shared::blob::BlobStore;
use mts_shared::config::Config;
use mts_shared::store::{self, Store};
use mts_shared::validate;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::Error;

/// The ingress service state; cheap to clone.
#[derive(Clone)]
pub struct Ingress {
    store: Store,
    blobs: BlobStore,
    inline_threshold: u64,
    max_payload: u64,
}

impl Ingress {
    /// A service storing through `store` and `blobs` with the limits of `config`.
    pub fn new(store: Store, blobs: BlobStore, config: &Config) -> Self {
        Self {
            store,
            blobs,
            inline_threshold: config.inline_threshold_bytes,
            max_payload: config.max_payload_bytes,
        }
    }

    async fn publish_message(&self, request: PublishRequest) -> Result<PublishResponse, Error> {
        validate::subject(&request.subject)?;
        validate::headers(&request.headers)?;
        let size = request.data.len() as u64;
        validate::payload_size(
            request.data.len(),
            usize::try_from(self.max_payload).unwrap_or(usize::MAX),
        )?;

        if size <= self.inline_threshold {
            let sequence = self
                .store
                .publish(
                    &request.subject,
                    &request.headers,
                    Some(&request.data),
                    None,
                    size,
                )
                .await
                .map_err(Error::Commit)?;
            return Ok(accepted(sequence, String::new()));
        }

        let key = format!("{}/{}", request.subject, uuid::Uuid::now_v7());
        self.blobs
            .put(&key, request.data)
            .await
            .map_err(Error::Upload)?;
        match self
            .store
            .publish(&request.subject, &request.headers, None, Some(&key), size)
            .await
        {
            Ok(sequence) => Ok(accepted(sequence, key)),
            Err(err) if err.outcome_unknown() => self.settle(key, err).await,
            Err(err) => {
                self.discard(&key).await;
                Err(Error::Commit(err))
            }
        }
    }

    /// The commit of `key` may or may not have happened. Ask Tarantool, which
    /// also fences off a late commit, before deciding the object's fate.
    async fn settle(&self, key: String, cause: store::Error) -> Result<PublishResponse, Error> {
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            match self.store.settle_object(&key).await {
                Ok(Some(sequence)) => return Ok(accepted(sequence, key)),
                Ok(None) => {
                    self.discard(&key).await;
                    return Err(Error::Commit(cause));
                }
                Err(err) => tracing::debug!(%err, attempt, "settling an uncertain publish"),
            }
        }
        tracing::warn!(object = %key, %cause, "publish outcome unknown; object left for the orphan sweep");
        Err(Error::Commit(cause))
    }

    /// Best effort: an object whose metadata will never be committed.
    async fn discard(&self, key: &str) {
        if let Err(err) = self.blobs.delete(key).await {
            tracing::warn!(object = %key, %err, "could not delete an uncommitted object");
        }
    }
}

fn accepted(sequence: u64, object_name: String) -> PublishResponse {
    PublishResponse {
        sequence,
        object_name,
        status_code: 0,
        error_message: String::new(),
    }
}

#[tonic::async_trait]
impl IngressService for Ingress {
    #[instrument(skip_all, fields(subject = %request.get_ref().subject, bytes = request.get_ref().data.len()))]
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let reply = self
            .publish_message(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "publish failed"))?;
        tracing::debug!(sequence = reply.sequence, "published");
        Ok(Response::new(reply))
    }
}
