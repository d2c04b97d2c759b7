//! Backups of MiniToolStream: Tarantool's checkpoint (taken with
//! `box.snapshot()`, pinned with `box.backup.start()` and read over the
//! network, so no access to Tarantool's disk is needed) and every object it
//! names, copied from the bucket while object deletions are held. A backup
//! is a directory:
//!
//! ```text
//! manifest.json            what was saved, sizes and SHA-256 digests
//! tarantool/*.snap         the checkpoint: restore it into an empty data directory
//! objects/<subject>/<id>   the payloads stored in the bucket, under their keys
//! ```
//!
//! Restore writes the checkpoint into an empty Tarantool data directory
//! (Tarantool stopped) and uploads the objects into an empty bucket.

mod backup;
mod error;
mod restore;

use std::path::PathBuf;

pub use backup::backup;
pub use error::Error;
pub use restore::restore;

use mts_shared::config::Config;

/// The command line.
#[derive(Debug, clap::Parser)]
#[command(name = "mts-backup", version)]
/// Back up MiniToolStream's Tarantool checkpoint and objects, or restore them.
///
/// Tarantool and the bucket are named by the services' settings: defaults,
/// then `--config FILE`, then the environment (TARANTOOL_ADDRESS,
/// TARANTOOL_USER, TARANTOOL_PASSWORD, MINIO_ENDPOINT, MINIO_ACCESS_KEY_ID,
/// MINIO_SECRET_ACCESS_KEY, MINIO_BUCKET_NAME, MINIO_USE_SSL).
///
/// Exit codes: 0 done, 1 failed, 2 usage or settings, 3 the backup is
/// damaged or incomplete, 4 the restore target is not empty.
pub struct Args {
    /// A TOML file with the services' settings.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Save a consistent backup into DIR (created; must be empty if it exists).
    Backup {
        /// The directory to write.
        #[arg(long = "to")]
        dir: PathBuf,
    },
    /// Restore the backup in DIR into a stopped Tarantool's empty data
    /// directory and an empty bucket; then start Tarantool.
    Restore {
        /// The backup directory.
        #[arg(long = "from")]
        dir: PathBuf,
        /// Tarantool's data directory (its `work_dir`/`memtx_dir`).
        #[arg(long)]
        tarantool_dir: PathBuf,
    },
}

/// Runs the command; a line saying what was done.
pub async fn run(args: Args) -> Result<String, Error> {
    let config = Config::load(0, args.config.as_deref(), std::env::vars())
        .map_err(|e| Error::Settings(e.to_string()))?;
    match args.command {
        Command::Backup { dir } => backup(&config, &dir).await.map(|s| s.to_string()),
        Command::Restore { dir, tarantool_dir } => restore(&config, &dir, &tarantool_dir)
            .await
            .map(|s| s.to_string()),
    }
}

/// `manifest.json`: what a backup holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The layout's version.
    pub format: u32,
    /// When the checkpoint was taken, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The schema version of the Tarantool backed up.
    pub schema_version: u64,
    /// The checkpoint's files under `tarantool/`.
    pub tarantool_files: Vec<SavedFile>,
    /// Objects saved under `objects/`.
    pub objects: u64,
    /// Their total size.
    pub object_bytes: u64,
    /// Keys a stored message named but the bucket no longer had.
    pub missing_objects: Vec<String>,
}

/// One saved file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedFile {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
}

/// The backup layout written by this version.
pub const FORMAT: u32 = 1;

/// Human-readable bytes.
fn size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// An object key as a relative path that stays inside the backup.
fn key_path(key: &str) -> Result<PathBuf, Error> {
    let parts: Vec<&str> = key.split('/').collect();
    if parts
        .iter()
        .any(|part| part.is_empty() || *part == "." || *part == "..")
    {
        return Err(Error::UnsafeKey(key.to_owned()));
    }
    Ok(parts.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_paths_inside_the_backup() {
        assert_eq!(
            key_path("orders.eu/0190-abc").unwrap(),
            PathBuf::from("orders.eu").join("0190-abc")
        );
        for bad in ["../x", "a/../../b", "/abs", "a//b", "a/", "."] {
            assert!(matches!(key_path(bad), Err(Error::UnsafeKey(_))), "{bad}");
        }
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(512), "512 bytes");
        assert_eq!(size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
