//! Reading subjects.

use mts_proto::pb::GetLastSequenceRequest;
use mts_proto::pb::egress_service_client::EgressServiceClient;

use crate::{Client, Error};

impl Client {
    /// The sequence of the last message published to `subject`; 0 when none
    /// was. Tried again as [`Retry`](crate::Retry) says when the service
    /// cannot answer for now.
    pub async fn last_sequence(&self, subject: &str) -> Result<u64, Error> {
        let egress = EgressServiceClient::new(self.egress.clone());
        let request = GetLastSequenceRequest {
            subject: subject.to_owned(),
        };
        self.retrying("last sequence", || {
            let (mut egress, request) = (egress.clone(), request.clone());
            async move {
                let reply = egress.get_last_sequence(self.request(request).await?).await;
                Ok(reply.map(|r| r.into_inner().last_sequence))
            }
        })
        .await
        .map(|(last, _)| last)
    }
}
