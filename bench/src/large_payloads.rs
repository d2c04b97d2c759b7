//! Large payloads end to end: N concurrent transfers of M MiB, each streamed
//! in and back out, verified by SHA-256 — through MiniToolStream
//! (PublishStream, FetchPayload), NATS JetStream's Object Store, or straight
//! to the S3 server (streamed PutObject, ranged GetObject).

use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{FetchPayloadRequest, PublishFrame, PublishHeader};
use mts_storage::object_store::{ObjectStore, StreamedBody};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::process::{Services, round};

const MIB: usize = 1024 * 1024;

/// Block `k` of transfer `t`: 1 MiB that differs from every other block.
fn block(t: usize, k: usize) -> Bytes {
    let mut data = vec![0u8; MIB];
    let mut state = (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k as u64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    Bytes::from(data)
}

/// Where the payloads go. (Made once per run: its size does not matter.)
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Peer {
    /// MiniToolStream's ingress and egress.
    Ours {
        ingress: IngressServiceClient<tonic::transport::Channel>,
        egress: EgressServiceClient<tonic::transport::Channel>,
        subject: String,
    },
    /// A NATS JetStream Object Store bucket (file storage, one replica).
    NatsObjectStore(async_nats::jetstream::object_store::ObjectStore),
    /// The S3 server, straight.
    S3(ObjectStore),
}

impl Peer {
    pub async fn ours(ingress: &str, egress: &str) -> Result<Self, String> {
        Ok(Self::Ours {
            ingress: IngressServiceClient::connect(ingress.to_owned())
                .await
                .map_err(|e| e.to_string())?,
            egress: EgressServiceClient::connect(egress.to_owned())
                .await
                .map_err(|e| e.to_string())?,
            subject: format!("bench.large.{}", std::process::id()),
        })
    }

    /// A fresh Object Store bucket on the NATS server at `nats`.
    pub async fn nats_object_store(nats: &str) -> Result<Self, String> {
        let client = async_nats::connect(nats)
            .await
            .map_err(|e| format!("NATS at {nats}: {e}"))?;
        let js = async_nats::jetstream::new(client);
        let bucket = format!("bench-large-{}", std::process::id());
        let _ = js.delete_object_store(&bucket).await;
        let store = js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket,
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating the object store: {e}"))?;
        Ok(Self::NatsObjectStore(store))
    }

    /// Stores transfer `t` (`blocks` MiB); returns where it is.
    async fn put(&self, t: usize, blocks: usize) -> Result<String, String> {
        let size = (blocks * MIB) as u64;
        match self {
            Self::Ours {
                ingress, subject, ..
            } => {
                let frames = futures::stream::iter(
                    std::iter::once(Frame::Header(PublishHeader {
                        subject: subject.clone(),
                        headers: Default::default(),
                        total_size: Some(size),
                        message_id: String::new(),
                        ordering_key: String::new(),
                    }))
                    .chain((0..blocks).map(move |k| Frame::Chunk(block(t, k))))
                    .map(|frame| PublishFrame { frame: Some(frame) }),
                );
                let reply = ingress
                    .clone()
                    .publish_stream(frames)
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner();
                Ok(reply.sequence.to_string())
            }
            Self::NatsObjectStore(store) => {
                let name = format!("transfer-{t}");
                let mut reader = BlockReader::new(t, blocks);
                store
                    .put(name.as_str(), &mut reader)
                    .await
                    .map_err(|e| format!("object store put: {e}"))?;
                Ok(name)
            }
            Self::S3(store) => {
                let key = format!("bench/large/{}/{t}", std::process::id());
                let (sender, body) = StreamedBody::channel(size);
                let feed = async move {
                    for k in 0..blocks {
                        if sender.send(block(t, k)).await.is_err() {
                            break;
                        }
                    }
                };
                let (stored, ()) = tokio::join!(store.put_streamed(&key, body, size), feed);
                stored.map_err(|e| e.to_string())?;
                Ok(key)
            }
        }
    }

    /// Reads back what `put` stored at `at`: its size and SHA-256.
    async fn get(&self, at: &str) -> Result<(usize, String), String> {
        let mut hasher = Sha256::new();
        let mut size = 0usize;
        match self {
            Self::Ours {
                egress, subject, ..
            } => {
                let sequence = at.parse().map_err(|e| format!("{at}: {e}"))?;
                let mut chunks = egress
                    .clone()
                    .fetch_payload(FetchPayloadRequest {
                        subject: subject.clone(),
                        sequence,
                        offset: 0,
                    })
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner();
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk.map_err(|s| s.to_string())?;
                    size += chunk.data.len();
                    hasher.update(&chunk.data);
                }
            }
            Self::NatsObjectStore(store) => {
                let mut object = store
                    .get(at)
                    .await
                    .map_err(|e| format!("object store get: {e}"))?;
                let mut buffer = vec![0u8; MIB];
                loop {
                    let n = object
                        .read(&mut buffer)
                        .await
                        .map_err(|e| format!("object store read: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    size += n;
                    hasher.update(&buffer[..n]);
                }
            }
            Self::S3(store) => {
                let mut body = store.read_from(at, 0).await.map_err(|e| e.to_string())?;
                while let Some(bytes) = body.next().await {
                    let bytes = bytes.map_err(|e| e.to_string())?;
                    size += bytes.len();
                    hasher.update(&bytes);
                }
            }
        }
        Ok((size, hex::encode(hasher.finalize())))
    }
}

/// Transfer `t`'s blocks as a reader, made as they are read.
struct BlockReader {
    t: usize,
    blocks: usize,
    next: usize,
    current: Bytes,
}

impl BlockReader {
    fn new(t: usize, blocks: usize) -> Self {
        Self {
            t,
            blocks,
            next: 0,
            current: Bytes::new(),
        }
    }
}

impl tokio::io::AsyncRead for BlockReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.current.is_empty() && self.next < self.blocks {
            let (t, k) = (self.t, self.next);
            self.current = block(t, k);
            self.next += 1;
        }
        let n = self.current.len().min(buf.remaining());
        let taken = self.current.split_to(n);
        buf.put_slice(&taken);
        std::task::Poll::Ready(Ok(()))
    }
}

