//! Restoring a backup: the checkpoint into an empty Tarantool data
//! directory (verified against the manifest), the objects into an empty
//! bucket.

use std::fmt;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use mts_config::Config;
use mts_storage::object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{Error, FORMAT, Manifest, objects, size};

/// What a restore put back.
#[derive(Debug)]
pub struct Summary {
    /// The Tarantool files written, and their total size.
    pub tarantool_files: Vec<String>,
    /// Bytes of them.
    pub tarantool_bytes: u64,
    /// Objects uploaded, and their total size.
    pub objects: u64,
    /// Bytes of them.
    pub object_bytes: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored Tarantool checkpoint {} ({}) and {} ({}); start Tarantool on its data directory now",
            self.tarantool_files.join(", "),
            size(self.tarantool_bytes),
            objects(self.objects),
            size(self.object_bytes),
        )
    }
}

/// Restores the backup in `dir` into `tarantool_dir` (Tarantool stopped, no
/// checkpoint or WAL files in it) and the bucket of `config` (no objects).
pub async fn restore(config: &Config, dir: &Path, tarantool_dir: &Path) -> Result<Summary, Error> {
    let manifest = read_manifest(dir).await?;
    ensure_no_tarantool_data(tarantool_dir).await?;
    let object_store = ObjectStore::new(config);
    object_store
        .ensure_bucket()
        .await
        .map_err(Error::object(""))?;
    let present = object_store
        .list_keys("")
        .await
        .map_err(Error::object(""))?;
    if let Some(key) = present.first() {
        return Err(Error::NotEmpty(format!(
            "bucket {} already holds objects (e.g. {key}); restore into an empty bucket",
            object_store.bucket()
        )));
    }

    let tarantool_bytes = restore_checkpoint(dir, &manifest, tarantool_dir).await?;

    let objects_dir = dir.join("objects");
    let mut pending = vec![objects_dir.clone()];
    let (mut objects, mut object_bytes) = (0, 0);
    while let Some(folder) = pending.pop() {
        let mut entries = match tokio::fs::read_dir(&folder).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && folder == objects_dir => {
                break;
            }
            Err(err) => return Err(Error::file(&folder)(err)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(Error::file(&folder))? {
            let path = entry.path();
            if entry
                .file_type()
                .await
                .map_err(Error::file(&path))?
                .is_dir()
            {
                pending.push(path);
                continue;
            }
            let key = object_key(&objects_dir, &path)?;
            object_bytes += upload(&object_store, config, &key, &path).await?;
            objects += 1;
        }
    }
    if objects != manifest.objects || object_bytes != manifest.object_bytes {
        return Err(Error::Damaged {
            path: objects_dir,
            reason: format!(
                "holds {objects} objects ({object_bytes} bytes); the manifest says {} ({} bytes)",
                manifest.objects, manifest.object_bytes
            ),
        });
    }
    Ok(Summary {
        tarantool_files: manifest
            .tarantool_files
            .iter()
            .map(|file| file.name.clone())
            .collect(),
        tarantool_bytes,
        objects,
        object_bytes,
    })
}

/// Copies the checkpoint files into `tarantool_dir` under temporary names,
/// hashing them on the way, and renames them into place only once every file
/// matched the manifest: a damaged backup leaves no checkpoint behind (and no
/// directory, if there was none). The bytes restored.
async fn restore_checkpoint(
    dir: &Path,
    manifest: &Manifest,
    tarantool_dir: &Path,
) -> Result<u64, Error> {
    let existed = tokio::fs::try_exists(tarantool_dir).await.unwrap_or(true);
    tokio::fs::create_dir_all(tarantool_dir)
        .await
        .map_err(Error::file(tarantool_dir))?;
    let mut copied = Vec::new();
    let mut bytes = 0;
    for file in &manifest.tarantool_files {
        let from = dir.join("tarantool").join(&file.name);
        let partial = tarantool_dir.join(format!("{}.partial", file.name));
        let checked = match copy_hashed(&from, &partial).await {
            Ok((size, digest)) if size == file.size && digest == file.sha256 => Ok(()),
            Ok((size, digest)) => Err(Error::Damaged {
                path: from,
                reason: format!(
                    "{size} bytes with SHA-256 {digest}; the manifest says {} bytes with {}",
                    file.size, file.sha256
                ),
            }),
            Err(err) => Err(err),
        };
        copied.push((partial, tarantool_dir.join(&file.name)));
        if let Err(err) = checked {
            for (partial, _) in &copied {
                let _ = tokio::fs::remove_file(partial).await;
            }
            if !existed {
                let _ = tokio::fs::remove_dir(tarantool_dir).await;
            }
            return Err(err);
        }
        bytes += file.size;
    }
    for (partial, final_name) in copied {
        tokio::fs::rename(&partial, &final_name)
            .await
            .map_err(Error::file(&final_name))?;
    }
    Ok(bytes)
}

/// Copies `from` to `to` in one pass: its size and hex SHA-256.
async fn copy_hashed(from: &Path, to: &Path) -> Result<(u64, String), Error> {
    use tokio::io::AsyncWriteExt;
    let mut source = tokio::fs::File::open(from)
        .await
        .map_err(Error::file(from))?;
    let mut target = tokio::fs::File::create(to).await.map_err(Error::file(to))?;
    let mut hash = Sha256::new();
    let mut size = 0;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = source.read(&mut buffer).await.map_err(Error::file(from))?;
        if read == 0 {
            break;
        }
        hash.update(&buffer[..read]);
        target
            .write_all(&buffer[..read])
            .await
            .map_err(Error::file(to))?;
        size += read as u64;
    }
    target.sync_all().await.map_err(Error::file(to))?;
    Ok((size, hex::encode(hash.finalize())))
}

async fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let path = dir.join("manifest.json");
    let text = tokio::fs::read(&path).await.map_err(|err| Error::Damaged {
        path: path.clone(),
        reason: format!("cannot read the manifest ({err}); an interrupted backup has none"),
    })?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|err| Error::Damaged {
        path: path.clone(),
        reason: format!("not a manifest: {err}"),
    })?;
    if manifest.format != FORMAT {
        return Err(Error::Damaged {
            path,
            reason: format!(
                "format {} is not the {FORMAT} this version reads",
                manifest.format
            ),
        });
    }
    if manifest.tarantool_files.is_empty()
        || manifest
            .tarantool_files
            .iter()
            .any(|file| file.name.contains('/') || file.name.starts_with('.'))
    {
        return Err(Error::Damaged {
            path,
            reason: "names no usable Tarantool files".into(),
        });
    }
    Ok(manifest)
}

/// Tarantool would recover from a checkpoint or WAL already there instead of
/// the restored one.
async fn ensure_no_tarantool_data(dir: &Path) -> Result<(), Error> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(Error::file(dir)(err)),
    };
    while let Some(entry) = entries.next_entry().await.map_err(Error::file(dir))? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if [".snap", ".xlog", ".vylog"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            return Err(Error::NotEmpty(format!(
                "{} already holds Tarantool data ({name}); stop Tarantool and restore into an empty data directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The object key a file under `objects/` was saved from.
fn object_key(objects_dir: &Path, path: &Path) -> Result<String, Error> {
    let relative = path.strip_prefix(objects_dir).map_err(|_| Error::Damaged {
        path: path.to_owned(),
        reason: "outside the objects folder".into(),
    })?;
    let parts: Option<Vec<&str>> = relative.iter().map(|part| part.to_str()).collect();
    parts
        .map(|parts| parts.join("/"))
        .ok_or_else(|| Error::Damaged {
            path: path.to_owned(),
            reason: "not a UTF-8 object key".into(),
        })
}

/// Uploads one file as `key`, in parts of `multipart_part_bytes` when
/// larger than one part; the bytes sent.
async fn upload(
    object_store: &ObjectStore,
    config: &Config,
    key: &str,
    path: &PathBuf,
) -> Result<u64, Error> {
    let part = usize::try_from(config.ingress.multipart_part_bytes).unwrap_or(usize::MAX);
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(Error::file(path))?;
    let length = file.metadata().await.map_err(Error::file(path))?.len();
    if length <= part as u64 {
        let data = read_part(&mut file, part)
            .await
            .map_err(Error::file(path))?;
        object_store
            .put(key, data)
            .await
            .map_err(Error::object(key))?;
        return Ok(length);
    }
    let mut upload = object_store
        .start_upload(key)
        .await
        .map_err(Error::object(key))?;
    let mut sent = 0;
    loop {
        let data = read_part(&mut file, part)
            .await
            .map_err(Error::file(path))?;
        if data.is_empty() {
            break;
        }
        sent += data.len() as u64;
        upload.put_part(data).await.map_err(Error::object(key))?;
    }
    upload.complete().await.map_err(Error::object(key))?;
    Ok(sent)
}

/// Up to `part` bytes from `file`; fewer only at its end.
async fn read_part(file: &mut tokio::fs::File, part: usize) -> std::io::Result<bytes::Bytes> {
    let mut buffer = BytesMut::with_capacity(part);
    while buffer.len() < part {
        if file.read_buf(&mut buffer).await? == 0 {
            break;
        }
    }
    Ok(buffer.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_map_back_to_their_keys() {
        let root = Path::new("/b/objects");
        assert_eq!(
            object_key(root, &root.join("orders.eu").join("0190-abc")).unwrap(),
            "orders.eu/0190-abc"
        );
        assert!(object_key(root, Path::new("/elsewhere/x")).is_err());
    }

    #[tokio::test]
    async fn a_damaged_checkpoint_leaves_nothing_behind() {
        let root = std::env::temp_dir().join(format!("mts-damaged-{}", std::process::id()));
        tokio::fs::create_dir_all(root.join("backup/tarantool"))
            .await
            .unwrap();
        tokio::fs::write(root.join("backup/tarantool/1.snap"), "SNAP, altered")
            .await
            .unwrap();
        let manifest = Manifest {
            format: FORMAT,
            created_unix: 0,
            schema_version: 0,
            taken_on: None,
            tarantool_files: vec![crate::SavedFile {
                name: "1.snap".into(),
                size: 4,
                sha256: hex::encode(Sha256::digest(b"SNAP")),
            }],
            objects: 0,
            object_bytes: 0,
            missing_objects: Vec::new(),
        };
        let target = root.join("data");
        let restored = restore_checkpoint(&root.join("backup"), &manifest, &target).await;
        let left = tokio::fs::try_exists(&target).await.unwrap();
        tokio::fs::remove_dir_all(&root).await.unwrap();
        assert!(
            matches!(restored, Err(Error::Damaged { .. })),
            "{restored:?}"
        );
        assert!(!left, "the data directory was left behind");
    }

    #[tokio::test]
    async fn a_data_directory_with_a_checkpoint_is_refused() {
        let dir = std::env::temp_dir().join(format!("mts-restore-{}", std::process::id()));
        tokio::fs::create_dir_all(&dir).await.unwrap();
        tokio::fs::write(dir.join("init.lua"), "").await.unwrap();
        ensure_no_tarantool_data(&dir).await.unwrap();
        tokio::fs::write(dir.join("00000000000000000000.snap"), "")
            .await
            .unwrap();
        let refused = ensure_no_tarantool_data(&dir).await;
        tokio::fs::remove_dir_all(&dir).await.unwrap();
        assert!(matches!(refused, Err(Error::NotEmpty(_))), "{refused:?}");
    }
}
