//! Fan-out: many Subscribe streams on one subject on one egress. A publish
//! every `interval`; for every stream and every message, the time from the
//! publish call to the first notification covering it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::{PublishRequest, SubscribeRequest};
use tonic::transport::Channel;

use crate::publish::{Outcome, ingress_clients};
use crate::report::{Latencies, failed};

/// One stream's notifications: (sequence notified, when), in arrival order.
type Arrivals = Vec<(u64, Instant)>;

/// Streams per HTTP/2 connection; servers commonly allow 100 to 200.
const STREAMS_PER_CONNECTION: usize = 100;

pub async fn ours(
    ingress: &str,
    egress: &str,
    subject: &str,
    streams: usize,
    messages: u64,
    interval: Duration,
) -> Result<Outcome, String> {
    let mut channels = Vec::new();
    for _ in 0..streams.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(
            Channel::from_shared(egress.to_owned())
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("{egress}: {e}"))?,
        );
    }
    let arrivals: Arc<Mutex<Vec<Arrivals>>> = Arc::new(Mutex::new(vec![Vec::new(); streams]));
    let mut opened = Vec::new();
    for i in 0..streams {
        let mut client = EgressServiceClient::new(channels[i % channels.len()].clone());
        let request = SubscribeRequest {
            subject: subject.to_owned(),
            start_sequence: None,
            durable_name: format!("fan-{i}"),
        };
        opened.push(async move { client.subscribe(request).await.map(|r| (i, r.into_inner())) });
    }
    let opened = futures::future::join_all(opened).await;
    let mut readers = Vec::new();
    for stream in opened {
        let (i, mut notifications) = stream.map_err(|e| format!("subscribe: {e}"))?;
        let arrivals = Arc::clone(&arrivals);
        readers.push(tokio::spawn(async move {
            while let Some(Ok(notification)) = notifications.next().await {
                arrivals.lock().expect("not poisoned")[i]
                    .push((notification.sequence, Instant::now()));
            }
        }));
    }

    let mut client = ingress_clients(ingress, 1, 1).await?.remove(0);
    let mut sent_at = HashMap::new();
    let started = Instant::now();
    let mut errors = 0;
    for _ in 0..messages {
        let sent = Instant::now();
        match client
            .publish(PublishRequest {
                subject: subject.to_owned(),
                data: vec![1u8; 64].into(),
                headers: HashMap::new(),
                message_id: String::new(),
                ordering_key: String::new(),
            })
            .await
        {
            Ok(reply) => {
                sent_at.insert(reply.into_inner().sequence, sent);
            }
            Err(err) => {
                failed(err);
                errors += 1;
            }
        }
        tokio::time::sleep(interval).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elapsed = started.elapsed();
    for reader in &readers {
        reader.abort();
    }

    let arrivals = std::mem::take(&mut *arrivals.lock().expect("not poisoned"));
    let mut latencies = Latencies::default();
    let mut delivered = 0u64;
    for stream in &arrivals {
        for (sequence, sent) in &sent_at {
            // The first notification whose last sequence covers this one.
            if let Some((_, at)) = stream.iter().find(|(last, _)| last >= sequence) {
                latencies.record(at.saturating_duration_since(*sent));
                delivered += 1;
            }
        }
    }
    let expected = sent_at.len() as u64 * streams as u64;
    Ok(Outcome {
        messages: delivered,
        errors: errors + expected.saturating_sub(delivered),
        latencies,
        elapsed,
    })
}
