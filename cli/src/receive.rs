//! Receiving: following a subject, fetching a batch, downloading one
//! payload. A message is acknowledged only once it is done with — saved,
//! verified and synced to disk, or printed whole — never before.

use std::path::{Path, PathBuf};
use std::pin::pin;

use mts_client::{Client, Delivery, Error};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::failure::Failure;
use crate::output;
use crate::progress::Progress;

/// Payloads up to this size are printed when there is no output folder.
const PRINT_LIMIT: usize = 64 * 1024;

/// How received messages are handled.
pub struct Receiver {
    pub client: Client,
    /// Save payloads here; print them without it.
    pub out: Option<PathBuf>,
    /// Tells apart the partial files of receivers sharing a folder.
    pub durable: String,
    pub json: bool,
    pub quiet: bool,
}

/// What became of a message.
enum Outcome {
    /// Saved, verified and synced here: done with.
    Saved(PathBuf),
    /// Printed whole: done with.
    Printed,
    /// Only its metadata was printed: not done with.
    NotPrinted,
}

impl Outcome {
    fn done(&self) -> bool {
        !matches!(self, Self::NotPrinted)
    }
}

impl Receiver {
    /// Saves or prints `delivery`; true when it is done with and may be
    /// acknowledged.
    async fn take(&self, delivery: &Delivery) -> Result<bool, Failure> {
        let outcome = match &self.out {
            Some(dir) => {
                // A save may outlast the lease (a large download): it must
                // not be delivered again meanwhile.
                let _leased = delivery.keep_leased();
                Outcome::Saved(self.save(delivery, dir).await?)
            }
            None if !self.printable(delivery) => Outcome::NotPrinted,
            None => Outcome::Printed,
        };
        let (described, note) = match &outcome {
            Outcome::Saved(path) => (
                json!({"saved": path.display().to_string()}),
                format!("path={}", path.display()),
            ),
            Outcome::Printed => (json!("printed"), String::new()),
            Outcome::NotPrinted => (
                json!("not printed"),
                "(payload not printed — large or not text — and not acknowledged: use --out DIR to save it)".to_owned(),
            ),
        };
        let printed = matches!(outcome, Outcome::Printed);
        output::emit(
            self.json,
            output::delivery(delivery, &described, printed),
            || {
                let mut line = output::delivery_line(delivery);
                if !note.is_empty() {
                    line = format!("{line} {note}");
                }
                if printed {
                    // Only text is printed without --json.
                    line = format!("{line}\n{}", String::from_utf8_lossy(&delivery.data));
                }
                line
            },
        );
        Ok(outcome.done())
    }

    /// Whether the payload is printed whole: inline, small, and text (or
    /// any bytes, base64 in JSON) — never raw bytes to a terminal.
    fn printable(&self, delivery: &Delivery) -> bool {
        !delivery.payload_omitted
            && delivery.data.len() <= PRINT_LIMIT
            && (self.json || std::str::from_utf8(&delivery.data).is_ok())
    }

