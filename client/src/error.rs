//! What a call can fail with, and whether trying again may help.

use tonic::Code;

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service answered with an error status.
    #[error("{doing}: {} ({:?})", described(status), status.code())]
    Status {
        /// What was being done.
        doing: &'static str,
        /// The service's status.
        status: tonic::Status,
    },
    /// An endpoint, certificate or key could not be used.
    #[error("{0}")]
    Config(String),
    /// A connection could not be made.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The token provider failed.
    #[error("cannot get a token: {0}")]
    Token(String),
    /// A downloaded payload does not have the SHA-256 the service gave: it
    /// was not kept.
    #[error("message {sequence}: the payload's SHA-256 is {actual}, the service said {expected}")]
    Digest {
        /// The message's sequence.
        sequence: u64,
        /// What the service said.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Reading or writing a local file failed.
    #[error("{doing} {}: {source}", path.display())]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The consumer or publisher was closed.
    #[error("the {0} is closed")]
    Closed(&'static str),
}

impl Error {
    /// Whether the same call may succeed later: the service or its storage
    /// was unavailable, or the call ran out of time. A publish retried with
    /// the same message id is stored once.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Aborted
                ) || broken_link(status)
            }
            Self::Connect { .. } => true,
            Self::Config(_)
            | Self::Token(_)
            | Self::Digest { .. }
            | Self::Io { .. }
            | Self::Closed(_) => false,
        }
    }

    /// Whether the call may have been done although it failed: its
    /// deadline passed, or its connection broke, after it was sent.
    pub(crate) fn outcome_unknown(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                status.code() == Code::DeadlineExceeded || broken_link(status)
            }
            _ => false,
        }
    }

    /// The gRPC status code, for an error the service answered with.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// Whether `status` is the client's own report of a connection that broke
/// mid-call (an HTTP/2 or I/O error under it), not an answer of the
/// service's, which carries no such cause.
fn broken_link(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unknown | Code::Internal | Code::Cancelled
    ) && std::error::Error::source(status).is_some()
}

/// Whether a stream that failed with `status` may be opened again: it broke
/// (a restart, a connection closed for its age, a network fault) rather than
/// being refused for a reason the caller has to fix.
pub(crate) fn stream_may_reopen(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::DataLoss
    )
}

/// A status's message and the causes under it (a transport error's "tcp
/// connect error" says nothing of the refused connection under it), each
/// once.
fn described(status: &tonic::Status) -> String {
    let mut text = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(err) = cause {
        let more = err.to_string();
        if !more.is_empty() && !text.contains(&more) {
            text = if text.is_empty() {
                more
            } else {
                format!("{text}: {more}")
            };
        }
        cause = err.source();
    }
    text
}
