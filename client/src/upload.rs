//! Publishing a payload of any size in chunks over `PublishStream`, its
//! SHA-256 computed on the way and checked by the service before it stores
//! anything.

use std::path::Path;

use bytes::Bytes;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishEnd, PublishFrame, PublishHeader, PublishResponse};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::Repeat;
use crate::{Client, Error, Message, Published};

/// Bytes per chunk sent.
const CHUNK: usize = 1024 * 1024;

/// How far an upload or a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all, when known.
    pub total: Option<u64>,
}

/// Why one try of an upload ended without an answer.
enum Failed {
    /// The service's status: tried again when it allows.
    Status(tonic::Status),
    /// The source could not be read, or the client failed: not tried again.
    Local(Error),
}

impl Client {
    /// Publishes the file at `path` as the payload of `message` (whose own
    /// `data` must be empty), streamed in chunks over `PublishStream`: any
    /// size, never held whole in memory. The file's name goes in the header
    /// [`FILE_NAME_HEADER`](crate::FILE_NAME_HEADER) unless the message has
    /// one. `progress` hears of each chunk
    /// sent. The service checks the SHA-256 computed on the way before
    /// storing anything. A try the service could not take, or whose stream
    /// broke, is made again from the start of the file under the same
    /// message id, so the file is stored once.
    pub async fn publish_file(
        &self,
        message: Message,
        path: impl AsRef<Path>,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<Published, Error> {
        let path = path.as_ref();
        let mut message = message;
        if let Some(name) = path.file_name().and_then(|name| name.to_str()) {
            message
                .headers
                .entry(crate::FILE_NAME_HEADER.to_owned())
                .or_insert_with(|| name.to_owned());
        }
        let header = header_of(message)?;
        let message_id = header.message_id.clone();
        let mut attempt = 1;
        loop {
            let io = |doing| {
                move |source| Error::Io {
                    doing,
                    path: path.to_owned(),
                    source,
                }
            };
            let file = tokio::fs::File::open(path).await.map_err(io("opening"))?;
            let size = file.metadata().await.map_err(io("reading"))?.len();
            let header = PublishHeader {
                total_size: Some(size),
                ..header.clone()
            };
            let source = Source::File { file, path };
            let err = match self.upload(header, source, &mut progress).await {
                Ok(reply) => return Ok(Published::from_reply(reply, message_id, attempt)),
                Err(Failed::Local(err)) => return Err(err),
                Err(Failed::Status(status)) => Error::Status {
                    doing: "publish",
                    status,
                },
            };
            if !self.may_try_again(&err, attempt, Repeat::Safe) {
                return Err(err);
            }
            attempt += 1;
            let wait = self.retry.wait(attempt);
            tracing::debug!(%err, attempt, ?wait, "upload not taken; sending it again");
            tokio::time::sleep(wait).await;
        }
    }

    /// Publishes what `reader` gives until its end as the payload of
    /// `message` (whose own `data` must be empty), streamed in chunks over
    /// `PublishStream`. `total_size`, when known, lets the service send the
    /// payload to the object store in one request as it arrives; a reader
    /// that gives a different number of bytes stores nothing. A reader can
    /// be read once, so a failed upload is not tried again here: its error
    /// says whether publishing again (with the same message id) may succeed.
    pub async fn publish_stream(
        &self,
        message: Message,
        reader: impl AsyncRead + Unpin + Send,
        total_size: Option<u64>,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<Published, Error> {
        let header = PublishHeader {
            total_size,
            ..header_of(message)?
        };
        let message_id = header.message_id.clone();
        match self
            .upload(header, Source::Reader(Box::new(reader)), &mut progress)
            .await
        {
            Ok(reply) => Ok(Published::from_reply(reply, message_id, 1)),
            Err(Failed::Local(err)) => Err(err),
            Err(Failed::Status(status)) => Err(Error::Status {
                doing: "publish",
                status,
            }),
        }
    }

    /// One try: the header, the chunks as they are read, the digest.
    async fn upload(
        &self,
        header: PublishHeader,
        mut source: Source<'_>,
        progress: &mut (impl FnMut(Progress) + Send),
    ) -> Result<PublishResponse, Failed> {
        let total = header.total_size;
        let (frames, outgoing) = mpsc::channel::<PublishFrame>(4);
        let frame = |frame| PublishFrame { frame: Some(frame) };
        // The channel has room for it before the call starts.
        let _ = frames.try_send(frame(Frame::Header(header)));
        let request = self
            .stream_request(ReceiverStream::new(outgoing))
            .await
            .map_err(Failed::Local)?;
        let mut ingress = IngressServiceClient::new(self.ingress.clone());
        let mut call = Box::pin(ingress.publish_stream(request));
        // Owns the stream's sender: the stream closes when it is done. A
        // source that fails hands the sender back, so that the call is
        // reset before the stream could close as if complete.
        let feed = async move {
            let mut hasher = Sha256::new();
            let mut done = 0;
            progress(Progress { done, total });
            loop {
                let chunk = match source.read_chunk().await {
                    Ok(chunk) if chunk.is_empty() => break,
                    Ok(chunk) => chunk,
                    Err(err) => return Err((err, frames)),
                };
                hasher.update(&chunk);
                done += chunk.len() as u64;
                if frames.send(frame(Frame::Chunk(chunk))).await.is_err() {
                    // The call ended early; its answer says why.
                    return Ok(());
                }
                progress(Progress { done, total });
            }
            let end = Frame::End(PublishEnd {
                sha256: hex::encode(hasher.finalize()),
            });
            let _ = frames.send(frame(end)).await;
            Ok(())
        };
        tokio::pin!(feed);
        let fed = tokio::select! {
            // Answered (or refused) before the source ended: stop reading.
            reply = &mut call => {
                return reply.map(tonic::Response::into_inner).map_err(Failed::Status);
            }
            fed = &mut feed => fed,
        };
        match fed {
            Ok(()) => call
                .await
                .map(tonic::Response::into_inner)
                .map_err(Failed::Status),
            Err((err, frames)) => {
                // Reset first: nothing is stored, even when the bytes sent
                // were all the header announced.
                drop(call);
                drop(frames);
                Err(Failed::Local(err))
            }
        }
    }
}

/// The stream's header for `message`, under its message id or a new one.
fn header_of(message: Message) -> Result<PublishHeader, Error> {
    if !message.data.is_empty() {
        return Err(Error::Config(
            "a streamed message takes its payload from the file or reader; its data must be empty"
                .into(),
        ));
    }
    let request = message.into_request();
    Ok(PublishHeader {
        subject: request.subject,
        headers: request.headers,
        total_size: None,
        message_id: request.message_id,
        ordering_key: request.ordering_key,
    })
}

/// Where an upload's bytes come from.
enum Source<'a> {
    File {
        file: tokio::fs::File,
        path: &'a Path,
    },
    Reader(Box<dyn AsyncRead + Unpin + Send + 'a>),
}

impl Source<'_> {
    /// The next chunk: what one read gives, up to CHUNK bytes (a file fills
    /// it; a slow reader's bytes go out as they come, so the service never
    /// waits on a half-filled chunk); empty at its end.
    async fn read_chunk(&mut self) -> Result<Bytes, Error> {
        let mut buffer = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            let read = match self {
                Self::File { file, .. } => file.read(&mut buffer[filled..]).await,
                Self::Reader(_) if filled > 0 => break,
                Self::Reader(reader) => reader.read(&mut buffer[filled..]).await,
            };
            let read = read.map_err(|source| Error::Io {
                doing: "reading",
                path: match self {
                    Self::File { path, .. } => path.to_path_buf(),
                    Self::Reader(_) => "the reader".into(),
                },
                source,
            })?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        buffer.truncate(filled);
        Ok(Bytes::from(buffer))
    }
}
