//! Everything an egress request can fail with (start-up failures are
//! `mts_runtime::server::Error`), and the one mapping of those
//! failures to gRPC status codes.

use mts_runtime::{status, validate};
use mts_storage::{object_store, store};
use tonic_types::{ErrorDetails, StatusExt};

/// An egress failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a rule.
    #[error("invalid request: {0}")]
    Invalid(#[from] validate::Error),
    /// Tarantool failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The object store failed while reading a payload.
    #[error(transparent)]
    ObjectStore(object_store::Error),
    /// Metadata names an object that is gone.
    #[error("payload of {subject} #{sequence} is missing from the object store (object {key})")]
    MissingPayload {
        /// The message's subject.
        subject: String,
        /// The message's sequence.
        sequence: u64,
        /// The object key in its metadata.
        key: String,
    },
    /// A segment object that does not read as one.
    #[error("segment {key} is damaged: {detail}; restore it from a backup")]
    CorruptSegment {
        /// The segment's object key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// An ack for a sequence the subject has not reached.
    #[error("cannot ack sequence {sequence}: the last sequence of {subject} is {last}")]
    AckBeyondLast {
        /// The subject.
        subject: String,
        /// The sequence acked.
        sequence: u64,
        /// The subject's last sequence.
        last: u64,
    },
    /// A purge through a sequence never assigned.
    #[error(
        "cannot purge through sequence {sequence}: the last sequence of {subject} is {last}; purge through it at most, or 0 for all"
    )]
    PurgeBeyondLast {
        /// The subject.
        subject: String,
        /// The sequence asked for.
        sequence: u64,
        /// The subject's last sequence.
        last: u64,
    },
    /// A seek past what the subject will deliver next.
    #[error("cannot seek to sequence {sequence}: the last sequence of {subject} is {last}; seek to {next} at most", next = last + 1)]
    SeekBeyondLast {
        /// The subject.
        subject: String,
        /// The sequence asked for.
        sequence: u64,
        /// The subject's last sequence.
        last: u64,
    },
    /// An ack or nack names sequences the consumer does not hold.
    #[error(
        "durable {durable} on {subject} does not hold sequences {sequences:?}: they were acked already, never delivered to it, or dead-lettered"
    )]
    NotHeld {
        /// The subject.
        subject: String,
        /// The durable name.
        durable: String,
        /// The sequences not held.
        sequences: Vec<u64>,
    },
    /// The consumer does not exist.
    #[error("there is no consumer {durable} on {subject}")]
    ConsumerNotFound {
        /// The subject.
        subject: String,
        /// The durable name.
        durable: String,
    },
    /// A payload too large to send inline to a client that reads every
    /// payload inline.
    #[error(
        "message {sequence} on {subject} has a payload of {size} bytes, above the {limit}-byte limit for sending payloads inline (max_delivered_payload_bytes); read it with FetchPayload, and set omit_large_payloads on Fetch or Consume to receive such messages without their payload"
    )]
    PayloadTooLarge {
        /// The subject.
        subject: String,
        /// The sequence.
        sequence: u64,
        /// The payload's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A FetchPayload offset past the payload's end.
    #[error(
        "offset {offset} is past the end of the {size}-byte payload of message {sequence} on {subject}"
    )]
    OffsetPastEnd {
        /// The subject.
        subject: String,
        /// The sequence.
        sequence: u64,
        /// The offset asked for.
        offset: u64,
        /// The payload's size.
        size: u64,
    },
    /// No message has this subject and sequence (never published, or removed).
    #[error("there is no message {sequence} on {subject}")]
    MessageNotFound {
        /// The subject.
        subject: String,
        /// The sequence.
        sequence: u64,
    },
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
            Error::Store(source) => status::store(source),
            Error::ObjectStore(source) => status::object_store(source),
            Error::MissingPayload { .. } | Error::CorruptSegment { .. } => {
                tonic::Status::data_loss(err.to_string())
            }
            Error::AckBeyondLast { .. } | Error::NotHeld { .. } => {
                tonic::Status::failed_precondition(err.to_string())
            }
            Error::ConsumerNotFound { .. } | Error::MessageNotFound { .. } => {
                tonic::Status::not_found(err.to_string())
            }
            Error::PayloadTooLarge { .. } => tonic::Status::resource_exhausted(err.to_string()),
            Error::OffsetPastEnd { .. }
            | Error::SeekBeyondLast { .. }
            | Error::PurgeBeyondLast { .. } => tonic::Status::out_of_range(err.to_string()),
            Error::Auth(source) => source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_failure_has_a_deliberate_code() {
        let cases = [
            (
                Error::Invalid(validate::Error::new("batch_size", "too big")),
                Code::InvalidArgument,
            ),
            (
                Error::Store(store::Error::Timeout(std::time::Duration::from_secs(1))),
                Code::Unavailable,
            ),
            (Error::Store(store::Error::closed()), Code::Unavailable),
            (Error::Store(store::Error::protocol("x")), Code::Internal),
            (
                Error::ObjectStore(object_store::Error::Unavailable("refused".into())),
                Code::Unavailable,
            ),
            (
                Error::ObjectStore(object_store::Error::NotFound("k".into())),
                Code::Internal,
            ),
            (
                Error::MissingPayload {
                    subject: "s".into(),
                    sequence: 3,
                    key: "s/k".into(),
                },
                Code::DataLoss,
            ),
            (
                Error::CorruptSegment {
                    key: "s/segments/1".into(),
                    detail: "checksum mismatch".into(),
                },
                Code::DataLoss,
            ),
            (
                Error::AckBeyondLast {
                    subject: "s".into(),
                    sequence: 9,
                    last: 3,
                },
                Code::FailedPrecondition,
            ),
            (
                Error::NotHeld {
                    subject: "s".into(),
                    durable: "d".into(),
                    sequences: vec![4],
                },
                Code::FailedPrecondition,
            ),
            (
                Error::ConsumerNotFound {
                    subject: "s".into(),
                    durable: "d".into(),
                },
                Code::NotFound,
            ),
            (
                Error::PayloadTooLarge {
                    subject: "s".into(),
                    sequence: 2,
                    size: 100,
                    limit: 10,
                },
                Code::ResourceExhausted,
            ),
            (
                Error::OffsetPastEnd {
                    subject: "s".into(),
                    sequence: 2,
                    offset: 11,
                    size: 10,
                },
                Code::OutOfRange,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert!(!status.message().is_empty());
        }
    }

    #[test]
    fn ack_beyond_last_says_what_the_last_sequence_is() {
        let status = tonic::Status::from(Error::AckBeyondLast {
            subject: "orders".into(),
            sequence: 9,
            last: 3,
        });
        assert!(
            status.message().contains("last sequence of orders is 3"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn invalid_arguments_carry_field_violations() {
        let status = tonic::Status::from(Error::Invalid(validate::Error::new(
            "durable_name",
            "must not be empty",
        )));
        let details = status.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "durable_name"
        );
    }
}
