//! Fetch: a batch of messages leased to a durable consumer.

use mts_proto::pb::FetchRequest;
use mts_runtime::validate;
use mts_storage::store::Leased;

use crate::Error;
use crate::handlers::Egress;
use crate::rules::consumer_names;

/// Batch size when the client asks for 0 or less.
const DEFAULT_BATCH: u32 = 10;
/// Largest batch one Fetch may ask for.
const MAX_BATCH: i32 = 1000;

impl Egress {
    pub(crate) async fn lease_batch(&self, request: &FetchRequest) -> Result<Vec<Leased>, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        let limit = match request.batch_size {
            n if n <= 0 => DEFAULT_BATCH,
            n if n > MAX_BATCH => {
                return Err(validate::Error::new(
                    "batch_size",
                    format!("{n} is above the limit of {MAX_BATCH}"),
                )
                .into());
            }
            n => n.unsigned_abs(),
        };
        let batch = self
            .store
            .fetch(&request.subject, &request.durable_name, limit)
            .await?
            .messages;
        let batch = self.ready(&request.durable_name, batch).await?;
        self.count_deliveries(&batch);
        Ok(batch)
    }

    /// The wire messages of a fetched batch, large payloads left out when
    /// the client asked for that.
    pub(crate) fn fetched(
        &self,
        batch: Vec<Leased>,
        omit_large: bool,
    ) -> impl futures::Stream<Item = Result<mts_proto::pb::Message, Error>> + Send + use<> {
        let payloads = crate::delivery::Payloads {
            limits: self.payload_limits,
            omit_large,
        };
        crate::delivery::wire_messages(self.object_store.clone(), batch, payloads)
    }
}
