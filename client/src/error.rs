//! What a call can fail with, and whether trying again may help.

use tonic::Code;

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service answered with an error status.
    #[error("{doing}: {} ({:?})", status.message(), status.code())]
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
}

impl Error {
    /// Whether the same call may succeed later: the service or its storage
    /// was unavailable, or the call ran out of time. A publish retried with
    /// the same message id is stored once.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
            ),
            Self::Connect { .. } => true,
            Self::Config(_) | Self::Token(_) => false,
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
