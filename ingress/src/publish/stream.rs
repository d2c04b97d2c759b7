//! PublishStream: a payload of any size arrives in chunks and goes to the
//! object store, hashed on the way. A payload whose size the header announces
//! (up to `single_put_max_bytes`) streams straight into one PutObject, nothing
//! buffered; any other goes as a multipart upload, one part at a time, so
//! memory holds at most one part. Anything that goes wrong before the commit —
//! the client leaving, a bad frame, a size or digest mismatch — aborts the
//! upload, and nothing is stored. Completion must be explicit (an end frame,
//! or the announced total size): a client that is cancelled can close its side
//! of the stream as cleanly as one that finished.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishFrame, PublishResponse};
use mts_runtime::auth::{Caller, Permission};
use mts_runtime::validate;
use mts_storage::object_store::{self, StreamedBody, Upload, UploadEnded};
use mts_storage::store::Published;
use sha2::{Digest, Sha256};
use tonic::Streaming;

use crate::Error;
use crate::publish::{Envelope, Ingress, reply};
use crate::trace::with_trace;

/// Receives a streamed publish and stores it.
pub async fn publish(
    ingress: &Ingress,
    caller: Caller,
    client: &str,
    trace: Vec<(String, String)>,
    mut frames: Streaming<PublishFrame>,
) -> Result<PublishResponse, Error> {
    let silence = Silence {
        limit: ingress.stream_idle,
        client: client.to_owned(),
    };
    let header = match next_frame(&mut frames, &silence).await? {
        Some(Frame::Header(header)) => header,
        Some(Frame::Chunk(_) | Frame::End(_)) | None => {
            return Err(validate::Error::new(
                "header",
                "the first frame of a stream must be a header",
            )
            .into());
        }
    };
    caller.authorize(Permission::Publish, &header.subject)?;
    let mut header = header;
    with_trace(&mut header.headers, trace);
    let envelope = Envelope::checked(
        header.subject,
        header.headers,
        header.message_id,
        header.ordering_key,
    )?;
    let _slot = ingress.uploads.take(client)?;
    if let Some(seq) = ingress.already_published(&envelope).await? {
        return Ok(reply(
            Published {
                seq,
                duplicate: true,
            },
            String::new(),
            0,
            String::new(),
        ));
    }
    let key = ingress.object_key(&envelope);
    let total_size = header.total_size;
    let (size, sha256, landed) = match total_size {
        Some(total) if total > ingress.inline_threshold && total <= ingress.single_put_max => {
            let (size, sha256) = in_one_put(ingress, &key, &mut frames, total, silence).await?;
            (size, sha256, Landed::Object(key))
        }
        _ => in_parts(ingress, key, &mut frames, total_size, silence).await?,
    };
    match landed {
        Landed::Object(key) => ingress.commit_object(&envelope, key, size, sha256).await,
        Landed::Inline(data) => {
            let message = ingress.inline_message(envelope, data, sha256);
            ingress.publish_inline(message).await
        }
    }
}

/// Where a stream's payload went.
enum Landed {
    /// Small enough to store with the metadata.
    Inline(Bytes),
    /// Uploaded to the object store under this key.
    Object(String),
}

/// Streams the announced `total` bytes into one PutObject as they arrive.
/// The last chunk is held back until the stream has ended well (size and
/// digest checked), so a bad ending aborts the request before the object
/// exists. Returns the size and the hex SHA-256.
async fn in_one_put(
    ingress: &Ingress,
    key: &str,
    frames: &mut Streaming<PublishFrame>,
    total: u64,
    silence: Silence,
) -> Result<(u64, String), Error> {
    let (sender, body) = StreamedBody::channel(total);
    // A store that stops reading is as gone as a client that stops sending.
    let idle = ingress.stream_idle;
    let feed = async |chunk: Bytes| match tokio::time::timeout(idle, sender.send(chunk)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(UploadEnded)) | Err(_) => Err(Stop::UploadEnded),
    };
    let receive = async {
        let mut walk = Walk::new(Some(total), silence);
        let mut held: Option<Bytes> = None;
        let walked = async {
            while let Some(chunk) = walk.next_chunk(frames).await? {
                if let Some(previous) = held.replace(chunk) {
                    feed(previous).await?;
                }
            }
            let walked = walk.finish()?;
            if let Some(last) = held.take() {
                feed(last).await?;
            }
            Ok::<_, Stop>(walked)
        }
        .await;
        if walked.is_err() {
            sender.abort().await;
        }
        walked
    };
    let put = ingress.object_store.put_streamed(key, body, total);
    let (mut receive, mut put) = (std::pin::pin!(receive), std::pin::pin!(put));
    let (walked, uploaded) = tokio::select! {
        walked = &mut receive => {
            if let Err(Stop::Refused(err)) = walked {
                return Err(err);
            }
            // The store answers once it has the whole body, or has given up on it.
            let timeout = ingress.object_store_timeout;
            let uploaded = tokio::time::timeout(timeout, &mut put)
                .await
                .unwrap_or_else(|_| {
                    Err(object_store::Error::Unavailable(format!(
                        "no answer within {timeout:?} after the payload was sent"
                    )))
                });
            (walked, uploaded)
        }
        // The request can end well only after the whole body, checked, went out.
        uploaded = &mut put => {
            uploaded.map_err(Error::Upload)?;
            (receive.await, Ok(()))
        }
    };
    uploaded.map_err(Error::Upload)?;
    walked.map_err(|stop| match stop {
        Stop::Refused(err) => err,
        Stop::UploadEnded => Error::Upload(object_store::Error::Unavailable(
            "the object store stopped reading the payload".into(),
        )),
    })
}

