//! Publish-to-delivery latency at a fixed rate with one push subscriber:
//! MiniToolStream's Consume stream against a JetStream push consumer. Each
//! payload carries its send time; the subscriber records its age on arrival
//! and acknowledges it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_proto::pb::consume_request::Request;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::{
    AckSequences, ConsumeRequest, ConsumeStart, ConsumerConfig, CreateOrUpdateConsumerRequest,
    Message, PublishRequest,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::publish::{ManyPublisher, Outcome, ingress_clients, jetstream_stream};
use crate::report::{Latencies, age, failed, stamped, succeeded};

/// Publishes at `rate` per second for `duration`, each publish by `publish`
/// (true when stored); returns how many were stored and how many failed.
async fn paced<F, Fut>(rate: u64, duration: Duration, publish: F) -> (u64, u64)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let stored = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Bounds publishes in flight, so an overloaded system shows as latency.
    let in_flight = Arc::new(Semaphore::new(512));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while started.elapsed() < duration {
        tick.tick().await;
        // Catch up to where the schedule says we should be.
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let permit = Arc::clone(&in_flight)
                .acquire_owned()
                .await
                .expect("the semaphore stays open");
            let call = publish(sent);
            let (stored, failed) = (Arc::clone(&stored), Arc::clone(&failed));
            tokio::spawn(async move {
                if call.await {
                    stored.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
            sent += 1;
        }
    }
    // Let the last publishes finish.
    let _ = in_flight.acquire_many(512).await;
    (
        stored.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    )
}

/// A Consume stream on `durable`: the sender for ack frames, and the messages.
pub async fn consume(
    egress: &str,
    subject: &str,
    durable: &str,
    max_in_flight: u32,
) -> Result<(mpsc::Sender<ConsumeRequest>, tonic::Streaming<Message>), String> {
    let mut client = EgressServiceClient::connect(egress.to_owned())
        .await
        .map_err(|e| format!("{egress}: {e}"))?;
    let (frames, outbound) = mpsc::channel(1024);
    frames
        .send(ConsumeRequest {
            request: Some(Request::Start(ConsumeStart {
                subject: subject.to_owned(),
                durable_name: durable.to_owned(),
                max_in_flight,
                omit_large_payloads: true,
                report_not_held: false,
            })),
        })
        .await
        .map_err(|e| e.to_string())?;
    let messages = client
        .consume(ReceiverStream::new(outbound))
        .await
        .map_err(|e| format!("consume: {e}"))?
        .into_inner();
    Ok((frames, messages))
}

/// Creates durable consumer `durable` on `subject` with `max_ack_pending`.
pub async fn create_consumer(
    egress: &str,
    subject: &str,
    durable: &str,
    max_ack_pending: u32,
) -> Result<(), String> {
    let mut client = EgressServiceClient::connect(egress.to_owned())
        .await
        .map_err(|e| format!("{egress}: {e}"))?;
    client
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.to_owned(),
            durable_name: durable.to_owned(),
            config: Some(ConsumerConfig {
                max_ack_pending: Some(max_ack_pending),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .map_err(|e| format!("CreateOrUpdateConsumer: {e}"))?;
    Ok(())
}

/// An ack frame for one sequence.
pub fn ack(sequence: u64) -> ConsumeRequest {
    acks(vec![sequence])
}

/// An ack frame for `sequences`.
pub fn acks(sequences: Vec<u64>) -> ConsumeRequest {
    ConsumeRequest {
        request: Some(Request::Ack(AckSequences { sequences })),
    }
}

/// Waits until everything stored arrived (or 10 s pass), then stops the
/// subscriber and reports.
async fn finish(
    receiver: tokio::task::JoinHandle<()>,
    received: &AtomicU64,
    latencies: &Mutex<Latencies>,
    (stored, failed): (u64, u64),
    started: Instant,
) -> Result<Outcome, String> {
    settle(received, stored).await;
    let elapsed = started.elapsed();
    if receiver.is_finished() {
        return Err("the subscriber's stream ended early".into());
    }
    receiver.abort();
    let latencies = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    let received = received.load(Ordering::Relaxed);
    Ok(Outcome {
        messages: received,
        errors: failed + stored.saturating_sub(received),
        latencies,
        elapsed,
    })
}

/// Waits until `received` reaches `expected` or 10 s pass.
async fn settle(received: &AtomicU64, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How the MiniToolStream publisher sends.
#[derive(Debug, Clone, Copy)]
pub enum Publish {
    /// One unary Publish call per message.
    Unary,
    /// Every message on one PublishMany stream, each awaiting its answer.
    Many,
}

pub async fn ours(
    ingress: &str,
    egress: &str,
    subject: &str,
    size: usize,
    rate: u64,
    duration: Duration,
    publish: Publish,
) -> Result<Outcome, String> {
    let (frames, mut messages) = consume(egress, subject, "latency", 1000).await?;
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let receiver = tokio::spawn({
        let (received, latencies) = (Arc::clone(&received), Arc::clone(&latencies));
        async move {
            while let Some(Ok(message)) = messages.next().await {
                if let Some(took) = age(&message.data) {
                    latencies.lock().expect("not poisoned").record(took);
                }
                received.fetch_add(1, Ordering::Relaxed);
                if frames.send(ack(message.sequence)).await.is_err() {
                    break;
                }
            }
        }
    });

    let clients = ingress_clients(ingress, 2, 2).await?;
    let stream = match publish {
        Publish::Unary => None,
        Publish::Many => Some(ManyPublisher::open(clients[0].clone()).await?),
    };
    let subject = subject.to_owned();
    let started = Instant::now();
    let (stored, failed) = paced(rate, duration, |n| {
        let request = PublishRequest {
            subject: subject.clone(),
            data: stamped(size),
            headers: Default::default(),
            message_id: String::new(),
            ordering_key: String::new(),
        };
        let published: futures::future::BoxFuture<'static, bool> = match &stream {
            Some(stream) => Box::pin(stream.publish(request)),
            None => {
                let mut client = clients[n as usize % clients.len()].clone();
                Box::pin(async move { succeeded(client.publish(request).await) })
            }
        };
        published
    })
    .await;
    finish(receiver, &received, &latencies, (stored, failed), started).await
}

pub async fn jetstream(
    nats: &str,
    subject: &str,
    size: usize,
    rate: u64,
    duration: Duration,
) -> Result<Outcome, String> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, push};
    let js = jetstream_stream(nats, "BENCH_LATENCY", &format!("{subject}.>")).await?;
    let stream = js
        .get_stream("BENCH_LATENCY")
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(push::Config {
            deliver_subject: format!("{subject}-deliver"),
            durable_name: Some("latency".into()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::New,
            max_ack_pending: 1000,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("push consumer: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let receiver = tokio::spawn({
        let (received, latencies) = (Arc::clone(&received), Arc::clone(&latencies));
        async move {
            while let Some(Ok(message)) = messages.next().await {
                if let Some(took) = age(&message.payload) {
                    latencies.lock().expect("not poisoned").record(took);
                }
                received.fetch_add(1, Ordering::Relaxed);
                let _ = message.ack().await;
            }
        }
    });

    let subject = format!("{subject}.x");
    let started = Instant::now();
    let (stored, failed) = paced(rate, duration, |_| {
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            match js.publish(subject, stamped(size)).await {
                Ok(ack) => succeeded(ack.await),
                Err(err) => failed(err),
            }
        }
    })
    .await;
    finish(receiver, &received, &latencies, (stored, failed), started).await
}
