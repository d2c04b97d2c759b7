//! FetchPayload: one stored payload streamed in chunks from an offset, with
//! its size and SHA-256 so the client can verify it. An offloaded payload is
//! one ranged read whose body is pulled from the object store only as fast
//! as the client takes chunks, so memory stays bounded whatever the size.

use bytes::{Bytes, BytesMut};
use mts_proto::pb::{FetchPayloadRequest, PayloadChunk};
use mts_runtime::validate;
use mts_storage::object_store;
use tokio::sync::mpsc;
use tonic::Status;

use crate::Error;
use crate::handlers::Egress;

/// Bytes per chunk sent.
const CHUNK: usize = 1024 * 1024;
/// Chunks buffered between the object store and the client.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Checks the request and starts streaming.
pub async fn open(
    egress: &Egress,
    request: FetchPayloadRequest,
) -> Result<mpsc::Receiver<Result<PayloadChunk, Status>>, Error> {
    validate::subject(&request.subject)?;
    if request.sequence == 0 {
        return Err(validate::Error::new("sequence", "must be at least 1").into());
    }
    let mut message = egress
        .store
        .message(&request.subject, request.sequence)
        .await?
        .ok_or_else(|| Error::MessageNotFound {
            subject: request.subject.clone(),
            sequence: request.sequence,
        })?;
    egress.segments.resolve(&mut message).await?;
    if request.offset > message.size {
        return Err(Error::OffsetPastEnd {
            subject: message.subject,
            sequence: message.seq,
            offset: request.offset,
            size: message.size,
        });
    }
    let (total_size, sha256) = (message.size, message.sha256.clone().unwrap_or_default());
    let chunk = move |data: Bytes, offset: u64| PayloadChunk {
        data,
        offset,
        total_size,
        sha256: sha256.clone(),
    };
    let (sender, receiver) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let offset = request.offset;
    match (&message.object_key, message.data) {
        (Some(key), _) if offset < message.size => {
            let body =
                egress
                    .object_store
                    .read_from(key, offset)
                    .await
                    .map_err(|err| match err {
                        object_store::Error::NotFound(_) => Error::MissingPayload {
                            subject: message.subject.clone(),
                            sequence: message.seq,
                            key: key.clone(),
                        },
                        other => Error::ObjectStore(other),
                    })?;
            let timeout = egress.object_store.timeout();
            tokio::spawn(relay(body, offset, total_size, timeout, sender, chunk));
        }
        (_, data) => {
            let data = data.unwrap_or_default();
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let mut pieces: Vec<PayloadChunk> = (start..data.len())
                .step_by(CHUNK)
                .map(|at| chunk(data.slice(at..(at + CHUNK).min(data.len())), at as u64))
                .collect();
            if pieces.is_empty() {
                // Still tell the client the size and digest.
                pieces.push(chunk(Bytes::new(), offset));
            }
            tokio::spawn(async move {
                for piece in pieces {
                    if sender.send(Ok(piece)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    Ok(receiver)
}

/// Regroups the object store's body into chunks of CHUNK bytes. Each wait
/// for the store is bounded by `timeout`; waits for the client are not. A
/// body that ends short of `total_size` ends the stream with DATA_LOSS.
async fn relay(
    mut body: aws_sdk_s3::primitives::ByteStream,
    mut offset: u64,
    total_size: u64,
    timeout: std::time::Duration,
    sender: mpsc::Sender<Result<PayloadChunk, Status>>,
    chunk: impl Fn(Bytes, u64) -> PayloadChunk,
) {
    let mut pending = BytesMut::with_capacity(CHUNK);
    loop {
        let next = match tokio::time::timeout(timeout, body.next()).await {
            Ok(next) => next,
            Err(_) => {
                let status = Status::unavailable(format!(
                    "the object store sent nothing for {timeout:?}; resume at offset {offset}"
                ));
                let _ = sender.send(Err(status)).await;
                return;
            }
        };
        match next {
            Some(Ok(bytes)) => {
                pending.extend_from_slice(&bytes);
                while pending.len() >= CHUNK {
                    let data = pending.split_to(CHUNK).freeze();
                    let len = data.len() as u64;
                    if sender.send(Ok(chunk(data, offset))).await.is_err() {
                        return;
                    }
                    offset += len;
                }
            }
            Some(Err(err)) => {
                let status = Status::unavailable(format!(
                    "reading the payload from the object store failed; resume at offset {offset}: {err}"
                ));
                let _ = sender.send(Err(status)).await;
                return;
            }
            None => {
                let end = offset + pending.len() as u64;
                if !pending.is_empty()
                    && sender
                        .send(Ok(chunk(pending.freeze(), offset)))
                        .await
                        .is_err()
                {
                    return;
                }
                if end < total_size {
                    // A stream that simply ended would pass for the whole
                    // payload with a client that does not check the size.
                    let status = Status::data_loss(format!(
                        "the stored object ends at byte {end} of {total_size}"
                    ));
                    let _ = sender.send(Err(status)).await;
                }
                return;
            }
        }
    }
}