    /// Writes the payload to a partial file of its own, checks its SHA-256,
    /// syncs it and renames it to its name: the name the publisher gave, or
    /// its sequence. A partial file from an earlier try is resumed.
    async fn save(&self, delivery: &Delivery, dir: &Path) -> Result<PathBuf, Failure> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(Failure::io(format!("making {}", dir.display())))?;
        let name = delivery
            .file_name()
            .unwrap_or_else(|| delivery.sequence.to_string());
        let partial = partial_path(
            dir,
            &name,
            &delivery.subject,
            delivery.sequence,
            &self.durable,
        );
        let sha256 = if delivery.payload_omitted {
            let progress = Progress::new(name.clone(), self.quiet);
            self.client
                .download(&delivery.subject, delivery.sequence, &partial, |p| {
                    progress.update(p)
                })
                .await?
                .sha256
        } else {
            let digest = hex::encode(Sha256::digest(&delivery.data));
            if !delivery.sha256.is_empty() && !delivery.sha256.eq_ignore_ascii_case(&digest) {
                return Err(Error::Digest {
                    sequence: delivery.sequence,
                    expected: delivery.sha256.clone(),
                    actual: digest,
                }
                .into());
            }
            write_synced(&partial, &delivery.data).await?;
            digest
        };
        place(dir, &partial, &name, delivery.sequence, &sha256).await
    }

    /// Follows the subject until `count` messages are done with, Ctrl-C, or
    /// a failure; what was received and not done with is given back.
    pub async fn follow(
        &self,
        subject: &str,
        max_in_flight: u32,
        count: Option<u64>,
    ) -> Result<(), Failure> {
        let mut consumer = self
            .client
            .consumer(subject, &self.durable)
            .max_in_flight(max_in_flight)
            .start()
            .await?;
        let mut interrupted = pin!(tokio::signal::ctrl_c());
        let mut done = 0u64;
        // Not printed: held, leases kept alive, until mts exits and gives
        // them back — not delivered again meanwhile, not dead-lettered.
        let mut held = Vec::new();
        let outcome = loop {
            if count.is_some_and(|count| done >= count) {
                break Ok(());
            }
            let delivery = tokio::select! {
                delivery = consumer.next() => match delivery {
                    Ok(delivery) => delivery,
                    Err(err) => break Err(err.into()),
                },
                _ = &mut interrupted => break Ok(()),
            };
            let taken = tokio::select! {
                taken = self.take(&delivery) => taken,
                // A partial file stays, for the next delivery to resume.
                _ = &mut interrupted => break Ok(()),
            };
            match taken {
                Ok(true) => {
                    if let Err(err) = delivery.ack().await {
                        break Err(err.into());
                    }
                    done += 1;
                }
                Ok(false) => {
                    held.push(delivery.keep_leased());
                    if held.len() == max_in_flight as usize {
                        eprintln!(
                            "mts: holding {} messages not printed (--max-in-flight): no more arrive until mts exits and gives them back; use --out DIR to save them",
                            held.len()
                        );
                    }
                }
                Err(failure) => break Err(failure),
            }
        };
        drop(held);
        // Acks sent are applied; the rest is given back at once.
        consumer.close().await;
        outcome
    }

    /// Receives one batch: what is saved (or printed whole) is acknowledged
    /// together; the rest — not printed, failed to save, or after a failure
    /// — is given back at once.
    pub async fn fetch(&self, subject: &str, batch: u32, ack: bool) -> Result<(), Failure> {
        let deliveries = self.client.fetch(subject, &self.durable, batch).await?;
        let mut done = Vec::new();
        let mut failure = None;
        for delivery in &deliveries {
            let taken = if failure.is_some() {
                false
            } else {
                match self.take(delivery).await {
                    Ok(taken) => taken,
                    Err(err) => {
                        failure = Some(err);
                        false
                    }
                }
            };
            if taken {
                done.push(delivery.sequence);
            } else if ack {
                // Best effort: unsettled, it comes back after ack_wait anyway.
                let _ = delivery.nack(std::time::Duration::ZERO).await;
            }
        }
        if ack && !done.is_empty() {
            let acked = self.client.ack(subject, &self.durable, &done).await;
            if let (Err(err), Some(_)) = (&acked, &failure) {
                // Both are news; the save's failure is the exit code's.
                eprintln!("mts: {err}");
            } else {
                acked?;
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Downloads one payload to `out` (a file, a folder, or `-` for standard
/// output), resuming an interrupted download of it.
pub async fn payload_get(
    client: &Client,
    subject: &str,
    sequence: u64,
    out: Option<PathBuf>,
    json: bool,
    quiet: bool,
) -> Result<(), Failure> {
    let out = out.unwrap_or_else(|| PathBuf::from("."));
    if out == Path::new("-") {
        return payload_to_stdout(client, subject, sequence).await;
    }
    let folder = out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/');
    let (dir, name) = if folder {
        tokio::fs::create_dir_all(&out)
            .await
            .map_err(Failure::io(format!("making {}", out.display())))?;
        (out.clone(), sequence.to_string())
    } else {
        let name = out
            .file_name()
            .and_then(|name| name.to_str())
            .map(ToOwned::to_owned)
            .ok_or_else(|| Failure::Usage(format!("{} is not a file name", out.display())))?;
        let dir = out
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        (dir, name)
    };
    let partial = partial_path(&dir, &name, subject, sequence, "get");
    let progress = Progress::new(name.clone(), quiet);
    let downloaded = client
        .download(subject, sequence, &partial, |p| progress.update(p))
        .await?;
    drop(progress);
    let path = dir.join(&name);
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(Failure::io(format!("saving {}", path.display())))?;
    let value = json!({
        "subject": subject,
        "sequence": sequence,
        "size": downloaded.size,
        "sha256": downloaded.sha256,
        "resumed_from": downloaded.resumed_from,
        "path": path.display().to_string(),
    });
    output::emit(json, value, || {
        format!(
            "sequence={sequence} size={} sha256={} resumed_from={} path={}",
            downloaded.size,
            downloaded.sha256,
            downloaded.resumed_from,
            path.display()
        )
    });
    Ok(())
}

async fn payload_to_stdout(client: &Client, subject: &str, sequence: u64) -> Result<(), Failure> {
    let mut reader = client.payload(subject, sequence);
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = reader.chunk().await? {
        stdout
            .write_all(&chunk)
            .await
            .map_err(Failure::io("writing to standard output"))?;
    }
    stdout
        .flush()
        .await
        .map_err(Failure::io("writing to standard output"))
}

/// The partial file of message `sequence` of `subject` saved as `name` in
/// `dir` by `receiver`: hidden, and its own for each message and receiver,
/// so that receivers sharing a folder never write the same file, while a
/// later try of the same one resumes it.
fn partial_path(dir: &Path, name: &str, subject: &str, sequence: u64, receiver: &str) -> PathBuf {
    let tag = Sha256::digest(format!("{subject}\0{sequence}\0{receiver}\0{name}"));
    let tag = hex::encode(&tag[..6]);
    // A long name would make the partial one too long for the file system.
    if name.len() > 100 {
        return dir.join(format!(".mts-{tag}.part"));
    }
    dir.join(format!(".{name}.{tag}.part"))
}

async fn write_synced(path: &Path, data: &[u8]) -> Result<(), Failure> {
    let io = |doing: &str| Failure::io(format!("{doing} {}", path.display()));
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(io("creating"))?;
    file.write_all(data).await.map_err(io("writing"))?;
    file.sync_all().await.map_err(io("syncing"))
}

/// Gives the verified partial file its name in `dir`, never replacing a
/// file: one of that name with the same bytes is this message saved before
/// (a redelivery) and is kept; with other bytes it stays, and this one is
/// saved as `<stem>-<sequence>.<ext>` (then `<stem>-<sequence>-2.<ext>`, …).
async fn place(
    dir: &Path,
    partial: &Path,
    name: &str,
    sequence: u64,
    sha256: &str,
) -> Result<PathBuf, Failure> {
    let named = Path::new(name);
    let stem = named
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or(name);
    let extension = named.extension().and_then(|ext| ext.to_str());
    for attempt in 0u32..10_000 {
        let candidate = match (attempt, extension) {
            (0, _) => name.to_owned(),
            (1, Some(ext)) => format!("{stem}-{sequence}.{ext}"),
            (1, None) => format!("{stem}-{sequence}"),
            (n, Some(ext)) => format!("{stem}-{sequence}-{n}.{ext}"),
            (n, None) => format!("{stem}-{sequence}-{n}"),
        };
        let path = dir.join(candidate);
        // A hard link is made only where no file is: two receivers cannot
        // both take a name, and nothing saved is ever replaced.
        match tokio::fs::hard_link(partial, &path).await {
            Ok(()) => {
                let _ = tokio::fs::remove_file(partial).await;
                // The new name is on disk too, not only the bytes.
                if let Ok(folder) = tokio::fs::File::open(dir).await {
                    let _ = folder.sync_all().await;
                }
                return Ok(path);
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                if file_sha256(&path).await.as_deref() == Some(sha256) {
                    let _ = tokio::fs::remove_file(partial).await;
                    return Ok(path);
                }
            }
            Err(err) => {
                return Err(Failure::Io {
                    doing: format!("saving {}", path.display()),
                    error: err,
                });
            }
        }
    }
    Err(Failure::Io {
        doing: format!("saving {name} in {}", dir.display()),
        error: std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "10,000 files of that name are there already",
        ),
    })
}

async fn file_sha256(path: &Path) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1024 * 1024];
    loop {
        let read = file.read(&mut buffer).await.ok()?;
        if read == 0 {
            return Some(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}
