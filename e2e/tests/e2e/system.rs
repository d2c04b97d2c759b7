//! Both services started together against one configuration.

use futures::StreamExt;
use mts_config::Config;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::{FetchRequest, Message};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit::Running;
use tonic::transport::Channel;

pub struct System {
    pub ingress: Running,
    pub egress: Running,
}

impl System {
    pub async fn start(config: Config) -> Self {
        Self::start_with(config.clone(), config).await
    }

    pub async fn start_with(ingress: Config, egress: Config) -> Self {
        Self {
            ingress: Running::start(INGRESS, ingress, mts_ingress::run).await,
            egress: Running::start(EGRESS, egress, mts_egress::run).await,
        }
    }

    pub async fn publisher(&self) -> IngressServiceClient<Channel> {
        IngressServiceClient::connect(self.ingress.endpoint())
            .await
            .unwrap()
            .max_decoding_message_size(128 << 20)
            .max_encoding_message_size(128 << 20)
    }

    pub async fn subscriber(&self) -> EgressServiceClient<Channel> {
        EgressServiceClient::connect(self.egress.endpoint())
            .await
            .unwrap()
            .max_decoding_message_size(128 << 20)
    }

    /// One Fetch of up to `batch` messages, as a client written before
    /// `omit_large_payloads` makes it, every one of them received.
    pub async fn fetch(&self, subject: &str, durable: &str, batch: i32) -> Vec<Message> {
        self.try_fetch(subject, durable, batch, false)
            .await
            .unwrap()
    }

    /// One Fetch of up to `batch` messages: those received, or the status
    /// the stream ended with (the messages before it are dropped).
    pub async fn try_fetch(
        &self,
        subject: &str,
        durable: &str,
        batch: i32,
        omit_large_payloads: bool,
    ) -> Result<Vec<Message>, tonic::Status> {
        let mut stream = self
            .subscriber()
            .await
            .fetch(FetchRequest {
                subject: subject.into(),
                durable_name: durable.into(),
                batch_size: batch,
                omit_large_payloads,
            })
            .await?
            .into_inner();
        let mut messages = Vec::new();
        while let Some(message) = stream.next().await {
            messages.push(message?);
        }
        Ok(messages)
    }

    pub async fn stop(self) {
        self.ingress.stop().await.unwrap();
        self.egress.stop().await.unwrap();
    }
}
