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

use mts_config::Config;

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
        /// Write into a new `backup-<UTC time>` folder inside DIR instead.
        #[arg(long)]
        timestamped: bool,
        /// With --timestamped: then delete all but the newest N backups in DIR.
        #[arg(long, requires = "timestamped")]
        keep: Option<usize>,
    },
    /// Restore the backup in DIR into a stopped Tarantool's empty data
    /// directory and an empty bucket; then start Tarantool.
    Restore {
        /// The backup directory.
        #[arg(long = "from")]
        dir: PathBuf,
        /// DIR holds timestamped backups: restore the newest complete one.
        #[arg(long)]
        latest: bool,
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
        Command::Backup {
            dir,
            timestamped,
            keep,
        } => {
            let target = if timestamped {
                dir.join(format!(
                    "{PREFIX}{}",
                    utc_stamp(std::time::SystemTime::now())
                ))
            } else {
                dir.clone()
            };
            let mut summary = backup(&config, &target).await?.to_string();
            if let Some(keep) = keep {
                for old in prune(&dir, keep).await? {
                    summary.push_str(&format!("\nremoved the older backup {}", old.display()));
                }
            }
            Ok(summary)
        }
        Command::Restore {
            dir,
            latest,
            tarantool_dir,
        } => {
            let dir = if latest {
                complete_backups(&dir)
                    .await?
                    .pop()
                    .ok_or_else(|| Error::Damaged {
                        path: dir.clone(),
                        reason: "holds no complete backup".into(),
                    })?
            } else {
                dir
            };
            restore(&config, &dir, &tarantool_dir)
                .await
                .map(|s| format!("from {}: {s}", dir.display()))
        }
    }
}

/// Timestamped backups are named `backup-YYYYMMDDTHHMMSSZ`, so names sort
/// by time.
const PREFIX: &str = "backup-";

/// `YYYYMMDDTHHMMSSZ` for `time`.
fn utc_stamp(time: std::time::SystemTime) -> String {
    let secs = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The timestamped backups in `dir` that have a manifest, oldest first.
async fn complete_backups(dir: &std::path::Path) -> Result<Vec<PathBuf>, Error> {
    let mut found = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await.map_err(Error::file(dir))?;
    while let Some(entry) = entries.next_entry().await.map_err(Error::file(dir))? {
        let path = entry.path();
        let named = entry.file_name().to_string_lossy().starts_with(PREFIX);
        if named
            && tokio::fs::try_exists(path.join("manifest.json"))
                .await
                .unwrap_or(false)
        {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes all but the newest `keep` complete backups in `dir`.
async fn prune(dir: &std::path::Path, keep: usize) -> Result<Vec<PathBuf>, Error> {
    let backups = complete_backups(dir).await?;
    let excess = backups.len().saturating_sub(keep.max(1));
    let old: Vec<PathBuf> = backups.into_iter().take(excess).collect();
    for path in &old {
        tokio::fs::remove_dir_all(path)
            .await
            .map_err(Error::file(path))?;
    }
    Ok(old)
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
    /// The Tarantool member the checkpoint was taken on (a follower in a
    /// replica set); absent in backups made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_on: Option<String>,
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

/// "1 object", "3 objects".
fn objects(count: u64) -> String {
    if count == 1 {
        "1 object".into()
    } else {
        format!("{count} objects")
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
    fn stamps_are_utc_and_sort_by_time() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(utc_stamp(leap), "20000229T010203Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_795_318_200);
        assert_eq!(utc_stamp(later), "20261122T033000Z");
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_complete_backups() {
        let dir = std::env::temp_dir().join(format!("mts-prune-{}", std::process::id()));
        for name in [
            "backup-20260101T000000Z",
            "backup-20260102T000000Z",
            "backup-20260103T000000Z",
        ] {
            tokio::fs::create_dir_all(dir.join(name)).await.unwrap();
            tokio::fs::write(dir.join(name).join("manifest.json"), "{}")
                .await
                .unwrap();
        }
        // Interrupted: no manifest, so neither counted nor removed.
        tokio::fs::create_dir_all(dir.join("backup-20260104T000000Z"))
            .await
            .unwrap();
        let removed = prune(&dir, 2).await.unwrap();
        let left = complete_backups(&dir).await.unwrap();
        tokio::fs::remove_dir_all(&dir).await.unwrap();
        assert_eq!(removed, vec![dir.join("backup-20260101T000000Z")]);
        assert_eq!(
            left,
            vec![
                dir.join("backup-20260102T000000Z"),
                dir.join("backup-20260103T000000Z")
            ]
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(512), "512 bytes");
        assert_eq!(size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