/// Why a streamed PutObject's feed stopped early.
enum Stop {
    /// The stream was refused (or the client left).
    Refused(Error),
    /// The upload stopped taking the body.
    UploadEnded,
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Self::Refused(err)
    }
}

/// Collects chunks into parts, sending each full part of a multipart upload
/// (started at the first full part). Returns the size, the hex SHA-256 and
/// where the payload went: a payload that fits inline stays in memory.
async fn in_parts(
    ingress: &Ingress,
    key: String,
    frames: &mut Streaming<PublishFrame>,
    total_size: Option<u64>,
    silence: Silence,
) -> Result<(u64, String, Landed), Error> {
    let mut part = BytesMut::with_capacity(ingress.part_size);
    let mut upload: Option<Upload> = None;
    let mut walk = Walk::new(total_size, silence);
    let walked = async {
        while let Some(chunk) = walk.next_chunk(frames).await? {
            part.extend_from_slice(&chunk);
            let part_size = ingress.part_size;
            while part.len() >= part_size {
                let full = part.split_to(part_size).freeze();
                let started = match upload.as_mut() {
                    Some(started) => started,
                    None => upload.insert(
                        ingress
                            .object_store
                            .start_upload(&key)
                            .await
                            .map_err(Error::Upload)?,
                    ),
                };
                started.put_part(full).await.map_err(Error::Upload)?;
                part.reserve(part_size);
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let (size, sha256) = match walked.and_then(|()| walk.finish()) {
        Ok(walked) => walked,
        Err(err) => {
            if let Some(upload) = upload
                && let Err(abort) = upload.abort().await
            {
                tracing::warn!(object = %key, %abort, "could not abort a failed upload");
            }
            return Err(err);
        }
    };
    let part = part.freeze();
    match upload {
        None if size <= ingress.inline_threshold => {
            return Ok((size, sha256, Landed::Inline(part)));
        }
        None => ingress.object_store.put(&key, part).await,
        Some(mut upload) => {
            if !part.is_empty() {
                upload.put_part(part).await.map_err(Error::Upload)?;
            }
            upload.complete().await
        }
    }
    .map_err(Error::Upload)?;
    Ok((size, sha256, Landed::Object(key)))
}

/// How long a publisher may stay silent, and who it is, to say so.
#[derive(Clone)]
struct Silence {
    limit: Duration,
    client: String,
}

/// The next frame, waiting at most the silence limit for it.
async fn next_frame(
    frames: &mut Streaming<PublishFrame>,
    silence: &Silence,
) -> Result<Option<Frame>, Error> {
    loop {
        match tokio::time::timeout(silence.limit, frames.message()).await {
            Err(_) => {
                return Err(Error::Idle {
                    idle: silence.limit,
                    client: silence.client.clone(),
                });
            }
            Ok(Err(status)) => return Err(Error::ClientGone(status)),
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(PublishFrame { frame: Some(frame) }))) => return Ok(Some(frame)),
            Ok(Ok(Some(PublishFrame { frame: None }))) => {}
        }
    }
}

/// Reads the frames after the header, hashing each chunk, until the end
/// frame or, with an announced size, the stream's end; then checks the size
/// against the header and the digest against the end frame.
struct Walk {
    total_size: Option<u64>,
    /// How long the client may stay silent.
    silence: Silence,
    hasher: Sha256,
    size: u64,
    claimed: Option<String>,
    ended: bool,
}

impl Walk {
    fn new(total_size: Option<u64>, silence: Silence) -> Self {
        Self {
            total_size,
            silence,
            hasher: Sha256::new(),
            size: 0,
            claimed: None,
            ended: false,
        }
    }

    /// The next chunk, or `None` once the stream has ended.
    async fn next_chunk(
        &mut self,
        frames: &mut Streaming<PublishFrame>,
    ) -> Result<Option<Bytes>, Error> {
        while let Some(frame) = next_frame(frames, &self.silence).await? {
            if self.ended {
                return Err(
                    validate::Error::new("end", "no frame may follow the end frame").into(),
                );
            }
            match frame {
                Frame::Chunk(chunk) => {
                    self.size += chunk.len() as u64;
                    if let Some(total) = self.total_size.filter(|total| self.size > *total) {
                        return Err(validate::Error::new(
                            "chunk",
                            format!(
                                "the stream carries more than the {total} bytes its header announced"
                            ),
                        )
                        .into());
                    }
                    self.hasher.update(&chunk);
                    return Ok(Some(chunk));
                }
                Frame::End(end) => {
                    self.ended = true;
                    self.claimed = (!end.sha256.is_empty()).then_some(end.sha256);
                }
                Frame::Header(_) => {
                    return Err(validate::Error::new(
                        "header",
                        "only the first frame may be a header",
                    )
                    .into());
                }
            }
        }
        Ok(None)
    }

    /// Checks how the stream ended; returns the size and the hex SHA-256.
    fn finish(self) -> Result<(u64, String), Error> {
        let size = self.size;
        match self.total_size {
            Some(total) if total != size => {
                return Err(validate::Error::new(
                    "total_size",
                    format!("the header announced {total} bytes but the stream carried {size}"),
                )
                .into());
            }
            None if !self.ended => {
                return Err(validate::Error::new(
                    "end",
                    "the stream closed without an end frame or an announced total_size; nothing was stored",
                )
                .into());
            }
            _ => {}
        }
        let sha256 = hex::encode(self.hasher.finalize());
        match self.claimed {
            Some(claimed) if !claimed.eq_ignore_ascii_case(&sha256) => Err(validate::Error::new(
                "end.sha256",
                format!("the payload's SHA-256 is {sha256}, the end frame says {claimed}"),
            )
            .into()),
            _ => Ok((size, sha256)),
        }
    }
}