pub async fn run(
    peer: Peer,
    system: &str,
    mib: u64,
    concurrency: usize,
    services: &Services,
) -> Result<String, String> {
    let blocks = usize::try_from(mib).map_err(|e| e.to_string())?;
    // Digests first, so hashing is not counted as transfer time.
    let digests = futures::future::try_join_all((0..concurrency).map(|t| {
        tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            for k in 0..blocks {
                hasher.update(block(t, k));
            }
            hex::encode(hasher.finalize())
        })
    }))
    .await
    .map_err(|e| e.to_string())?;
    services.reset_peaks();
    let before_publish = services.usage();
    let started = Instant::now();
    let puts = digests.into_iter().enumerate().map(|(t, expected)| {
        let peer = peer.clone();
        async move { Ok::<_, String>((peer.put(t, blocks).await?, expected)) }
    });
    let stored = futures::future::try_join_all(puts).await?;
    let publish_seconds = started.elapsed().as_secs_f64();
    let publish_usage = services.figures_since(&before_publish);

    services.reset_peaks();
    let before_download = services.usage();
    let started = Instant::now();
    let gets = stored.into_iter().map(|(at, expected)| {
        let peer = peer.clone();
        async move {
            let (size, got) = peer.get(&at).await?;
            if got != expected || size != blocks * MIB {
                return Err(format!(
                    "{at}: read back {size} bytes with digest {got}, expected {expected}"
                ));
            }
            Ok::<_, String>(())
        }
    });
    futures::future::try_join_all(gets).await?;
    let download_seconds = started.elapsed().as_secs_f64();
    let download_usage = services.figures_since(&before_download);

    let total_mib = (blocks * concurrency) as f64;
    let phase = |seconds: f64, processes: serde_json::Value| {
        serde_json::json!({
            "seconds": round(seconds, 2),
            "mib_per_s": round(total_mib / seconds, 1),
            "processes": processes,
        })
    };
    Ok(serde_json::json!({
        "scenario": "5-large-payloads",
        "system": system,
        "payload_mib": blocks,
        "concurrency": concurrency,
        "publish": phase(publish_seconds, publish_usage),
        "download": phase(download_seconds, download_usage),
        "verified": true,
    })
    .to_string())
}
