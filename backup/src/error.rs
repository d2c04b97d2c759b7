//! Why a backup or restore failed, and the exit code each reason gets.

use std::path::PathBuf;
use std::process::ExitCode;

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings cannot be used.
    #[error("settings: {0}")]
    Settings(String),
    /// Tarantool refused or could not be reached.
    #[error("Tarantool at {address}: {source}")]
    Tarantool {
        /// Where it was looked for.
        address: String,
        /// What went wrong.
        #[source]
        source: mts_storage::store::Error,
    },
    /// The object store refused or could not be reached.
    #[error("object store, key {key:?}: {source}")]
    ObjectStore {
        /// The object concerned ("" for the bucket itself).
        key: String,
        /// What went wrong.
        #[source]
        source: mts_storage::object_store::Error,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The backup directory is unusable or damaged.
    #[error("backup {path}: {reason}")]
    Damaged {
        /// The backup directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A restore target already holds data.
    #[error("{0}")]
    NotEmpty(String),
    /// An object key that would leave the backup directory.
    #[error("object key {0:?} cannot be a path inside the backup")]
    UnsafeKey(String),
}

impl Error {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Settings(_) => 2,
            Self::Damaged { .. } | Self::UnsafeKey(_) => 3,
            Self::NotEmpty(_) => 4,
            Self::Tarantool { .. } | Self::ObjectStore { .. } | Self::File { .. } => 1,
        })
    }

    pub(crate) fn file(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::File { path, source }
    }

    pub(crate) fn object(
        key: impl Into<String>,
    ) -> impl FnOnce(mts_storage::object_store::Error) -> Self {
        let key = key.into();
        move |source| Self::ObjectStore { key, source }
    }
}
