//! Consumer and subject administration: creating, reading, moving (seek)
//! and deleting consumers, and subjects' retention limits and state.

use mts_config::MAX_RETENTION_AGE_MS;
use mts_proto::pb::seek_consumer_request::To;
use mts_proto::pb::{
    ConsumerInfo, CreateOrUpdateConsumerRequest, SeekConsumerRequest, SetSubjectLimitsRequest,
};
use mts_runtime::validate;
use mts_storage::store::{ConsumerSettings, ConsumerState, DeliverPolicy, Seek, SubjectState};

use crate::handlers::Egress;
use crate::rules::consumer_names;
use crate::{Error, wire};

impl Egress {
    /// Deletes a consumer; whether it existed.
    pub(crate) async fn delete(&self, subject: &str, durable: &str) -> Result<bool, Error> {
        consumer_names(subject, durable)?;
        Ok(self.store.delete_consumer(subject, durable).await?)
    }

    /// Moves a consumer to a sequence or a time; its state after.
    pub(crate) async fn seek(&self, request: SeekConsumerRequest) -> Result<ConsumerInfo, Error> {
        let (subject, durable) = (&request.subject, &request.durable_name);
        consumer_names(subject, durable)?;
        let to = match request.to {
            None | Some(To::Sequence(0)) => {
                return Err(validate::Error::new(
                    "to",
                    "name a sequence (from 1) or a time to seek to",
                )
                .into());
            }
            Some(To::Sequence(sequence)) => {
                let last = self.store.last_seq(subject).await?;
                if sequence > last + 1 {
                    return Err(Error::SeekBeyondLast {
                        subject: subject.clone(),
                        sequence,
                        last,
                    });
                }
                Seek::After(sequence - 1)
            }
            Some(To::Time(time)) => {
                let time_ns = wire::time_ns(&time, "time")?;
                // Among messages in a segment, to the exact one.
                match self.store.locate_time(subject, time_ns).await? {
                    Some(block) => Seek::After(self.segments.start_after(block, time_ns).await?),
                    None => Seek::Time(time_ns),
                }
            }
        };
        if self.store.seek(subject, durable, to).await?.is_none() {
            return Err(Error::ConsumerNotFound {
                subject: subject.clone(),
                durable: durable.clone(),
            });
        }
        let state = self.consumer_state(subject, durable).await?;
        Ok(wire::consumer_info(state, false))
    }

    /// What is stored for a subject, and its limits.
    pub(crate) async fn subject_state(&self, subject: &str) -> Result<SubjectState, Error> {
        validate::subject(subject)?;
        Ok(self.store.subject_info(subject).await?)
    }

    pub(crate) async fn put_consumer(
        &self,
        request: CreateOrUpdateConsumerRequest,
    ) -> Result<ConsumerInfo, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        let mut settings = wire::consumer_settings(&request.subject, request.config)?;
        self.resolve_start_time(&request.subject, &mut settings)
            .await?;
        let created = self
            .store
            .create_or_update_consumer(&request.subject, &request.durable_name, &settings)
            .await?;
        let state = self
            .consumer_state(&request.subject, &request.durable_name)
            .await?;
        Ok(wire::consumer_info(state, created))
    }

    /// For a consumer starting at a time that falls among messages in a
    /// segment, finds the exact message there (Tarantool knows only each
    /// block's first commit time).
    async fn resolve_start_time(
        &self,
        subject: &str,
        settings: &mut ConsumerSettings,
    ) -> Result<(), Error> {
        let (Some(DeliverPolicy::ByStartTime), Some(time_ns)) =
            (settings.deliver_policy, settings.start_time_ns)
        else {
            return Ok(());
        };
        if let Some(block) = self.store.locate_time(subject, time_ns).await? {
            settings.start_after = Some(self.segments.start_after(block, time_ns).await?);
        }
        Ok(())
    }

    pub(crate) async fn consumer_state(
        &self,
        subject: &str,
        durable: &str,
    ) -> Result<ConsumerState, Error> {
        self.store
            .consumer_info(subject, durable)
            .await?
            .ok_or_else(|| Error::ConsumerNotFound {
                subject: subject.to_owned(),
                durable: durable.to_owned(),
            })
    }

    /// Checks and sets a subject's own retention limits; what is stored for
    /// it, afterwards.
    pub(crate) async fn set_limits(
        &self,
        request: SetSubjectLimitsRequest,
    ) -> Result<SubjectState, Error> {
        validate::subject(&request.subject)?;
        let limits = request.limits.unwrap_or_default();
        if let Some(age) = limits.max_age_ms.filter(|age| *age > MAX_RETENTION_AGE_MS) {
            return Err(validate::Error::new(
                "limits.max_age_ms",
                format!(
                    "{age} is above the limit of {MAX_RETENTION_AGE_MS} (100 years); 0 keeps messages forever"
                ),
            )
            .into());
        }
        self.store
            .set_subject_limits(&request.subject, wire::limits(limits)?)
            .await?;
        Ok(self.store.subject_info(&request.subject).await?)
    }
}
