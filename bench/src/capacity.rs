//! Capacity: far more messages than Tarantool's memory holds are published
//! (PublishMany, 64 in flight per stream), Tarantool's resident memory is
//! sampled as they go in, then one consumer replays all of them from
//! sequence 1 and checks every payload. Publishes refused for room (the hot
//! tier full, RESOURCE_EXHAUSTED) are counted and sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::{AckSequencesRequest, FetchRequest, PublishRequest};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use crate::delivery::{acks, consume, create_consumer};
use crate::process::{Services, round};
use crate::publish::ingress_clients;

/// PublishMany streams publishing at once.
const STREAMS: usize = 8;
/// Messages each stream keeps in flight.
const IN_FLIGHT: usize = 64;
/// Messages per Fetch of the replay.
const REPLAY_BATCH: i32 = 1000;

/// Message `id`'s payload of `size` bytes: the id, then bytes derived from it.
fn payload(id: u64, size: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size.max(8))
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(id) as u8)
        .collect();
    data[..8].copy_from_slice(&id.to_le_bytes());
    data
}

fn verified(data: &[u8], size: usize) -> bool {
    data.len() >= 8 && {
        let id = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        data == payload(id, size).as_slice()
    }
}

/// Publishes ids `ids` on one stream; returns how many were refused for
/// room along the way (and sent again).
async fn publish_stream(
    mut client: mts_proto::pb::ingress_service_client::IngressServiceClient<
        tonic::transport::Channel,
    >,
    subject: String,
    size: usize,
    ids: Vec<u64>,
) -> Result<u64, String> {
    let mut refused = 0;
    let mut todo = ids;
    while !todo.is_empty() {
        let (send, receive) = tokio::sync::mpsc::channel(IN_FLIGHT);
        let mut answers = client
            .publish_many(ReceiverStream::new(receive))
            .await
            .map_err(|e| format!("PublishMany: {e}"))?
            .into_inner();
        let sending = {
            let (subject, todo) = (subject.clone(), todo.clone());
            tokio::spawn(async move {
                for id in todo {
                    let request = PublishRequest {
                        subject: subject.clone(),
                        data: payload(id, size).into(),
                        headers: Default::default(),
                        message_id: String::new(),
                        ordering_key: String::new(),
                    };
                    if send.send(request).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut again = Vec::new();
        for id in &todo {
            let answer = answers
                .message()
                .await
                .map_err(|e| format!("PublishMany: {e}"))?
                .ok_or("PublishMany ended early")?;
            match answer.status_code {
                0 => {}
                // RESOURCE_EXHAUSTED: nothing stored; later.
                8 => again.push(*id),
                code => return Err(format!("publish {id}: {code} {}", answer.error_message)),
            }
        }
        let _ = sending.await;
        refused += again.len() as u64;
        if !again.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        todo = again;
    }
    Ok(refused)
}

/// Tarantool's resident memory now, MiB.
fn tarantool_rss(services: &Services) -> f64 {
    services
        .current_rss("tarantool")
        .map_or(0.0, |b| round(b as f64 / (1024.0 * 1024.0), 1))
}

/// Runs the scenario: `messages` of `size` bytes, then the replay.
pub async fn run(
    ingress: &str,
    egress: &str,
    subject: &str,
    size: usize,
    messages: u64,
    services: &Services,
) -> Result<String, String> {
    let clients = ingress_clients(ingress, STREAMS, STREAMS).await?;
    let started = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let published = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (samples, services_rss) = (Arc::clone(&samples), services.rss_reader("tarantool"));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Some(rss) = services_rss() {
                    samples
                        .lock()
                        .expect("not poisoned")
                        .push(round(rss as f64 / (1024.0 * 1024.0), 1));
                }
            }
        })
    };
    let streams = clients.into_iter().enumerate().map(|(i, client)| {
        let ids: Vec<u64> = (1..=messages)
            .filter(|id| id % STREAMS as u64 == i as u64)
            .collect();
        let published = Arc::clone(&published);
        let subject = subject.to_owned();
        async move {
            let n = ids.len() as u64;
            let refused = publish_stream(client, subject, size, ids).await?;
            published.fetch_add(n, Ordering::Relaxed);
            Ok::<_, String>(refused)
        }
    });
    let refused: u64 = futures::future::try_join_all(streams)
        .await?
        .into_iter()
        .sum();
    let publish_seconds = started.elapsed().as_secs_f64();
    sampler.abort();
    let rss_after_publish = tarantool_rss(services);

    // The replays: one consumer from sequence 1 on a Consume stream, then
    // another with Fetch and Ack, as the original clients read.
    let streamed = replay_streaming(egress, subject, size, messages).await?;
    let fetched = replay_fetching(egress, subject, size).await?;
    let samples = samples.lock().expect("not poisoned").clone();
    Ok(json!({
        "scenario": "7-capacity",
        "system": "minitoolstream",
        "config": {"size": size, "messages": messages, "streams": STREAMS},
        "published": published.load(Ordering::Relaxed),
        "refused_and_retried": refused,
        "publish_seconds": round(publish_seconds, 1),
        "publish_msg_per_s": round(messages as f64 / publish_seconds, 0),
        "tarantool_rss_mib_samples": Value::from(samples),
        "tarantool_rss_mib_after": rss_after_publish,
        "replayed": streamed.replayed,
        "replay_errors": streamed.bad + messages.saturating_sub(streamed.replayed),
        "replay_seconds": round(streamed.seconds, 1),
        "replay_msg_per_s": round(streamed.replayed as f64 / streamed.seconds.max(f64::EPSILON), 0),
        "fetch_replayed": fetched.replayed,
        "fetch_replay_errors": fetched.bad + messages.saturating_sub(fetched.replayed),
        "fetch_replay_msg_per_s": round(fetched.replayed as f64 / fetched.seconds.max(f64::EPSILON), 0),
        "verified": streamed.bad == 0 && streamed.replayed == messages
            && fetched.bad == 0 && fetched.replayed == messages,
    })
    .to_string())
}

