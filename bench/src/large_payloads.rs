//! Large payloads end to end: N concurrent transfers of M MiB, each streamed
//! in with PublishStream and back out with FetchPayload, verified by SHA-256.

use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{FetchPayloadRequest, PublishFrame, PublishHeader};
use sha2::{Digest, Sha256};

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

pub async fn run(
    ingress: &str,
    egress: &str,
    mib: u64,
    concurrency: usize,
    services: &Services,
) -> Result<String, String> {
    let blocks = usize::try_from(mib).map_err(|e| e.to_string())?;
    let subject = format!("bench.large.{}", std::process::id());
    let ingress_client = IngressServiceClient::connect(ingress.to_owned())
        .await
        .map_err(|e| e.to_string())?;
    let egress_client = EgressServiceClient::connect(egress.to_owned())
        .await
        .map_err(|e| e.to_string())?;
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
    let publishes = digests.into_iter().enumerate().map(|(t, expected)| {
        let mut client = ingress_client.clone();
        let subject = subject.clone();
        async move {
            let frames = futures::stream::iter(
                std::iter::once(Frame::Header(PublishHeader {
                    subject,
                    headers: Default::default(),
                    total_size: Some((blocks * MIB) as u64),
                    message_id: String::new(),
                    ordering_key: String::new(),
                }))
                .chain((0..blocks).map(move |k| Frame::Chunk(block(t, k))))
                .map(|frame| PublishFrame { frame: Some(frame) }),
            );
            let reply = client
                .publish_stream(frames)
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            if reply.sha256 != expected {
                return Err(format!(
                    "transfer {t}: server digest {} != {expected}",
                    reply.sha256
                ));
            }
            Ok::<_, String>((reply.sequence, expected))
        }
    });
    let stored = futures::future::try_join_all(publishes).await?;
    let publish_seconds = started.elapsed().as_secs_f64();
    let publish_usage = services.figures_since(&before_publish);

    services.reset_peaks();
    let before_download = services.usage();
    let started = Instant::now();
    let downloads = stored.into_iter().map(|(sequence, expected)| {
        let mut client = egress_client.clone();
        let subject = subject.clone();
        async move {
            let mut chunks = client
                .fetch_payload(FetchPayloadRequest { subject, sequence, offset: 0 })
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            let mut hasher = Sha256::new();
            let mut size = 0usize;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|s| s.to_string())?;
                size += chunk.data.len();
                hasher.update(&chunk.data);
            }
            let got = hex::encode(hasher.finalize());
            if got != expected || size != blocks * MIB {
                return Err(format!("sequence {sequence}: downloaded {size} bytes with digest {got}, expected {expected}"));
            }
            Ok::<_, String>(())
        }
    });
    futures::future::try_join_all(downloads).await?;
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
        "payload_mib": blocks,
        "concurrency": concurrency,
        "publish": phase(publish_seconds, publish_usage),
        "download": phase(download_seconds, download_usage),
        "verified": true,
    })
    .to_string())
}
