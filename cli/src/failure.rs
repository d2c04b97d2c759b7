//! What went wrong, and the exit code that says so.

use std::fmt;
use std::process::ExitCode;

/// A failed command.
#[derive(Debug)]
pub enum Failure {
    /// The server refused or could not serve a call.
    Call {
        /// What was being done.
        doing: String,
        /// The server's status.
        status: tonic::Status,
    },
    /// Local input or output failed.
    Io {
        /// What was being done.
        doing: String,
        /// The cause.
        error: std::io::Error,
    },
    /// A downloaded payload does not have the digest the server gave.
    Digest {
        /// The message.
        sequence: u64,
        /// What the server said.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// A token could not be made or used.
    Token(String),
    /// The endpoint could not be reached or parsed.
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        error: tonic::transport::Error,
    },
}

impl Failure {
    pub fn call(doing: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let doing = doing.into();
        move |status| Self::Call { doing, status }
    }

    pub fn io(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let doing = doing.into();
        move |error| Self::Io { doing, error }
    }

    /// The documented exit code.
    pub fn exit_code(&self) -> ExitCode {
        use tonic::Code;
        ExitCode::from(match self {
            Self::Call { status, .. } => match status.code() {
                Code::NotFound => 3,
                Code::Unauthenticated | Code::PermissionDenied => 7,
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::AlreadyExists => 4,
                Code::Unavailable
                | Code::ResourceExhausted
                | Code::DeadlineExceeded
                | Code::Aborted => 5,
                _ => 1,
            },
            Self::Connect { .. } => 5,
            Self::Digest { .. } => 6,
            Self::Io { .. } | Self::Token(_) => 1,
        })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Call { doing, status } => {
                write!(f, "{doing}: {:?}: {}", status.code(), status.message())
            }
            Self::Io { doing, error } => write!(f, "{doing}: {error}"),
            Self::Token(why) => write!(f, "token: {why}"),
            Self::Digest {
                sequence,
                expected,
                actual,
            } => write!(
                f,
                "message {sequence}: the payload's SHA-256 is {actual}, the server said {expected}; nothing was saved or acknowledged"
            ),
            Self::Connect { endpoint, error } => {
                write!(f, "cannot connect to {endpoint}: {error}")?;
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    write!(f, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        let code = |status: tonic::Status| Failure::call("x")(status).exit_code();
        assert_eq!(code(tonic::Status::not_found("")), ExitCode::from(3));
        assert_eq!(code(tonic::Status::invalid_argument("")), ExitCode::from(4));
        assert_eq!(
            code(tonic::Status::failed_precondition("")),
            ExitCode::from(4)
        );
        assert_eq!(code(tonic::Status::unavailable("")), ExitCode::from(5));
        assert_eq!(
            code(tonic::Status::resource_exhausted("")),
            ExitCode::from(5)
        );
        assert_eq!(code(tonic::Status::internal("")), ExitCode::from(1));
        assert_eq!(code(tonic::Status::unauthenticated("")), ExitCode::from(7));
        assert_eq!(
            code(tonic::Status::permission_denied("")),
            ExitCode::from(7)
        );
        let digest = Failure::Digest {
            sequence: 1,
            expected: "a".into(),
            actual: "b".into(),
        };
        assert_eq!(digest.exit_code(), ExitCode::from(6));
    }
}
