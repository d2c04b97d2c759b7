//! Consumer and subject administration: creating, reading, listing, moving
//! (seek) and deleting consumers; subjects' retention limits and state,
//! their listing, purge and deletion.

use mts_config::MAX_RETENTION_AGE_MS;
use mts_proto::pb::seek_consumer_request::To;
use mts_proto::pb::{
    ConsumerInfo, CreateOrUpdateConsumerRequest, DeleteSubjectResponse, ListConsumersRequest,
    ListConsumersResponse, ListSubjectsRequest, ListSubjectsResponse, PurgeSubjectRequest,
    PurgeSubjectResponse, SeekConsumerRequest, SetSubjectLimitsRequest,
};
use mts_runtime::auth::Caller;
use mts_runtime::validate;
use mts_storage::store::{
    ConsumerSettings, ConsumerState, DeliverPolicy, PurgeStep, Seek, SegmentCut, SubjectState,
};

use crate::handlers::Egress;
use crate::rules::consumer_names;
use crate::{Error, wire};

/// Entries in a listing page when the request names no page size.
const PAGE_SIZE: u32 = 100;
/// Most entries in a listing page.
const MAX_PAGE_SIZE: u32 = 1000;
/// Longest page token a listing takes: two names and a space.
const MAX_PAGE_TOKEN: usize = 1024;
/// Messages one purge step removes, in one transaction.
const PURGE_STEP: u32 = 500;
/// Message ids one step of a deletion forgets.
const DELETE_STEP: u32 = 1000;

/// A listing's page size, checked.
fn page_size(requested: u32) -> Result<u32, validate::Error> {
    match requested {
        0 => Ok(PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(validate::Error::new(
            "page_size",
            format!("{n} is above the limit of {MAX_PAGE_SIZE}"),
        )),
        n => Ok(n),
    }
}

/// A page token this service gave, checked for size (its content is only
/// ever a position in name order).
fn page_token(token: &str) -> Result<&str, validate::Error> {
    if token.len() > MAX_PAGE_TOKEN {
        return Err(validate::Error::new(
            "page_token",
            "is not one this service gave: pass next_page_token as it came",
        ));
    }
    Ok(token)
}

/// A consumers listing's page token: the (subject, durable) it ends at.
fn consumer_position(token: &str) -> Result<Option<(&str, &str)>, validate::Error> {
    if page_token(token)?.is_empty() {
        return Ok(None);
    }
    token.split_once(' ').map(Some).ok_or_else(|| {
        validate::Error::new(
            "page_token",
            "is not one this service gave: pass next_page_token as it came",
        )
    })
}

impl Egress {
    /// A page of subjects the caller may use, in name order.
    pub(crate) async fn list_subjects(
        &self,
        caller: &Caller,
        request: ListSubjectsRequest,
    ) -> Result<ListSubjectsResponse, Error> {
        let limit = page_size(request.page_size)?;
        let after = page_token(&request.page_token)?;
        let page = self
            .store
            .list_subjects(&request.prefix, after, limit)
            .await?;
        // The token is where this page's look ended, shown or not.
        let next_page_token = match page.entries.last() {
            Some(last) if page.more => last.subject.clone(),
            _ => String::new(),
        };
        let subjects = page
            .entries
            .into_iter()
            .filter(|s| caller.may_use(&s.subject))
            .map(wire::subject_info)
            .collect();
        Ok(ListSubjectsResponse {
            subjects,
            next_page_token,
        })
    }

    /// A page of consumers on subjects the caller may use, in (subject,
    /// name) order, of one subject or of all.
    pub(crate) async fn list_consumers(
        &self,
        caller: &Caller,
        request: ListConsumersRequest,
    ) -> Result<ListConsumersResponse, Error> {
        if !request.subject.is_empty() {
            validate::subject(&request.subject)?;
        }
        let limit = page_size(request.page_size)?;
        let after = consumer_position(&request.page_token)?;
        let page = self
            .store
            .list_consumers(&request.subject, after, limit)
            .await?;
        let next_page_token = match page.entries.last() {
            Some(last) if page.more => format!("{} {}", last.subject, last.durable),
            _ => String::new(),
        };
        let consumers = page
            .entries
            .into_iter()
            .filter(|c| caller.may_use(&c.subject))
            .map(|c| wire::consumer_info(c, false))
            .collect();
        Ok(ListConsumersResponse {
            consumers,
            next_page_token,
        })
    }

    /// Purges a subject's messages through a sequence (0 = all).
    pub(crate) async fn purge(
        &self,
        request: PurgeSubjectRequest,
    ) -> Result<PurgeSubjectResponse, Error> {
        let subject = &request.subject;
        validate::subject(subject)?;
        let through = request.through_sequence;
        if through > 0 {
            let last = self.store.last_seq(subject).await?;
            if through > last {
                return Err(Error::PurgeBeyondLast {
                    subject: subject.clone(),
                    sequence: through,
                    last,
                });
            }
        }
        let purged = self.purge_through(subject, through).await?;
        let state = self.store.subject_info(subject).await?;
        Ok(PurgeSubjectResponse {
            purged,
            subject: Some(wire::subject_info(state)),
        })
    }

    /// Deletes a subject: its messages, consumers, limits and message ids.
    pub(crate) async fn delete_subject(
        &self,
        subject: &str,
    ) -> Result<DeleteSubjectResponse, Error> {
        validate::subject(subject)?;
        let purged = self.purge_through(subject, 0).await?;
        let mut consumers_deleted = 0;
        loop {
            let (done, consumers) = self.store.delete_subject_step(subject, DELETE_STEP).await?;
            consumers_deleted += consumers;
            if done {
                break;
            }
        }
        tracing::info!(%subject, purged, consumers_deleted, "subject deleted");
        Ok(DeleteSubjectResponse {
            purged,
            consumers_deleted,
        })
    }

    /// Removes the messages of `subject` through `through` (0 = its last
    /// sequence when the purge begins) in bounded steps; how many went.
    async fn purge_through(&self, subject: &str, mut through: u64) -> Result<u64, Error> {
        let mut purged = 0;
        let mut cut = None;
        loop {
            let (step, resolved) = self
                .store
                .purge_step(subject, through, PURGE_STEP, cut.take())
                .await?;
            through = resolved;
            match step {
                PurgeStep::Done(removed) => return Ok(purged + removed),
                PurgeStep::More(removed) => purged += removed,
                PurgeStep::Cut {
                    removed,
                    first_seq,
                    blocks,
                } => {
                    // The purge ends inside a segment: its purged messages'
                    // bytes are in the object, not in Tarantool.
                    purged += removed;
                    let bytes = self
                        .segments
                        .bytes_between(subject, first_seq, through, &blocks)
                        .await?;
                    cut = Some(SegmentCut { first_seq, bytes });
                }
            }
        }
    }

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
