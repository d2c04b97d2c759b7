//! PublishStream: a payload of any size arrives in chunks and goes to the
//! object store as a multipart upload, one part at a time, hashed on the
//! way. Memory holds at most one part. Anything that goes wrong before the
//! commit — the client leaving, a bad frame, a size or digest mismatch —
//! aborts the upload, and nothing is stored. Completion must be explicit (an
//! end frame, or the announced total size): a client that is cancelled can
//! close its side of the stream as cleanly as one that finished.

use std::time::Duration;

use bytes::BytesMut;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishFrame, PublishResponse};
use mts_shared::auth::{Caller, Permission};
use mts_shared::blob::Upload;
use mts_shared::store::{Payload, Published};
use mts_shared::validate;
use sha2::{Digest, Sha256};
use tonic::Streaming;

use crate::Error;
use crate::service::{Envelope, Ingress, reply, with_trace};

/// A client that sends nothing for this long has gone away.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// Receives a streamed publish and stores it.
pub async fn publish(
    ingress: &Ingress,
    caller: Caller,
    trace: Vec<(String, String)>,
    mut frames: Streaming<PublishFrame>,
) -> Result<PublishResponse, Error> {
    let header = match next_frame(&mut frames).await? {
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
    let envelope = Envelope::checked(header.subject, header.headers, header.message_id)?;
    let _slot = ingress
        .uploads
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::Busy {
            limit: ingress.max_uploads,
        })?;
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
    let key = envelope.object_key();
    let mut receiver = Receiver {
        ingress,
        key: &key,
        part: BytesMut::with_capacity(ingress.part_size),
        hasher: Sha256::new(),
        size: 0,
        upload: None,
    };
    let received = receiver.receive(&mut frames, header.total_size).await;
    let Receiver {
        part,
        hasher,
        size,
        upload,
        ..
    } = receiver;
    let sha256 = hex::encode(hasher.finalize());
    let received = received.and_then(|claimed| match claimed {
        Some(claimed) if !claimed.eq_ignore_ascii_case(&sha256) => Err(validate::Error::new(
            "end.sha256",
            format!("the payload's SHA-256 is {sha256}, the end frame says {claimed}"),
        )
        .into()),
        _ => Ok(()),
    });
    if let Err(err) = received {
        if let Some(upload) = upload
            && let Err(abort) = upload.abort().await
        {
            tracing::warn!(object = %key, %abort, "could not abort a failed upload");
        }
        return Err(err);
    }
    let published = match upload {
        None if size <= ingress.inline_threshold => {
            let published = ingress
                .commit(&envelope, Payload::Inline(&part), size, &sha256)
                .await?;
            return Ok(reply(published, String::new(), size, sha256));
        }
        None => {
            ingress
                .blobs
                .put(&key, part.freeze())
                .await
                .map_err(Error::Upload)?;
            ingress
                .commit_object(&envelope, key.clone(), size, &sha256)
                .await?
        }
        Some(mut upload) => {
            let finished = async {
                if !part.is_empty() {
                    upload.put_part(part.freeze()).await?;
                }
                upload.complete().await
            };
            finished.await.map_err(Error::Upload)?;
            ingress
                .commit_object(&envelope, key.clone(), size, &sha256)
                .await?
        }
    };
    let object_name = if published.duplicate {
        String::new()
    } else {
        key
    };
    Ok(reply(published, object_name, size, sha256))
}

async fn next_frame(frames: &mut Streaming<PublishFrame>) -> Result<Option<Frame>, Error> {
    loop {
        match tokio::time::timeout(IDLE_LIMIT, frames.message()).await {
            Err(_) => return Err(Error::Idle(IDLE_LIMIT)),
            Ok(Err(status)) => return Err(Error::ClientGone(status)),
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(PublishFrame { frame: Some(frame) }))) => return Ok(Some(frame)),
            Ok(Ok(Some(PublishFrame { frame: None }))) => {}
        }
    }
}

struct Receiver<'a> {
    ingress: &'a Ingress,
    key: &'a str,
    part: BytesMut,
    hasher: Sha256,
    size: u64,
    upload: Option<Upload>,
}

impl Receiver<'_> {
    /// Takes chunks, sending each full part, until the end frame (whose
    /// claimed digest it returns) or, with an announced size, the stream's end.
    async fn receive(
        &mut self,
        frames: &mut Streaming<PublishFrame>,
        total_size: Option<u64>,
    ) -> Result<Option<String>, Error> {
        let mut claimed = None;
        let mut ended = false;
        while let Some(frame) = next_frame(frames).await? {
            if ended {
                return Err(
                    validate::Error::new("end", "no frame may follow the end frame").into(),
                );
            }
            match frame {
                Frame::Chunk(chunk) => self.take(&chunk, total_size).await?,
                Frame::End(end) => {
                    ended = true;
                    claimed = (!end.sha256.is_empty()).then_some(end.sha256);
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
        match total_size {
            Some(total) if total != self.size => Err(validate::Error::new(
                "total_size",
                format!("the header announced {total} bytes but the stream carried {}", self.size),
            )
            .into()),
            None if !ended => Err(validate::Error::new(
                "end",
                "the stream closed without an end frame or an announced total_size; nothing was stored",
            )
            .into()),
            _ => Ok(claimed),
        }
    }

    /// Hashes a chunk and sends every part it completes.
    async fn take(&mut self, chunk: &[u8], total_size: Option<u64>) -> Result<(), Error> {
        self.size += chunk.len() as u64;
        if let Some(total) = total_size.filter(|total| self.size > *total) {
            return Err(validate::Error::new(
                "chunk",
                format!("the stream carries more than the {total} bytes its header announced"),
            )
            .into());
        }
        self.hasher.update(chunk);
        self.part.extend_from_slice(chunk);
        let part_size = self.ingress.part_size;
        while self.part.len() >= part_size {
            let full = self.part.split_to(part_size).freeze();
            let upload = match self.upload.as_mut() {
                Some(upload) => upload,
                None => self.upload.insert(
                    self.ingress
                        .blobs
                        .start_upload(self.key)
                        .await
                        .map_err(Error::Upload)?,
                ),
            };
            upload.put_part(full).await.map_err(Error::Upload)?;
            self.part.reserve(part_size);
        }
        Ok(())
    }
}
