//! The gRPC status of each failure of the stores: what both services answer
//! when Tarantool or the object store fails. A service's own error type maps
//! its store failures through these, in its one error→status match.

use mts_storage::{object_store, store};
use tonic::Status;

/// The status of a Tarantool failure.
pub fn store(err: store::Error) -> Status {
    use store::{Error, Refusal};
    match (&err, err.refusal()) {
        (Error::Unavailable(_) | Error::Timeout(_), _) => {
            Status::unavailable(format!("metadata store unavailable, retry later: {err}"))
        }
        // DEADLINE_EXCEEDED is gRPC's "may or may not have completed".
        (Error::OutcomeUnknown { .. }, _) => Status::deadline_exceeded(format!(
            "{err}; to retry without storing twice, publish again with the same message_id"
        )),
        (_, Some(Refusal::Full)) => Status::resource_exhausted(format!(
            "Tarantool is out of memory, nothing was stored; publish again later, and lower hot_tier_max_bytes or raise memtx_memory: {err}"
        )),
        // A state with a policy, not a fault: the message says what to do.
        (_, Some(Refusal::HotFull)) => Status::resource_exhausted(err.to_string()),
        (_, Some(Refusal::Late)) => {
            Status::unavailable(format!("metadata store was too slow, retry later: {err}"))
        }
        (_, Some(Refusal::QuorumLost)) => Status::unavailable(format!(
            "the Tarantool replica set lacks a quorum (too few members up), nothing was stored; retry once members are back: {err}"
        )),
        (_, Some(Refusal::Abandoned | Refusal::Fenced)) => Status::aborted(format!(
            "publish was abandoned after a timeout; publish again: {err}"
        )),
        (
            Error::Full(_) | Error::Rejected(_) | Error::Refused { .. } | Error::Protocol(_),
            None,
        ) => Status::internal(format!("metadata store error: {err}")),
    }
}

/// The status of an object-store failure, the same in both services. Only
/// an outage is worth a client's retry; a refusal (credentials, permissions)
/// or a missing bucket or object is the deployment's to fix, and says so.
pub fn object_store(err: object_store::Error) -> Status {
    match &err {
        object_store::Error::Unavailable(_) => {
            Status::unavailable(format!("object store unavailable, retry later: {err}"))
        }
        object_store::Error::Rejected(_) => Status::internal(format!(
            "the object store refused the service's request (check its credentials, permissions and bucket): {err}"
        )),
        object_store::Error::NotFound(_) => Status::internal(format!(
            "the object store is missing what the service expects (check the bucket): {err}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tonic::Code;

    #[test]
    fn each_store_failure_has_its_code() {
        let cases = [
            (store::Error::closed(), Code::Unavailable),
            (
                store::Error::Timeout(Duration::from_secs(1)),
                Code::Unavailable,
            ),
            (store::Error::protocol("x"), Code::Internal),
            (
                store::Error::Refused {
                    code: 2,
                    reason: "Failed to allocate".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                store::Error::Refused {
                    code: 10002,
                    reason: "late".into(),
                },
                Code::Unavailable,
            ),
            (
                store::Error::Refused {
                    code: 10001,
                    reason: "abandoned".into(),
                },
                Code::Aborted,
            ),
            (
                store::Error::Refused {
                    code: 0,
                    reason: "Failed to allocate 1193 bytes in slab allocator for memtx_tuple"
                        .into(),
                },
                Code::ResourceExhausted,
            ),
            (
                store::Error::Refused {
                    code: 10004,
                    reason: "the hot tier is full".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                store::Error::OutcomeUnknown {
                    cause: Box::new(store::Error::closed()),
                    waited: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            assert_eq!(store(err).code(), code, "{text}");
        }
        let unknown = store(store::Error::OutcomeUnknown {
            cause: Box::new(store::Error::closed()),
            waited: Duration::from_secs(1),
        });
        assert!(
            unknown.message().contains("message_id"),
            "{}",
            unknown.message()
        );
    }

    #[test]
    fn each_object_store_failure_has_its_code() {
        assert_eq!(
            object_store(object_store::Error::Unavailable("x".into())).code(),
            Code::Unavailable
        );
        let refused = object_store(object_store::Error::Rejected("AccessDenied".into()));
        assert_eq!(refused.code(), Code::Internal);
        assert!(
            !refused.message().contains("retry later"),
            "{}",
            refused.message()
        );
        assert_eq!(
            object_store(object_store::Error::NotFound("k".into())).code(),
            Code::Internal
        );
    }
}
