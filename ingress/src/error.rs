//! Everything a publish can fail with (start-up failures are
//! `mts_runtime::server::Error`), and the one mapping of those
//! failures to gRPC status codes.

use mts_runtime::{status, validate};
use mts_storage::{object_store, store};
use tonic_types::{ErrorDetails, StatusExt};

/// An ingress failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a rule; nothing was stored.
    #[error("invalid request: {0}")]
    Invalid(#[from] validate::Error),
    /// The payload could not be uploaded; nothing was stored.
    #[error("payload upload failed: {0}")]
    Upload(#[source] object_store::Error),
    /// The metadata could not be committed; the upload (if any) was removed.
    #[error("metadata commit failed: {0}")]
    Commit(#[source] store::Error),
    /// Every streamed-upload slot of this process is taken.
    #[error("{limit} streamed uploads are already running on this ingress; retry shortly")]
    Busy {
        /// The configured cap.
        limit: usize,
    },
    /// This client holds its whole share of the streamed-upload slots.
    #[error(
        "this client already runs {limit} streamed uploads on this ingress (max_uploads_per_client); finish one, then retry"
    )]
    ClientBusy {
        /// The configured share.
        limit: usize,
    },
    /// The client broke off a streamed publish; nothing was stored.
    #[error("the publish stream broke off, nothing was stored: {0}")]
    ClientGone(tonic::Status),
    /// The client stopped sending in the middle of a stream.
    #[error(
        "the publisher ({client}) sent nothing for {idle:?} in the middle of its PublishStream (stream_idle_timeout_ms); nothing was stored"
    )]
    Idle {
        /// How long it was silent.
        idle: std::time::Duration,
        /// Who it is (token client, or address).
        client: String,
    },
    /// A publish task failed unexpectedly.
    #[error("the publish failed unexpectedly: {0}")]
    Panicked(String),
    /// The caller may not do this.
    #[error(transparent)]
    Auth(#[from] mts_runtime::auth::Error),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(violation) => tonic::Status::with_error_details(
                tonic::Code::InvalidArgument,
                violation.to_string(),
                ErrorDetails::with_bad_request_violation(violation.field, violation.reason),
            ),
            Error::Upload(source) => {
                let status = status::object_store(source);
                tonic::Status::new(
                    status.code(),
                    format!(
                        "payload upload failed, nothing was stored: {}",
                        status.message()
                    ),
                )
            }
            // Unknown is not "not stored": the status says which it is.
            Error::Commit(source @ store::Error::OutcomeUnknown { .. }) => {
                let status = status::store(source);
                tonic::Status::new(
                    status.code(),
                    format!("publish outcome unknown: {}", status.message()),
                )
            }
            Error::Commit(source) => {
                let status = status::store(source);
                tonic::Status::new(
                    status.code(),
                    format!("message not stored: {}", status.message()),
                )
            }
            Error::Busy { .. } | Error::ClientBusy { .. } => tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                err.to_string(),
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
            ),
            Error::ClientGone(_) => tonic::Status::cancelled(err.to_string()),
            Error::Idle { .. } => tonic::Status::deadline_exceeded(err.to_string()),
            Error::Auth(source) => source.into(),
            Error::Panicked(_) => tonic::Status::internal(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn validation_failures_name_the_field() {
        let status = tonic::Status::from(Error::Invalid(validate::Error::new(
            "subject",
            "must not be empty",
        )));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("subject: must not be empty"));
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations[0].field, "subject");
    }

    #[test]
    fn dependency_failures_are_retryable() {
        let upload = tonic::Status::from(Error::Upload(object_store::Error::Unavailable(
            "connection refused".into(),
        )));
        assert_eq!(upload.code(), Code::Unavailable);
        assert!(upload.message().contains("nothing was stored"));

        let commit = tonic::Status::from(Error::Commit(store::Error::Timeout(
            std::time::Duration::from_secs(5),
        )));
        assert_eq!(commit.code(), Code::Unavailable);
        assert!(commit.message().contains("message not stored"));

        let closed = tonic::Status::from(Error::Commit(store::Error::closed()));
        assert_eq!(closed.code(), Code::Unavailable);
    }

    #[test]
    fn an_unknown_outcome_is_never_reported_as_not_stored() {
        let unknown = tonic::Status::from(Error::Commit(store::Error::OutcomeUnknown {
            cause: Box::new(store::Error::closed()),
            waited: std::time::Duration::from_secs(5),
        }));
        assert_eq!(unknown.code(), Code::DeadlineExceeded);
        assert!(
            !unknown.message().contains("not stored"),
            "{}",
            unknown.message()
        );
        assert!(
            unknown.message().contains("outcome unknown"),
            "{}",
            unknown.message()
        );
        assert!(
            unknown.message().contains("message_id"),
            "{}",
            unknown.message()
        );
    }

    #[test]
    fn no_failure_maps_to_unknown() {
        let errors = [
            Error::Invalid(validate::Error::new("data", "too big")),
            Error::Upload(object_store::Error::Rejected("AccessDenied".into())),
            Error::Upload(object_store::Error::NotFound("k".into())),
            Error::Commit(store::Error::protocol("bad")),
            Error::Commit(store::Error::Refused {
                code: 2,
                reason: "Failed to allocate".into(),
            }),
            Error::Panicked("x".into()),
        ];
        for err in errors {
            let text = err.to_string();
            assert_ne!(tonic::Status::from(err).code(), Code::Unknown, "{text}");
        }
    }
}
