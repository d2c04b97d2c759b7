//! What went wrong, and the exit code that says so (see `mts --help`).

use std::fmt;
use std::process::ExitCode;

use mts_client::Error;
use tonic::Code;

/// A failed command.
#[derive(Debug)]
pub enum Failure {
    /// A call, or the client's own work (a download, an upload), failed.
    Client(Error),
    /// The command line asks for something that cannot be done.
    Usage(String),
    /// Local input or output failed.
    Io {
        /// What was being done.
        doing: String,
        /// The cause.
        error: std::io::Error,
    },
    /// A token could not be made.
    Token(String),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        Self::Client(err)
    }
}

impl Failure {
    pub fn io(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let doing = doing.into();
        move |error| Self::Io { doing, error }
    }

    /// The documented exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Client(err) => match err {
                Error::Status { status, .. } => match status.code() {
                    Code::NotFound => 3,
                    Code::Unauthenticated | Code::PermissionDenied => 7,
                    Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::AlreadyExists => 4,
                    // Unavailable, busy, out of time, a link that broke.
                    _ if err.is_retryable() => 5,
                    _ => 1,
                },
                Error::Config(_) | Error::Token(_) => 2,
                Error::Connect { .. } => 5,
                Error::Digest { .. } => 6,
                _ => 1,
            },
            Self::Usage(_) => 2,
            Self::Io { .. } | Self::Token(_) => 1,
        })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Each error's text carries its cause once: no chain is added.
            Self::Client(err) => write!(f, "{err}"),
            Self::Usage(why) => write!(f, "{why}"),
            Self::Io { doing, error } => write!(f, "{doing}: {error}"),
            Self::Token(why) => write!(f, "token: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_documented_exit_codes() {
        let code =
            |status: tonic::Status| Failure::from(Error::Status { doing: "x", status }).exit_code();
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
        let digest = Failure::from(Error::Digest {
            sequence: 1,
            expected: "a".into(),
            actual: "b".into(),
        });
        assert_eq!(digest.exit_code(), ExitCode::from(6));
        let endpoint = Failure::from(Error::Config("no scheme".into()));
        assert_eq!(endpoint.exit_code(), ExitCode::from(2));
    }
}
