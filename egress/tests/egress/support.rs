//! The fixture every egress test starts from: an egress service in-process
//! on 127.0.0.1:0 against the real Tarantool and S3 server, a client, the
//! store to publish through, and a subject of its own.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use mts_config::Config;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::{AckRequest, FetchRequest, GetLastSequenceRequest, Message};
use mts_proto::service_names::EGRESS;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;
use mts_testkit::{self as testing, Running};
use tonic::transport::Channel;

pub struct Fixture {
    pub service: Running,
    pub client: EgressServiceClient<Channel>,
    pub store: Store,
    pub subject: String,
    pub config: Config,
}

pub async fn fixture(name: &str) -> Fixture {
    fixture_with(name, |_| {}).await
}

/// A fixture whose egress runs with `tweak` applied to its configuration.
pub async fn fixture_with(name: &str, tweak: impl FnOnce(&mut Config)) -> Fixture {
    let mut config = testing::config();
    // Far above the 10 s a test waits for a notification: only a commit
    // waking the waiter in Tarantool can deliver one in time.
    config.egress.long_poll_seconds = 300;
    tweak(&mut config);
    let service = Running::start(EGRESS, config.clone(), mts_egress::run).await;
    let client = EgressServiceClient::connect(service.endpoint())
        .await
        .unwrap();
    Fixture {
        service,
        client,
        store: Store::connect(&config).await.unwrap(),
        subject: testing::unique_subject(name),
        config,
    }
}

impl Fixture {
    pub async fn publish(&self, data: &[u8]) -> u64 {
        let headers = HashMap::from([("n".to_string(), data.len().to_string())]);
        self.store
            .publish(&self.subject, &headers, Some(data), None, data.len() as u64)
            .await
            .unwrap()
    }

    /// Publishes `payload` offloaded, as the ingress stores a large one: in
    /// the bucket under a key of the subject's, which its metadata names.
    /// Returns the key.
    pub async fn publish_offloaded(
        &self,
        payload: &[u8],
        headers: &HashMap<String, String>,
    ) -> String {
        let key = format!("{}/{}", self.subject, testing::unique_subject("object"));
        ObjectStore::new(&self.config)
            .put(&key, payload.to_vec().into())
            .await
            .unwrap();
        self.store
            .publish(
                &self.subject,
                headers,
                None,
                Some(&key),
                payload.len() as u64,
            )
            .await
            .unwrap();
        key
    }

    pub async fn fetch(&mut self, durable: &str, batch_size: i32) -> Vec<Message> {
        let stream = self
            .client
            .fetch(FetchRequest {
                subject: self.subject.clone(),
                durable_name: durable.into(),
                batch_size,
                omit_large_payloads: false,
            })
            .await
            .unwrap()
            .into_inner();
        stream.map(|m| m.unwrap()).collect().await
    }

    /// Fetches until something comes back, for at most `within`.
    pub async fn fetch_within(
        &mut self,
        durable: &str,
        batch_size: i32,
        within: Duration,
    ) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.fetch(durable, batch_size).await;
            if !got.is_empty() || tokio::time::Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn ack(&mut self, durable: &str, sequence: u64) -> Result<bool, tonic::Status> {
        self.client
            .ack_message(AckRequest {
                durable_name: durable.into(),
                subject: self.subject.clone(),
                sequence,
            })
            .await
            .map(|r| r.into_inner().success)
    }

    pub async fn last(&mut self) -> u64 {
        self.client
            .get_last_sequence(GetLastSequenceRequest {
                subject: self.subject.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .last_sequence
    }
}

pub fn sequences(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.sequence).collect()
}

pub async fn next(
    stream: &mut tonic::Streaming<mts_proto::pb::Notification>,
) -> mts_proto::pb::Notification {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a notification within 10 s")
        .expect("stream still open")
        .expect("no error")
}
