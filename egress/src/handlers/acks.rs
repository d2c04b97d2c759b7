//! AckMessage (cumulative), Ack (exact sequences), Nack, ExtendLease and
//! Reject.

use mts_proto::pb::{
    AckRequest, AckSequencesRequest, ExtendLeaseRequest, NackRequest, RejectRequest,
};
use mts_runtime::validate;
use mts_storage::store::{AckOutcome, NotHeld};

use crate::Error;
use crate::handlers::Egress;
use crate::rules::{consumer_names, extension, held, reject_reason, sequence_list};

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

    /// Returns the consumer's ack floor after the rejection.
    pub(crate) async fn reject(&self, request: RejectRequest) -> Result<u64, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        sequence_list(&request.sequences)?;
        reject_reason(&request.reason)?;
        let verdict = self
            .reject_held(
                &request.subject,
                &request.durable_name,
                &request.sequences,
                &request.reason,
            )
            .await?;
        held(&request.subject, &request.durable_name, verdict)
    }

    /// Rejects held `seqs`; those in segments are read from there for
    /// their dead-letter copies, and rejected with them. Returns the ack
    /// floor after it, or the sequences the consumer does not hold (then
    /// nothing changed).
    pub(crate) async fn reject_held(
        &self,
        subject: &str,
        durable: &str,
        seqs: &[u64],
        reason: &str,
    ) -> Result<Result<u64, NotHeld>, Error> {
        let rejected = match self
            .store
            .reject(subject, durable, seqs, reason, &[])
            .await?
        {
            Ok(rejected) => rejected,
            Err(not_held) => return Ok(Err(not_held)),
        };
        if rejected.in_segments.is_empty() {
            self.metrics.rejections.inc_by(seqs.len() as u64);
            return Ok(Ok(rejected.ack_floor));
        }
        // Copies first, in order; one that retention took meanwhile goes
        // last, without a copy, and is dropped.
        let (mut copies, mut gone) = (Vec::new(), Vec::new());
        for &seq in &rejected.in_segments {
            match self.store.message(subject, seq).await? {
                Some(mut message) => {
                    self.segments.resolve(&mut message).await?;
                    copies.push(message);
                }
                None => gone.push(seq),
            }
        }
        let mut cold: Vec<u64> = copies.iter().map(|m| m.seq).collect();
        cold.extend(gone);
        let rejected = self
            .store
            .reject(subject, durable, &cold, reason, &copies)
            .await?;
        if rejected.is_ok() {
            self.metrics.rejections.inc_by(seqs.len() as u64);
        }
        Ok(rejected.map(|r| r.ack_floor))
    }
}
