//! Publishing one message.

use std::collections::HashMap;

use bytes::Bytes;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::{PublishRequest, PublishResponse};

use crate::client::Repeat;
use crate::{Client, Error};

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// Where it goes.
    pub subject: String,
    /// Its payload.
    pub data: Bytes,
    /// Its headers.
    pub headers: HashMap<String, String>,
    /// Its id: a second message with the same id on the subject within the
    /// service's dedup window is not stored again. Generated when empty.
    pub message_id: Option<String>,
    /// Its ordering key: a durable consumer gets a key's messages in order,
    /// one at a time.
    pub ordering_key: Option<String>,
}

impl Message {
    /// A message of `data` to `subject`.
    pub fn new(subject: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            data: data.into(),
            ..Self::default()
        }
    }

    /// With this header too.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// With this message id.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// The request that publishes it, under its message id or a new one.
    pub(crate) fn into_request(self) -> PublishRequest {
        let message_id = self
            .message_id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        PublishRequest {
            subject: self.subject,
            data: self.data,
            headers: self.headers,
            message_id,
            ordering_key: self.ordering_key.unwrap_or_default(),
        }
    }

    /// With this ordering key.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }
}

/// What the service stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message's sequence on its subject.
    pub sequence: u64,
    /// True when a message with the same id had been stored already: this
    /// is its sequence, and nothing new was stored.
    pub duplicate: bool,
    /// The payload's size in bytes.
    pub size: u64,
    /// The payload's hex SHA-256.
    pub sha256: String,
    /// The message id it was published under (generated when it had none).
    pub message_id: String,
    /// How many tries it took.
    pub attempts: u32,
}

impl Published {
    /// What the service's answer `reply` says, for the message published
    /// under `message_id` in `attempts` tries.
    pub(crate) fn from_reply(reply: PublishResponse, message_id: String, attempts: u32) -> Self {
        Self {
            sequence: reply.sequence,
            duplicate: reply.duplicate,
            size: reply.size,
            sha256: reply.sha256,
            message_id,
            attempts,
        }
    }
}

impl Client {
    /// Publishes one message (unary `Publish`). A try the service could not
    /// take for now is made again, under the same message id, as
    /// [`Retry`](crate::Retry) says: a message is stored once however many
    /// tries it takes. Errors say with [`Error::is_retryable`] whether a
    /// later call may succeed.
    pub async fn publish(&self, message: Message) -> Result<Published, Error> {
        let request = message.into_request();
        let message_id = request.message_id.clone();
        let ingress = IngressServiceClient::new(self.ingress.clone());
        let (reply, attempts) = self
            .retrying("publish", Repeat::Safe, || {
                let (mut ingress, request) = (ingress.clone(), request.clone());
                async move {
                    let reply = ingress.publish(self.request(request).await?).await;
                    Ok(reply.map(tonic::Response::into_inner))
                }
            })
            .await?;
        Ok(Published::from_reply(reply, message_id, attempts))
    }
}
