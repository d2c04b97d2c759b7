//! Reading a stored payload with `FetchPayload`: chunk by chunk, resumed
//! from where it broke off, its SHA-256 checked at the end.

use std::path::Path;

use bytes::Bytes;
use mts_proto::pb::{FetchPayloadRequest, PayloadChunk};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Streaming;

use crate::client::Repeat;
use crate::error::stream_may_reopen;
use crate::upload::Progress;
use crate::{Client, Error};

/// Reads one stored payload in chunks ([`Client::payload`]). A stream that
/// breaks (a restart, a connection closed for its age) is opened again at
/// the offset reached, as the client's [`Retry`](crate::Retry) says; the
/// payload's SHA-256 is checked when the last chunk arrives.
pub struct PayloadReader {
    client: Client,
    subject: String,
    sequence: u64,
    offset: u64,
    /// Every byte from offset 0, for the digest.
    hasher: Sha256,
    total_size: Option<u64>,
    sha256: Option<String>,
    chunks: Option<Streaming<PayloadChunk>>,
    /// Breaks since the last chunk.
    breaks: u32,
    /// Breaks in all.
    reopened: u32,
    finished: bool,
}

/// A payload saved by [`Client::download`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Its size in bytes.
    pub size: u64,
    /// Its hex SHA-256, checked against the service's.
    pub sha256: String,
    /// Bytes that were in the file already (an earlier, interrupted
    /// download) and were not downloaded again.
    pub resumed_from: u64,
}

impl Client {
    /// A reader of the payload of message `sequence` of `subject`, from its
    /// start.
    pub fn payload(&self, subject: impl Into<String>, sequence: u64) -> PayloadReader {
        PayloadReader {
            client: self.clone(),
            subject: subject.into(),
            sequence,
            offset: 0,
            hasher: Sha256::new(),
            total_size: None,
            sha256: None,
            chunks: None,
            breaks: 0,
            reopened: 0,
            finished: false,
        }
    }

    /// Downloads the payload of message `sequence` of `subject` into the
    /// file at `path`, appending to what an earlier interrupted download
    /// left there (which is read back for the digest). `progress` hears of
    /// each chunk. The file is synced before this returns. A file whose
    /// bytes do not have the service's SHA-256 is removed, and the error
    /// says so; any other failure leaves it for the next try to resume.
    pub async fn download(
        &self,
        subject: impl Into<String>,
        sequence: u64,
        path: impl AsRef<Path>,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<Downloaded, Error> {
        let path = path.as_ref();
        let io = |doing| {
            move |source| Error::Io {
                doing,
                path: path.to_owned(),
                source,
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .await
            .map_err(io("opening"))?;
        let mut reader = self.payload(subject, sequence);
        // What an earlier try saved counts towards the digest.
        let mut buffer = vec![0u8; 1024 * 1024];
        loop {
            let read = file.read(&mut buffer).await.map_err(io("reading"))?;
            if read == 0 {
                break;
            }
            reader.hasher.update(&buffer[..read]);
            reader.offset += read as u64;
        }
        let resumed_from = reader.offset;
        let outcome = async {
            while let Some(chunk) = reader.chunk().await? {
                file.write_all(&chunk).await.map_err(io("writing"))?;
                progress(Progress {
                    done: reader.offset,
                    total: reader.total_size,
                });
            }
            file.sync_all().await.map_err(io("syncing"))?;
            Ok(())
        }
        .await;
        if let Err(err) = outcome {
            if matches!(err, Error::Digest { .. }) {
                let _ = tokio::fs::remove_file(path).await;
            } else {
                // What arrived is kept for the next try to resume.
                let _ = file.flush().await;
            }
            return Err(err);
        }
        Ok(Downloaded {
            size: reader.offset,
            sha256: reader.sha256.unwrap_or_default(),
            resumed_from,
        })
    }
}

impl PayloadReader {
    /// The next chunk; `None` once the whole payload has arrived and its
    /// SHA-256 matched.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if self.finished {
                return Ok(None);
            }
            if self.total_size.is_some_and(|total| self.offset > total) {
                return Err(Error::Config(format!(
                    "message {}: {} bytes were already read, the payload has {}",
                    self.sequence,
                    self.offset,
                    self.total_size.unwrap_or_default()
                )));
            }
            let chunks = match &mut self.chunks {
                Some(chunks) => chunks,
                None => self.chunks.insert(self.open().await?),
            };
            match chunks.message().await {
                Ok(Some(chunk)) => {
                    self.breaks = 0;
                    if chunk.offset != self.offset {
                        return Err(Error::Config(format!(
                            "message {}: a chunk at offset {} arrived where {} was expected",
                            self.sequence, chunk.offset, self.offset
                        )));
                    }
                    self.total_size = Some(chunk.total_size);
                    self.sha256 = Some(chunk.sha256);
                    if chunk.data.is_empty() {
                        continue;
                    }
                    self.hasher.update(&chunk.data);
                    self.offset += chunk.data.len() as u64;
                    return Ok(Some(chunk.data));
                }
                // Every answer carries at least one chunk, with the size:
                // an end before any is a stream that broke.
                Ok(None) if self.total_size.is_some_and(|total| self.offset >= total) => {
                    self.finished = true;
                    self.chunks = None;
                    self.verify()?;
                    return Ok(None);
                }
                // Ended short of the payload's size: it broke.
                Ok(None) => {
                    self.broke(tonic::Status::unavailable("the payload stream ended early"))
                        .await?;
                }
                Err(status) => self.broke(status).await?,
            }
        }
    }

    /// Bytes read so far (from the payload's start).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The payload's size, once the first chunk has arrived.
    pub fn total_size(&self) -> Option<u64> {
        self.total_size
    }

    /// The payload's hex SHA-256 as the service gives it, once the first
    /// chunk has arrived.
    pub fn sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    /// How often the stream broke and was opened again.
    pub fn reopened(&self) -> u32 {
        self.reopened
    }

    async fn open(&self) -> Result<Streaming<PayloadChunk>, Error> {
        let request = FetchPayloadRequest {
            subject: self.subject.clone(),
            sequence: self.sequence,
            offset: self.offset,
        };
        let egress = self.client.egress_client();
        self.client
            .retrying("download", Repeat::Safe, || {
                let (mut egress, request) = (egress.clone(), request.clone());
                async move {
                    let request = self.client.stream_request(request).await?;
                    Ok(egress
                        .fetch_payload(request)
                        .await
                        .map(tonic::Response::into_inner))
                }
            })
            .await
            .map(|(chunks, _)| chunks)
    }

    /// The stream broke with `status`: the next call opens it again after a
    /// wait, unless it may not be.
    async fn broke(&mut self, status: tonic::Status) -> Result<(), Error> {
        self.chunks = None;
        self.breaks += 1;
        self.reopened += 1;
        if !stream_may_reopen(&status) || self.breaks >= self.client.retry.attempts {
            return Err(Error::Status {
                doing: "download",
                status,
            });
        }
        let wait = self.client.retry.wait(self.breaks + 1);
        tracing::debug!(%status, offset = self.offset, ?wait, "payload stream broke; resuming");
        tokio::time::sleep(wait).await;
        Ok(())
    }

    fn verify(&mut self) -> Result<(), Error> {
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        match &self.sha256 {
            // Messages stored before digests were kept have none.
            Some(expected) if !expected.is_empty() && !expected.eq_ignore_ascii_case(&actual) => {
                Err(Error::Digest {
                    sequence: self.sequence,
                    expected: expected.clone(),
                    actual,
                })
            }
            _ => {
                self.sha256 = Some(actual);
                Ok(())
            }
        }
    }
}
