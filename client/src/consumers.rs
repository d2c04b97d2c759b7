//! Administering durable consumers.

use std::time::{SystemTime, UNIX_EPOCH};

use mts_proto::pb::seek_consumer_request::To;
use mts_proto::pb::{
    ConsumerConfig, ConsumerInfo, ConsumerRequest, CreateOrUpdateConsumerRequest,
    ListConsumersRequest, SeekConsumerRequest,
};

use crate::client::Repeat;
use crate::{Client, Error};

/// Where [`Client::seek_consumer`] moves a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    /// The next message delivered is this one, or the first stored after
    /// it (at most the subject's last sequence + 1).
    Sequence(u64),
    /// The first message stored at or after this time.
    Time(SystemTime),
}

impl Client {
    /// Creates the durable consumer `durable` of `subject`, or updates its
    /// settings when it exists (where it starts applies only to a new one).
    /// Unset fields of `config` take the service's defaults.
    pub async fn create_consumer(
        &self,
        subject: &str,
        durable: &str,
        config: ConsumerConfig,
    ) -> Result<ConsumerInfo, Error> {
        let request = CreateOrUpdateConsumerRequest {
            subject: subject.to_owned(),
            durable_name: durable.to_owned(),
            config: Some(config),
        };
        self.egress_call(
            "create consumer",
            Repeat::Safe,
            request,
            |mut egress, request| async move { egress.create_or_update_consumer(request).await },
        )
        .await
    }

    /// A consumer's settings and exact state (its lag among them).
    pub async fn consumer_info(&self, subject: &str, durable: &str) -> Result<ConsumerInfo, Error> {
        let request = consumer_request(subject, durable);
        self.egress_call(
            "consumer info",
            Repeat::Safe,
            request,
            |mut egress, request| async move { egress.get_consumer_info(request).await },
        )
        .await
    }

    /// Deletes a consumer and its leases (`NOT_FOUND` when there is none).
    pub async fn delete_consumer(&self, subject: &str, durable: &str) -> Result<(), Error> {
        let request = consumer_request(subject, durable);
        self.egress_call(
            "delete consumer",
            Repeat::IfNotDone,
            request,
            |mut egress, request| async move { egress.delete_consumer(request).await },
        )
        .await
        .map(drop)
    }

    /// Moves a consumer to a sequence or a time, dropping every lease it
    /// holds: later messages are delivered anew, earlier ones never again.
    pub async fn seek_consumer(
        &self,
        subject: &str,
        durable: &str,
        to: Seek,
    ) -> Result<ConsumerInfo, Error> {
        let to = match to {
            Seek::Sequence(sequence) => To::Sequence(sequence),
            Seek::Time(time) => {
                if time < UNIX_EPOCH {
                    return Err(Error::Config(
                        "a consumer cannot seek to a time before 1970".into(),
                    ));
                }
                To::Time(time.into())
            }
        };
        let request = SeekConsumerRequest {
            subject: subject.to_owned(),
            durable_name: durable.to_owned(),
            to: Some(to),
        };
        self.egress_call(
            "seek consumer",
            Repeat::Safe,
            request,
            |mut egress, request| async move { egress.seek_consumer(request).await },
        )
        .await
    }

    /// The consumers of `subject` (of every subject for `None`) in
    /// (subject, name) order, read a page at a time.
    pub async fn consumers(&self, subject: Option<&str>) -> Result<Vec<ConsumerInfo>, Error> {
        let mut consumers = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListConsumersRequest {
                subject: subject.unwrap_or_default().to_owned(),
                page_size: 1000,
                page_token,
            };
            let page = self
                .egress_call(
                    "list consumers",
                    Repeat::Safe,
                    request,
                    |mut egress, request| async move { egress.list_consumers(request).await },
                )
                .await?;
            consumers.extend(page.consumers);
            if page.next_page_token.is_empty() {
                return Ok(consumers);
            }
            page_token = page.next_page_token;
        }
    }
}

fn consumer_request(subject: &str, durable: &str) -> ConsumerRequest {
    ConsumerRequest {
        subject: subject.to_owned(),
        durable_name: durable.to_owned(),
    }
}
