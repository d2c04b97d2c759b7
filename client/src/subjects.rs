//! Reading and administering subjects.

use mts_proto::pb::{
    GetLastSequenceRequest, ListSubjectsRequest, PurgeSubjectRequest, SetSubjectLimitsRequest,
    SubjectInfo, SubjectLimits, SubjectRequest,
};

use crate::client::Repeat;
use crate::{Client, Error};

/// What [`Client::purge_subject`] removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Purged {
    /// Messages removed.
    pub purged: u64,
    /// What the subject stores afterwards.
    pub subject: Option<SubjectInfo>,
}

impl Client {
    /// The sequence of the last message published to `subject`; 0 when none
    /// was. Tried again as [`Retry`](crate::Retry) says when the service
    /// cannot answer for now.
    pub async fn last_sequence(&self, subject: &str) -> Result<u64, Error> {
        let request = GetLastSequenceRequest {
            subject: subject.to_owned(),
        };
        self.egress_call(
            "last sequence",
            Repeat::Safe,
            request,
            |mut egress, request| async move { egress.get_last_sequence(request).await },
        )
        .await
        .map(|reply| reply.last_sequence)
    }

    /// What `subject` stores, and its limits.
    pub async fn subject_info(&self, subject: &str) -> Result<SubjectInfo, Error> {
        let request = SubjectRequest {
            subject: subject.to_owned(),
        };
        self.egress_call(
            "subject info",
            Repeat::Safe,
            request,
            |mut egress, request| async move { egress.get_subject_info(request).await },
        )
        .await
    }

    /// Every subject whose name starts with `prefix` (all for an empty
    /// one), in name order, read a page at a time.
    pub async fn subjects(&self, prefix: &str) -> Result<Vec<SubjectInfo>, Error> {
        let mut subjects = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListSubjectsRequest {
                prefix: prefix.to_owned(),
                page_size: 1000,
                page_token,
            };
            let page = self
                .egress_call(
                    "list subjects",
                    Repeat::Safe,
                    request,
                    |mut egress, request| async move { egress.list_subjects(request).await },
                )
                .await?;
            subjects.extend(page.subjects);
            if page.next_page_token.is_empty() {
                return Ok(subjects);
            }
            page_token = page.next_page_token;
        }
    }

    /// Sets `subject`'s retention limits; unset fields stay as they are.
    pub async fn set_subject_limits(
        &self,
        subject: &str,
        limits: SubjectLimits,
    ) -> Result<SubjectInfo, Error> {
        let request = SetSubjectLimitsRequest {
            subject: subject.to_owned(),
            limits: Some(limits),
        };
        self.egress_call(
            "set limits",
            Repeat::Safe,
            request,
            |mut egress, request| async move { egress.set_subject_limits(request).await },
        )
        .await
    }

    /// Removes `subject`'s messages up to and including `through` (all
    /// stored when the purge begins, for `None`) with their payloads; its
    /// consumers move past them.
    pub async fn purge_subject(
        &self,
        subject: &str,
        through: Option<u64>,
    ) -> Result<Purged, Error> {
        if through == Some(0) {
            // On the wire 0 means all: never what a caller giving 0 meant.
            return Err(Error::Config(
                "purging through sequence 0 would remove everything; give None to purge all".into(),
            ));
        }
        let request = PurgeSubjectRequest {
            subject: subject.to_owned(),
            through_sequence: through.unwrap_or(0),
        };
        let reply = self
            .egress_call(
                "purge",
                Repeat::IfNotDone,
                request,
                |mut egress, request| async move { egress.purge_subject(request).await },
            )
            .await?;
        Ok(Purged {
            purged: reply.purged,
            subject: reply.subject,
        })
    }

    /// Removes `subject`: its messages and payloads, consumers, limits and
    /// message ids. Returns the messages and consumers removed.
    pub async fn delete_subject(&self, subject: &str) -> Result<(u64, u64), Error> {
        let request = SubjectRequest {
            subject: subject.to_owned(),
        };
        self.egress_call(
            "delete subject",
            Repeat::IfNotDone,
            request,
            |mut egress, request| async move { egress.delete_subject(request).await },
        )
        .await
        .map(|reply| (reply.purged, reply.consumers_deleted))
    }
}
