//! Publish throughput in a closed loop (each worker publishes, waits for the
//! acknowledgement, publishes again) against MiniToolStream, NATS JetStream
//! and the physical references: pipelined calls of the same Tarantool stored
//! procedure, and S3 PutObject against the same S3 server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishFrame, PublishHeader, PublishRequest};
use mts_storage::object_store::ObjectStore;
use mts_storage::store::{InlineMessage, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::report::{Latencies, failed, succeeded};

/// What a closed loop did.
pub struct Outcome {
    pub messages: u64,
    pub errors: u64,
    pub latencies: Latencies,
    pub elapsed: Duration,
}

/// Runs one worker per client until `duration` is over; `call` is one
/// request, true when it succeeded.
pub async fn closed_loop<C, F, Fut>(clients: Vec<C>, duration: Duration, call: F) -> Outcome
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Latencies::default());
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if call(client.clone()).await {
                        latencies.record(sent.elapsed());
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed, latencies)
            })
        })
        .collect();
    let mut outcome = Outcome {
        messages: 0,
        errors: 0,
        latencies: Latencies::default(),
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (ok, failed, latencies) = worker.await.expect("a worker panicked");
        outcome.messages += ok;
        outcome.errors += failed;
        outcome.latencies.add(&latencies);
    }
    outcome.elapsed = started.elapsed();
    outcome
}

/// Ingress clients spread over `connections` HTTP/2 connections.
pub async fn ingress_clients(
    endpoint: &str,
    connections: usize,
    workers: usize,
) -> Result<Vec<IngressServiceClient<Channel>>, String> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            Channel::from_shared(endpoint.to_owned())
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("{endpoint}: {e}"))?,
        );
    }
    Ok((0..workers)
        .map(|i| {
            IngressServiceClient::new(channels[i % channels.len()].clone())
                .max_encoding_message_size(usize::MAX)
        })
        .collect())
}

/// The message every publish scenario sends: `size` bytes, no headers.
fn publish_request(subject: &str, size: usize) -> PublishRequest {
    PublishRequest {
        subject: subject.to_owned(),
        data: Bytes::from(vec![7u8; size]),
        headers: HashMap::new(),
        message_id: String::new(),
        ordering_key: String::new(),
    }
}

