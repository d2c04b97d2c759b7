//! Competing consumers: a backlog of `total` messages, published first, then
//! drained by `consumers` streams sharing one durable consumer, every message
//! acknowledged. Throughput is of the drain alone; latency is each message's
//! time from the drain's start to its arrival.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_proto::pb::PublishRequest;

use crate::delivery::{ack, consume, create_consumer};
use crate::publish::{Outcome, ingress_clients, jetstream_stream};
use crate::report::Latencies;

/// Messages leased and unacknowledged at once, across the consumers.
const MAX_ACK_PENDING: u32 = 1024;

/// Publishes `total` messages of `size` bytes with 64 publishers.
async fn prefill(ingress: &str, subject: &str, size: usize, total: u64) -> Result<(), String> {
    let clients = ingress_clients(ingress, 4, 64).await?;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers = clients.into_iter().map(|mut client| {
        let (next, subject) = (Arc::clone(&next), subject.to_owned());
        async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                client
                    .publish(PublishRequest {
                        subject: subject.clone(),
                        data: vec![3u8; size].into(),
                        headers: Default::default(),
                        message_id: String::new(),
                        ordering_key: String::new(),
                    })
                    .await
                    .map_err(|e| format!("prefill: {e}"))?;
            }
            Ok::<_, String>(())
        }
    });
    futures::future::try_join_all(workers).await.map(|_| ())
}

/// Waits for the drain to finish (at most 10 minutes), stops the
/// consumers and reports.
async fn drained(
    seen: &Mutex<HashSet<u64>>,
    latencies: &Mutex<Latencies>,
    total: u64,
    started: Instant,
    consumers: &[tokio::task::JoinHandle<()>],
) -> Result<Outcome, String> {
    until_drained(seen, total, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    for consumer in consumers {
        consumer.abort();
    }
    let drained = seen.lock().expect("not poisoned").len() as u64;
    let latencies = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    Ok(Outcome {
        messages: drained,
        errors: total.saturating_sub(drained),
        latencies,
        elapsed,
    })
}

/// Waits until `seen` holds `total` sequences or `limit` passes.
async fn until_drained(seen: &Mutex<HashSet<u64>>, total: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while (seen.lock().expect("not poisoned").len() as u64) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn ours(
    ingress: &str,
    egress: &str,
    subject: &str,
    size: usize,
    total: u64,
    consumers: usize,
) -> Result<Outcome, String> {
    prefill(ingress, subject, size, total).await?;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    // As many leased at once as JetStream's consumer below allows.
    create_consumer(egress, subject, "drain", MAX_ACK_PENDING).await?;
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..consumers {
        let (frames, mut messages) =
            consume(egress, subject, "drain", MAX_ACK_PENDING / consumers as u32).await?;
        let (seen, latencies) = (Arc::clone(&seen), Arc::clone(&latencies));
        streams.push(tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                latencies
                    .lock()
                    .expect("not poisoned")
                    .record(started.elapsed());
                seen.lock().expect("not poisoned").insert(message.sequence);
                if frames.send(ack(message.sequence)).await.is_err() {
                    break;
                }
            }
        }));
    }
    drained(&seen, &latencies, total, started, &streams).await
}

pub async fn jetstream(
    nats: &str,
    subject: &str,
    size: usize,
    total: u64,
    consumers: usize,
) -> Result<Outcome, String> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let js = jetstream_stream(nats, "BENCH_DRAIN", &format!("{subject}.>")).await?;
    let publish_subject = format!("{subject}.x");
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publishers = (0..64).map(|_| {
        let (js, next, subject) = (js.clone(), Arc::clone(&next), publish_subject.clone());
        async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                js.publish(subject.clone(), vec![3u8; size].into())
                    .await
                    .map_err(|e| format!("prefill: {e}"))?
                    .await
                    .map_err(|e| format!("prefill: {e}"))?;
            }
            Ok::<_, String>(())
        }
    });
    futures::future::try_join_all(publishers).await?;

    let stream = js
        .get_stream("BENCH_DRAIN")
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("drain".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: i64::from(MAX_ACK_PENDING),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("pull consumer: {e}"))?;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..consumers {
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let (seen, latencies) = (Arc::clone(&seen), Arc::clone(&latencies));
        workers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                latencies
                    .lock()
                    .expect("not poisoned")
                    .record(started.elapsed());
                if let Ok(info) = message.info() {
                    seen.lock()
                        .expect("not poisoned")
                        .insert(info.stream_sequence);
                }
                let _ = message.ack().await;
            }
        }));
    }
    drained(&seen, &latencies, total, started, &workers).await
}
