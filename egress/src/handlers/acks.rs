//! AckMessage (cumulative), Ack (exact sequences), Nack and ExtendLease.

use mts_proto::pb::{AckRequest, AckSequencesRequest, ExtendLeaseRequest, NackRequest};
use mts_runtime::validate;
use mts_storage::store::AckOutcome;

use crate::Error;
use crate::handlers::Egress;
use crate::rules::{consumer_names, extension, held, sequence_list};

impl Egress {
    pub(crate) async fn cumulative_ack(&self, request: AckRequest) -> Result<u64, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        if request.sequence == 0 {
            return Err(validate::Error::new("sequence", "must be at least 1").into());
        }
        match self
            .store
            .ack_message(&request.subject, &request.durable_name, request.sequence)
            .await?
        {
            AckOutcome::Acked { position } => Ok(position),
            AckOutcome::BeyondLast { last } => Err(Error::AckBeyondLast {
                subject: request.subject,
                sequence: request.sequence,
                last,
            }),
        }
    }

    pub(crate) async fn ack_sequences(&self, request: AckSequencesRequest) -> Result<u64, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        sequence_list(&request.sequences)?;
        let verdict = self
            .store
            .ack_sequences(&request.subject, &request.durable_name, &request.sequences)
            .await?;
        held(&request.subject, &request.durable_name, verdict)
    }

    pub(crate) async fn nack_sequences(&self, request: NackRequest) -> Result<(), Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        sequence_list(&request.sequences)?;
        let verdict = self
            .store
            .nack(
                &request.subject,
                &request.durable_name,
                &request.sequences,
                request.delay_ms,
            )
            .await?;
        held(&request.subject, &request.durable_name, verdict)
    }

    /// Returns when the leases now run out (ns since the Unix epoch).
    pub(crate) async fn extend_leases(&self, request: ExtendLeaseRequest) -> Result<u64, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        sequence_list(&request.sequences)?;
        let extend_ms = extension(request.extend_ms)?;
        let verdict = self
            .store
            .extend_leases(
                &request.subject,
                &request.durable_name,
                &request.sequences,
                extend_ms,
            )
            .await?;
        held(&request.subject, &request.durable_name, verdict)
    }
}