/// Sequences acknowledged per ack frame of the streamed replay.
const REPLAY_ACK_EVERY: usize = 1000;
/// Messages the streamed replay keeps in flight.
const REPLAY_IN_FLIGHT: u32 = 4000;

/// How a replay went: messages read, how many arrived out of order or with
/// wrong bytes, and how long it took.
struct Replay {
    replayed: u64,
    bad: u64,
    seconds: f64,
}

/// Replays `messages` from sequence 1 as an old-style client does: Fetch a
/// batch, Ack it, Fetch the next.
async fn replay_fetching(egress: &str, subject: &str, size: usize) -> Result<Replay, String> {
    let mut client = EgressServiceClient::connect(egress.to_owned())
        .await
        .map_err(|e| format!("{egress}: {e}"))?
        .max_decoding_message_size(256 << 20);
    let durable = "capacity-replay-fetch";
    let started = Instant::now();
    let (mut replayed, mut bad, mut next) = (0u64, 0u64, 1u64);
    loop {
        let mut stream = client
            .fetch(FetchRequest {
                subject: subject.to_owned(),
                durable_name: durable.into(),
                batch_size: REPLAY_BATCH,
                omit_large_payloads: true,
            })
            .await
            .map_err(|e| format!("Fetch: {e}"))?
            .into_inner();
        let mut sequences = Vec::with_capacity(REPLAY_BATCH as usize);
        while let Some(message) = stream.next().await {
            let message = message.map_err(|e| format!("Fetch: {e}"))?;
            if message.sequence != next || !verified(&message.data, size) {
                bad += 1;
            }
            next = message.sequence + 1;
            sequences.push(message.sequence);
        }
        if sequences.is_empty() {
            break;
        }
        replayed += sequences.len() as u64;
        client
            .ack(AckSequencesRequest {
                subject: subject.to_owned(),
                durable_name: durable.into(),
                sequences,
            })
            .await
            .map_err(|e| format!("Ack: {e}"))?;
    }
    Ok(Replay {
        replayed,
        bad,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Replays `messages` from sequence 1 on one Consume stream, acknowledging
/// in frames of `REPLAY_ACK_EVERY` sequences while the next ones arrive.
async fn replay_streaming(
    egress: &str,
    subject: &str,
    size: usize,
    messages: u64,
) -> Result<Replay, String> {
    let started = Instant::now();
    create_consumer(egress, subject, "capacity-replay", REPLAY_IN_FLIGHT).await?;
    let (frames, mut stream) =
        consume(egress, subject, "capacity-replay", REPLAY_IN_FLIGHT).await?;
    let (mut replayed, mut bad, mut next) = (0u64, 0u64, 1u64);
    let mut sequences = Vec::with_capacity(REPLAY_ACK_EVERY);
    while replayed < messages {
        let message = match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(format!("Consume: {e}")),
            Ok(None) => return Err("Consume: the stream ended".into()),
            Err(_) => break,
        };
        if message.sequence != next || !verified(&message.data, size) {
            bad += 1;
        }
        next = message.sequence + 1;
        replayed += 1;
        sequences.push(message.sequence);
        if sequences.len() == REPLAY_ACK_EVERY || replayed == messages {
            frames
                .send(acks(std::mem::take(&mut sequences)))
                .await
                .map_err(|_| "Consume: the stream ended".to_owned())?;
        }
    }
    Ok(Replay {
        replayed,
        bad,
        seconds: started.elapsed().as_secs_f64(),
    })
}