/// MiniToolStream unary Publish of `size` bytes.
pub async fn ours(
    ingress: &str,
    subject: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Result<Outcome, String> {
    let clients = ingress_clients(ingress, 4, workers).await?;
    let request = publish_request(subject, size);
    Ok(closed_loop(clients, duration, move |mut client| {
        let request = request.clone();
        async move { succeeded(client.publish(request).await) }
    })
    .await)
}

/// MiniToolStream PublishMany, one stream per worker, each message awaiting
/// its answer before the next is sent (as synchronous as the unary loop).
pub async fn ours_many(
    ingress: &str,
    subject: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Result<Outcome, String> {
    let mut publishers = Vec::new();
    for client in ingress_clients(ingress, 4, workers).await? {
        publishers.push(ManyPublisher::open(client).await?);
    }
    let request = publish_request(subject, size);
    Ok(closed_loop(publishers, duration, move |publisher| {
        publisher.publish(request.clone())
    })
    .await)
}

/// A PublishMany stream any number of publishes share: a request is queued
/// together with the slot its (in-order) answer resolves. Cheap to clone.
#[derive(Clone)]
pub struct ManyPublisher {
    queue: Arc<Mutex<ManyQueue>>,
}

struct ManyQueue {
    requests: mpsc::UnboundedSender<PublishRequest>,
    waiting: VecDeque<oneshot::Sender<bool>>,
}

impl ManyPublisher {
    pub async fn open(mut client: IngressServiceClient<Channel>) -> Result<Self, String> {
        let (requests, outgoing) = mpsc::unbounded_channel();
        let mut answers = client
            .publish_many(UnboundedReceiverStream::new(outgoing))
            .await
            .map_err(|e| format!("PublishMany: {e}"))?
            .into_inner();
        let queue = Arc::new(Mutex::new(ManyQueue {
            requests,
            waiting: VecDeque::new(),
        }));
        tokio::spawn({
            let queue = Arc::clone(&queue);
            async move {
                while let Ok(Some(answer)) = answers.message().await {
                    let slot = queue.lock().expect("not poisoned").waiting.pop_front();
                    if let Some(slot) = slot {
                        let stored = answer.status_code == 0
                            || failed(format!(
                                "PublishMany answered {}: {}",
                                answer.status_code, answer.error_message
                            ));
                        let _ = slot.send(stored);
                    }
                }
                // The stream ended: every publish still waiting failed.
                queue.lock().expect("not poisoned").waiting.clear();
            }
        });
        Ok(Self { queue })
    }

    /// Sends `request`; resolves to whether it was stored.
    pub fn publish(&self, request: PublishRequest) -> impl Future<Output = bool> + Send + use<> {
        let (slot, answer) = oneshot::channel();
        {
            let mut queue = self.queue.lock().expect("not poisoned");
            if queue.requests.send(request).is_ok() {
                queue.waiting.push_back(slot);
            }
        }
        async move { answer.await.unwrap_or(false) }
    }
}

/// MiniToolStream PublishStream of `size` bytes in 1 MiB chunks.
pub async fn ours_streamed(
    ingress: &str,
    subject: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Result<Outcome, String> {
    let clients = ingress_clients(ingress, workers, workers).await?;
    let data = Bytes::from(vec![7u8; size]);
    let subject = subject.to_owned();
    Ok(closed_loop(clients, duration, move |mut client| {
        let header = Frame::Header(PublishHeader {
            subject: subject.clone(),
            headers: HashMap::new(),
            total_size: Some(data.len() as u64),
            message_id: String::new(),
            ordering_key: String::new(),
        });
        let chunks: Vec<Frame> = (0..data.len())
            .step_by(1 << 20)
            .map(|at| Frame::Chunk(data.slice(at..(at + (1 << 20)).min(data.len()))))
            .collect();
        let frames = futures::stream::iter(
            std::iter::once(header)
                .chain(chunks)
                .map(|frame| PublishFrame { frame: Some(frame) }),
        );
        async move { succeeded(client.publish_stream(frames).await) }
    })
    .await)
}

/// The JetStream stream the peer publishes to: file storage, one replica,
/// created afresh.
pub async fn jetstream_stream(
    nats: &str,
    name: &str,
    subjects: &str,
) -> Result<async_nats::jetstream::Context, String> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let client = async_nats::connect(nats)
        .await
        .map_err(|e| format!("NATS at {nats}: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(name).await;
    js.create_stream(Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        storage: StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create stream {name}: {e}"))?;
    Ok(js)
}

/// JetStream synchronous publish: each publish awaits its acknowledgement.
pub async fn jetstream(
    nats: &str,
    subject: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Result<Outcome, String> {
    let js = jetstream_stream(nats, "BENCH_PUBLISH", &format!("{subject}.>")).await?;
    let data = Bytes::from(vec![7u8; size]);
    let subject = format!("{subject}.x");
    Ok(closed_loop(vec![js; workers], duration, move |js| {
        let (subject, data) = (subject.clone(), data.clone());
        async move {
            match js.publish(subject, data).await {
                Ok(ack) => succeeded(ack.await),
                Err(err) => failed(err),
            }
        }
    })
    .await)
}

/// The stored procedure the ingress calls, through the same group commit,
/// straight from this process: the metadata path's ceiling.
pub async fn tarantool(
    store: Store,
    subject: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Outcome {
    let message = InlineMessage {
        subject: subject.to_owned(),
        headers: HashMap::new(),
        data: Bytes::from(vec![7u8; size]),
        sha256: "0".repeat(64),
        message_id: None,
        dedup_window: Duration::ZERO,
    };
    closed_loop(vec![store; workers], duration, move |store| {
        let published = store.publish_inline(message.clone());
        async move { succeeded(published.await) }
    })
    .await
}

/// S3 PutObject of `size` bytes to the same server: the payload path's ceiling.
pub async fn s3(
    object_store: ObjectStore,
    prefix: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Outcome {
    let data = Bytes::from(vec![7u8; size]);
    let prefix = prefix.to_owned();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    closed_loop(vec![object_store; workers], duration, move |object_store| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (key, data) = (format!("{prefix}/{n}"), data.clone());
        async move { succeeded(object_store.put(&key, data).await) }
    })
    .await
}

/// NATS JetStream's Object Store: each publish one `put` of `size` bytes into
/// a fresh bucket (file storage, one replica), which the client cuts into
/// chunk messages.
pub async fn nats_object_store(
    nats: &str,
    size: usize,
    workers: usize,
    duration: Duration,
) -> Result<Outcome, String> {
    let crate::large_payloads::Peer::NatsObjectStore(store) =
        crate::large_payloads::Peer::nats_object_store(nats).await?
    else {
        return Err("not an object store".into());
    };
    let data = Bytes::from(vec![7u8; size]);
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    Ok(closed_loop(vec![store; workers], duration, move |store| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data = data.clone();
        async move {
            let mut reader: &[u8] = &data;
            succeeded(store.put(format!("o{n}").as_str(), &mut reader).await)
        }
    })
    .await)
}
