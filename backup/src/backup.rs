//! Taking a backup: checkpoint, pinned files read in chunks, then every
//! object the checkpoint may name, with object deletions held throughout.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mts_config::Config;
use mts_storage::object_store::{self, ObjectStore};
use mts_storage::store::{Checkpoint, SCHEMA_VERSION, Store};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::{Error, FORMAT, Manifest, SavedFile, key_path, objects, size};

/// How long object deletions stay held without a renewal: long enough to
/// ride out a slow call, short enough that a crashed backup does not hold
/// them for long.
const HOLD: Duration = Duration::from_secs(600);
/// How often a running backup renews the hold.
const RENEW_EVERY: Duration = Duration::from_secs(60);
/// How long the checkpoint itself may take.
const CHECKPOINT_LIMIT: Duration = Duration::from_secs(1800);
/// Checkpoint bytes per call.
const CHUNK: u64 = 1024 * 1024;
/// Object keys per call.
const KEYS_PER_PAGE: u32 = 1000;

/// What a backup saved.
#[derive(Debug)]
pub struct Summary {
    /// Where.
    pub dir: std::path::PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        let checkpoint: u64 = m.tarantool_files.iter().map(|file| file.size).sum();
        write!(
            f,
            "saved to {}: Tarantool checkpoint {} ({}), {} ({}); {} in all",
            self.dir.display(),
            m.tarantool_files
                .iter()
                .map(|file| file.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            size(checkpoint),
            objects(m.objects),
            size(m.object_bytes),
            size(checkpoint + m.object_bytes),
        )?;
        if !m.missing_objects.is_empty() {
            write!(
                f,
                "\nwarning: {} objects that stored messages name were already missing from the bucket: {}",
                m.missing_objects.len(),
                m.missing_objects.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Backs up the Tarantool and bucket of `config` into `dir`.
pub async fn backup(config: &Config, dir: &Path) -> Result<Summary, Error> {
    prepare(dir).await?;
    let tarantool = |source| Error::Tarantool {
        address: config.tarantool.address.clone(),
        source,
    };
    let store = Store::connect(config).await.map_err(tarantool)?;
    let object_store = ObjectStore::new(config);
    object_store.check().await.map_err(Error::object(""))?;

    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let checkpoint = store
        .backup_start(HOLD, CHECKPOINT_LIMIT)
        .await
        .map_err(tarantool)?;
    tracing::info!(
        files = ?checkpoint.files,
        member = checkpoint.address,
        "checkpoint taken and pinned; object deletions held"
    );
    let renewer = tokio::spawn({
        let store = store.clone();
        async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                if let Err(err) = store.backup_renew(HOLD).await {
                    tracing::warn!(%err, "could not renew the hold on object deletions");
                }
            }
        }
    });
    let copied = copy(&store, &object_store, dir, &checkpoint).await;
    renewer.abort();
    // Unpin and lift the hold whatever happened.
    let stopped = store.backup_stop(&checkpoint).await;
    let (tarantool_files, objects, object_bytes, missing_objects) = copied?;
    stopped.map_err(tarantool)?;

    let manifest = Manifest {
        format: FORMAT,
        created_unix,
        schema_version: SCHEMA_VERSION,
        taken_on: Some(checkpoint.address.clone()),
        tarantool_files,
        objects,
        object_bytes,
        missing_objects,
    };
    // Written last: a backup without its manifest is incomplete.
    let path = dir.join("manifest.json");
    let json = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
    tokio::fs::write(&path, json)
        .await
        .map_err(Error::file(&path))?;
    Ok(Summary {
        dir: dir.to_owned(),
        manifest,
    })
}

/// Creates `dir`, which must hold nothing yet.
async fn prepare(dir: &Path) -> Result<(), Error> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(Error::file(dir))?;
    let mut entries = tokio::fs::read_dir(dir).await.map_err(Error::file(dir))?;
    if entries
        .next_entry()
        .await
        .map_err(Error::file(dir))?
        .is_some()
    {
        return Err(Error::NotEmpty(format!(
            "{} is not empty; back up into a new directory",
            dir.display()
        )));
    }
    Ok(())
}

type Copied = (Vec<SavedFile>, u64, u64, Vec<String>);

async fn copy(
    store: &Store,
    object_store: &ObjectStore,
    dir: &Path,
    checkpoint: &Checkpoint,
) -> Result<Copied, Error> {
    let tarantool = |source| Error::Tarantool {
        address: checkpoint.address.clone(),
        source,
    };
    let mut saved = Vec::new();
    tokio::fs::create_dir_all(dir.join("tarantool"))
        .await
        .map_err(Error::file(dir))?;
    for (name, file_size) in checkpoint.files.iter().cloned() {
        if name.contains('/') || name.starts_with('.') {
            return Err(Error::UnsafeKey(name));
        }
        let path = dir.join("tarantool").join(&name);
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(Error::file(&path))?;
        let mut hash = Sha256::new();
        let mut offset = 0;
        while offset < file_size {
            let asked = CHUNK.min(file_size - offset);
            let chunk = store
                .backup_read(checkpoint, &name, offset, asked)
                .await
                .map_err(tarantool)?;
            if chunk.is_empty() || chunk.len() as u64 > asked {
                return Err(Error::Damaged {
                    path: path.clone(),
                    reason: format!(
                        "Tarantool answered {} bytes of {name} at {offset} when asked for {asked} \
                         (of {file_size})",
                        chunk.len()
                    ),
                });
            }
            hash.update(&chunk);
            out.write_all(&chunk).await.map_err(Error::file(&path))?;
            offset += chunk.len() as u64;
        }
        out.sync_all().await.map_err(Error::file(&path))?;
        saved.push(SavedFile {
            name,
            size: file_size,
            sha256: hex::encode(hash.finalize()),
        });
    }

    let (mut objects, mut bytes, mut missing) = (0, 0, Vec::new());
    // Offloaded payloads of stored messages (hot or in segments), the
    // segments, then objects deleted since the checkpoint (their deletion
    // waits behind the hold).
    for source in ["messages", "segments", "gc"] {
        // Stored messages' objects must be there, at the sizes they name;
        // those waiting for deletion may be gone already.
        let named = source != "gc";
        let mut after = String::new();
        loop {
            let page = store
                .backup_keys(source, &after, KEYS_PER_PAGE)
                .await
                .map_err(tarantool)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after.clone_from(last);
            for (key, expected) in page {
                let path = dir.join("objects").join(key_path(&key)?);
                match save_object(object_store, &key, &path).await {
                    Ok(written) if named && written != expected => {
                        return Err(Error::Damaged {
                            path,
                            reason: format!(
                                "object {key} holds {written} bytes; its message says {expected}"
                            ),
                        });
                    }
                    Ok(written) => {
                        objects += 1;
                        bytes += written;
                    }
                    Err(Error::ObjectStore {
                        source: object_store::Error::NotFound(_),
                        ..
                    }) => {
                        if named {
                            missing.push(key);
                        }
                    }
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok((saved, objects, bytes, missing))
}

/// Streams one object into `path`; the bytes written.
async fn save_object(object_store: &ObjectStore, key: &str, path: &Path) -> Result<u64, Error> {
    let mut body = object_store
        .read_from(key, 0)
        .await
        .map_err(Error::object(key))?;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(Error::file(parent))?;
    }
    let mut out = tokio::fs::File::create(path)
        .await
        .map_err(Error::file(path))?;
    let mut written = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::ObjectStore {
            key: key.to_owned(),
            source: object_store::Error::Unavailable(e.to_string()),
        })?;
        out.write_all(&chunk).await.map_err(Error::file(path))?;
        written += chunk.len() as u64;
    }
    out.sync_all().await.map_err(Error::file(path))?;
    Ok(written)
}
